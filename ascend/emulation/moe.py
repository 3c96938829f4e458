"""CPU emulation of the MoE ops with their torch_npu 2.14.0 schemas: gating top-k (incl. hash routing),
init_routing_v2, grouped_matmul (float, per-token int8, weight-only int8/int4; on 950 the MX FP8 form) and
finalize_routing.

The 950 (A5) forms come from the 2.14.0 wheel's CODE, not its docstrings (which list A2/A3 or A2 only; the code
wins, capability.py): op_plugin/meta/_meta_registrations.py npu_grouped_matmul_meta (~line 3506: `is_fp8` x/weight
float8_e4m3fn/e5m2, scale_dtype / per_token_scale_dtype "only supports float8_e8m0fnu", dtypes only A5 has) and the
TorchAir converter ge_converter/custom/grouped_matmul.py (is_arch35() branches: arch35_mxa8w4, the A5 float32
output "does not support float32 in versions prior to A5"); npu_moe_init_routing_v2_meta (~1411: MXFP8 quant_modes
2/3/16/17 with float8_e8m0fnu scales); npu_moe_finalize_routing's converter (custom/npu_moe_finalize_routing.py
line ~75: `not is_arch35()` picks MoeFinalizeRouting, A5 always MoeFinalizeRoutingV2). The MX form's shapes and
the A5 group-list rule are CANN's aclnnGroupedMatmulV4.md (ops-transformer gmm/grouped_matmul/docs, the 910_95
sections): gsM = gsN = 1, gsK = 32; scale [g, ceil(K/64), N, 2] ([g, N, ceil(K/64), 2] for a transposed weight),
per_token_scale [M, ceil(K/64), 2], both e8m0; group_list's last value / sum "不大于" (at most) x's rows.

Index conventions emulated:
- init_routing_v2 (ASSUMED, its 2.14.0 doc gives shapes only): the (token, slot) pairs are flattened token-major,
  src = t * k + j, and sorted by expert id stably (ties keep src order); pairs outside active_expert_range are
  dropped. expanded_row_idx with row_idx_type 0 is indexed by src: expanded_row_idx[src] = output row, -1 when
  dropped (doc: "当row_idx_type为0时，有效元素与无效元素共存，其中无效元素由-1填充"); with row_idx_type 1 it is
  indexed by output row: expanded_row_idx[row] = src, rows past the kept count undefined (-1 here).
- finalize_routing (doc formula): out(i) = skip1 + skip2 + sum_k scales[i,k] * (rows[dst[i + k * NUM_ROWS]] +
  bias[expert[i,k]]): its index is slot-major, so a caller holding init_routing_v2's token-major index transposes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats import INT4_PER_INT32, unpack_int4
from .basic import FLOAT_ACT, FP8, HALF_ACT, as_dtype, check, is_a5, scaled_product

INDEX_DTYPES = (torch.int32, torch.int64)
# torch_npu's own dtype codes (TORCH_NPU_DTYPE_TO_STRING_MAP in op_plugin/meta/_meta_registrations.py)
NPU_HIFLOAT8, NPU_FLOAT8_E8M0, NPU_FLOAT4_E2M1, NPU_FLOAT4_E1M2 = 290, 293, 296, 297
MX_BLOCK = 32  # the MX form's K block (aclnnGroupedMatmulV4, 910_95: gsK = 32); scales come in pairs [..., 2]
E8M0_BYTES = (torch.uint8, torch.float8_e8m0fnu)


def npu_moe_gating_top_k(chip: str, x: Tensor, k: int, *, bias: Tensor | None = None,
                         input_ids: Tensor | None = None, tid2eid: Tensor | None = None, k_group: int = 1,
                         group_count: int = 1, group_select_mode: int = 0, renorm: int = 0, norm_type: int = 0,
                         out_flag: bool = False, routed_scaling_factor: float = 1.0,
                         eps: float = 1e-20) -> tuple[Tensor, Tensor, Tensor]:
    """s = softmax(x) (norm_type 0) or sigmoid(x) (1); ids = top-k of s + bias, or tid2eid[input_ids] (hash mode);
    y = s[ids], renormalised to sum 1 (+eps) for sigmoid (ASSUMED: the doc only names eps "计算yOut使用的eps系数"),
    times routed_scaling_factor. Returns (y [T,k] x.dtype, ids int32 [T,k], norm_out fp32 [T,E]): three tensors
    whatever out_flag (meta function). doc: x 2-D fp16/bf16/fp32, E <= 2048; bias 1-D [E] of x's dtype; input_ids
    1-D [T] and tid2eid 2-D [*, k], int32/int64; meta: "input_ids and tid2eid must be both provided or both omitted"."""
    op = "npu_moe_gating_top_k"
    check(x.dim() == 2 and x.shape[1] <= 2048, op, "x must be [tokens, experts <= 2048]")
    check(x.dtype in FLOAT_ACT, op, f"unsupported dtype {x.dtype}")
    check((input_ids is None) == (tid2eid is None), op, "input_ids and tid2eid must be both provided or both omitted")
    check(norm_type in (0, 1), op, "norm_type must be 0 (softmax) or 1 (sigmoid)")
    check(renorm == 0, op, "renorm only supports 0 (doc)")
    check(group_count == 1 and k_group == 1, op, "group-limited routing is not emulated")
    check(1 <= k <= x.shape[1], op, "k out of range")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == x.shape[1] and bias.dtype == x.dtype, op,
              f"bias must be 1-D [{x.shape[1]}] with x's dtype {x.dtype} (doc), got {bias.dtype} {tuple(bias.shape)}")
    s = x.float().softmax(-1) if norm_type == 0 else x.float().sigmoid()
    if tid2eid is not None:
        check(input_ids.dim() == 1 and input_ids.shape[0] == x.shape[0] and input_ids.dtype in INDEX_DTYPES, op,
              "input_ids must be int32/int64 [T]")
        check(tid2eid.dim() == 2 and tid2eid.shape[1] == k and tid2eid.dtype in INDEX_DTYPES, op,
              f"tid2eid must be int32/int64 [vocab, {k}]")
        ids = tid2eid[input_ids.long()].long()
    else:
        sel = s + bias.float() if bias is not None else s
        ids = sel.topk(k, dim=-1).indices
    y = s.gather(-1, ids)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), ids.to(torch.int32), s


def npu_moe_init_routing_v2(chip: str, x: Tensor, expert_idx: Tensor, *, scale: Tensor | None = None,
                            offset: Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                            expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                            active_expert_range: list[int] = (), row_idx_type: int = 0,
                            x_dtype: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dropless permutation of [T,H] rows into expert order. doc: expert ids "不能超过专家数" (below expert_num);
    expert_num in (0, 10240]; active_expert_range [start, end) with end <= expert_num; drop_pad_mode 0,
    expert_tokens_num_type 1/2 and expert_tokens_num_flag True are the only supported values ("当前仅支持").
    Outputs (meta shapes): expanded_x [T*k or active_num, H] (rows past the kept count zero here, undefined on the
    device), expanded_row_idx int32 [T*k], counts int64 [end - start], expanded_scale fp32 [rows] (undefined
    without scale: zeros here)."""
    op = "npu_moe_init_routing_v2"
    check(x.dim() == 2 and expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0], op,
          "x [T,H] and expert_idx [T,k] expected")
    check(x.dtype in FLOAT_ACT, op, f"x dtype {x.dtype}: only the unquantised float form is emulated")
    check(expert_idx.dtype == torch.int32, op, f"expert_idx must be int32, got {expert_idx.dtype}")
    check(drop_pad_mode == 0, op, "drop_pad_mode: only 0 (dropless) is supported")
    check(quant_mode == -1 and scale is None and offset is None and x_dtype is None, op,
          "fused quantisation is not emulated")
    check(expert_tokens_num_type == 1, op, "expert_tokens_num_type: the doc supports only 1 and 2 (2, key-value, "
          "is not emulated)")
    check(expert_tokens_num_flag, op, "expert_tokens_num_flag: only True is supported (doc)")
    check(row_idx_type in (0, 1), op, "row_idx_type must be 0 or 1")
    check(0 < expert_num <= 10240, op, f"expert_num must be in (0, 10240], got {expert_num}")
    rng = list(active_expert_range) or [0, expert_num]
    check(len(rng) == 2 and 0 <= rng[0] < rng[1] <= expert_num, op,
          f"active_expert_range {rng} must satisfy 0 <= start < end <= expert_num ({expert_num})")
    start, end = rng
    T, k = expert_idx.shape
    flat = expert_idx.reshape(-1).long()
    if flat.numel():
        check(int(flat.min()) >= 0 and int(flat.max()) < expert_num, op,
              f"expert ids must lie in [0, expert_num = {expert_num}), got [{int(flat.min())}, {int(flat.max())}]")
    n_rows = T * k if active_num <= 0 else min(active_num, T * k)
    keep = (flat >= start) & (flat < end)
    order = torch.sort(torch.where(keep, flat, torch.full_like(flat, end)), stable=True).indices
    n_keep = min(int(keep.sum()), n_rows)
    src_sorted = order[:n_keep]
    expanded_x = torch.zeros((n_rows, x.shape[1]), dtype=x.dtype)
    expanded_x[:n_keep] = x[src_sorted // k]
    row_idx = torch.full((T * k,), -1, dtype=torch.int32)
    if row_idx_type == 0:
        row_idx[src_sorted] = torch.arange(n_keep, dtype=torch.int32)
    else:
        row_idx[:n_keep] = src_sorted.to(torch.int32)
    counts = torch.bincount(flat[src_sorted] - start, minlength=end - start).to(torch.int64)
    return expanded_x, row_idx, counts, torch.zeros(n_rows, dtype=torch.float32)


def _group_bounds(op: str, chip: str, group_list: Tensor, group_list_type: int, n_groups: int,
                  m: int) -> list[tuple[int, int]]:
    """doc, group_type 0 with a tensor group_list: int64, one entry per weight group (<= 1024); type 0 (cumsum):
    non-negative, non-decreasing, last value == x's rows; type 1 (counts): non-negative, length not 1, sum == x's
    rows ("数值的总和与x中tensor的第一维相等"). On 950 the last value / the sum may be smaller
    ("不大于x中tensor的第一维", aclnnGroupedMatmulV4.md, 910_95 group-type table): the rows past it belong to no
    group."""
    check(group_list is not None and group_list.dtype == torch.int64 and group_list.numel() == n_groups, op,
          f"group_list must be int64 [{n_groups}]")
    check(n_groups <= 1024, op, "at most 1024 groups (doc)")
    vals = group_list.tolist()
    check(all(v >= 0 for v in vals), op, "group_list values must be non-negative")
    if group_list_type == 1:
        check(len(vals) != 1, op, "a counts group_list (group_list_type 1) cannot have length 1 (doc)")
        ends = torch.tensor(vals).cumsum(0).tolist()
    else:
        check(group_list_type == 0, op, "group_list_type must be 0 (cumsum) or 1 (counts)")
        check(all(b >= a for a, b in zip(vals, vals[1:], strict=False)), op, "cumsum group_list must be non-decreasing")
        ends = vals
    if is_a5(chip):
        check(ends[-1] <= m, op, f"group sizes must add up to at most x's {m} rows (950), they add up to {ends[-1]}")
    else:
        check(ends[-1] == m, op, f"group sizes must add up to x's {m} rows (doc), they add up to {ends[-1]}")
    return list(zip([0] + ends[:-1], ends, strict=False))


def _is_transposed(w: Tensor) -> bool:
    """The meta's is_transpose_weight: a [E, K, N] weight that is the transposed view of a contiguous [E, N, K]."""
    return w.stride()[-2] == 1 and w.stride()[-1] == w.shape[-2]


def _mx_values(codes: Tensor, scale: Tensor, k_axis: int) -> Tensor:
    """fp32 codes * 2^(scale byte - 127) with one scale per MX_BLOCK along `k_axis` of `codes`; `scale` has the
    pair layout [..., ceil(K/64), 2] folded in already as [..., ceil(K/64) * 2] along the same axis."""
    K = codes.shape[k_axis]
    s = torch.exp2(scale.view(torch.uint8).float() - 127.0).repeat_interleave(MX_BLOCK, dim=k_axis)
    return codes.float() * s.narrow(k_axis, 0, K)


def _check_mx(op: str, xx: Tensor, w: Tensor, scale: list[Tensor] | None, per_token_scale: list[Tensor] | None,
              scale_dtype: int | None, per_token_scale_dtype: int | None) -> tuple[Tensor, Tensor]:
    """The MX FP8 form (aclnnGroupedMatmulV4, 910_95 "动态量化（mx量化）"): x and weight float8_e4m3fn/e5m2, scale and
    per_token_scale e8m0 bytes (scale_dtype / per_token_scale_dtype float8_e8m0fnu, meta). Returns (the weight's
    fp32 values [E, K, N], x's fp32 values [M, K])."""
    check(scale is not None and per_token_scale is not None, op,
          "FP8 x / weight need scale and per_token_scale (the MX form; meta: is_fp8)")
    check(scale_dtype == NPU_FLOAT8_E8M0 and per_token_scale_dtype == NPU_FLOAT8_E8M0, op,
          "the FP8 form is emulated as MX only: scale_dtype and per_token_scale_dtype must be float8_e8m0fnu "
          f"({NPU_FLOAT8_E8M0}), got {scale_dtype} / {per_token_scale_dtype} (the G-B / per-channel FP8 forms are "
          "not emulated)")
    E, K, N = w.shape
    M = xx.shape[0]
    kb = -(-K // (2 * MX_BLOCK))  # ceil(K / 64): the scales come in pairs
    s, ps = scale[0], per_token_scale[0]
    trans = _is_transposed(w)
    want = (E, N, kb, 2) if trans else (E, kb, N, 2)
    check(s.dtype in E8M0_BYTES and tuple(s.shape) == want, op,
          f"scale must be e8m0 bytes {list(want)} for a{' transposed' if trans else 'n untransposed'} weight "
          f"[E, K, N] = {list(w.shape)} (aclnnGroupedMatmulV4 mx table), got {s.dtype} {list(s.shape)}")
    check(ps.dtype in E8M0_BYTES and tuple(ps.shape) == (M, kb, 2), op,
          f"per_token_scale must be e8m0 bytes [M, ceil(K/64), 2] = {[M, kb, 2]}, got {ps.dtype} {list(ps.shape)}")
    if trans:  # scale [E, N, kb, 2] -> per K block along the last axis of the [E, N, K] weight
        wv = _mx_values(w.transpose(1, 2), s.reshape(E, N, kb * 2), 2).transpose(1, 2)
    else:
        wv = _mx_values(w, s.permute(0, 1, 3, 2).reshape(E, kb * 2, N), 1)
    return wv, _mx_values(xx, ps.reshape(M, kb * 2), 1)


def npu_grouped_matmul(chip: str, x: list[Tensor], weight: list[Tensor], *, bias: list[Tensor] | None = None,
                       scale: list[Tensor] | None = None, offset: list[Tensor] | None = None,
                       antiquant_scale: list[Tensor] | None = None, antiquant_offset: list[Tensor] | None = None,
                       per_token_scale: list[Tensor] | None = None, group_list: Tensor | None = None,
                       activation_input: list[Tensor] | None = None,
                       activation_quant_scale: list[Tensor] | None = None,
                       activation_quant_offset: list[Tensor] | None = None, split_item: int | None = 0,
                       group_type: int | None = None, group_list_type: int | None = 0, act_type: int | None = 0,
                       tuning_config: list[int] | None = None, output_dtype: int | None = None,
                       x_dtype: int | None = None, weight_dtype: int | None = None, scale_dtype: int | None = None,
                       per_token_scale_dtype: int | None = None) -> list[Tensor]:
    """The single-tensor MoE form ("单单单", group_type 0, split_item 2/3): x [M,K], weight [E,K,N], rows of group e:
    y = x_e @ W_e. Forms (doc tables, tensor group_list, A2):
      float: x, weight fp16/bf16/fp32 of one dtype, output x's dtype;
      per-token quant: x int8, weight int8, scale [E,N] fp32/bf16, per_token_scale [M] fp32, output bf16/fp16;
      weight-only (伪量化): x fp16/bf16, weight int8 [E,K,N] or int4 packed 8 per int32 [E,K,N/8], antiquant_scale
        [E,N] (per-channel) or [E,G,N] (per-group, G divides K) in x's dtype, output x's dtype;
      (950: the float form in bf16/fp16 only, CANN's 910_95 table);
      950 only, MX FP8 (the wheel's meta + CANN's 910_95 table, header): x [M,K] and weight [E,K,N] float8, scale
        e8m0 [E, ceil(K/64), N, 2] ([E, N, ceil(K/64), 2] when weight is the transposed view of [E,N,K]),
        per_token_scale e8m0 [M, ceil(K/64), 2], scale_dtype = per_token_scale_dtype = float8_e8m0fnu (293),
        output_dtype bf16/fp16/fp32: y = sum over K of (x * xscale) (w * wscale), fp32 accumulation.
    Weight-only math (ASSUMED): (q * antiquant_scale) rounded to x's dtype, products accumulated in fp32.
    Rows past the last group (950 allows group sizes adding up to fewer than M) are undefined on the device: NaN
    here, so a caller that reads them (or multiplies them by zero) fails loudly."""
    op = "npu_grouped_matmul"
    check(len(x) == 1 and len(weight) == 1, op, "only the single-tensor MoE form is emulated")
    check(split_item in (2, 3) and group_type == 0, op, "the single-tensor form needs split_item 2/3 and group_type 0")
    check(act_type == 0 and bias is None and offset is None and antiquant_offset is None, op,
          "bias / offset / antiquant_offset / fused activation are not emulated")
    check(activation_input is None and activation_quant_scale is None and activation_quant_offset is None, op,
          "activation_* are reserved (None only, doc)")
    a5 = is_a5(chip)
    xx, w = x[0], weight[0]
    if a5:  # meta: "x_dtype supports hifloat8, mxfp4 for now", the same for weight_dtype; scale dtypes e8m0 only
        for name, v in (("x_dtype", x_dtype), ("weight_dtype", weight_dtype)):
            check(v in (None, NPU_HIFLOAT8, NPU_FLOAT4_E2M1, NPU_FLOAT4_E1M2), op,
                  f"{name} supports hifloat8, mxfp4 for now, but it is {v} (meta)")
        for name, v in (("scale_dtype", scale_dtype), ("per_token_scale_dtype", per_token_scale_dtype)):
            check(v in (None, NPU_FLOAT8_E8M0), op,
                  f"{name} only supports float8_e8m0fnu for now, but it is {v} (meta)")
        check(x_dtype is None and weight_dtype is None and tuning_config is None, op,
              "hifloat8 / FP4 operands (x_dtype / weight_dtype) and tuning_config are not emulated")
    else:
        check(all(v is None for v in (tuning_config, x_dtype, weight_dtype, scale_dtype, per_token_scale_dtype)), op,
              "tuning_config / *_dtype are not in the 2.14.0 doc")
        check(xx.dtype not in FP8 and w.dtype not in FP8, op, "FP8 operands are A5 (950) forms: the meta's is_fp8 "
              "with float8_e8m0fnu scale dtypes and the TorchAir converter's arch35 branches")
    check(xx.dim() == 2 and w.dim() == 3, op, "x [M,K] and weight [E,K,N] expected (doc: weight 3-D, x 2-D)")
    E = w.shape[0]
    M, K = xx.shape
    check(w.shape[1] == K, op, f"weight K {w.shape[1]} != x K {K}")
    check(K < 65536 and w.shape[2] < 65536, op, "A2 inner limit: x's and weight's last dims below 65536 (doc)")
    bounds = _group_bounds(op, chip, group_list, group_list_type, E, M)
    out_dt = as_dtype(output_dtype)
    mx = None
    if xx.dtype in FP8:  # 950: the MX form
        check(w.dtype in FP8, op, f"FP8 x needs FP8 weights (meta is_fp8), got {w.dtype}")
        check(out_dt in FLOAT_ACT, op, f"the MX form's output_dtype must be bf16/fp16/fp32, got {out_dt}")
        check(antiquant_scale is None, op, "the MX form takes no antiquant_scale")
        mx = _check_mx(op, xx, w, scale, per_token_scale, scale_dtype, per_token_scale_dtype)
        N = w.shape[2]
    elif xx.dtype == torch.int8:  # per-token quantisation
        check(w.dtype == torch.int8, op, f"int8 x needs int8 weights (doc tables), got {w.dtype}")
        check(scale is not None and per_token_scale is not None, op, "per-token form needs scale and per_token_scale")
        check(scale[0].dtype in (torch.float32, torch.bfloat16) and tuple(scale[0].shape) == (E, w.shape[2]), op,
              "scale must be fp32/bf16 [E, N]")
        check(out_dt in HALF_ACT, op, "per-token output_dtype must be bf16/fp16 (doc)")
        N = w.shape[2]
    elif antiquant_scale is not None:  # weight-only
        check(xx.dtype in HALF_ACT and w.dtype in (torch.int8, torch.int32), op,
              "weight-only form: x fp16/bf16, weight int8 or int4 (int32-packed)")
        check(scale is None and per_token_scale is None, op, "weight-only form takes no scale / per_token_scale")
        N = w.shape[2] * (INT4_PER_INT32 if w.dtype == torch.int32 else 1)
        s = antiquant_scale[0]
        check(s.dtype == xx.dtype, op, f"antiquant_scale must have x's dtype {xx.dtype}, got {s.dtype}")
        check((s.dim() == 2 and tuple(s.shape) == (E, N)) or (s.dim() == 3 and s.shape[0] == E and s.shape[2] == N
              and K % s.shape[1] == 0), op, f"antiquant_scale must be [E, N] or [E, G, N] with G | K, got "
              f"{tuple(s.shape)}")
        check(w.dtype == torch.int32 or s.dim() == 2, op, "int8 weights are per-channel only (doc)")
        check(out_dt in (None, xx.dtype), op, "weight-only output_dtype must be None or x's dtype")
    else:
        check(xx.dtype in FLOAT_ACT and w.dtype == xx.dtype, op,
              f"float x/weight must share a dtype: {xx.dtype}/{w.dtype}")
        # 950's unquantised rows are bf16/bf16 and fp16/fp16 only (aclnnGroupedMatmulV4, 910_95 非量化场景 table)
        check(not a5 or xx.dtype in HALF_ACT, op, f"950's float form takes bf16/fp16 x and weight, got {xx.dtype}")
        check(scale is None and per_token_scale is None, op, "the float form takes no scales")
        check(out_dt in (None, xx.dtype), op, "float output_dtype must be None or x's dtype")
        N = w.shape[2]
    # rows outside every group: undefined on the device (only 950 allows them) -> NaN
    out = torch.full((M, N), float("nan"), dtype=torch.float32)
    for e, (a, b) in enumerate(bounds):
        if b == a:
            continue
        xe = xx[a:b]
        if mx is not None:
            out[a:b] = mx[1][a:b] @ mx[0][e]
        elif xx.dtype == torch.int8:
            out[a:b] = scaled_product(op, xe, w[e], scale[0][e], per_token_scale[0][a:b])
        elif antiquant_scale is not None:
            q = (unpack_int4(w[e]) if w.dtype == torch.int32 else w[e]).float()  # [K, N]
            s = antiquant_scale[0][e].float()  # [N] per-channel or [G, N] per-group
            if s.dim() == 2:
                s = s.repeat_interleave(K // s.shape[0], dim=0)
            wd = (q * s).to(xx.dtype).float()
            out[a:b] = xe.float() @ wd
        else:
            out[a:b] = xe.float() @ w[e].float()
    dt = out_dt if xx.dtype == torch.int8 or mx is not None else xx.dtype
    return [out.to(dt)]


def npu_moe_finalize_routing(chip: str, expanded_permuted_rows: Tensor, skip1: Tensor | None, skip2: Tensor | None,
                             bias: Tensor | None, scales: Tensor | None, expanded_src_to_dst_row: Tensor,
                             export_for_source_row: Tensor | None, drop_pad_mode: int | None = 0,
                             k: int | None = 1) -> Tensor:
    """doc formula: out(i,j) = skip1 + skip2 + sum_k scales[i,k] * (rows[dst[i + k * NUM_ROWS], j] +
    bias[expert[i,k], j]). doc: rows 2-D fp16/bf16/fp32; skip1/skip2/bias/scales of rows' dtype ("数据类型要求与
    expanded_permuted_rows一致"); skip2 None forces skip1 None; dst int32 [NUM_ROWS*K] with values in
    [0, NUM_ROWS*K - 1] (drop_pad_mode 0, the only mode); "当scales为None时，则需要指定k". NUM_ROWS = scales' rows,
    else len(dst) / k (meta function)."""
    op = "npu_moe_finalize_routing"
    rows = expanded_permuted_rows
    check(rows.dim() == 2 and rows.dtype in FLOAT_ACT, op, "expanded_permuted_rows must be 2-D fp16/bf16/fp32")
    check(drop_pad_mode == 0, op, "drop_pad_mode: only 0 (doc)")
    dst = expanded_src_to_dst_row
    check(dst.dim() == 1 and dst.dtype == torch.int32, op, "expanded_src_to_dst_row must be int32 1-D")
    if scales is not None:
        num_rows, kk = scales.shape
        check(scales.dtype == rows.dtype, op, f"scales must have the rows' dtype {rows.dtype}, got {scales.dtype}")
    else:
        check(k is not None and k > 0 and dst.numel() % k == 0, op, "k must be given when scales is None (doc)")
        kk = k
        num_rows = dst.numel() // kk
    check(dst.numel() == num_rows * kk, op, f"expanded_src_to_dst_row must hold NUM_ROWS*K = {num_rows * kk} entries")
    if dst.numel():
        check(int(dst.min()) >= 0 and int(dst.max()) < rows.shape[0] and int(dst.max()) <= num_rows * kk - 1, op,
              "expanded_src_to_dst_row values must lie in [0, NUM_ROWS*K - 1] (drop_pad_mode 0)")
    check(not (skip2 is None and skip1 is not None), op, "skip2 None requires skip1 None (doc)")
    for name, t in (("skip1", skip1), ("skip2", skip2), ("bias", bias)):
        check(t is None or t.dtype == rows.dtype, op, f"{name} must have the rows' dtype {rows.dtype}")
    idx = dst.long().view(kk, num_rows).t()  # [NUM_ROWS, K]: dst[i + k * NUM_ROWS]
    picked = rows.float()[idx]  # [NUM_ROWS, K, H]
    if bias is not None:
        check(export_for_source_row is not None, op, "bias needs export_for_source_row")
        picked = picked + bias.float()[export_for_source_row.long()]
    if scales is not None:
        picked = picked * scales.float().unsqueeze(-1)
    out = picked.sum(1)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(rows.dtype)
