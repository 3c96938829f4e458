"""Sparse attention over gathered KV rows with the attention sink (one kernel for prefill and decode), and the KV
compressor's gated pooling."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import block_params, cfg, dot_precision, launch_opts, pow2, upcast_dots


@triton.jit
def _sparse_attn_kernel(q_ptr, kv_ptr, sink_ptr, idx_ptr, o_ptr, S, H, D, K, N, scale,
                        sqb, sqs, sqh, skb, skn, sib, sis, sob, sos, soh,
                        UPCAST: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (B*S queries, head blocks). Every head of a query shares the same gathered rows (MQA: key = value),
    # so one gather of BLOCK_N rows serves BLOCK_H heads.
    pid_q = tl.program_id(0)
    b = pid_q // S
    s = pid_q % S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    hmask = heads < H
    dmask = dims < D
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + s * sqs + heads[:, None] * sqh + dims[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # the sink is a virtual key with logit sink[h] and a zero value: starting the running max at it and the running
    # denominator at exp(0) = 1 puts it in the denominator only, and keeps the max finite (no -inf - -inf NaNs)
    m_i = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)
    l_i = tl.full((BLOCK_H,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    kv_base = kv_ptr + b.to(tl.int64) * skb
    idx_base = idx_ptr + b.to(tl.int64) * sib + s * sis
    for j0 in range(0, K, BLOCK_N):
        js = j0 + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_base + js, mask=js < K, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < N)
        rows = tl.where(valid, idx, 0)
        kv = tl.load(kv_base + rows[:, None] * skn + dims[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            kv = kv.to(tl.float32)
        logits = tl.dot(q, tl.trans(kv), input_precision=PREC) * scale  # [BLOCK_H, BLOCK_N], fp32
        logits = tl.where(valid[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # like the official kernel, P is rounded to the activation dtype before the PV product (here the
        # un-normalised P of the running max; the reference rounds the normalised P: the same up to 1 ulp of it)
        p_lo = p.to(q_ptr.dtype.element_ty)
        if UPCAST:
            p_lo = p_lo.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_lo, kv, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]  # l_i >= exp(sink - m) > 0 unless the sink underflows; a query with no rows gives 0
    tl.store(o_ptr + b.to(tl.int64) * sob + s * sos + heads[:, None] * soh + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])


def sparse_attention(q: Tensor, kv: Tensor, sink: Tensor, indices: Tensor, softmax_scale: float) -> Tensor:
    """q [B,S,H,D], kv [B,N,D], sink [H] fp32, indices [B,S,K] (-1 = none) -> [B,S,H,D] in q.dtype."""
    B, S, H, D = q.shape
    N = kv.shape[1]
    K = indices.shape[-1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv = kv.contiguous()
    idx = indices.contiguous()
    sink = sink.float().contiguous()
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    upcast = upcast_dots() or q.dtype == torch.float32 or kv.dtype != q.dtype
    c = cfg("attn", "fp32" if upcast else None)
    bh = max(16, min(c["BLOCK_H"], pow2(H)))  # tl.dot needs every dim >= 16: few heads are padded (masked)
    bn = c["BLOCK_N"] if K > 16 else 16
    grid = (B * S, triton.cdiv(H, bh))
    p = block_params(c)
    p.update(BLOCK_H=bh, BLOCK_N=bn)
    _sparse_attn_kernel[grid](q, kv, sink, idx, out, S, H, D, K, N, float(softmax_scale),
                              q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
                              idx.stride(0), idx.stride(1), out.stride(0), out.stride(1), out.stride(2),
                              UPCAST=upcast, PREC=dot_precision(q.dtype),
                              BLOCK_D=pow2(D, 16), **p, **launch_opts(c))
    return out


@triton.jit
def _compress_pool_kernel(kv_ptr, sc_ptr, o_ptr, L, C, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program: one compressed row (b, n) x BLOCK_C channels; softmax over the L tokens of each channel
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tok = tl.arange(0, BLOCK_L)
    mask = (tok[:, None] < L) & (ch[None, :] < C)
    offs = row * L * C + tok[:, None] * C + ch[None, :]
    z = tl.load(sc_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    z = tl.where(ch[None, :] < C, z, 0.0)  # padded channels: finite scores, so no NaN arithmetic on them
    x = tl.load(kv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mx = tl.max(z, axis=0)
    e = tl.exp(z - mx[None, :])  # a channel whose scores are all -inf gives NaN, as torch's softmax does
    y = tl.sum(e * x, axis=0) / tl.sum(e, axis=0)
    tl.store(o_ptr + row * C + ch, y, mask=ch < C)


def compress_pool(kv: Tensor, score: Tensor) -> Tensor:
    """kv, score [B,N,L,c] -> sum_t softmax_t(score) * kv, [B,N,c] fp32."""
    B, N, L, C = kv.shape
    kvc = kv.float().contiguous()
    sc = score.float().expand_as(kv).contiguous()
    out = torch.empty((B, N, C), dtype=torch.float32, device=kv.device)
    if out.numel() == 0:
        return out
    c = cfg("pool")
    bl = pow2(L)
    bc = max(16, min(c["BLOCK_C"], pow2(C), c["TILE"] // bl))  # long pools (L = 128) get narrower channel blocks
    _compress_pool_kernel[(B * N, triton.cdiv(C, bc))](kvc, sc, out, L, C, BLOCK_L=bl, BLOCK_C=bc)
    return out
