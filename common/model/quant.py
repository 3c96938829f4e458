"""FP8 / FP4 storage formats of the official checkpoint: packing, dequantisation and (for generated checkpoints)
quantisation. Pure torch; used by the reference ops and the checkpoint loader/writer.

Formats (shared/spec/dsv4-architecture.md section 7.2):
- FP8 e4m3 weights in 128x128 blocks, scale [ceil(out/128), ceil(in/128)], UE8M0 (2^(byte-127)) in the release.
- FP4 e2m1 expert weights, two codes per byte along the input dim (low nibble = even column), scale [out, in/32].
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 code -> value; bit 3 is the sign (codes 8..15 are the negatives of 0..7)
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)
_E2M1_POS = E2M1_VALUES[:8]


def pow2_ceil(x: Tensor) -> Tensor:
    """2^ceil(log2(x)) for positive fp32 x: the UE8M0 ("round scale up") convention."""
    return torch.exp2(torch.ceil(torch.log2(x)))


# -- FP4 ---------------------------------------------------------------------------------------------------------------
def unpack_fp4(packed: Tensor) -> Tensor:
    """[..., n/2] int8/uint8 bytes -> [..., n] fp32 e2m1 values (low nibble = even column)."""
    b = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    if b.dtype != torch.uint8:
        raise TypeError(f"packed FP4 must be int8 or uint8 bytes, got {packed.dtype}")
    lo = (b & 0x0F).long()
    hi = (b >> 4).long()
    codes = torch.stack([lo, hi], dim=-1).flatten(-2)
    return E2M1_VALUES.to(packed.device)[codes]


def round_to_e2m1_codes(x: Tensor) -> Tensor:
    """Round fp32 values (already divided by their scale) to the nearest e2m1 code, ties to the even code
    (the hardware cast's round-to-nearest-even), saturating at +-6. Returns int64 codes 0..15."""
    ax = x.abs().clamp(max=FP4_MAX)
    grid = _E2M1_POS.to(x.device)
    hi = torch.bucketize(ax, grid, right=False).clamp(max=7)  # first grid value >= ax
    lo = (hi - 1).clamp(min=0)
    d_lo = ax - grid[lo]
    d_hi = grid[hi] - ax
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    mag = torch.where(pick_hi, hi, lo)
    sign = (x < 0) & (mag > 0)
    return mag + 8 * sign.long()


def pack_fp4(codes: Tensor) -> Tensor:
    """[..., n] int codes 0..15 -> [..., n/2] int8 bytes (low nibble = even column)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dim, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def dequant_fp4(packed: Tensor, scale: Tensor, block: int = 32) -> Tensor:
    """W[o, i] = e2m1(code[o, i]) * scale[o, i // block] -> fp32 [..., out, in]."""
    vals = unpack_fp4(packed)
    n = vals.shape[-1]
    want = (n + block - 1) // block
    if scale.shape[-1] != want or scale.shape[:-1] != vals.shape[:-1]:
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match weight {tuple(vals.shape)} "
                         f"(expected {tuple(vals.shape[:-1]) + (want,)})")
    s = scale.float().repeat_interleave(block, dim=-1)[..., :n]
    return vals * s


def quantize_fp4(w: Tensor, block: int = 32) -> tuple[Tensor, Tensor]:
    """fp32 [..., out, in] -> (packed int8 [..., out, in/2], fp32 power-of-two scale [..., out, in/block])."""
    wf = w.float()
    n = wf.shape[-1]
    if n % block:
        raise ValueError(f"FP4 quantisation needs in % {block} == 0, got {n}")
    blocks = wf.unflatten(-1, (n // block, block))
    amax = blocks.abs().amax(-1).clamp(min=FP4_MAX * 2.0 ** -126)
    scale = pow2_ceil(amax / FP4_MAX)
    codes = round_to_e2m1_codes(blocks / scale.unsqueeze(-1)).flatten(-2)
    return pack_fp4(codes), scale


# -- FP8 ---------------------------------------------------------------------------------------------------------------
def _expand_block_scale(scale: Tensor, rows: int, cols: int, block: int) -> Tensor:
    s = scale.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return s[..., :rows, :cols]


def dequant_fp8(weight: Tensor, scale: Tensor, block: int = 128) -> Tensor:
    """W[o, i] = q[o, i] * s[o // block, i // block] -> fp32. Partial edge blocks are allowed."""
    rows, cols = weight.shape[-2:]
    want = ((rows + block - 1) // block, (cols + block - 1) // block)
    if tuple(scale.shape[-2:]) != want:
        raise ValueError(f"FP8 scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)} "
                         f"(expected [..., {want[0]}, {want[1]}] for {block}x{block} blocks)")
    return weight.float() * _expand_block_scale(scale, rows, cols, block)


def quantize_fp8(w: Tensor, block: int = 128) -> tuple[Tensor, Tensor]:
    """fp32 [..., out, in] -> (float8_e4m3fn weight, fp32 power-of-two scale [..., ceil(out/b), ceil(in/b)])."""
    wf = w.float()
    rows, cols = wf.shape[-2:]
    pr, pc = (-rows) % block, (-cols) % block
    padded = torch.nn.functional.pad(wf, (0, pc, 0, pr))
    nb_r, nb_c = padded.shape[-2] // block, padded.shape[-1] // block
    blocks = padded.unflatten(-2, (nb_r, block)).unflatten(-1, (nb_c, block))  # [..., R, b, C, b]
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-4)  # [..., R, C]
    scale = pow2_ceil(amax / FP8_MAX)
    q = (wf / _expand_block_scale(scale, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


# -- E8M0 scales -------------------------------------------------------------------------------------------------------
def e8m0_to_float(t: Tensor) -> Tensor:
    """float8_e8m0fnu (or its raw uint8 bytes) -> fp32 2^(byte-127)."""
    if t.dtype == torch.float8_e8m0fnu:
        t = t.view(torch.uint8)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected E8M0 scale bytes, got {t.dtype}")
    return torch.exp2(t.float() - 127.0)


def float_to_e8m0(t: Tensor) -> Tensor:
    """fp32 powers of two -> float8_e8m0fnu (exact for powers of two in range)."""
    e = torch.log2(t.float())
    if not torch.equal(e, e.round()):
        raise ValueError("UE8M0 scales must be powers of two")
    return (e + 127).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def dequant_weight(weight: Tensor, scale: Tensor | None, fmt: str) -> Tensor:
    """Any LinearWeight storage format -> fp32 dense weight."""
    if fmt == "none":
        return weight.float()
    if scale is None:
        raise ValueError(f"{fmt} weight without a scale tensor")
    if fmt == "fp8":
        return dequant_fp8(weight, scale)
    if fmt == "fp4":
        return dequant_fp4(weight, scale)
    raise ValueError(f"unknown weight format {fmt!r}")


# -- integer formats of chips without FP8 GEMMs (Ascend 910B / 910C) ---------------------------------------------------
# The hardware-neutral math of ascend/convert.py, here so that the reference ops can run the SAME converted integer
# weights (common/model/reference_w8a8.py) without importing a backend. Values are returned as integral fp32.
INT8_MAX = 127.0
INT4_MAX = 7.0  # symmetric: -8 is never produced, so negation stays exact


def quantize_int8_rows(wf: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 [..., out, in] -> (integral fp32 q in [-127, 127], fp32 scale [..., out]): symmetric per output channel,
    scale = amax / 127 (an all-zero row keeps scale 1, so it stays exactly zero)."""
    scale = wf.abs().amax(-1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX)
    return q, scale


def quantize_int4_groups(wt: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor]:
    """fp32 [..., in, out] (input-major, the grouped GEMM's [K, N]) -> (integral fp32 q [..., in, out] in [-7, 7],
    fp32 scale [..., in/G, out]) per (group of G inputs, output channel). 16 uniform levels fit values on the FP4
    grid (0.5, 1.5 ... 6 times a scale) poorly, so per group the scale amax/c (c in 7..5) with the smallest squared
    error wins."""
    K, N = wt.shape[-2:]
    if K % group_size or N % 8:
        raise ValueError(f"int4 groups need in % {group_size} == 0 and out % 8 == 0, got in={K} out={N}")
    g = wt.unflatten(-2, (K // group_size, group_size))  # [..., K/G, G, N]
    amax = g.abs().amax(-2)  # [..., K/G, N]
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    best_err, scale = None, None
    for c in (INT4_MAX, 6.5, 6.0, 5.5, 5.0):
        s = amax / c
        err = (torch.round(g / s.unsqueeze(-2)).clamp(-INT4_MAX, INT4_MAX) * s.unsqueeze(-2) - g).square().sum(-2)
        if best_err is None:
            best_err, scale = err, s
        else:
            better = err < best_err
            best_err, scale = torch.where(better, err, best_err), torch.where(better, s, scale)
    q = torch.round(g / scale.unsqueeze(-2)).clamp(-INT4_MAX, INT4_MAX).flatten(-3, -2)
    return q, scale


def quantize_int8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token (per row) int8 activation quantisation, npu_dynamic_quant's documented formula: scale =
    rowMax(|x|) / 127, q = round(x / scale). Returns (integral fp32 q, fp32 scale [...]); a zero row gives 0s."""
    xf = x.float()
    scale = xf.abs().amax(-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / safe.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX), scale
