"""Fake (meta) implementations of the emulated torch_npu operators: output shapes and dtypes without computing, so
that torch.compile / torch._dynamo can trace a step that calls them, as TorchAir traces the real torch_npu ops
through the meta functions the wheel registers (torch_npu/op_plugin/meta/_meta_registrations.py).

Two kinds:
  - an op whose CPU kernel computes with torch ops alone and reads no tensor value on the host (rms_norm, the MX
    quantisation, quant_matmul, the mHC ops, ...) is its own fake: run on fake tensors, it produces exactly the
    shapes it produces on real ones, and nothing here can drift from it;
  - an op whose kernel reads values on the host (group lists, sequence lengths, expert ids: to split its work or to
    check a documented constraint) gets the shape rule below, written from the 2.14.0 meta function named in each
    docstring, for the forms the emulation implements.
tests/test_ascend_fake.py replays every emulated call a decode step makes on 950DT/910B/910C under FakeTensorMode and
asserts the fake's shapes and dtypes equal the kernel's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats import INT4_PER_INT32
from .basic import as_dtype


def npu_moe_init_routing_v2(chip: str, x: Tensor, expert_idx: Tensor, *, scale: Tensor | None = None,
                            offset: Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                            expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                            active_expert_range: list[int] = (), row_idx_type: int = 0,
                            x_dtype: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """npu_moe_init_routing_v2_meta, dropless unquantised form: expanded_x [min(active_num, T*k) or T*k, H] in x's
    dtype, expanded_row_idx int32 [T*k], counts int64 [end - start of active_expert_range, else expert_num] when
    expert_tokens_num_flag, expanded_scale fp32 [rows]."""
    T, k = expert_idx.shape
    rows = T * k if active_num <= 0 else min(active_num, T * k)
    rng = list(active_expert_range)
    n_counts = rng[1] - rng[0] if rng else expert_num
    return (x.new_empty((rows, x.shape[1])), x.new_empty((T * k,), dtype=torch.int32),
            x.new_empty((n_counts,) if expert_tokens_num_flag else (0,), dtype=torch.int64),
            x.new_empty((rows,), dtype=torch.float32))


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
    """npu_grouped_matmul_meta, single-tensor form (split_item 2/3, group_type 0): one output [sum of x's rows, N],
    N = weight's last dim (times 8 for int4 packed in int32), in output_dtype, else x's dtype."""
    w = weight[0]
    n = w.shape[-1] * (INT4_PER_INT32 if w.dtype == torch.int32 else 1)
    rows = sum(t.shape[0] for t in x)
    return [x[0].new_empty((rows, n), dtype=as_dtype(output_dtype) or x[0].dtype)]


def npu_moe_finalize_routing(chip: str, expanded_permuted_rows: Tensor, skip1: Tensor | None, skip2: Tensor | None,
                             bias: Tensor | None, scales: Tensor | None, expanded_src_to_dst_row: Tensor,
                             export_for_source_row: Tensor | None, drop_pad_mode: int | None = 0,
                             k: int | None = 1) -> Tensor:
    """npu_moe_finalize_routing_meta, dropless: [NUM_ROWS, H] in the rows' dtype, NUM_ROWS = scales' rows, else
    len(expanded_src_to_dst_row) / k."""
    n = scales.shape[0] if scales is not None else expanded_src_to_dst_row.shape[0] // k
    return expanded_permuted_rows.new_empty((n, expanded_permuted_rows.shape[1]))


def _heads(key: Tensor, layout_key: str) -> int:
    return key.shape[1] if layout_key == "TND" else key.shape[2]


def npu_lightning_indexer(chip: str, query: Tensor, key: Tensor, weights: Tensor, *,
                          actual_seq_lengths_query: Tensor | None = None, actual_seq_lengths_key: Tensor | None = None,
                          block_table: Tensor | None = None, layout_query: str = "BSND", layout_key: str = "BSND",
                          sparse_count: int = 2048, sparse_mode: int = 3, pre_tokens: int = 2 ** 63 - 1,
                          next_tokens: int = 2 ** 63 - 1, return_value: bool = False) -> tuple[Tensor, Tensor]:
    """npu_lightning_indexer_forward (meta): indices int32 [B, S1, N2, K] (BSND query) or [T1, N2, K] (TND), N2 the
    key's head axis (1 for TND keys, 2 otherwise); values of that shape in the query's dtype when return_value, else
    an empty [0]."""
    lead = tuple(query.shape[:2]) if layout_query == "BSND" else (query.shape[0],)
    shape = (*lead, _heads(key, layout_key), sparse_count)
    values = query.new_empty(shape if return_value else (0,))
    return query.new_empty(shape, dtype=torch.int32), values


def npu_sparse_flash_attention(chip: str, query: Tensor, key: Tensor, value: Tensor | None, sparse_indices: Tensor,
                               scale_value: float, *, block_table: Tensor | None = None,
                               actual_seq_lengths_query: Tensor | None = None,
                               actual_seq_lengths_kv: Tensor | None = None, query_rope: Tensor | None = None,
                               key_rope: Tensor | None = None, sparse_block_size: int = 1, layout_query: str = "BSND",
                               layout_kv: str = "BSND", sparse_mode: int = 3, pre_tokens: int = 2 ** 63 - 1,
                               next_tokens: int = 2 ** 63 - 1, attention_mode: int = 0,
                               return_softmax_lse: bool = False,
                               sinks: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """npu_sparse_flash_attention (meta): the output has the query's shape and dtype; softmax_max / softmax_sum are
    [0]-shaped fp32 unless return_softmax_lse, which the emulation does not implement (training only)."""
    return query.new_empty(query.shape), query.new_empty((0,), dtype=torch.float32), \
        query.new_empty((0,), dtype=torch.float32)


FAKES = {
    "npu_moe_init_routing_v2": npu_moe_init_routing_v2,
    "npu_grouped_matmul": npu_grouped_matmul,
    "npu_moe_finalize_routing": npu_moe_finalize_routing,
    "npu_lightning_indexer": npu_lightning_indexer,
    "npu_sparse_flash_attention": npu_sparse_flash_attention,
}
