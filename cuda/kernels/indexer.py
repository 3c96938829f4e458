"""Lightning-indexer scores: score[b,s,t] = sum_h w[b,s,h] * relu(q[b,s,h] . k[b,t]), masked to t < visible[b,s].
The top-k selection over the scores is the shared stable sort common.ops.topk_visible (a named fallback)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv4.common.model.ops import topk_visible

from ._common import cfg, dot_precision, launch_opts, pow2, upcast_dots


@triton.jit
def _indexer_score_kernel(q_ptr, k_ptr, w_ptr, vis_ptr, o_ptr, S, H, Di, T,
                          sqb, sqs, sqh, skb, skt, swb, sws, UPCAST: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    # grid: (B*S queries, key blocks). All heads of the query in one tile: the head sum is a reduction in registers
    pid_q = tl.program_id(0)
    b = pid_q // S
    s = pid_q % S
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    hmask = heads < H
    dmask = dims < Di
    vis = tl.load(vis_ptr + pid_q)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + s * sqs + heads[:, None] * sqh + dims[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    k = tl.load(k_ptr + b.to(tl.int64) * skb + ts[:, None].to(tl.int64) * skt + dims[None, :],
                mask=(ts[:, None] < T) & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    dots = tl.maximum(tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)  # [BLOCK_H, BLOCK_T] fp32
    w = tl.load(w_ptr + b.to(tl.int64) * swb + s * sws + heads, mask=hmask, other=0.0).to(tl.float32)
    score = tl.sum(dots * w[:, None], axis=0)
    score = tl.where(ts < vis, score, float("-inf"))  # causal visibility: only completed blocks before the query
    tl.store(o_ptr + pid_q.to(tl.int64) * T + ts, score, mask=ts < T)


def indexer_scores(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor) -> Tensor:
    """q [B,S,H,Di], k [B,T,Di], weights [B,S,H], visible [B,S] -> fp32 scores [B,S,T] (-inf where not visible)."""
    B, S, H, Di = q.shape
    T = k.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    k = k.contiguous()
    w = weights.float().contiguous()
    vis = visible.to(torch.int32).expand(B, S).contiguous()
    out = torch.empty((B, S, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    upcast = upcast_dots() or q.dtype == torch.float32 or k.dtype != q.dtype
    c = cfg("index", "fp32" if upcast else None)
    bt = max(16, min(c["BLOCK_T"], pow2(T)))
    _indexer_score_kernel[(B * S, triton.cdiv(T, bt))](
        q, k, w, vis, out, S, H, Di, T, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        w.stride(0), w.stride(1), UPCAST=upcast,
        PREC=dot_precision(q.dtype), BLOCK_H=pow2(H, 16), BLOCK_D=pow2(Di, 16), BLOCK_T=bt, **launch_opts(c))
    return out


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int) -> Tensor:
    """Top-min(topk, T) visible keys per query, -1 where fewer are visible. Scores: Triton; selection: the shared
    stable sort of common.ops.topk_visible (named fallback), so exact ties (all-zero ReLU rows) resolve to the lower
    index exactly as in every other backend."""
    return topk_visible(indexer_scores(q, k, weights, visible), visible.to(q.device), topk)
