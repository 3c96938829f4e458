"""Row-wise kernels: RMSNorm (with and without weight), interleaved RoPE (forward/inverse) and the clamped SwiGLU."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cfg, pow2


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, M, N, eps, HAS_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # fp32 right after the load (bf16 math is wrong
    # in the interpreter, and the reference normalises in fp32 anyway)
    y = x * tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """weight * x * rsqrt(mean(x^2) + eps) over the last dim (no weight when None), fp32 math, out in x.dtype."""
    xc = x.contiguous()
    n = x.shape[-1]
    m = xc.numel() // max(n, 1)
    y = torch.empty_like(xc)
    if m == 0:
        return y
    c = cfg("rows")
    bn = pow2(n)
    # keep a program's tile near 16K elements: long rows get fewer rows per program
    bm = max(1, min(c["BLOCK_M"], pow2(16384 // bn)))
    w = weight.contiguous() if weight is not None else xc  # dummy pointer when unweighted
    _rms_norm_kernel[(triton.cdiv(m, bm),)](xc, w, y, m, n, eps, HAS_WEIGHT=weight is not None,
                                            BLOCK_M=bm, BLOCK_N=bn)
    return y


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, R, S, H, HALF, sxb, sxs, sxh, SIGN: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # one row = one (b, s, h) vector of r = 2*HALF elements; pair i is (x[2i], x[2i+1])
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.arange(0, BLOCK_P)
    mask = (rows[:, None] < R) & (pairs[None, :] < HALF)
    h = rows % H
    bs = rows // H  # b * S + s: cos/sin are contiguous [B*S, HALF]
    b = bs // S
    s = bs % S
    xoff = (b.to(tl.int64) * sxb + s * sxs + h * sxh)[:, None] + 2 * pairs[None, :]
    a = tl.load(x_ptr + xoff, mask=mask, other=0.0).to(tl.float32)
    bb = tl.load(x_ptr + xoff + 1, mask=mask, other=0.0).to(tl.float32)
    coff = bs.to(tl.int64)[:, None] * HALF + pairs[None, :]
    c = tl.load(cos_ptr + coff, mask=mask, other=1.0)
    sn = tl.load(sin_ptr + coff, mask=mask, other=0.0) * SIGN  # SIGN = -1: conjugate rotation (inverse)
    yoff = rows.to(tl.int64)[:, None] * (2 * HALF) + 2 * pairs[None, :]
    tl.store(y_ptr + yoff, (a * c - bb * sn).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + yoff + 1, (a * sn + bb * c).to(y_ptr.dtype.element_ty), mask=mask)


def rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Interleaved rotary embedding of x [B,S,H,r] with cos/sin [B,S,r/2]; returns a new contiguous tensor."""
    B, S, H, r = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    half = r // 2
    y = torch.empty((B, S, H, r), dtype=x.dtype, device=x.device)
    rows = B * S * H
    if rows == 0:
        return y
    # cos/sin may be broadcast views (e.g. [1,S,r/2] expanded over B): materialise them as [B*S, r/2] fp32
    cf = cos.float().expand(B, S, half).contiguous()
    sf = sin.float().expand(B, S, half).contiguous()
    bp = pow2(half)
    br = max(1, min(cfg("rows")["BLOCK_M"] * 4, pow2(8192 // bp)))
    _rope_kernel[(triton.cdiv(rows, br),)](x, cf, sf, y, rows, S, H, half, x.stride(0), x.stride(1), x.stride(2),
                                           SIGN=-1.0 if inverse else 1.0, BLOCK_R=br, BLOCK_P=bp)
    return y


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n, limit, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLAMP:
        g = tl.minimum(g, limit)  # the gate has an upper clamp only
        u = tl.minimum(tl.maximum(u, -limit), limit)
    tl.store(y_ptr + offs, g * tl.sigmoid(g) * u, mask=mask)


def swiglu(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    """silu(g) * u in fp32 (clamped when limit > 0), as a flat elementwise kernel."""
    g, u = torch.broadcast_tensors(gate, up)
    g, u = g.contiguous(), u.contiguous()
    y = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    n = g.numel()
    if n:
        block = 4096 if cfg("rows")["BLOCK_M"] > 8 else 1024
        _swiglu_kernel[(triton.cdiv(n, block),)](g, u, y, n, float(limit), CLAMP=limit > 0, BLOCK=block)
    return y
