"""The MoE half of AscendOps (backend.py): routing, the SwiGLU, and the routed experts through torch_npu's fused MoE
ops (npu_moe_init_routing_v2 -> npu_grouped_matmul -> npu_moe_finalize_routing) where the chip has them, with static
shapes and no host read on A2 and 950; a per-expert GEMM loop on 910C; the static gathered torch form (one expert
weight per (token, expert) pair) without the fused routing or for fp32 activations on 950.

A mixin: it uses AscendOps' plumbing (`npu`, `chip`, `has`, `_took`, `last_path`, `native_weight`, `_kept`,
`_table`, `_torch`, `linear`, `_v4_fp8_quant`), and is only ever a base of AscendOps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4.common.model.ops import LinearWeight
from dsv4.common.model.static import routed_experts

from . import compose
from .capability import A5
from .convert import MX_BLOCK, dequant_any
from .emulation.moe import NPU_FLOAT8_E8M0  # torch_npu's dtype code (the wheel's meta map)

HALF = (torch.float16, torch.bfloat16)
FP8_BLOCK = 128  # the FP8 GEMM's activation blocks (1 x 128 along K)
MX_PER_128 = FP8_BLOCK // MX_BLOCK  # a V4 activation scale (per 128 of K) is this many equal MX scales (per 32)
# a torch_npu without the fused routing: up to this many (token, expert) pairs the experts run in the static-shape
# form (each pair gathers its expert's weights: peak memory grows with the pairs, so long prefills take the loop)
STATIC_EXPERT_PAIRS = 64


class MoEOps:
    # -- MoE --------------------------------------------------------------------------------------------------------
    def moe_gate(self, x: Tensor, weight: Tensor, bias: Tensor | None, tid2eid: Tensor | None,
                 token_ids: Tensor | None, topk: int, score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
        # the weight's transposed view, kept per parameter (_transposed): the same fp32 operand, one .t() fewer a call
        logits = x.float() @ self._transposed(weight).float()
        if score_func in ("softmax", "sigmoid") and self.has("npu_moe_gating_top_k") and logits.shape[1] <= 2048:
            self._took("moe_gate", "npu_moe_gating_top_k")
            # meta check: input_ids and tid2eid both or neither; doc: bias has x's dtype (fp32 logits here)
            hashed = tid2eid is not None
            y, ids, _ = self.npu.npu_moe_gating_top_k(
                logits, topk, bias=None if hashed or bias is None else bias.to(logits.dtype),
                input_ids=token_ids.reshape(-1) if hashed else None, tid2eid=tid2eid if hashed else None,
                norm_type=0 if score_func == "softmax" else 1, routed_scaling_factor=route_scale)
            return y.float(), ids.long()
        # npu_moe_gating_top_k scores with softmax or sigmoid only; V4's sqrt(softplus) is composed in torch
        self._took("moe_gate", f"torch ({score_func} scoring is not in npu_moe_gating_top_k)")
        if tid2eid is not None:  # int64 once per table (the lookup's ids are int64): no cast per call
            tid2eid = self._kept("int64", tid2eid, tid2eid.long)
        return compose.gate(logits, bias, tid2eid, token_ids, topk, score_func, route_scale)

    def swiglu(self, gate: Tensor, up: Tensor, limit: float) -> Tensor:
        # V4 clamps u to +-limit and g above only; npu_clipped_swiglu is the GPT-OSS form (alpha, +1 bias), so the
        # clamp is torch and the activation npu_swiglu
        g, u = gate.float(), up.float()
        if limit > 0:
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        if self.has("npu_swiglu") and 1 <= g.dim() <= 8:  # doc products: A2 only
            self._took("swiglu", "torch clamp + npu_swiglu")
            return self.npu.npu_swiglu(torch.cat([g, u], dim=-1), dim=-1)
        self._took("swiglu", "torch")
        return F.silu(g) * u

    def _grouped(self, rows: Tensor, w: LinearWeight, ends: Tensor,
                 mx_rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Per-expert GEMM of expert-sorted rows [M, K] with stacked weights (native format) on npu_grouped_matmul;
        `ends` [E] int64 on the device: where each expert's rows end (a prefix sum, group_list_type 0: a counts list
        may not have length 1, doc). A2 wants ends[-1] == M (doc); 950 allows fewer (aclnnGroupedMatmulV4, 910_95)
        and leaves the rows past ends[-1] undefined. `mx_rows`: the rows' MX quantisation (_mx_rows) for an "mxfp8"
        weight. Returns [M, N] in rows.dtype."""
        gm = self.npu.npu_grouped_matmul
        kw = dict(group_list=ends, group_list_type=0, split_item=3, group_type=0)
        half = rows.dtype in HALF
        if mx_rows is not None:
            # 950, the MX form (the wheel's meta: is_fp8 with e8m0 scale dtypes; shapes: aclnnGroupedMatmulV4's
            # 910_95 mx table): the weight is the transposed view [E, K, N] of the stored [E, N, K] codes, with its
            # [E, N, K/64, 2] scales
            self.last_path["grouped_gemm"] = "npu_dynamic_mx_quant + npu_grouped_matmul (MX FP8, e8m0 scales)"
            return gm([mx_rows[0]], [self._kn_view(w)], scale=[w.scale], per_token_scale=[mx_rows[1]],
                      output_dtype=rows.dtype, scale_dtype=NPU_FLOAT8_E8M0,
                      per_token_scale_dtype=NPU_FLOAT8_E8M0, **kw)[0]
        if w.fmt == "w8a8" and half and self.has("npu_dynamic_quant"):
            # doc table "per-token量化": int8 x, int8 weight, fp32 scale, fp32 per_token_scale, bf16/fp16 out
            self.last_path["grouped_gemm"] = "npu_dynamic_quant + npu_grouped_matmul (per-token W8A8)"
            xq, xs = self.npu.npu_dynamic_quant(rows)
            return gm([xq], [w.weight.transpose(1, 2)], scale=[w.scale.float()], per_token_scale=[xs],
                      output_dtype=rows.dtype, **kw)[0]
        if w.fmt == "w4a8" and half:
            # doc table "伪量化": fp16/bf16 x, int4 weight (8 per int32), per-group antiquant_scale in x's dtype: the
            # documented W4 form keeps the activations in bf16 (the doc has no int8-x / int4-weight row)
            self.last_path["grouped_gemm"] = "npu_grouped_matmul (weight-only int4, bf16 activations)"
            return gm([rows], [w.weight], antiquant_scale=[w.scale.to(rows.dtype)], **kw)[0]
        # float operands: unquantised weights, or fp32 activations (the quantised forms take fp16/bf16) - then the
        # activation quantisation is simulated in torch and the weight dequantised, which is the same math
        if w.fmt == "none":
            xs_, wd = rows, w.weight.to(rows.dtype)
        elif w.fmt in ("fp8", "mxfp8"):
            xs_, wd = compose.fp8_sim(rows.float(), 128).to(rows.dtype), dequant_any(w).to(rows.dtype)
        elif w.fmt == "w4a8":
            xs_, wd = rows, dequant_any(w).to(rows.dtype)
        else:
            q, s = compose.quant_int8_per_token(rows)
            xs_, wd = (q * s.unsqueeze(-1)).to(rows.dtype), dequant_any(w).to(rows.dtype)
        self.last_path["grouped_gemm"] = f"npu_grouped_matmul float ({w.fmt} weight dequantised)"
        return gm([xs_], [wd.transpose(1, 2)], **kw)[0]

    def _kn_view(self, w: LinearWeight) -> Tensor:
        """The [E, K, N] transposed view of stacked [E, N, K] weights, made once per weight tensor and kept."""
        return self._kept("kn", w.weight, lambda: w.weight.transpose(1, 2))

    def _mx_rows(self, rows: Tensor, w: LinearWeight) -> tuple[Tensor, Tensor] | None:
        """rows [M, K] as the MX form takes them, or None where it does not run (another weight format, fp32 rows,
        K off 128-multiples: the float form then runs the same math). V4's per-128 FP8 quantisation
        (AscendOps._v4_fp8_quant: e4m3 codes, ue8m0 scale) with each scale byte handed over as the four
        equal per-32 MX scales it is: e8m0 bytes [M, K/64, 2], one stored index_select (which also drops the even
        padding of an odd count of 128-blocks)."""
        M, K = rows.shape
        if not (w.fmt == "mxfp8" and rows.dtype in HALF and K % FP8_BLOCK == 0 and self.has("npu_dynamic_mx_quant")):
            return None
        nb = K // FP8_BLOCK
        y, mx = self._v4_fp8_quant(rows, FP8_BLOCK)
        dev = rows.device
        rep = self._table(("mx_per32", nb, str(dev)),
                          lambda: torch.arange(nb, device=dev).repeat_interleave(MX_PER_128))  # [K/32]
        return y, mx.view(M, -1).index_select(1, rep).view(M, -1, 2)

    def _grouped_ffn(self, rows: Tensor, ends: Tensor, w1: LinearWeight, w2: LinearWeight, w3: LinearWeight,
                     swiglu_limit: float, row_weights: Tensor | None) -> Tensor:
        """w2(swiglu(w1 x, w3 x) * row_weight) of expert-sorted rows [M, d] on npu_grouped_matmul, group ends on the
        device (see _grouped), row_weights [M, 1] fp32. The reference's roundings: GEMM outputs in rows.dtype,
        SwiGLU and the weighting in fp32, h rounded to rows.dtype."""
        xq = self._mx_rows(rows, w1)  # w1 and w3 take the same rows: one quantisation
        h = self.swiglu(self._grouped(rows, w1, ends, xq), self._grouped(rows, w3, ends, xq), swiglu_limit)
        if row_weights is not None:
            h = h * row_weights
        h = h.to(rows.dtype)
        return self._grouped(h, w2, ends, self._mx_rows(h, w2))

    def expert_ffn(self, rows: Tensor, counts: Tensor, w1: LinearWeight, w2: LinearWeight, w3: LinearWeight,
                   swiglu_limit: float, row_weights: Tensor | None = None) -> tuple[Tensor, str]:
        """w2(swiglu(w1 x, w3 x) * row_weight) of expert-sorted rows [M, d] (native stacked weights, group sizes
        `counts` adding up to M; row_weights [M]). Returns ([M, d] in rows.dtype, the GEMM path).
        npu_grouped_matmul where the chip has it (A2, 950); elsewhere (910C) one GEMM per expert through `linear`
        (the W8A8 npu_quant_matmul), one host read of the counts."""
        if self.has("npu_grouped_matmul"):
            rw = None if row_weights is None else row_weights[:, None]
            y = self._grouped_ffn(rows, torch.cumsum(counts, 0), w1, w2, w3, swiglu_limit, rw)
            return y, self.last_path["grouped_gemm"]
        y = torch.zeros(rows.shape[0], w2.weight.shape[-2] if w2.fmt != "w4a8" else w2.scale.shape[-1],
                        dtype=rows.dtype, device=rows.device)
        ends = counts.cumsum(0).tolist()
        for e, (a, b) in enumerate(zip([0] + ends[:-1], ends, strict=False)):
            if b > a:
                we = [LinearWeight(w.weight[e], None if w.scale is None else w.scale[e], w.fmt) for w in (w1, w2, w3)]
                h = self.swiglu(self.linear(rows[a:b], we[0]), self.linear(rows[a:b], we[2]), swiglu_limit)
                if row_weights is not None:
                    h = h * row_weights[a:b, None]
                y[a:b] = self.linear(h.to(rows.dtype), we[1])
        return y, (f"per-expert {self.last_path.get('linear', 'linear')} (no grouped GEMM on {self.chip}: A2 by its "
                   "doc, 950 by the wheel's code)")

    def moe_experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: LinearWeight, w2: LinearWeight,
                    w3: LinearWeight, swiglu_limit: float, expert_offset: int = 0,
                    n_experts: int | None = None) -> Tensor:
        T, d = x.shape
        k = ids.shape[1]
        n_local = w1.weight.shape[0]
        if T == 0:
            return torch.zeros((0, d), dtype=torch.float32, device=x.device)
        why = (f"no npu_moe_init_routing_v2 on {self.chip}" if not self.has("npu_moe_init_routing_v2") else
               "fp32 activations: 950's grouped GEMM takes bf16/fp16 (aclnnGroupedMatmulV4, 910_95)"
               if self.chip in A5 and x.dtype not in HALF else None)
        if why is not None:
            if T * k <= STATIC_EXPERT_PAIRS or torch.compiler.is_compiling():
                # decode: every (token, expert) pair gathers its expert's weights, with no data-dependent shape
                self._took("moe_experts", f"torch, static shapes: one gathered expert per (token, expert) pair ({why})")
                return routed_experts(self)(x, weights, ids, w1, w2, w3, swiglu_limit, expert_offset, n_experts)
            self._took("moe_experts", f"torch reference ({why})")
            return self._torch.moe_experts(x, weights, ids, w1, w2, w3, swiglu_limit, expert_offset, n_experts)
        w1n, w2n, w3n = (self.native_weight(w, expert=True) for w in (w1, w2, w3))
        M, dev = T * k, x.device
        # doc: expert ids "不能超过专家数" and active_expert_range ends at or below expert_num. With expert parallelism
        # `ids` are global: this rank's experts map to 0..n_local-1 and every other id to one spare id n_local, so
        # expert_num = n_local + 1 and no pair is dropped (finalize_routing's index must hold no -1 either): ids
        # clamped into [-1, n_local], then looked up in a stored table whose entries n_local and -1 (the last) are
        # the spare id. Without it (this process holds all n_experts) every id is local: no spare, no masking.
        # Shapes are static (T*k rows) and nothing is read on the host: the static decode step captures all of this
        all_local = expert_offset == 0 and n_experts == n_local
        n_route = n_local if all_local else n_local + 1  # routed ids, the spare one included
        if all_local:
            ids32 = ids.to(torch.int32)  # [T, k]
        else:
            local = ids if expert_offset == 0 else ids - expert_offset
            spare_map = self._table(("spare_map", n_local, str(dev)), lambda: torch.cat([
                torch.arange(n_local, dtype=torch.int32, device=dev), torch.full((2,), n_local, dtype=torch.int32,
                                                                                device=dev)]))
            ids32 = spare_map[local.clamp(-1, n_local)]  # [T, k] int32
        rows, row_idx, counts, _ = self.npu.npu_moe_init_routing_v2(
            x, ids32, active_num=M, expert_num=n_route, expert_tokens_num_type=1, expert_tokens_num_flag=True,
            active_expert_range=[0, n_route], row_idx_type=0)
        # V4 weights each expert's activation BEFORE w2 (finalize_routing would weight after): the routing weight
        # of output row r is weights[src] for the src with row_idx[src] = r (every row is some pair's: dropless)
        row_w = torch.empty(M, 1, dtype=torch.float32, device=dev)
        row_w[row_idx] = weights.float().view(M, 1)
        if self.has("npu_grouped_matmul"):
            ends = torch.cumsum(counts, 0)  # [n_route] on the device; the spare expert's rows sort last
            if all_local:
                y = self._grouped_ffn(rows, ends, w1n, w2n, w3n, swiglu_limit, row_w)
            else:
                spare = self._table(("rows", M, str(dev)), lambda: torch.arange(M, device=dev)[:, None]) \
                    >= ends[n_local - 1:n_local]  # [M, 1]: other ranks' pairs
                # 950 takes group ends adding up to fewer rows (its GEMM leaves the spare rows undefined); A2's doc
                # wants every row in a group: the spare rows join the last one, ends[n_local - 1] replaced by
                # ends[n_local]
                fold = self._table(("fold_spare", n_local, str(dev)), lambda: torch.cat([
                    torch.arange(n_local - 1, device=dev), torch.full((1,), n_local, device=dev)]))
                gemm_ends = ends[:n_local] if self.chip in A5 else ends.index_select(0, fold)
                y = self._grouped_ffn(rows, gemm_ends, w1n, w2n, w3n, swiglu_limit, row_w).masked_fill(spare, 0.0)
            gemm = self.last_path["grouped_gemm"]
        else:  # 910C: one GEMM per local expert; the spare rows stay zero
            y, gemm = self.expert_ffn(rows, counts if all_local else counts[:n_local], w1n, w2n, w3n, swiglu_limit,
                                      row_w.view(M))
        path = f"npu_moe_init_routing_v2 -> {gemm} -> swiglu"
        if self.has("npu_moe_finalize_routing"):
            # doc: "当scales为None时，则需要指定k"; its index is read slot-major, dst[i + k * NUM_ROWS], while
            # init_routing_v2's is token-major [T, k]: a stored permutation reorders it
            self._took("moe_experts", path + " -> npu_moe_finalize_routing")
            slot_major = self._table(("slot_major", T, k, str(dev)),
                                     lambda: torch.arange(M, device=dev).view(T, k).t().reshape(-1))
            dst = row_idx.index_select(0, slot_major)
            return self.npu.npu_moe_finalize_routing(y.float(), None, None, None, None, dst, ids32, k=k)
        # finalize_routing's products are A2 (+ 950 by the wheel's code): un-permute with a torch index_add on 910C
        self._took("moe_experts", path + " -> torch un-permute")
        out = torch.zeros(T, d, dtype=torch.float32, device=dev)
        src_tok = torch.arange(M, device=dev) // k
        return out.index_add_(0, src_tok, y.float()[row_idx.long()])
