"""CPU emulation of the MoE ops (torch-npu-ops.md section 6): gating top-k (incl. hash routing), init_routing_v2,
grouped_matmul (float, int8 W8A8, int4 W4A8, FP8 on 950) and finalize_routing.

Index conventions emulated (our reading of OPDOC:npu_moe_init_routing_v2; re-check on hardware):
- the (token, slot) pairs are flattened token-major: src = t * k + j;
- tokens are sorted by expert id, stably (ties keep src order); only ids in `active_expert_range` are kept;
- expanded_row_idx with row_idx_type 0 is the scatter index: expanded_row_idx[src] = output row (-1 if dropped);
  row_idx_type 1 is the gather index: expanded_row_idx[row] = src (-1 for unused rows);
- expert_token_cumsum_or_count: int64 [end - start], counts (type 1) or their prefix sum (type 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats import unpack_int4
from .basic import FLOAT_ACT, FP8, check, scaled_product


def npu_moe_gating_top_k(chip: str, x: Tensor, k: int, *, bias: Tensor | None = None, input_ids: Tensor | None = None,
                         tid2eid: Tensor | None = None, k_group: int = 1, group_count: int = 1,
                         group_select_mode: int = 0, renorm: int = 0, norm_type: int = 0, out_flag: bool = False,
                         routed_scaling_factor: float = 1.0,
                         eps: float = 1e-20) -> tuple[Tensor, Tensor, Tensor | None]:
    """s = softmax(x) (norm_type 0) or sigmoid(x) (1); ids = top-k of s + bias (or tid2eid[input_ids]);
    y = s[ids], renormalised to sum 1 (+eps) for sigmoid, times routed_scaling_factor. Returns
    (y [T,k] x.dtype, ids int32 [T,k], s fp32 [T,E] when out_flag else None)."""
    op = "npu_moe_gating_top_k"
    check(x.dim() == 2 and x.shape[1] <= 2048, op, "x must be [tokens, experts <= 2048]")
    check(x.dtype in FLOAT_ACT, op, f"unsupported dtype {x.dtype}")
    check(norm_type in (0, 1), op, "norm_type must be 0 (softmax) or 1 (sigmoid)")
    check(renorm == 0, op, "renorm only supports 0")
    check(group_count == 1 and k_group == 1, op, "group-limited routing is not emulated")
    check(1 <= k <= x.shape[1], op, "k out of range")
    s = x.float().softmax(-1) if norm_type == 0 else x.float().sigmoid()
    if tid2eid is not None:
        check(input_ids is not None and tid2eid.dim() == 2 and tid2eid.shape[1] == k, op,
              "hash routing needs input_ids [T] and tid2eid [vocab, k]")
        ids = tid2eid[input_ids.long()].long()
    else:
        sel = s + bias.float() if bias is not None else s
        ids = sel.topk(k, dim=-1).indices
    y = s.gather(-1, ids)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), ids.to(torch.int32), (s if out_flag else None)


def npu_moe_init_routing_v2(chip: str, x: Tensor, expert_idx: Tensor, *, scale: Tensor | None = None,
                            offset: Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                            expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                            active_expert_range: list[int] | None = None,
                            row_idx_type: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Dropless permutation of [T,H] rows into expert order. expanded_x is [T*k (or active_num), H]; rows past the
    kept count are zero here (undefined on the device)."""
    op = "npu_moe_init_routing_v2"
    check(x.dim() == 2 and expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0], op,
          "x [T,H] and expert_idx [T,k] expected")
    check(expert_idx.dtype == torch.int32, op, f"expert_idx must be int32, got {expert_idx.dtype}")
    check(drop_pad_mode == 0, op, "only dropless mode (drop_pad_mode 0) is emulated")
    check(quant_mode == -1 and scale is None and offset is None, op, "fused quant is not emulated")
    check(expert_tokens_num_type in (0, 1), op, "expert_tokens_num_type 2 (key-value) is not emulated")
    check(row_idx_type in (0, 1), op, "row_idx_type must be 0 (scatter) or 1 (gather)")
    start, end = (active_expert_range or [0, expert_num])
    check(expert_num > 0 and 0 <= start < end <= expert_num, op, "need expert_num > 0 and a valid active range")
    T, k = expert_idx.shape
    n_rows = T * k if active_num < 0 else min(active_num, T * k)
    flat = expert_idx.reshape(-1).long()
    keep = (flat >= start) & (flat < end)
    order = torch.sort(torch.where(keep, flat, torch.full_like(flat, end)), stable=True).indices
    n_keep = min(int(keep.sum()), n_rows)
    src_sorted = order[:n_keep]
    expanded_x = torch.zeros((n_rows, x.shape[1]), dtype=x.dtype)
    expanded_x[:n_keep] = x[src_sorted // k]
    if row_idx_type == 0:
        row_idx = torch.full((T * k,), -1, dtype=torch.int32)
        row_idx[src_sorted] = torch.arange(n_keep, dtype=torch.int32)
    else:
        row_idx = torch.full((n_rows,), -1, dtype=torch.int32)
        row_idx[:n_keep] = src_sorted.to(torch.int32)
    counts = torch.bincount(flat[src_sorted] - start, minlength=end - start).to(torch.int64)
    tokens = counts if expert_tokens_num_type == 1 else counts.cumsum(0)
    if not expert_tokens_num_flag:
        tokens = torch.zeros(0, dtype=torch.int64)
    return expanded_x, row_idx, tokens, None


def _group_bounds(op: str, group_list: Tensor, group_list_type: int, n_groups: int, m: int) -> list[tuple[int, int]]:
    check(group_list.dtype == torch.int64 and group_list.numel() == n_groups, op,
          f"group_list must be int64 [{n_groups}], got {group_list.dtype} {tuple(group_list.shape)}")
    vals = group_list.tolist()
    if group_list_type == 1:
        check(all(v >= 0 for v in vals), op, "group counts must be >= 0")
        ends = torch.tensor(vals).cumsum(0).tolist()
    else:
        check(group_list_type == 0, op, "group_list_type must be 0 (cumsum) or 1 (counts)")
        check(all(b >= a for a, b in zip([0] + vals, vals, strict=False)), op,
              "cumsum group_list must be non-decreasing")
        ends = vals
    check(not ends or ends[-1] <= m, op, "group_list sums past the number of rows")
    return list(zip([0] + ends[:-1], ends, strict=False))


def npu_grouped_matmul(chip: str, x: list[Tensor], weight: list[Tensor], *, bias: list[Tensor] | None = None,
                       scale: list[Tensor] | None = None, offset: list[Tensor] | None = None,
                       antiquant_scale: list[Tensor] | None = None, antiquant_offset: list[Tensor] | None = None,
                       per_token_scale: list[Tensor] | None = None, group_list: Tensor | None = None,
                       activation_input: list[Tensor] | None = None,
                       activation_quant_scale: list[Tensor] | None = None,
                       activation_quant_offset: list[Tensor] | None = None, split_item: int = 0,
                       group_type: int | None = None, group_list_type: int = 0, act_type: int = 0,
                       output_dtype: torch.dtype | None = None, tuning_config: list[int] | None = None) -> list[Tensor]:
    """MoE form only: one x [M,K], one stacked weight [E,K,N], group_list over M, split_item 2/3, group_type 0.
    Rows of group e: y = x_e @ W_e. Quantised forms:
      int8 x, int8 W [E,K,N]: y = (x @ W) * scale[e][n] * per_token_scale[m]                     (W8A8)
      int8 x, int32 W [E,K,N/8] (8 int4 per int32): scale [E,K/G,N] per-group or [E,N]          (W4A8)
      FP8 x, FP8 W (950): block scales scale [E,K/128,N/128], per_token_scale [M,K/128]          (FP8)
    Rows past the last group are zero here (left untouched on the device)."""
    op = "npu_grouped_matmul"
    check(len(x) == 1 and len(weight) == 1, op, "only the single-tensor MoE form is emulated")
    check(split_item in (2, 3) and group_type == 0, op, "MoE form needs split_item 2/3 and group_type 0")
    check(act_type == 0 and bias is None and offset is None, op, "bias/offset/fused activation are not emulated")
    check(antiquant_scale is None and antiquant_offset is None, op, "weight-only antiquant is not emulated")
    xx, w = x[0], weight[0]
    check(xx.dim() == 2 and w.dim() == 3, op, "x [M,K] and weight [E,K,N] expected")
    E = w.shape[0]
    M, K = xx.shape
    bounds = _group_bounds(op, group_list, group_list_type, E, M)
    quant = xx.dtype == torch.int8 or xx.dtype in FP8
    if not quant:
        check(xx.dtype in FLOAT_ACT and w.dtype == xx.dtype, op,
              f"float x/weight must share a dtype: {xx.dtype}/{w.dtype}")
        out_dtype = xx.dtype
    else:
        check(scale is not None and per_token_scale is not None, op, "quantised inputs need scale and per_token_scale")
        check(output_dtype in (torch.float16, torch.bfloat16), op, "quantised output_dtype must be fp16/bf16")
        out_dtype = output_dtype
    int4 = w.dtype == torch.int32
    N = w.shape[2] * (8 if int4 else 1)
    check(w.shape[1] == K, op, f"weight K {w.shape[1]} != x K {K}")
    out = torch.zeros((M, N), dtype=torch.float32)
    for e, (a, b) in enumerate(bounds):
        if b == a:
            continue
        xe = xx[a:b]
        if not quant:
            out[a:b] = (xe.float() @ w[e].float())
        elif xx.dtype in FP8:
            out[a:b] = scaled_product(op, chip, xe, w[e], scale[0][e], per_token_scale[0][a:b], [1, 128, 128])
        elif int4:
            q = unpack_int4(w[e]).float()  # [K, N]
            s = scale[0][e].float()
            if s.dim() == 1:  # per-channel
                acc = (xe.double() @ q.double()) * s.double()
            else:  # per-group along K: partial sums per group, each with its own scale
                G = K // s.shape[0]
                check(G * s.shape[0] == K, op, "per-group scale must divide K")
                parts = torch.einsum("mgk,gkn->mgn", xe.double().unflatten(1, (-1, G)),
                                     q.double().unflatten(0, (-1, G)))
                acc = (parts * s.double()).sum(1)
            out[a:b] = (acc * per_token_scale[0][a:b].double().unsqueeze(-1)).float()
        else:
            check(w.dtype == torch.int8, op, f"int8 x needs int8 or int4-packed weights, got {w.dtype}")
            out[a:b] = scaled_product(op, chip, xe, w[e], scale[0][e], per_token_scale[0][a:b], None)
    return [out.to(out_dtype)]


def npu_moe_finalize_routing(chip: str, expanded_permuted_rows: Tensor, skip1: Tensor | None, skip2: Tensor | None,
                             bias: Tensor | None, scales: Tensor | None, expanded_src_to_dst_row: Tensor,
                             expert_for_source_row: Tensor, drop_pad_mode: int = 0) -> Tensor:
    """out[t] = skip1[t] + skip2[t] + sum_j scales[t,j] * (rows[dst[t*k+j]] + bias[expert[t,j]]); a dst of -1
    (a pair dropped by active_expert_range) contributes nothing. Index layout: token-major, as init_routing_v2's
    scatter index (row_idx_type 0) - our reading, unverified on hardware."""
    op = "npu_moe_finalize_routing"
    check(drop_pad_mode == 0, op, "only dropless mode is emulated")
    T, k = expert_for_source_row.shape
    check(expanded_src_to_dst_row.numel() == T * k, op, "expanded_src_to_dst_row must hold T*k entries")
    dst = expanded_src_to_dst_row.long().view(T, k)
    rows = expanded_permuted_rows.float()
    picked = rows[dst.clamp(min=0)]  # [T,k,H]
    if bias is not None:
        picked = picked + bias.float()[expert_for_source_row.long()]
    w = scales.float() if scales is not None else torch.ones(T, k)
    picked = torch.where((dst >= 0).unsqueeze(-1), picked * w.unsqueeze(-1), torch.zeros_like(picked))
    out = picked.sum(1)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(expanded_permuted_rows.dtype)
