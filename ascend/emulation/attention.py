"""CPU emulation of the DSA ops: npu_lightning_indexer and npu_sparse_flash_attention, with their torch_npu 2.14.0
schemas (ascend/schemas/torch_npu-2.14.0.yaml). The wheel's docs give dtypes and layouts but no chip list and no
head/D limits; those (D = 128 / 512 + 64, head counts, `sinks` on 950 only, attention_mode 2) come from the op-plugin
docs (shared/spec/torch-npu-ops.md section 4) and are listed in capability.UNVERIFIED.

Layouts emulated: BSND and TND queries; BSND, TND and paged PA_BSND keys (block_table + per-batch kv lengths).
TND needs cumulative (prefix-sum) int32 actual_seq_lengths, as the doc states.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .basic import HALF_ACT, INT63, check, is_a5

A5_INDEXER_HEADS = (8, 16, 24, 32, 64)


def _valid_sparse_count(n: int) -> bool:
    return 1 <= n <= 2048 or (3072 <= n <= 8192 and n % 1024 == 0)


def _split_queries(op: str, q: Tensor, layout: str, cu: Tensor | None) -> list[Tensor]:
    """Per batch: [S1_b, N, D] query tensors."""
    if layout == "BSND":
        check(q.dim() == 4, op, "BSND query must be 4-D")
        return list(q.unbind(0))
    check(layout == "TND", op, f"layout_query must be BSND or TND, got {layout!r}")
    check(q.dim() == 3, op, "TND query must be 3-D")
    check(cu is not None and cu.dtype == torch.int32, op, "TND needs int32 cumulative actual_seq_lengths_query")
    ends = cu.tolist()
    check(all(b >= a for a, b in zip([0] + ends, ends, strict=False)) and ends[-1] == q.shape[0], op,
          "actual_seq_lengths_query must be a prefix sum ending at T")
    return [q[a:b] for a, b in zip([0] + ends[:-1], ends, strict=False)]


def _split_keys(op: str, k: Tensor, layout: str, lens: Tensor | None, block_table: Tensor | None,
                batches: int) -> list[Tensor]:
    """Per batch: [S2_b, 1, D] key tensors."""
    if layout == "BSND":
        check(k.dim() == 4 and k.shape[2] == 1, op, "BSND key must be [B,S2,1,D] (one kv head)")
        keys = list(k.unbind(0))
        if lens is not None:
            keys = [kb[:int(n)] for kb, n in zip(keys, lens.tolist(), strict=False)]
        return keys
    if layout == "TND":
        check(k.dim() == 3 and k.shape[1] == 1, op, "TND key must be [T2,1,D]")
        check(lens is not None and lens.dtype == torch.int32, op, "TND needs int32 cumulative actual_seq_lengths_kv")
        ends = lens.tolist()
        return [k[a:b] for a, b in zip([0] + ends[:-1], ends, strict=False)]
    check(layout == "PA_BSND", op, f"unknown key layout {layout!r}")
    check(k.dim() == 4 and k.shape[2] == 1, op, "paged key must be [blocks, block_size, 1, D]")
    bs = k.shape[1]
    check(bs % 16 == 0 and bs <= 1024, op, f"block_size must be a multiple of 16 and <= 1024, got {bs}")
    check(block_table is not None and block_table.dim() == 2 and block_table.shape[0] == batches, op,
          "PA_BSND needs block_table [B, max_blocks]")
    check(lens is not None and lens.numel() == batches, op, "PA_BSND needs per-batch kv lengths")
    out = []
    for b, n in enumerate(lens.tolist()):
        nblk = -(-int(n) // bs)
        check(nblk <= block_table.shape[1], op, "block_table too short for the kv length")
        rows = k[block_table[b, :nblk].long()].flatten(0, 1) if nblk else k[:0, 0]
        out.append(rows[:int(n)])
    return out


def _causal_limit(s1: int, s2: int, sparse_mode: int) -> Tensor:
    """sparse_mode 3 (right-down causal): query i of s1 sees key j iff j <= i + s2 - s1."""
    i = torch.arange(s1)
    return i + (s2 - s1) if sparse_mode == 3 else torch.full((s1,), s2 - 1)


def npu_lightning_indexer(chip: str, query: Tensor, key: Tensor, weights: Tensor, *,
                          actual_seq_lengths_query: Tensor | None = None, actual_seq_lengths_key: Tensor | None = None,
                          block_table: Tensor | None = None, layout_query: str = "BSND", layout_key: str = "BSND",
                          sparse_count: int = 2048, sparse_mode: int = 3, pre_tokens: int = INT63,
                          next_tokens: int = INT63, return_value: bool = False) -> tuple[Tensor, Tensor | None]:
    """score_j = sum_h w_h * relu(q_h . k_j) (fp32); top-sparse_count key positions per query, best first,
    int32 [B,S1,1,K] (BSND) or [T1,1,K] (TND), -1 padded when fewer keys are visible. The second output is
    [0]-shaped unless return_value (meta function). doc: query, key and weights "数据类型支持bfloat16和float16"."""
    op = "npu_lightning_indexer"
    check(query.shape[-1] == 128 and key.shape[-1] == 128, op, f"D must be 128, got {query.shape[-1]}")
    check(query.dtype in HALF_ACT and key.dtype == query.dtype, op, "query/key must be bf16 or fp16 (same dtype)")
    check(weights.dtype in HALF_ACT, op, f"weights must be bf16/fp16 (doc), got {weights.dtype}")
    # doc: query / key / weights "不支持非连续" (non-contiguous tensors are not supported)
    check(query.is_contiguous() and key.is_contiguous() and weights.is_contiguous(), op,
          "query, key and weights must be contiguous (doc)")
    n1 = query.shape[-2]
    check(n1 in A5_INDEXER_HEADS if is_a5(chip) else 1 <= n1 <= 64, op, f"query heads N1={n1} unsupported on {chip}")
    check(_valid_sparse_count(sparse_count), op, f"sparse_count {sparse_count} not in [1,2048] or 3072..8192/1024")
    check(sparse_mode in (0, 3), op, "sparse_mode must be 0 or 3")
    check(pre_tokens == INT63 and next_tokens == INT63, op, "pre/next_tokens only support the default")
    check(not (return_value and layout_key == "PA_BSND"), op, "return_value is not supported with a paged key")
    qs = _split_queries(op, query, layout_query, actual_seq_lengths_query)
    ws = _split_queries(op, weights.unsqueeze(-1), layout_query, actual_seq_lengths_query)
    ks = _split_keys(op, key, layout_key, actual_seq_lengths_key, block_table, len(qs))
    idx_out, val_out = [], []
    for qb, wb, kb in zip(qs, ws, ks, strict=False):
        s1, s2 = qb.shape[0], kb.shape[0]
        score = torch.einsum("snd,td->snt", qb.float(), kb[:, 0].float()).relu()
        score = (score * wb.float()).sum(1)  # [S1, S2]
        allowed = torch.arange(s2)[None, :] <= _causal_limit(s1, s2, sparse_mode)[:, None]
        score = score.masked_fill(~allowed, float("-inf"))
        kk = min(sparse_count, s2)
        # best first; equal scores -> lower position (assumed: the doc does not state the op's tie order)
        top_v, top_i = score.sort(dim=-1, descending=True, stable=True)
        idx = torch.full((s1, sparse_count), -1, dtype=torch.int32)
        val = torch.full((s1, sparse_count), float("-inf"))
        ok = torch.isfinite(top_v[:, :kk])
        idx[:, :kk] = torch.where(ok, top_i[:, :kk], -1).to(torch.int32)
        val[:, :kk] = top_v[:, :kk]
        idx_out.append(idx.unsqueeze(1))
        val_out.append(val.unsqueeze(1))
    stack = torch.stack if layout_query == "BSND" else torch.cat
    values = stack(val_out).to(query.dtype) if return_value else query.new_empty((0,))
    return stack(idx_out), values


def npu_sparse_flash_attention(chip: str, query: Tensor, key: Tensor, value: Tensor | None, sparse_indices: Tensor,
                               scale_value: float, *, block_table: Tensor | None = None,
                               actual_seq_lengths_query: Tensor | None = None,
                               actual_seq_lengths_kv: Tensor | None = None, query_rope: Tensor | None = None,
                               key_rope: Tensor | None = None, sparse_block_size: int = 1, layout_query: str = "BSND",
                               layout_kv: str = "BSND", sparse_mode: int = 3, pre_tokens: int = INT63,
                               next_tokens: int = INT63, attention_mode: int = 0, return_softmax_lse: bool = False,
                               sinks: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MLA-absorbed sparse attention: logits over the gathered keys (nope || rope, 512 + 64 dims), value = the
    512-d key (key and value share storage), one softmax (+ the per-head sink logit in the denominator when
    `sinks` is given). P is rounded to the activation dtype before the PV product. A query with no valid index
    gets zeros. Indices: valid entries first, -1 padding at the end (doc: "需要保证每行有效值均在前半部分，无效值均在
    后半部分"). Returns (out, softmax_max, softmax_sum), the last two [0]-shaped fp32 unless return_softmax_lse
    (meta function)."""
    op = "npu_sparse_flash_attention"
    check(attention_mode == 2, op, "only attention_mode=2 (MLA-absorb) is supported")
    check(query.shape[-1] == 512 and key.shape[-1] == 512, op, f"D must be 512 (+64 rope), got {query.shape[-1]}")
    check(query_rope is not None and key_rope is not None and query_rope.shape[-1] == 64 and key_rope.shape[-1] == 64,
          op, "query_rope / key_rope with D = 64 are required")
    check(query.dtype in HALF_ACT and key.dtype == query.dtype, op, "query/key must be bf16 or fp16")
    check(value is not None, op, "value=None needs CANN >= 9.2.0 (meta function); pass the key")
    # doc: query, key, value, sparse_indices, query_rope, key_rope "不支持非连续"
    check(all(t is None or t.is_contiguous() for t in (query, key, value, sparse_indices, query_rope, key_rope)),
          op, "query, key, value, sparse_indices, query_rope and key_rope must be contiguous (doc)")
    check(value.data_ptr() == key.data_ptr() or torch.equal(value, key), op, "key and value must be the same tensor")
    n1 = query.shape[-2]
    if is_a5(chip):
        check(1 <= n1 <= 128 and sparse_block_size == 1, op, "950: N1 in 1..128 and sparse_block_size 1")
    else:
        check(n1 in (1, 2, 4, 8, 16, 32, 64, 128), op, f"A2/A3 query heads must be a power of two <= 128, got {n1}")
        check(sinks is None, op, "sinks are supported on 950 only (aclnnSparseFlashAttentionV2)")
    check(sparse_block_size == 1, op, "only sparse_block_size 1 is emulated")
    check(sparse_mode in (0, 3), op, "sparse_mode must be 0 or 3")
    check(sparse_indices.dtype == torch.int32, op, "sparse_indices must be int32")
    check(not return_softmax_lse, op, "softmax_lse outputs are training-only; not emulated")
    if sinks is not None:
        check(sinks.dtype == torch.float32 and tuple(sinks.shape) == (n1,), op, "sinks must be fp32 [N1]")
    layout_k = "PA_BSND" if block_table is not None else layout_kv
    qs = _split_queries(op, torch.cat([query, query_rope], -1), layout_query, actual_seq_lengths_query)
    ks = _split_keys(op, torch.cat([key, key_rope], -1), layout_k, actual_seq_lengths_kv, block_table, len(qs))
    idx_split = _split_queries(op, sparse_indices, layout_query, actual_seq_lengths_query)
    outs = []
    for qb, kb, ib in zip(qs, ks, idx_split, strict=False):
        ib = ib[:, 0].long()  # [S1, K]
        valid = ib >= 0
        first_pad = (~valid).int().cumsum(-1) > 0
        check(not bool((valid & first_pad).any()), op, "valid indices must be packed before the -1 padding")
        s1, s2 = qb.shape[0], kb.shape[0]
        check(bool((ib < s2).all()), op, "sparse index out of range")
        valid = valid & (ib <= _causal_limit(s1, s2, sparse_mode)[:, None])
        keys = kb[:, 0].float()[ib.clamp(min=0)]  # [S1, K, 576]
        logits = torch.einsum("snd,skd->snk", qb.float(), keys) * scale_value
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        m = logits.amax(-1, keepdim=True)
        if sinks is not None:
            m = torch.maximum(m, sinks.float().view(1, n1, 1))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(logits - m)
        den = p.sum(-1, keepdim=True)
        if sinks is not None:
            den = den + torch.exp(sinks.float().view(1, n1, 1) - m)
        p = (p / den.clamp(min=1e-30)).to(query.dtype).float()
        outs.append(torch.einsum("snk,skd->snd", p, keys[..., :512]).to(query.dtype))
    out = torch.stack(outs) if layout_query == "BSND" else torch.cat(outs)
    return out, query.new_empty((0,), dtype=torch.float32), query.new_empty((0,), dtype=torch.float32)
