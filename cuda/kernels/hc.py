"""Manifold-constrained hyper-connections: the mixing GEMM with its RMS factor, the pre epilogue (sigmoid gates,
Sinkhorn of the n x n comb, weighted stream sum) and the post update."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cfg, pow2


@triton.jit
def _hc_mix_kernel(x_ptr, fn_ptr, m_ptr, T, KX, MIX, eps,
                   BLOCK_M: tl.constexpr, BLOCK_MIX: tl.constexpr, BLOCK_K: tl.constexpr):
    # m[t] = (x_t @ fn^T) * rsqrt(mean(x_t^2) + eps) over the flattened n*d streams; exact fp32 (ieee) dots since
    # the Sinkhorn/sigmoid outputs scale the whole residual stream
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mixc = tl.arange(0, BLOCK_MIX)
    rmask = rows < T
    acc = tl.zeros((BLOCK_M, BLOCK_MIX), tl.float32)
    ssq = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, KX, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < KX
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * KX + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        f = tl.load(fn_ptr + mixc[:, None] * KX + kk[None, :], mask=(mixc[:, None] < MIX) & kmask[None, :],
                    other=0.0)
        acc += tl.dot(x, tl.trans(f), input_precision="ieee")
        ssq += tl.sum(x * x, axis=1)
    acc = acc * tl.rsqrt(ssq / KX + eps)[:, None]
    tl.store(m_ptr + rows[:, None] * MIX + mixc[None, :], acc, mask=rmask[:, None] & (mixc[None, :] < MIX))


@triton.jit
def _hc_pre_kernel(m_ptr, x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, T, NS, D, MIX, iters, hc_eps,
                   HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    st = tl.arange(0, BLOCK_S)
    rmask = rows < T
    smask = st < NS
    rs_mask = rmask[:, None] & smask[None, :]
    mrow = m_ptr + rows[:, None].to(tl.int64) * MIX
    pre = tl.load(mrow + st[None, :], mask=rs_mask, other=0.0) * tl.load(scale_ptr)
    pre = tl.sigmoid(pre + tl.load(base_ptr + st, mask=smask, other=0.0)[None, :]) + hc_eps
    if not HEAD:
        post = tl.load(mrow + NS + st[None, :], mask=rs_mask, other=0.0) * tl.load(scale_ptr + 1)
        post = 2.0 * tl.sigmoid(post + tl.load(base_ptr + NS + st, mask=smask, other=0.0)[None, :])
        tl.store(post_ptr + rows[:, None] * NS + st[None, :], post, mask=rs_mask)
        # comb [BLOCK_M, j, k] from m[2n + j*n + k]; padded entries are -inf for the softmax and 0 afterwards
        j3 = st[None, :, None]
        k3 = st[None, None, :]
        cmask = rmask[:, None, None] & (j3 < NS) & (k3 < NS)
        cidx = j3 * NS + k3
        c = tl.load(m_ptr + rows[:, None, None].to(tl.int64) * MIX + 2 * NS + cidx, mask=cmask, other=0.0)
        c = c * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * NS + cidx, mask=(j3 < NS) & (k3 < NS), other=0.0)
        c = tl.where(cmask, c, float("-inf"))
        cmax = tl.max(c, axis=2)
        cmax = tl.where(cmax == float("-inf"), 0.0, cmax)  # fully padded rows: keep the arithmetic finite
        c = tl.exp(c - cmax[:, :, None])
        csum = tl.sum(c, axis=2)
        csum = tl.where(csum == 0.0, 1.0, csum)
        c = tl.where(cmask, c / csum[:, :, None] + hc_eps, 0.0)  # the softmax is the first row normalisation
        c = c / (tl.sum(c, axis=1)[:, None, :] + hc_eps)
        for _ in range(1, iters):
            c = c / (tl.sum(c, axis=2)[:, :, None] + hc_eps)
            c = c / (tl.sum(c, axis=1)[:, None, :] + hc_eps)
        tl.store(comb_ptr + rows[:, None, None].to(tl.int64) * NS * NS + cidx, c, mask=cmask)
    # y = sum_j pre_j x_j, d in blocks
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        xm = rs_mask[:, :, None] & (dd[None, None, :] < D)
        x = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * NS * D + st[None, :, None] * D + dd[None, None, :],
                    mask=xm, other=0.0).to(tl.float32)
        y = tl.sum(pre[:, :, None] * x, axis=1)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * D + dd[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (dd[None, :] < D))


def _mix(x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
    T = x.shape[0]
    kx = x.shape[1] * x.shape[2]
    mix = fn.shape[0]
    m = torch.empty((T, mix), dtype=torch.float32, device=x.device)
    c = cfg("hc")
    _hc_mix_kernel[(triton.cdiv(T, c["BLOCK_M"]),)](x, fn.float().contiguous(), m, T, kx, mix, float(norm_eps),
                                                    BLOCK_M=c["BLOCK_M"], BLOCK_MIX=pow2(mix, 16),
                                                    BLOCK_K=c["BLOCK_K"])
    return m


def hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float, norm_eps: float,
           head: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """x [B,S,n,d] -> (y [B,S,d] x.dtype, post [B,S,n] fp32, comb [B,S,n,n] fp32); head=True: y only."""
    B, S, n, d = x.shape
    xc = x.reshape(B * S, n, d).contiguous()
    T = B * S
    y = torch.empty((B, S, d), dtype=x.dtype, device=x.device)
    post = torch.empty((B, S, n), dtype=torch.float32, device=x.device)
    comb = torch.empty((B, S, n, n), dtype=torch.float32, device=x.device)
    if T == 0:
        return y, (None if head else post), (None if head else comb)
    m = _mix(xc, fn, norm_eps)
    c = cfg("hc")
    bs = pow2(n)
    # a 3-D [rows, n, BLOCK_D] tile: keep it near the 2-D tile size of the mixing kernel
    bd = max(16, min(c["BLOCK_D"], pow2(d)))
    bm = max(1, min(c["BLOCK_M"], pow2(max(1, c["BLOCK_M"] * c["BLOCK_D"] // (bs * bd)))))
    _hc_pre_kernel[(triton.cdiv(T, bm),)](m, xc, scale.float().contiguous(), base.float().contiguous(), y, post, comb,
                                          T, n, d, fn.shape[0], int(iters), float(hc_eps), HEAD=head,
                                          BLOCK_M=bm, BLOCK_S=bs, BLOCK_D=bd)
    if head:
        return y, None, None
    return y, post, comb


@triton.jit
def _hc_post_kernel(x_ptr, r_ptr, post_ptr, comb_ptr, o_ptr, R, NS, D,
                    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # one output row = (token t, stream k): post[t,k] * x[t] + sum_j comb[t,j,k] * res[t,j]
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    js = tl.arange(0, BLOCK_S)
    rmask = rows < R
    dmask = dd < D
    t = (rows // NS).to(tl.int64)
    k = rows % NS
    x = tl.load(x_ptr + t[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    p = tl.load(post_ptr + rows, mask=rmask, other=0.0)
    cw = tl.load(comb_ptr + t[:, None] * NS * NS + js[None, :] * NS + k[:, None],
                 mask=rmask[:, None] & (js[None, :] < NS), other=0.0)  # comb[t, j, k] for every j
    res = tl.load(r_ptr + t[:, None, None] * NS * D + js[None, :, None] * D + dd[None, None, :],
                  mask=rmask[:, None, None] & (js[None, :, None] < NS) & dmask[None, None, :], other=0.0)
    y = p[:, None] * x.to(tl.float32) + tl.sum(cw[:, :, None] * res.to(tl.float32), axis=1)
    tl.store(o_ptr + rows[:, None].to(tl.int64) * D + dd[None, :], y.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def hc_post(x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """x [B,S,d], residual [B,S,n,d], post [B,S,n], comb [B,S,n,n] -> [B,S,n,d] in x.dtype."""
    B, S, n, d = residual.shape
    out = torch.empty((B, S, n, d), dtype=x.dtype, device=x.device)
    R = B * S * n
    if R == 0:
        return out
    c = cfg("hc")
    bs = pow2(n)
    bd = max(16, min(c["BLOCK_D"], pow2(d)))
    br = max(1, min(c["BLOCK_M"], pow2(max(1, c["BLOCK_M"] * c["BLOCK_D"] // (bs * bd)))))
    _hc_post_kernel[(triton.cdiv(R, br), triton.cdiv(d, bd))](
        x.contiguous(), residual.contiguous(), post.float().contiguous(), comb.float().contiguous(), out, R, n, d,
        BLOCK_R=br, BLOCK_S=bs, BLOCK_D=bd)
    return out
