"""GEMMs: one grouped kernel serves the plain linear layers (one group) and the MoE experts (one group per expert).

Weight formats (common/model/ops.py LinearWeight): "none" (float), "fp8" (e4m3 + 128x128 block scales), "fp4" (two e2m1
codes per byte along K, low nibble = even column, + 1x32 block scales). With fp8/fp4 weights the activation is
FP8-quantised per token in 1x128 blocks with power-of-two scales, in torch (`quant_act`): casts to fp8 inside an
interpreted kernel are unreliable. The kernel then accumulates per 128-wide K block in fp32 and applies
a_scale[row, kb] * w_scale[nb, kb] (fp8) or the weight's 1x32 scales while unpacking (fp4).

Work is cut into tiles of BLOCK_M rows of one group: tile t covers rows [tile_lo[t], tile_hi[t]) of expert
tile_e[t]. Rows may be gathered from the activation through a row map (the MoE permutation: the sorted copy of the
tokens is never materialised). A tile with an empty range runs zero K iterations, so the grid can be sized from an
upper bound without a device-to-host sync. The w1/w3 pair can run fused with the clamped SwiGLU and route weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import block_params, cfg, dot_precision, launch_opts, upcast_dots

FMT_CODES = {"none": 0, "fp8": 1, "fp4": 2}
ACT_BLOCK = 128  # activation quantisation block along K (1x128) and the FP8 weight block


def quant_act(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token 1x128 FP8 quantisation: (e4m3 codes [M,K], fp32 power-of-two scales [M,K/128]).
    Same formula as Ops.fp8_sim, so code * scale equals the reference's fake-quantised activation exactly."""
    M, K = x2d.shape
    if K % ACT_BLOCK:
        raise ValueError(f"FP8 activation quantisation needs K % {ACT_BLOCK} == 0, got K={K}")
    xb = x2d.float().view(M, K // ACT_BLOCK, ACT_BLOCK)
    s = torch.exp2(torch.ceil(torch.log2(xb.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0)))
    q = (xb / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(M, K), s.view(M, K // ACT_BLOCK).contiguous()


@triton.jit
def _e2m1(code):
    # e2m1 magnitude from the 3 low bits: exponent field e (2 bits), mantissa m (1 bit);
    # e == 0 is subnormal (0 or 0.5), otherwise 2^(e-1) * (1 + m/2). Bit 3 is the sign.
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, tl.exp2((e - 1).to(tl.float32)) * (1.0 + 0.5 * m))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _weight_block_dot(a, a_even, a_odd, w_ptr, ws_ptr, e, ncols, nmask, k0, K, s_we, s_wn, s_wse, s_wsn,
                      W_FMT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Product of the activation block (rows x BLOCK_K) with one weight block (BLOCK_N x BLOCK_K), weight scales
    applied; the activation's own scale (fp8/fp4 paths) is applied by the caller."""
    wbase = w_ptr + e.to(tl.int64) * s_we + ncols[:, None].to(tl.int64) * s_wn
    if W_FMT == 2:
        # packed FP4: byte j of the block holds columns k0+2j (low nibble) and k0+2j+1 (high nibble)
        jj = tl.arange(0, BLOCK_K // 2)
        kmask = nmask[:, None] & (k0 + 2 * jj[None, :] < K)
        byte = tl.load(wbase + k0 // 2 + jj[None, :], mask=kmask, other=0).to(tl.int32) & 0xFF
        sc = tl.load(ws_ptr + e.to(tl.int64) * s_wse + ncols[:, None].to(tl.int64) * s_wsn
                     + (k0 + 2 * jj[None, :]) // 32, mask=kmask, other=0.0).to(tl.float32)
        w_lo = _e2m1(byte & 15) * sc
        w_hi = _e2m1(byte >> 4) * sc
        if not UPCAST:  # e2m1 * 2^k and e4m3 values are exact in bf16: a bf16 tensor-core dot loses nothing
            w_lo = w_lo.to(tl.bfloat16)
            w_hi = w_hi.to(tl.bfloat16)
        acc = tl.dot(a_even, tl.trans(w_lo), input_precision=PREC)
        acc += tl.dot(a_odd, tl.trans(w_hi), input_precision=PREC)
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(wbase + kk[None, :], mask=nmask[:, None] & (kk[None, :] < K), other=0.0)
        if W_FMT == 0:
            w = w.to(a.dtype)  # the reference casts the weight to the activation dtype
        elif UPCAST:
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), input_precision=PREC)
        if W_FMT == 1:
            wsc = tl.load(ws_ptr + e.to(tl.int64) * s_wse + (ncols // 128).to(tl.int64) * s_wsn + k0 // 128,
                          mask=nmask, other=0.0)
            acc = acc * wsc[None, :]
    return acc


@triton.jit
def _grouped_gemm_kernel(a_ptr, as_ptr, rowmap_ptr, w_ptr, ws_ptr, w3_ptr, w3s_ptr, out_ptr, rw_ptr,
                         tile_e_ptr, tile_lo_ptr, tile_hi_ptr, N, K, limit,
                         s_am, s_asm, s_we, s_wn, s_wse, s_wsn, s_om,
                         W_FMT: tl.constexpr, GATHER: tl.constexpr, SWIGLU: tl.constexpr, CLAMP: tl.constexpr,
                         ROUTE_W: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_t)
    lo = tl.load(tile_lo_ptr + pid_t)
    hi = tl.load(tile_hi_ptr + pid_t)
    pos = lo + tl.arange(0, BLOCK_M)
    rmask = pos < hi
    if GATHER:
        arow = tl.load(rowmap_ptr + pos, mask=rmask, other=0).to(tl.int64)
    else:
        arow = pos.to(tl.int64)
    ncols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ncols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_end = tl.where(hi > lo, K, 0)  # empty tile (grid sized from an upper bound): no work
    for k0 in range(0, k_end, BLOCK_K):
        a = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        a_even = tl.zeros((BLOCK_M, BLOCK_K // 2), tl.float32)
        a_odd = tl.zeros((BLOCK_M, BLOCK_K // 2), tl.float32)
        if W_FMT == 2:
            jj = tl.arange(0, BLOCK_K // 2)
            amask = rmask[:, None] & (k0 + 2 * jj[None, :] < K)
            aoff = a_ptr + arow[:, None] * s_am + k0 + 2 * jj[None, :]
            if UPCAST:
                a_even = tl.load(aoff, mask=amask, other=0.0).to(tl.float32)
                a_odd = tl.load(aoff + 1, mask=amask, other=0.0).to(tl.float32)
            else:
                a_even = tl.load(aoff, mask=amask, other=0.0).to(tl.bfloat16)
                a_odd = tl.load(aoff + 1, mask=amask, other=0.0).to(tl.bfloat16)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + arow[:, None] * s_am + kk[None, :], mask=rmask[:, None] & (kk[None, :] < K),
                        other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
        part = _weight_block_dot(a, a_even, a_odd, w_ptr, ws_ptr, e, ncols, nmask, k0, K, s_we, s_wn, s_wse, s_wsn,
                                 W_FMT, UPCAST, PREC, BLOCK_K)
        if SWIGLU:
            part3 = _weight_block_dot(a, a_even, a_odd, w3_ptr, w3s_ptr, e, ncols, nmask, k0, K, s_we, s_wn,
                                      s_wse, s_wsn, W_FMT, UPCAST, PREC, BLOCK_K)
        if W_FMT != 0:  # per-token activation scale of this 128-wide K block
            asc = tl.load(as_ptr + arow * s_asm + k0 // 128, mask=rmask, other=0.0)
            part = part * asc[:, None]
            if SWIGLU:
                part3 = part3 * asc[:, None]
        acc += part
        if SWIGLU:
            acc3 += part3
    if SWIGLU:
        g = acc
        u = acc3
        if CLAMP:
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        acc = g * tl.sigmoid(g) * u
        if ROUTE_W:  # the routing weight multiplies h before the down projection, in fp32
            acc = acc * tl.load(rw_ptr + pos, mask=rmask, other=0.0)[:, None]
    tl.store(out_ptr + pos[:, None].to(tl.int64) * s_om + ncols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


def gemm_cfg(a_dtype: torch.dtype, swiglu: bool = False) -> dict[str, int]:
    """Tile sizes of one grouped-GEMM launch, by the dtype of the A operand the kernel reads (e4m3 for fp8/fp4
    weights). One function, because the tile table (make_tiles) and the kernel must agree on BLOCK_M."""
    return cfg("gemm", "fp32" if a_dtype == torch.float32 else "swiglu" if swiglu else None)


def grouped_gemm(a: Tensor, a_scale: Tensor | None, rowmap: Tensor | None, w: Tensor, w_scale: Tensor | None,
                 fmt: str, tiles: tuple[Tensor, Tensor, Tensor], n_rows_out: int, out_dtype: torch.dtype,
                 w3: Tensor | None = None, w3_scale: Tensor | None = None, limit: float = 0.0,
                 route_w: Tensor | None = None, block_m: int | None = None, out: Tensor | None = None) -> Tensor:
    """out[p] = A[rowmap[p]] @ W[e(p)]^T for the rows p of every tile (SwiGLU(w, w3) * route_w when w3 is given).
    a: [M_a, K] (act dtype, or e4m3 with a_scale [M_a, K/128] for fp8/fp4 weights); w: [E, N, K] ("none"/"fp8")
    or [E, N, K/2] int8 ("fp4"); tiles from `make_tiles`. Rows outside every tile are left unwritten (pass a
    zero-filled `out` when they are read later)."""
    N = w.shape[1]
    K = a.shape[1]
    if out is None:
        out = torch.empty((n_rows_out, N), dtype=out_dtype, device=a.device)
    code = FMT_CODES[fmt]
    if code and a_scale is None:
        raise ValueError(f"{fmt} weights need a quantised activation and its scales")
    upcast = upcast_dots() or a.dtype == torch.float32
    c = gemm_cfg(a.dtype, w3 is not None)
    p = block_params(c)
    if block_m is not None:  # the tile height make_tiles used (<= gemm_cfg's BLOCK_M)
        p["BLOCK_M"] = block_m
    if code and p["BLOCK_K"] != ACT_BLOCK:  # the kernel applies one activation / weight scale per K block
        raise ValueError(f"{fmt} weights need BLOCK_K == {ACT_BLOCK}, got {p['BLOCK_K']}")
    n_tiles = tiles[0].numel()
    if n_rows_out == 0 or n_tiles == 0 or N == 0:
        return out
    w = w.contiguous()
    ws = w_scale.float().contiguous() if w_scale is not None else w
    w3c = w3.contiguous() if w3 is not None else w
    w3s = w3_scale.float().contiguous() if w3_scale is not None else ws
    asc = a_scale if a_scale is not None else a
    # fp32 operands (and everything under the interpreter) run as exact fp32 dots; on a GPU bf16 activations, fp8
    # codes and unpacked fp4 (as bf16) feed the tensor cores directly (`upcast` above)
    grid = (n_tiles, triton.cdiv(N, p["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        a, asc, rowmap if rowmap is not None else tiles[0], w, ws, w3c, w3s, out,
        route_w if route_w is not None else asc, tiles[0], tiles[1], tiles[2], N, K, float(limit),
        a.stride(0), asc.stride(0), w.stride(0), w.stride(1), ws.stride(0), ws.stride(-2) if ws.dim() > 1 else 0,
        out.stride(0), W_FMT=code, GATHER=rowmap is not None, SWIGLU=w3 is not None, CLAMP=limit > 0,
        ROUTE_W=route_w is not None, UPCAST=upcast, PREC=dot_precision(torch.float32 if upcast else torch.bfloat16),
        **p, **launch_opts(c))
    return out


def make_tiles(counts: Tensor, block_m: int, max_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tile table for groups of `counts` consecutive rows, built on the device without a host sync: the table has
    the upper-bound length cdiv(max_rows, block_m) + len(counts); unused tiles get an empty row range."""
    E = counts.numel()
    dev = counts.device
    counts = counts.to(torch.int64)
    n_max = (max_rows + block_m - 1) // block_m + E
    per_e = (counts + block_m - 1) // block_m
    cum_tiles = torch.cumsum(per_e, 0)
    row_end = torch.cumsum(counts, 0)
    row_start = row_end - counts
    t = torch.arange(n_max, device=dev)
    e = torch.searchsorted(cum_tiles, t, right=True)
    used = e < E
    ec = e.clamp(max=E - 1)
    lo = row_start[ec] + (t - (cum_tiles[ec] - per_e[ec])) * block_m
    hi = torch.minimum(lo + block_m, row_end[ec])
    lo = torch.where(used, lo, 0)
    hi = torch.where(used, hi, 0)
    return ec.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32)


def linear(x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str) -> Tensor:
    """y = x @ W^T for x [..., K]; fp8/fp4 weights get the per-token FP8 activation quantisation."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    N = weight.shape[0]
    if fmt == "none":
        a, a_s = x2.contiguous(), None
    else:
        a, a_s = quant_act(x2)
    bm = gemm_cfg(a.dtype)["BLOCK_M"]
    tiles = make_tiles(torch.tensor([M], device=x.device), bm, M)
    y = grouped_gemm(a, a_s, None, weight[None], None if scale is None else scale[None], fmt, tiles, M, x.dtype,
                     block_m=bm)
    return y.view(*x.shape[:-1], N)
