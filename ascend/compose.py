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


def fp4_sim(x: Tensor, block: int) -> Tensor:
    """ReferenceOps.fp4_sim (e2m1 quantise-dequantise in blocks, ue8m0 scale 2^ceil(log2(max(amax, 6 * 2^-126) / 6)),
    round to nearest, ties to the even code) without the code lookup: the e2m1 grid is uniform with step 0.5 below 2,
    1 below 4 and 2 up to 6, so a magnitude rounds to nearest-even multiple of its step (torch.round ties to even, and
    an even multiple is an even code). Equal values; a negative value that rounds to zero gives -0 where the reference
    gives +0."""
    xf = x.float().unflatten(-1, (-1, block))
    s = pow2_scale(xf.abs().amax(-1, keepdim=True), FP4_MAX, FP4_MAX * 2.0 ** -126)
    v = xf / s
    a = v.abs().clamp(max=FP4_MAX)
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    q = torch.copysign(torch.round(a / step) * step, v)
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
