"""Shape functions (fake kernels) of the emulated MoE operators, so that torch.compile / torch._dynamo can trace a
call to them as one opaque operator, as they trace the real torch_npu ops through the wheel's meta registrations.

Each mirrors the output shapes and dtypes of the 2.14.0 wheel's meta function (op_plugin/meta/_meta_registrations.py:
npu_moe_init_routing_v2_meta, npu_dynamic_mx_quant's meta, npu_grouped_matmul_meta, npu_moe_finalize_routing_meta)
for the forms the emulation implements; the checks stay in the CPU kernels (they run on real inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .basic import NpuOpError, _mx_fp8_type, as_dtype

INT4_PER_INT32 = 8


def npu_moe_init_routing_v2(x: Tensor, expert_idx: Tensor, *, scale: Tensor | None = None,
                            offset: Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                            expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                            active_expert_range: list[int] = (), row_idx_type: int = 0,
                            x_dtype: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """meta, dropless and unquantised: expanded_x [rows, H] x.dtype with rows = T*k or min(active_num, T*k),
    expanded_row_idx int32 [T*k], counts int64 [range length], expanded_scale fp32 [rows]."""
    T, k = expert_idx.shape
    rows = T * k if active_num <= 0 else min(active_num, T * k)
    rng = list(active_expert_range) or [0, expert_num]
    return (x.new_empty(rows, x.shape[1]), expert_idx.new_empty(T * k, dtype=torch.int32),
            x.new_empty(rng[1] - rng[0], dtype=torch.int64), x.new_empty(rows, dtype=torch.float32))


def npu_dynamic_mx_quant(input: Tensor, *, axis: int = -1, round_mode: str = "rint", dst_type: int = 296,
                         block_size: int = 32, scale_alg: int | None = 0, dst_type_max: float = 0.0,
                         max_low_bound: float = 0.0) -> tuple[Tensor, Tensor]:
    """meta, FP8 on the last axis: y of input's shape in the FP8 dtype, mxscale uint8 [..., ceil(nb / 2), 2]."""
    out_dt = _mx_fp8_type(dst_type)
    if out_dt is None:
        raise NpuOpError(f"npu_dynamic_mx_quant: only FP8 outputs are emulated, got dst_type {dst_type}")
    nb = -(-input.shape[-1] // block_size)
    return (input.new_empty(input.shape, dtype=out_dt),
            input.new_empty(*input.shape[:-1], -(-nb // 2), 2, dtype=torch.uint8))


def npu_grouped_matmul(x: list[Tensor], weight: list[Tensor], *, bias: list[Tensor] | None = None,
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
    """meta, the single-tensor form (split_item 2/3): one [M, N] output, N = weight[0].shape[2] (times 8 for an
    int32-packed int4 weight), output_dtype or else x's dtype."""
    if split_item not in (2, 3) or len(x) != 1 or len(weight) != 1 or weight[0].dim() != 3:
        raise NpuOpError("npu_grouped_matmul: only the single-tensor MoE form is emulated")
    n = weight[0].shape[2] * (INT4_PER_INT32 if weight[0].dtype == torch.int32 else 1)
    return [x[0].new_empty(x[0].shape[0], n, dtype=as_dtype(output_dtype) or x[0].dtype)]


def npu_moe_finalize_routing(expanded_permuted_rows: Tensor, skip1: Tensor | None, skip2: Tensor | None,
                             bias: Tensor | None, scales: Tensor | None, expanded_src_to_dst_row: Tensor,
                             export_for_source_row: Tensor | None, drop_pad_mode: int | None = 0,
                             k: int | None = 1) -> Tensor:
    """meta, dropless: [scales' rows, or dst's length / k, H] in the rows' dtype."""
    rows = scales.shape[0] if scales is not None else expanded_src_to_dst_row.shape[0] // k
    return expanded_permuted_rows.new_empty(rows, expanded_permuted_rows.shape[1])


FAKES = {name: fn for name, fn in globals().items() if name.startswith("npu_")}
