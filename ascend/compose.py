"""Torch compositions of the Ascend backend where its arithmetic must differ from the plain reference: FP8 rounding
without an FP8 dtype (A2/A3), the int8 activation quantisation npu_dynamic_quant would do where it cannot run
(fp32 activations), and the router on precomputed logits. Plain torch ops only, so they run on an NPU as well as on
the CPU. Elsewhere the backend falls back to dsv4.common.model.reference directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .formats import round_e4m3

FP8_MAX = 448.0
FP4_MAX = 6.0
GATHER_CHUNK = 128  # queries per gather in sparse_attention: bounds the [B, s, K, D] gathered keys


def pow2_scale(amax: Tensor, qmax: float, floor: float) -> Tensor:
    """UE8M0 scale: 2^ceil(log2(max(amax, floor) / qmax))."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=floor) / qmax)))


def fp8_sim(x: Tensor, block: int, mode: str = "e4m3") -> Tensor:
    xf = x.float().unflatten(-1, (-1, block))
    s = pow2_scale(xf.abs().amax(-1, keepdim=True), FP8_MAX, 1e-4)
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX)
    q = round_e4m3(q) if mode == "e4m3" else q.to(x.dtype).float()
    return (q * s).flatten(-2).to(x.dtype)


def _e2m1_signed_grid() -> tuple[Tensor, Tensor]:
    """The 15 signed e2m1 values in ascending order and the 14 fp32 boundaries between neighbours for
    torch.bucketize (right=False: a value equal to a boundary takes the lower neighbour). A midpoint whose tie goes
    to the upper neighbour (the even code there) is lowered by one fp32 ulp, so that the midpoint itself lies above it
    and no other fp32 value moves: the hardware cast's round-to-nearest-even, saturating at +-6."""
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # codes 0..7: even codes 0, 2, 4, 6 = 0, 1, 2, 4
    values = [-m for m in mags[:0:-1]] + mags
    # from Python constants only (no tensor read back): the first call may come inside a graph capture
    up = torch.tensor([mags.index(abs(v)) % 2 == 0 for v in values[1:]])  # the upper neighbour's code is even
    grid = torch.tensor(values, dtype=torch.float32)
    mid = (grid[:-1] + grid[1:]) / 2
    bounds = torch.where(up, torch.nextafter(mid, torch.tensor(float("-inf"))), mid)
    return grid, bounds


_E2M1_GRID: dict[str, tuple[Tensor, Tensor]] = {}  # device -> (grid, bounds), kept like reference.hadamard_matrix


def fp4_sim(x: Tensor, block: int) -> Tensor:
    """ReferenceOps.fp4_sim (e2m1 quantise-dequantise in blocks, ue8m0 scale 2^ceil(log2(max(amax, 6 * 2^-126) / 6)),
    round to nearest, ties to the even code, saturating at +-6) in fewer ops: one bucketize of the signed scaled
    values against the boundaries between neighbouring grid values (_e2m1_signed_grid) and one lookup, where the
    reference rounds magnitudes to codes and re-applies the sign. Equal values, the sign of zero included."""
    dev = str(x.device)
    if dev not in _E2M1_GRID:
        _E2M1_GRID[dev] = tuple(t.to(x.device) for t in _e2m1_signed_grid())
    grid, bounds = _E2M1_GRID[dev]
    xf = x.float().unflatten(-1, (-1, block))
    s = pow2_scale(xf.abs().amax(-1, keepdim=True), FP4_MAX, FP4_MAX * 2.0 ** -126)
    q = grid[torch.bucketize(xf / s, bounds)]
    return (q * s).flatten(-2).to(x.dtype)


def quant_int8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """npu_dynamic_quant's formula for activations it cannot take (fp32): scale = amax/127, q = round(x/scale)."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / safe.unsqueeze(-1)).clamp(-127, 127), scale


def gate(logits: Tensor, bias: Tensor | None, tid2eid: Tensor | None, token_ids: Tensor | None, topk: int,
         score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
    if score_func == "sqrtsoftplus":
        s = F.softplus(logits).sqrt()
    elif score_func == "softmax":
        s = logits.softmax(-1)
    elif score_func == "sigmoid":
        s = logits.sigmoid()
    else:
        raise ValueError(f"unknown score_func {score_func!r}")
    if tid2eid is not None:
        ids = tid2eid[token_ids.long()].long()
    else:
        ids = (s + bias.float() if bias is not None else s).topk(topk, dim=-1).indices
    w = s.gather(-1, ids)
    if score_func != "softmax":
        w = w / w.sum(-1, keepdim=True)
    return w * route_scale, ids
