"""Weight conversion for chips without FP8/FP4 GEMMs (910B / 910C), and FP4 -> FP8 re-encoding for the 950 path.

Formats produced (LinearWeight.fmt; the Ascend backend consumes all of them):
- "w8a8": weight int8 [..., out, in] (checkpoint orientation), scale fp32 [..., out]: symmetric per output channel,
  W ~ q * scale[o]. Runs as npu_dynamic_quant (per-token int8 activations) + npu_quant_matmul / npu_grouped_matmul.
- "w4a8": weight int32 [..., in, out/8] = int4 values in the op-ready [K, N] layout, 8 per int32 along N
  (formats.pack_int4), scale fp32 [..., in/G, out]: symmetric per (group of G input rows, output channel).
  Runs as npu_grouped_matmul's weight-only (antiquant) form with bf16 activations on 910B: torch_npu 2.14.0's doc
  has no int8-activation / int4-weight row. The published Ascend V4 weights are w8a8 / w4a8 conversions
  (torch-npu-ops.md section 8).
- "fp8" from "fp4": FP4 experts re-encoded as FP8 128x128 blocks so the 950 FP8 grouped GEMM can run them; exact
  whenever the per-32 FP4 scales inside one 128x128 block span at most 2^14 (checked by fp4_to_fp8_is_exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsv4.common.model.ops import LinearWeight
from dsv4.common.model.quant import (
    INT4_MAX,
    INT8_MAX,
    dequant_weight,
    quantize_fp8,
    quantize_int4_groups,
    quantize_int8_rows,
)

from .formats import pack_int4, unpack_int4

__all__ = ["INT4_MAX", "INT8_MAX", "convert_for_chip", "dequant_any", "fp4_to_fp8", "to_w4a8", "to_w8a8"]


def dequant_any(w: LinearWeight) -> Tensor:
    """fp32 [..., out, in] for every format, including the Ascend ones."""
    if w.fmt == "w8a8":
        return w.weight.float() * w.scale.float().unsqueeze(-1)
    if w.fmt == "w4a8":
        q = unpack_int4(w.weight).float()  # [..., in, out]
        G = q.shape[-2] // w.scale.shape[-2]
        s = w.scale.float().repeat_interleave(G, dim=-2)
        return (q * s).transpose(-1, -2)
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
    backend's on-the-fly conversion): 950 keeps FP8 (FP4 -> FP8); 910B gets w8a8 (dense) / w4a8 (experts: the
    grouped GEMM's documented weight-only int4 form); 910C w8a8 everywhere (torch_npu 2.14.0 documents the grouped
    GEMM for A2 only, and npu_quant_matmul has no int8-x / int4-weight form)."""
    if w.fmt in ("none", "w8a8", "w4a8"):
        return w
    if chip.startswith("950"):
        return fp4_to_fp8(w) if w.fmt == "fp4" else w
    return to_w4a8(w) if expert and chip == "910b" else to_w8a8(w)
