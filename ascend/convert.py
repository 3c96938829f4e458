"""Weight conversion for chips without FP8/FP4 GEMMs (910B / 910C), and FP4 -> FP8 re-encoding for the 950 path.

Formats produced (LinearWeight.fmt; the Ascend backend consumes all of them):
- "w8a8": weight int8 [..., out, in] (checkpoint orientation), scale fp32 [..., out]: symmetric per output channel,
  W ~ q * scale[o]. Runs as npu_dynamic_quant (per-token int8 activations) + npu_quant_matmul / npu_grouped_matmul.
- "w4a8": weight int32 [..., in, out/8] = int4 values in the op-ready [K, N] layout, 8 per int32 along N
  (formats.pack_int4), scale fp32 [..., in/G, out]: symmetric per (group of G input rows, output channel).
  Runs as npu_grouped_matmul's weight-only (antiquant) form with bf16 activations on 910B: torch_npu 2.14.0's doc
  has no int8-activation / int4-weight row. The published Ascend V4 weights are w8a8 / w4a8 conversions
  (torch-npu-ops.md section 8).
- "fp8" from "fp4": FP4 weights re-encoded as FP8 128x128 blocks (the 950's dense FP8 G-B GEMM); exact whenever
  the per-32 FP4 scales inside one 128x128 block span at most 2^14 (checked by fp4_to_fp8_is_exact).
- "mxfp8" (950 experts, npu_grouped_matmul's MX form): weight float8_e4m3fn [..., out, in] (checkpoint orientation;
  the GEMM takes its transposed view), scale uint8 e8m0 bytes [..., out, ceil(in/64), 2]: one scale per 32 inputs,
  in the op's pair layout. From FP4 it is exact by construction: every e2m1 value is an e4m3 value and the
  checkpoint's own ue8m0 per-32 scales are kept; from FP8 128x128 blocks each block scale is repeated over its
  32-column blocks (exact too). Memory: 1 byte a weight instead of FP4's 0.5 (the experts double in size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsv4.common.model.ops import LinearWeight
from dsv4.common.model.quant import (
    INT4_MAX,
    INT8_MAX,
    dequant_weight,
    float_to_e8m0,
    quantize_fp8,
    quantize_int4_groups,
    quantize_int8_rows,
    unpack_fp4,
)

from .formats import pack_int4, unpack_int4

__all__ = ["INT4_MAX", "INT8_MAX", "convert_for_chip", "dequant_any", "fp4_to_fp8", "to_mxfp8", "to_w4a8", "to_w8a8"]

MX_BLOCK = 32  # the MX form's K block (one e8m0 scale per 32 inputs)


def dequant_any(w: LinearWeight) -> Tensor:
    """fp32 [..., out, in] for every format, including the Ascend ones."""
    if w.fmt == "w8a8":
        return w.weight.float() * w.scale.float().unsqueeze(-1)
    if w.fmt == "w4a8":
        q = unpack_int4(w.weight).float()  # [..., in, out]
        G = q.shape[-2] // w.scale.shape[-2]
        s = w.scale.float().repeat_interleave(G, dim=-2)
        return (q * s).transpose(-1, -2)
    if w.fmt == "mxfp8":
        n = w.weight.shape[-1]
        s = torch.exp2(w.scale.view(torch.uint8).float() - 127.0).flatten(-2).repeat_interleave(MX_BLOCK, dim=-1)
        return w.weight.float() * s[..., :n]
    return dequant_weight(w.weight, w.scale, w.fmt)


def to_w8a8(w: LinearWeight) -> LinearWeight:
    """Any float/FP8/FP4 weight -> int8 with one fp32 scale per output channel (amax / 127)."""
    # the math is hardware-neutral (common/model/quant.py): the reference's W8A8 mode runs the same conversion
    q, scale = quantize_int8_rows(dequant_any(w))
    q = q.to(torch.int8)
    return LinearWeight(q, scale, "w8a8")


def to_w4a8(w: LinearWeight, group_size: int = 32) -> LinearWeight:
    """Any float/FP8/FP4 weight -> int4 with per-(group of `group_size` inputs, output) scales, packed op-ready.
    group_size 32 keeps the FP4 checkpoint's own 1x32 scale granularity; group_size = in gives per-channel."""
    q, scale = quantize_int4_groups(dequant_any(w).transpose(-1, -2), group_size)  # [..., in, out]
    return LinearWeight(pack_int4(q), scale, "w4a8")


def fp4_to_fp8(w: LinearWeight) -> LinearWeight:
    """FP4 (e2m1, 1x32 scales) -> FP8 e4m3 with 128x128 power-of-two block scales (common/model/quant.py format)."""
    if w.fmt != "fp4":
        raise ValueError(f"expected an fp4 weight, got {w.fmt!r}")
    q, s = quantize_fp8(dequant_weight(w.weight, w.scale, "fp4"))
    return LinearWeight(q, s, "fp8")


def to_mxfp8(w: LinearWeight) -> LinearWeight:
    """FP4 (e2m1 codes, ue8m0 1x32 scales) or FP8 (128x128 block scales) -> "mxfp8", exactly (module docstring)."""
    if w.fmt == "fp4":
        codes = unpack_fp4(w.weight)  # e2m1 values: all representable in e4m3
        scale = w.scale.float()  # [..., out, in/32] powers of two
    elif w.fmt == "fp8":
        rows, cols = w.weight.shape[-2:]
        codes = w.weight
        scale = w.scale.float().repeat_interleave(128, dim=-2)[..., :rows, :]
        scale = scale.repeat_interleave(128 // MX_BLOCK, dim=-1)[..., :(cols + MX_BLOCK - 1) // MX_BLOCK]
    else:
        raise ValueError(f"expected an fp4 or fp8 weight, got {w.fmt!r}")
    nb = scale.shape[-1]
    pad = nb % 2  # the op's pair layout: an odd count of 32-blocks gets one padding scale (2^0)
    scale = torch.nn.functional.pad(scale, (0, pad), value=1.0)
    byte = float_to_e8m0(scale).view(torch.uint8)
    return LinearWeight(codes.to(torch.float8_e4m3fn), byte.unflatten(-1, (-1, 2)).contiguous(), "mxfp8")


def fp4_to_fp8_is_exact(w: LinearWeight) -> bool:
    return torch.equal(dequant_any(fp4_to_fp8(w)), dequant_any(w))


def conversion_error(w: LinearWeight, fmt: str = "w8a8", tokens: int = 32, seed: int = 0,
                     group_size: int = 32) -> dict[str, float]:
    """Accuracy cost of a conversion: the converted GEMM as the Ascend 910B path runs it (emulated: per-token int8
    activations via npu_dynamic_quant, integer GEMM, dequant) vs the GEMM with the original weight dequantised
    (no activation quantisation), on `tokens` random N(0,1) bf16 activations. Also the weight-only error."""
    from . import create_ops  # deferred: convert is importable without the backend

    gen = torch.Generator().manual_seed(seed)
    W = dequant_any(w)
    if W.dim() != 2:
        raise ValueError("conversion_error takes one [out, in] weight (index an expert first)")
    x = torch.randn(tokens, W.shape[1], generator=gen).to(torch.bfloat16)
    conv = to_w8a8(w) if fmt == "w8a8" else to_w4a8(w, group_size)
    ops = create_ops(emulate=True, chip="910b")
    y_ref = x.float() @ W.t()
    y = ops.linear(x, conv).float()
    err = (y - y_ref).abs()
    werr = (dequant_any(conv) - W).abs()
    return {"max_abs": err.max().item(), "mean_abs": err.mean().item(),
            "rel_rms": (err.square().mean().sqrt() / y_ref.square().mean().sqrt()).item(),
            "weight_max_abs": werr.max().item(), "weight_mean_abs": werr.mean().item()}


def convert_for_chip(w: LinearWeight, chip: str, expert: bool = False) -> LinearWeight:
    """What AscendOps would convert a checkpoint weight to on `chip` (done once at load time to avoid the
    backend's on-the-fly conversion): 950 keeps FP8 (FP4 -> FP8; experts -> "mxfp8" for the grouped GEMM's MX
    form); 910B gets w8a8 (dense) / w4a8 (experts: the grouped GEMM's documented weight-only int4 form); 910C
    w8a8 everywhere (npu_quant_matmul has no int8-x / int4-weight form, and the grouped GEMM is not A3's)."""
    if w.fmt in ("none", "w8a8", "w4a8"):
        return w
    if chip.startswith("950"):
        if expert:  # npu_grouped_matmul's MX form
            return to_mxfp8(w)
        return fp4_to_fp8(w) if w.fmt == "fp4" else w
    return to_w4a8(w) if expert and chip == "910b" else to_w8a8(w)
