"""`CudaOps`: the ops interface on Triton kernels (cuda/kernels/).

Triton kernels: rms_norm, head_rms_norm, rope (forward and inverse), swiglu, linear (one grouped GEMM kernel for
unquantised, FP8 block-scaled and packed-FP4 weights), sparse_attention (online softmax with the sink, gathered
rows), compress_pool, indexer_topk's scores, moe_experts (grouped w1/w3 GEMM with fused clamped SwiGLU and route
weight, grouped w2 GEMM, gather-combine), hc_pre / hc_head (mixing GEMM + sigmoid/Sinkhorn epilogue), hc_post.

Named fallbacks (torch, in this process):
- fp8_sim, fp4_sim: torch quant-dequant (ReferenceOps); casts to fp8 inside interpreted kernels are wrong on a few
  percent of elements, and these run on small tensors (the KV rows, the indexer keys/queries).
- the FP8 activation quantisation before the FP8/FP4 GEMMs (`kernels.gemm.quant_act`), for the same reason.
- hadamard: torch matmul with the Sylvester matrix (ReferenceOps): a dense [n, n] product, n = 128.
- indexer_topk's selection: the shared stable sort (common.ops.topk_visible) over the kernel's scores.
- moe_gate: torch ([T, E] logits, scoring, topk: tiny next to the experts).
- moe_experts' permutation bookkeeping: torch argsort/bincount/cumsum (the sorted gather is fused into the GEMM).
- all_reduce / all_gather: inherited identities (the distributed layer overrides them).

head_rms_norm computes in fp32 and rounds once (the reference computes in q.dtype): identical for fp32,
within 1 bf16 ulp for bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsv4.common.model.ops import OP_NAMES, LinearWeight, Ops
from dsv4.common.model.reference import ReferenceOps

from .kernels import attention, gemm, hc, indexer, moe, rows
from .kernels._common import interpreting

_TRITON = "Triton kernel"
DESCRIPTION: dict[str, str] = {
    "rms_norm": _TRITON,
    "head_rms_norm": f"{_TRITON} (fp32 math, rounded once)",
    "rope": _TRITON,
    "fp8_sim": "torch fallback (fp8 casts in interpreted kernels are unreliable)",
    "fp4_sim": "torch fallback (reference quant-dequant)",
    "hadamard": "torch fallback (matmul with the Sylvester matrix)",
    "linear": f"{_TRITON}: grouped GEMM, FP8 128x128 / FP4 1x32 block scales; activation FP8 quantised in torch",
    "linears": "one Triton linear per weight (the Ops default)",
    "grouped_linear": "torch fallback (one bmm over the groups: the Ops default; wo_a is dense)",
    "sparse_attention": f"{_TRITON}: gathered rows, online softmax with sink",
    "compress_pool": _TRITON,
    "indexer_topk": f"{_TRITON} scores + stable-sort selection fallback (common.ops.topk_visible)",
    "moe_gate": "torch fallback ([T,E] router)",
    "swiglu": _TRITON,
    "moe_experts": f"{_TRITON}s: grouped GEMM + fused SwiGLU, grouped w2, combine; torch argsort permutation",
    "hc_pre": f"{_TRITON}s: mixing GEMM + Sinkhorn epilogue",
    "hc_post": _TRITON,
    "hc_head": f"{_TRITON}s: mixing GEMM + sigmoid epilogue",
}


class CudaOps(Ops):
    name = "cuda"

    def __init__(self, device: str | torch.device = "cuda") -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu" and not interpreting():
            raise RuntimeError("CudaOps on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1)")
        self._ref = ReferenceOps(self.device)

    # -- normalisation ------------------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return rows.rms_norm(x, weight.float(), eps)

    def head_rms_norm(self, q: Tensor, eps: float) -> Tensor:
        return rows.rms_norm(q, None, eps)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, out: Tensor | None = None) -> Tensor:
        y = rows.rope(x, cos, sin, inverse)
        return y if out is None else out.copy_(y)

    # -- quantisation simulation and Hadamard: named torch fallbacks --------------------------------------------------
    def fp8_sim(self, x: Tensor, block: int, mode: str = "e4m3") -> Tensor:
        return self._ref.fp8_sim(x, block, mode)

    def fp4_sim(self, x: Tensor, block: int) -> Tensor:
        return self._ref.fp4_sim(x, block)

    def hadamard(self, x: Tensor) -> Tensor:
        return self._ref.hadamard(x)

    # -- linear / attention -------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, w: LinearWeight) -> Tensor:
        return gemm.linear(x, w.weight, w.scale, w.fmt)

    def sparse_attention(self, q: Tensor, kv: Tensor, sink: Tensor, indices: Tensor, softmax_scale: float) -> Tensor:
        return attention.sparse_attention(q, kv, sink, indices, softmax_scale)

    def compress_pool(self, kv: Tensor, score: Tensor) -> Tensor:
        return attention.compress_pool(kv, score)

    def indexer_topk(self, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int) -> Tensor:
        return indexer.indexer_topk(q, k, weights, visible, topk)

    # -- MoE ----------------------------------------------------------------------------------------------------------
    def moe_gate(self, x: Tensor, weight: Tensor, bias: Tensor | None, tid2eid: Tensor | None,
                 token_ids: Tensor | None, topk: int, score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
        return self._ref.moe_gate(x, weight, bias, tid2eid, token_ids, topk, score_func, route_scale)

    def swiglu(self, gate: Tensor, up: Tensor, limit: float) -> Tensor:
        return rows.swiglu(gate, up, limit)

    def moe_experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: LinearWeight, w2: LinearWeight,
                    w3: LinearWeight, swiglu_limit: float, expert_offset: int = 0,
                    n_experts: int | None = None) -> Tensor:
        return moe.moe_experts(x, weights, ids, tuple(w1), tuple(w2), tuple(w3), swiglu_limit, expert_offset)

    # -- hyper-connections --------------------------------------------------------------------------------------------
    def hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float,
               norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return hc.hc_pre(x, fn, scale, base, iters, hc_eps, norm_eps)

    def hc_post(self, x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        return hc.hc_post(x, residual, post, comb)

    def hc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_eps: float, norm_eps: float) -> Tensor:
        return hc.hc_pre(x, fn, scale, base, 0, hc_eps, norm_eps, head=True)[0]

    def describe(self) -> dict[str, str]:
        where = "interpreter (CPU)" if self.device.type == "cpu" else str(self.device)
        return {op: f"{DESCRIPTION[op]} [{where}]" for op in OP_NAMES}
