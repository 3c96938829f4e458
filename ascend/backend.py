"""AscendOps: the ops interface on Ascend NPUs through torch_npu's fused operators.

`self.npu` is the real `torch_npu` module on hardware, or the CPU emulation (ascend/emulation) with emulate=True;
the code path is otherwise identical. Per op, the fused torch_npu operator is used where the capability table
(capability.py) gives the chip that op AND the call's shapes / dtypes fit its documented constraints; otherwise a
torch composition runs (the reference ops, or compose.py where Ascend differs). `last_path[op]` records the path
of the latest call, `describe()` the policy.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4.common.model.ops import OP_NAMES, LinearWeight, Ops
from dsv4.common.model.reference import ReferenceOps

from . import compose
from .capability import FP8_CHIPS, LATEST_RELEASE, custom_op, op_available
from .convert import dequant_any, fp4_to_fp8, to_w4a8, to_w8a8
from .emulation.attention import A5_INDEXER_HEADS, _valid_sparse_count

HALF = (torch.float16, torch.bfloat16)
WEIGHT_POLICIES = ("auto", "w8a8", "bf16")
LI_BLOCK = 64  # paged-key block size for the lightning indexer (a multiple of 16, <= 1024: section 4)


class AscendOps(Ops):
    name = "ascend"

    def __init__(self, npu: object, chip: str, device: str | torch.device = "npu:0", release: str = LATEST_RELEASE,
                 weights: str = "auto", use_custom_ops: bool = False, emulated: bool = False) -> None:
        if weights not in WEIGHT_POLICIES:
            raise ValueError(f"weights must be one of {WEIGHT_POLICIES}, got {weights!r}")
        self.npu, self.chip, self.release, self.weights = npu, chip, release, weights
        self.device = torch.device(device)
        self.emulated = emulated
        self.use_custom_ops = use_custom_ops
        self.last_path: dict[str, str] = {}
        self._converted: dict[int, tuple[weakref.ref, LinearWeight]] = {}
        # where no fused operator fits, the plain-torch reference runs (it uses only stock torch ops, so it runs on
        # the NPU too); Ascend-specific compositions (no FP8 dtype on A2/A3, int8 quantisation) live in compose.py
        self._torch = ReferenceOps(self.device)

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def has(self, op: str) -> bool:
        return op_available(self.npu, op, self.chip, self.release)

    def _took(self, op: str, path: str) -> None:
        self.last_path[op] = path

    @property
    def fp8_native(self) -> bool:
        return self.chip in FP8_CHIPS and self.weights == "auto"

    def native_weight(self, w: LinearWeight, expert: bool = False) -> LinearWeight:
        """The checkpoint weight in a format this chip's GEMMs take, converted once and cached per weight tensor:
        950 keeps FP8 (FP4 -> FP8 blocks); 910B/910C have no FP8 GEMM, so FP8 -> w8a8 and FP4 experts -> w4a8
        (convert ahead of time with ascend.convert.convert_for_chip to skip this)."""
        if w.fmt in ("none", "w8a8", "w4a8"):
            return w
        if self.fp8_native and w.fmt == "fp8":
            return w
        key = id(w.weight)
        hit = self._converted.get(key)
        if hit is not None and hit[0]() is w.weight:
            return hit[1]
        if self.weights == "bf16":
            out = LinearWeight(dequant_any(w).to(torch.bfloat16), None, "none")
        elif self.fp8_native:
            out = fp4_to_fp8(w)
        else:
            out = to_w4a8(w) if expert and self.weights == "auto" else to_w8a8(w)
        self._converted[key] = (weakref.ref(w.weight), out)
        return out

    # -- normalisation ----------------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if self.has("npu_rms_norm") and x.dim() >= 2:
            self._took("rms_norm", "npu_rms_norm")
            return self.npu.npu_rms_norm(x, weight.float(), eps)[0]
        self._took("rms_norm", "torch")
        xf = x.float()
        return (weight.float() * xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)

    def head_rms_norm(self, q: Tensor, eps: float) -> Tensor:
        # the official code normalises q in bf16 arithmetic; npu_rms_norm (fp32 inside) differs by ~1 bf16 ulp, which
        # was enough to move tiny-model logits by 2e-2, so half precision stays in torch; fp32 uses the op
        if self.has("npu_rms_norm") and q.dtype == torch.float32:
            self._took("head_rms_norm", "npu_rms_norm")
            return self.npu.npu_rms_norm(q, torch.ones(q.shape[-1], dtype=q.dtype, device=q.device), eps)[0]
        self._took("head_rms_norm", "torch")
        return q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)

    # -- rotary -----------------------------------------------------------------------------------------------------
    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
        # npu_rotary_mul 'interleave' takes full-width cos/sin (each pair's value at 2i and 2i+1, section 2);
        # run in fp32 because the V4 rope math is fp32 and bf16 cos/sin would add rounding
        r1 = cos.float().repeat_interleave(2, dim=-1).unsqueeze(2)  # [B,S,1,r]
        r2 = sin.float().repeat_interleave(2, dim=-1).unsqueeze(2)
        if inverse:
            r2 = -r2
        if self.has("npu_rotary_mul"):
            self._took("rope", "npu_rotary_mul(interleave)")
            return self.npu.npu_rotary_mul(x.float(), r1, r2, rotary_mode="interleave").to(x.dtype)
        self._took("rope", "torch")
        xf = x.float().unflatten(-1, (-1, 2))
        rot = torch.stack([-xf[..., 1], xf[..., 0]], -1).flatten(-2)
        return (x.float() * r1 + rot * r2).to(x.dtype)

    # -- simulated quantisation (no torch_npu op: QAT-matching simulations, composed in torch) ----------------------
    def fp8_sim(self, x: Tensor, block: int, mode: str = "e4m3") -> Tensor:
        self._took("fp8_sim", "torch (arithmetic e4m3 rounding: A2/A3 have no FP8 dtype)")
        return compose.fp8_sim(x, block, mode)

    def fp4_sim(self, x: Tensor, block: int) -> Tensor:
        self._took("fp4_sim", "torch")
        return self._torch.fp4_sim(x, block)

    def hadamard(self, x: Tensor) -> Tensor:
        self._took("hadamard", "torch (matmul with H_n)")
        return self._torch.hadamard(x)

    # -- linear -----------------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, w: LinearWeight) -> Tensor:
        w = self.native_weight(w)
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        if w.fmt == "none":
            self._took("linear", "torch matmul")
            return F.linear(x, w.weight.to(x.dtype))
        if w.fmt == "fp8":
            y = self._linear_fp8(x2, w)
        elif w.fmt == "w8a8":
            y = self._linear_w8a8(x2, w)
        elif w.fmt == "w4a8":
            counts = torch.tensor([x2.shape[0]], dtype=torch.int64, device=x.device)
            stacked = LinearWeight(w.weight.unsqueeze(0), w.scale.unsqueeze(0), "w4a8")
            y = self._grouped(x2, stacked, counts)
            self._took("linear", self.last_path["grouped_gemm"])
        else:
            raise ValueError(f"unsupported weight format {w.fmt!r}")
        return y.reshape(*lead, -1)

    def _linear_fp8(self, x2: Tensor, w: LinearWeight) -> Tensor:
        K = x2.shape[-1]
        if x2.dtype in HALF and K % 128 == 0 and self.has("npu_quant_matmul"):
            # 950 FP8 GEMM: per-token 1x128 power-of-two activation scales and the 128x128 weight block scales
            # (npu_quant_matmul group_sizes [1,128,128]; section 8). On device, transpose the weight once at load.
            self._took("linear", "npu_quant_matmul FP8 block-scaled (950)")
            xq, xs = compose.quant_fp8_per_block(x2)
            return self.npu.npu_quant_matmul(xq, w.weight.t(), w.scale.float().t(), pertoken_scale=xs,
                                             output_dtype=x2.dtype, group_sizes=[1, 128, 128])
        self._took("linear", "torch (fp32 activations: the FP8 GEMM takes fp16/bf16) FP8-simulated")
        return F.linear(compose.fp8_sim(x2.float(), 128), dequant_any(w)).to(x2.dtype)

    def _act_int8(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        if x2.dtype in HALF and self.has("npu_dynamic_quant"):
            return self.npu.npu_dynamic_quant(x2)
        q, s = compose.quant_int8_per_token(x2)
        return q, s

    def _linear_w8a8(self, x2: Tensor, w: LinearWeight) -> Tensor:
        if x2.dtype in HALF and self.has("npu_dynamic_quant") and self.has("npu_quant_matmul"):
            self._took("linear", "npu_dynamic_quant + npu_quant_matmul (W8A8)")
            xq, xs = self.npu.npu_dynamic_quant(x2)
            return self.npu.npu_quant_matmul(xq, w.weight.t(), w.scale.float(), pertoken_scale=xs,
                                             output_dtype=x2.dtype)
        self._took("linear", "torch W8A8 (fp32 activations: npu_dynamic_quant takes fp16/bf16)")
        xq, xs = compose.quant_int8_per_token(x2)
        y = (xq @ w.weight.float().t()) * xs.unsqueeze(-1) * w.scale.float()
        return y.to(x2.dtype)

    # -- attention --------------------------------------------------------------------------------------------------
    def _sfa_fits(self, q: Tensor, kv: Tensor) -> str | None:
        H, D = q.shape[2], q.shape[3]
        if not self.has("npu_sparse_flash_attention"):
            return "npu_sparse_flash_attention not on this chip/release"
        if self.chip not in FP8_CHIPS:
            return "attention sinks need the 950 SFA (A2/A3 SFA has no `sinks`)"
        if D != 512:
            return f"SFA is hard-wired to 512 (+64 rope) dims, head_dim is {D}"
        if q.dtype not in HALF or kv.dtype != q.dtype:
            return "SFA takes bf16/fp16 only"
        if not 1 <= H <= 128:
            return "SFA takes 1..128 query heads"
        return None

    def sparse_attention(self, q: Tensor, kv: Tensor, sink: Tensor, indices: Tensor, softmax_scale: float) -> Tensor:
        why = self._sfa_fits(q, kv)
        if why is not None:
            self._took("sparse_attention", f"torch ({why})")
            return self._torch.sparse_attention(q, kv, sink, indices, softmax_scale)
        self._took("sparse_attention", "npu_sparse_flash_attention (950, sinks)")
        B, S, H, _ = q.shape
        # SFA wants valid indices packed first, -1 padding last; ours may come in any order
        order = torch.sort((indices < 0).to(torch.int8), dim=-1, stable=True).indices
        packed = torch.gather(indices, -1, order).to(torch.int32).unsqueeze(2)  # [B,S,1,K]
        # V4 keeps its rope dims inside the 512 (last 64), so the op's separate 64-d rope part gets zeros: the
        # logits gain nothing and the value (= the 512-d key) is exactly V4's
        q_rope = q.new_zeros(B, S, H, 64)
        kv4 = kv.unsqueeze(2)
        k_rope = kv.new_zeros(B, kv.shape[1], 1, 64)
        # sparse_mode 0: the indices already encode causality; mode 3 would also mask the appended compressed rows
        out = self.npu.npu_sparse_flash_attention(q, kv4, kv4, packed, softmax_scale, query_rope=q_rope,
                                                  key_rope=k_rope, layout_query="BSND", layout_kv="BSND",
                                                  sparse_mode=0, attention_mode=2, sinks=sink.float())
        return out[0]

    def compress_pool(self, kv: Tensor, score: Tensor) -> Tensor:
        # overlap compression (and the pooling itself) has no torch_npu op (V4's compressor is a custom op)
        self._took("compress_pool", "torch")
        return (score.float().softmax(dim=2) * kv.float()).sum(dim=2)

    def _li_fits(self, q: Tensor, k: Tensor, kk: int) -> str | None:
        H, D = q.shape[2], q.shape[3]
        if not self.has("npu_lightning_indexer"):
            return "npu_lightning_indexer not on this chip/release"
        if D != 128:
            return f"lightning indexer needs D = 128, got {D}"
        if q.dtype not in HALF or k.dtype != q.dtype:
            return "lightning indexer takes bf16/fp16 q/k"
        if (H not in A5_INDEXER_HEADS) if self.chip in FP8_CHIPS else not 1 <= H <= 64:
            return f"{H} indexer heads unsupported on {self.chip}"
        if not _valid_sparse_count(kk):
            return f"top-k {kk} outside the op's sparse_count range"
        return None

    def indexer_topk(self, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int) -> Tensor:
        B, S, H, D = q.shape
        T = k.shape[1]
        kk = min(topk, T)
        if kk == 0:
            self._took("indexer_topk", "empty")
            return torch.full((B, S, 0), -1, dtype=torch.long, device=q.device)
        why = self._li_fits(q, k, kk)
        if why is not None:
            self._took("indexer_topk", f"torch ({why})")
            return self._torch.indexer_topk(q, k, weights, visible, kk)
        self._took("indexer_topk", "npu_lightning_indexer (TND query, paged key)")
        # the op's causal modes do not express "query (b,s) sees keys t < visible[b,s]"; a paged key with one
        # "batch" per query does: every query's block_table row points at its batch's key blocks and its kv length
        # is visible[b,s] (the decode-style call vllm-ascend makes)
        nblk = -(-T // LI_BLOCK)
        cache = F.pad(k, (0, 0, 0, nblk * LI_BLOCK - T)).reshape(B * nblk, LI_BLOCK, 1, D)
        table = (torch.arange(B, device=q.device) * nblk).unsqueeze(1) + torch.arange(nblk, device=q.device)
        table = table.repeat_interleave(S, dim=0).to(torch.int32)  # [B*S, nblk]
        lens = visible.reshape(-1).clamp(0, T).to(torch.int32)
        cu_q = torch.arange(1, B * S + 1, dtype=torch.int32, device=q.device)
        # 950 takes no fp32 weights: bf16 weights there (scores then differ from fp32 ones by ~1e-3 relative)
        w = weights.reshape(B * S, H)
        w = w.to(torch.bfloat16) if self.chip in FP8_CHIPS else w.float()
        idx, _ = self.npu.npu_lightning_indexer(q.reshape(B * S, H, D), cache, w, actual_seq_lengths_query=cu_q,
                                                actual_seq_lengths_key=lens, block_table=table, layout_query="TND",
                                                layout_key="PA_BSND", sparse_count=kk, sparse_mode=0)
        return idx[:, 0, :kk].long().view(B, S, kk)

    # -- MoE --------------------------------------------------------------------------------------------------------
    def moe_gate(self, x: Tensor, weight: Tensor, bias: Tensor | None, tid2eid: Tensor | None,
                 token_ids: Tensor | None, topk: int, score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
        logits = x.float() @ weight.float().t()
        if score_func in ("softmax", "sigmoid") and self.has("npu_moe_gating_top_k") and logits.shape[1] <= 2048:
            self._took("moe_gate", "npu_moe_gating_top_k")
            y, ids, _ = self.npu.npu_moe_gating_top_k(
                logits, topk, bias=None if tid2eid is not None else bias, input_ids=token_ids, tid2eid=tid2eid,
                norm_type=0 if score_func == "softmax" else 1, routed_scaling_factor=route_scale)
            return y.float(), ids.long()
        # npu_moe_gating_top_k scores with softmax or sigmoid only; V4's sqrt(softplus) is composed in torch
        self._took("moe_gate", f"torch ({score_func} scoring is not in npu_moe_gating_top_k)")
        return compose.gate(logits, bias, tid2eid, token_ids, topk, score_func, route_scale)

    def swiglu(self, gate: Tensor, up: Tensor, limit: float) -> Tensor:
        # V4 clamps u to +-limit and g above only; npu_clipped_swiglu is the GPT-OSS form (alpha, +1 bias), so the
        # clamp is torch and the activation npu_swiglu
        g, u = gate.float(), up.float()
        if limit > 0:
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        if self.has("npu_swiglu"):
            self._took("swiglu", "torch clamp + npu_swiglu")
            return self.npu.npu_swiglu(torch.cat([g, u], dim=-1), dim=-1)
        self._took("swiglu", "torch")
        return F.silu(g) * u

    def _grouped(self, rows: Tensor, w: LinearWeight, counts: Tensor) -> Tensor:
        """Per-expert GEMM of expert-sorted rows [M, K] with stacked weights (native format), group sizes `counts`.
        Returns [M, N] in rows.dtype."""
        gm = self.npu.npu_grouped_matmul
        kw = dict(group_list=counts, group_list_type=1, split_item=3, group_type=0)
        half = rows.dtype in HALF
        if w.fmt == "fp8" and half and rows.shape[1] % 128 == 0:
            self.last_path["grouped_gemm"] = "npu_grouped_matmul FP8 block-scaled (950)"
            xq, xs = compose.quant_fp8_per_block(rows)
            return gm([xq], [w.weight.transpose(1, 2)], scale=[w.scale.float().transpose(1, 2)],
                      per_token_scale=[xs], output_dtype=rows.dtype, **kw)[0]
        if w.fmt in ("w8a8", "w4a8") and half and self.has("npu_dynamic_quant"):
            self.last_path["grouped_gemm"] = f"npu_dynamic_quant + npu_grouped_matmul ({w.fmt.upper()})"
            xq, xs = self.npu.npu_dynamic_quant(rows)
            wt = w.weight.transpose(1, 2) if w.fmt == "w8a8" else w.weight
            return gm([xq], [wt], scale=[w.scale.float()], per_token_scale=[xs], output_dtype=rows.dtype, **kw)[0]
        # float operands: unquantised weights, or fp32 activations (the quantised forms take fp16/bf16) - then the
        # activation quantisation is simulated in torch and the weight dequantised, which is the same math
        if w.fmt == "none":
            xs_, wd = rows, w.weight.to(rows.dtype)
        elif w.fmt == "fp8":
            xs_, wd = compose.fp8_sim(rows.float(), 128).to(rows.dtype), dequant_any(w).to(rows.dtype)
        else:
            q, s = compose.quant_int8_per_token(rows)
            xs_, wd = (q * s.unsqueeze(-1)).to(rows.dtype), dequant_any(w).to(rows.dtype)
        self.last_path["grouped_gemm"] = f"npu_grouped_matmul float ({w.fmt} weight dequantised)"
        return gm([xs_], [wd.transpose(1, 2)], **kw)[0]

    def moe_experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: LinearWeight, w2: LinearWeight,
                    w3: LinearWeight, swiglu_limit: float, expert_offset: int = 0) -> Tensor:
        T, d = x.shape
        k = ids.shape[1]
        n_local = w1.weight.shape[0]
        if T == 0:
            return torch.zeros((0, d), dtype=torch.float32, device=x.device)
        w1n, w2n, w3n = (self.native_weight(w, expert=True) for w in (w1, w2, w3))
        ids32 = ids.to(torch.int32)
        rows, row_idx, counts, _ = self.npu.npu_moe_init_routing_v2(
            x, ids32, active_num=T * k, expert_num=expert_offset + n_local, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, active_expert_range=[expert_offset, expert_offset + n_local], row_idx_type=0)
        h = self.swiglu(self._grouped(rows, w1n, counts), self._grouped(rows, w3n, counts), swiglu_limit)
        # V4 weights each expert's activation BEFORE w2 (finalize_routing would weight after): put the routing
        # weights in expert order (scatter through the row index; dropped pairs land in a spare last slot)
        dst = torch.where(row_idx >= 0, row_idx.long(), torch.full_like(row_idx, T * k, dtype=torch.long))
        row_w = torch.zeros(T * k + 1, dtype=torch.float32, device=x.device)
        row_w.scatter_(0, dst, weights.reshape(-1).float())
        y = self._grouped((h * row_w[:rows.shape[0], None]).to(x.dtype), w2n, counts)
        self._took("moe_experts", f"npu_moe_init_routing_v2 -> {self.last_path['grouped_gemm']} -> swiglu")
        if self.has("npu_moe_finalize_routing"):
            self.last_path["moe_experts"] += " -> npu_moe_finalize_routing"
            return self.npu.npu_moe_finalize_routing(y.float(), None, None, None, None, row_idx, ids32)
        # finalize_routing's page lists A2 only: un-permute with a torch index_add elsewhere
        self.last_path["moe_experts"] += " -> torch un-permute"
        yf = torch.cat([y.float(), y.new_zeros(1, d, dtype=torch.float32)])
        out = torch.zeros(T, d, dtype=torch.float32, device=x.device)
        src_tok = torch.arange(T * k, device=x.device) // k
        return out.index_add_(0, src_tok, yf[dst.clamp(max=yf.shape[0] - 1)])

    # -- hyper-connections ------------------------------------------------------------------------------------------
    def _mhc_fits(self, x: Tensor) -> str | None:
        if not (self.has("npu_mhc_pre") and self.has("npu_mhc_sinkhorn") and self.has("npu_mhc_post")):
            return "npu_mhc_* are 950-only"
        n, D = x.shape[-2], x.shape[-1]
        if x.dtype not in HALF:
            return "npu_mhc_* take bf16/fp16"
        if n not in (4, 6, 8) or D % 16 or D > 16384:
            return f"n={n}, D={D} outside the op's n in {{4,6,8}}, 16-aligned D <= 16384"
        return None

    def hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float,
               norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        why = self._mhc_fits(x)
        if why is None:
            self._took("hc_pre", "npu_mhc_pre + npu_mhc_sinkhorn")
            h_in, post, res = self.npu.npu_mhc_pre(x, fn.float(), scale.float(), base.float(), norm_eps=norm_eps,
                                                   hc_eps=hc_eps)[:3]
            return h_in, post, self.npu.npu_mhc_sinkhorn(res, eps=hc_eps, num_iters=iters)
        custom = custom_op("_C_ascend", "npu_hc_pre_v2") if self.use_custom_ops else None
        if custom is not None:  # vllm-ascend's A2/A3 kernel; output order assumed (y, post, comb): unverified
            self._took("hc_pre", "torch.ops._C_ascend.npu_hc_pre_v2")
            out = custom(x, fn, scale, base, x.shape[-2], iters, norm_eps, hc_eps)
            return out[0], out[1], out[2]
        # A2/A3 have no mHC op and no Sinkhorn op: composed in torch
        self._took("hc_pre", f"torch ({why})")
        return self._torch.hc_pre(x, fn, scale, base, iters, hc_eps, norm_eps)

    def hc_post(self, x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        why = self._mhc_fits(residual)
        if why is None and x.dtype == residual.dtype:
            self._took("hc_post", "npu_mhc_post")
            return self.npu.npu_mhc_post(residual, comb.float(), x, post.float())
        self._took("hc_post", f"torch ({why or 'mixed dtypes'})")
        return self._torch.hc_post(x, residual, post, comb)

    def hc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_eps: float, norm_eps: float) -> Tensor:
        why = self._mhc_fits(x)
        if why is None:
            # the head collapse is mhc_pre's h_in alone: pad phi/bias with zero post/res rows, alpha = [s0, 0, 0]
            n = x.shape[-2]
            phi = torch.cat([fn.float(), fn.new_zeros(n * n + n, fn.shape[1], dtype=torch.float32)])
            bias = torch.cat([base.float(), base.new_zeros(n * n + n, dtype=torch.float32)])
            alpha = torch.cat([scale.float().reshape(1), scale.new_zeros(2, dtype=torch.float32)])
            self._took("hc_head", "npu_mhc_pre (zero-padded post/res rows)")
            return self.npu.npu_mhc_pre(x, phi, alpha, bias, norm_eps=norm_eps, hc_eps=hc_eps)[0]
        self._took("hc_head", f"torch ({why})")
        return self._torch.hc_head(x, fn, scale, base, hc_eps, norm_eps)

    # ------------------------------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        c = self.chip
        a5 = c in FP8_CHIPS

        def fused(op: str, text: str, fallback: str) -> str:
            return text if self.has(op) else f"torch ({fallback}: {op} not on {c})"

        lin = ("FP8 block-scaled npu_quant_matmul (FP4 re-encoded as FP8)" if self.fp8_native else
               "W8A8: npu_dynamic_quant + npu_quant_matmul (FP8/FP4 weights converted to int8, no FP8 GEMM on "
               f"{c})" if self.weights != "bf16" else "bf16 dequantised weights")
        plan = {
            "rms_norm": fused("npu_rms_norm", "npu_rms_norm", "composed"),
            "head_rms_norm": "torch in the activation dtype (as the official bf16 code); npu_rms_norm for fp32",
            "rope": fused("npu_rotary_mul", "npu_rotary_mul(rotary_mode='interleave'), fp32, full-width cos/sin",
                          "composed"),
            "fp8_sim": "torch: QAT simulation, arithmetic e4m3 rounding (no FP8 dtype on A2/A3)",
            "fp4_sim": "torch: QAT simulation (no torch_npu op)",
            "hadamard": "torch matmul with H_n (no torch_npu op)",
            "linear": lin + "; fp32 activations: torch with the same math",
            "sparse_attention": ("npu_sparse_flash_attention with sinks when head_dim = 512 (zero 64-d rope part) "
                                 "and bf16/fp16, else torch" if a5 and self.has("npu_sparse_flash_attention") else
                                 "torch: A2/A3 SFA has no attention sinks"),
            "compress_pool": "torch: no compressor op in torch_npu (custom op in vllm-ascend)",
            "indexer_topk": fused("npu_lightning_indexer", "npu_lightning_indexer (TND, paged key per query) when "
                                  f"D = 128, bf16/fp16, heads {'in {8,16,24,32,64}' if a5 else '<= 64'}; else torch",
                                  "composed"),
            "moe_gate": fused("npu_moe_gating_top_k", "torch for sqrtsoftplus (op scores softmax/sigmoid only); "
                              "npu_moe_gating_top_k for softmax/sigmoid", "composed"),
            "swiglu": "torch clamp (V4's clamp is not npu_clipped_swiglu's) + npu_swiglu",
            "moe_experts": ("npu_moe_init_routing_v2 -> npu_grouped_matmul (" +
                            ("FP8" if self.fp8_native else "W4A8 int4" if self.weights == "auto" else self.weights)
                            + ") -> swiglu -> npu_grouped_matmul -> " +
                            ("npu_moe_finalize_routing" if self.has("npu_moe_finalize_routing") else
                             "torch un-permute (finalize_routing is A2-only)")),
            "hc_pre": ("npu_mhc_pre + npu_mhc_sinkhorn (bf16/fp16)" if self.has("npu_mhc_pre") else
                       "torch: no mHC/Sinkhorn op on A2/A3" +
                       (" (custom npu_hc_pre_v2 enabled)" if self.use_custom_ops else "")),
            "hc_post": "npu_mhc_post (bf16/fp16)" if self.has("npu_mhc_post") else "torch: no mHC op on A2/A3",
            "hc_head": ("npu_mhc_pre with zero-padded post/res rows" if self.has("npu_mhc_pre") else
                        "torch: no mHC op on A2/A3"),
        }
        plan["indexer_scores"] = "torch (inherited composition: the lightning indexer returns indices, not scores)"
        tag = f" [chip {c}{', emulated' if self.emulated else ''}]"
        return {op: plan[op] + tag for op in OP_NAMES + ["indexer_scores"]}
