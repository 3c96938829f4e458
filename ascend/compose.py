"""Torch compositions of the Ascend backend where its arithmetic must differ from the plain reference: FP8 rounding
without an FP8 dtype (A2/A3), the int8 activation quantisation npu_dynamic_quant would do where it cannot run
(fp32 activations), and the router on precomputed logits. Plain torch ops only, so they run on an NPU as well as on
the CPU. Elsewhere the backend falls back to dsv4.common.model.reference directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4.common.model.config import FP8_BLOCK
from dsv4.common.model.ops import LinearWeight

from .convert import dequant_any
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


def dequant_fp8_blocks(w: LinearWeight) -> Tensor:
    """fp32 [out, in] of an FP8 weight with 128x128 block scales: the same products as dequant_weight, in two ops (one
    upcast, one broadcast multiply over the blocks) where both dims are whole blocks, instead of expanding the scale
    to full size; partial edge blocks take dequant_any."""
    rows, cols = w.weight.shape[-2:]
    if w.fmt != "fp8" or w.weight.dim() != 2 or rows % FP8_BLOCK or cols % FP8_BLOCK:
        return dequant_any(w)
    q = w.weight.float().view(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK)
    return (q * w.scale.float()[:, None, :, None]).view(rows, cols)


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
