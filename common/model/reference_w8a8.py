"""The reference ops in W8A8 mode: the oracle for the integer path of chips without FP8 GEMMs (Ascend 910B / 910C).

ReferenceW8A8Ops converts every FP8/FP4 checkpoint weight exactly as the Ascend backend does on those chips
(common/model/quant.py, the math ascend/convert.py also calls) and runs the GEMMs in torch with the documented
arithmetic of the fused ops:
- dense GEMMs (and, on 910C, every expert GEMM): per-output-channel int8 weights, per-token int8 activations
  (npu_dynamic_quant's scale = rowMax|x| / 127), integer products, then weight scale x token scale;
- 910B expert GEMMs: int4 weights per (32 inputs, output channel), weight-only: activations stay in the activation
  dtype and the dequantised weight is rounded to it (npu_grouped_matmul's antiquant form).
So a W8A8 backend is judged against the same integer weights (tight bounds: configs/parity.yaml
reference-ascend_w8a8), while the FP8-vs-W8A8 accuracy cost stays a separate measurement (reference-ascend_requantized).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from dsv4.common.model.ops import LinearWeight
from dsv4.common.model.quant import dequant_weight, quantize_int4_groups, quantize_int8_per_token, quantize_int8_rows
from dsv4.common.model.reference import ReferenceOps

INT4_GROUP = 32  # the FP4 checkpoint's own 1x32 scale granularity (ascend/convert.py to_w4a8's default)
W8A8_CHIPS = ("910b", "910c")


class ReferenceW8A8Ops(ReferenceOps):
    """ReferenceOps whose quantised GEMMs run the integer weights `chip` converts to (910b: int8 dense + int4
    experts; 910c: int8 everywhere). Unquantised weights (fmt "none") run as in the reference."""

    name = "reference"

    def __init__(self, device: str | torch.device = "cpu", chip: str = "910b") -> None:
        super().__init__(device)
        if chip not in W8A8_CHIPS:
            raise ValueError(f"the reference W8A8 mode follows {' / '.join(W8A8_CHIPS)}, got chip {chip!r}")
        self.chip = chip
        self._cache: dict[tuple[int, bool], tuple[weakref.ref, LinearWeight]] = {}

    def converted(self, w: LinearWeight, expert: bool = False) -> LinearWeight:
        """The chip's integer form of an FP8/FP4 weight, as LinearWeight("int8": q [..., out, in] + scale [..., out];
        "int4": q [..., in, out] + scale [..., in/32, out]), integral fp32 values. Cached per weight tensor."""
        if w.fmt not in ("fp8", "fp4"):
            return w
        key = (id(w.weight), expert)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is w.weight:
            return hit[1]
        wf = dequant_weight(w.weight, w.scale, w.fmt)
        if expert and self.chip == "910b":
            q, s = quantize_int4_groups(wf.transpose(-1, -2), INT4_GROUP)
            out = LinearWeight(q, s, "int4")
        else:
            q, s = quantize_int8_rows(wf)
            out = LinearWeight(q, s, "int8")
        self._cache[key] = (weakref.ref(w.weight), out)
        return out

    def linear(self, x: Tensor, w: LinearWeight) -> Tensor:
        w = self.converted(w)
        if w.fmt == "int8":
            # integer products are exact in fp64 (the int32 accumulator), then weight scale, then token scale
            lead, K = x.shape[:-1], x.shape[-1]
            xq, xs = quantize_int8_per_token(x.reshape(-1, K))
            y = (xq.double() @ w.weight.double().t()) * w.scale.double()
            y = (y * xs.double().unsqueeze(-1)).float()
            return y.reshape(*lead, -1).to(x.dtype)
        if w.fmt == "int4":
            # weight-only: the dequantised weight (scale in the activation dtype) rounded to x's dtype, fp32 products
            G = w.weight.shape[-2] // w.scale.shape[-2]
            s = w.scale.to(x.dtype).float().repeat_interleave(G, dim=-2)
            wd = (w.weight * s).to(x.dtype).float()  # [in, out]
            return (x.float() @ wd).to(x.dtype)
        return super().linear(x, w)

    def moe_experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: LinearWeight, w2: LinearWeight,
                    w3: LinearWeight, swiglu_limit: float, expert_offset: int = 0,
                    n_experts: int | None = None) -> Tensor:
        w1, w2, w3 = (self.converted(w, expert=True) for w in (w1, w2, w3))
        return super().moe_experts(x, weights, ids, w1, w2, w3, swiglu_limit, expert_offset, n_experts)

