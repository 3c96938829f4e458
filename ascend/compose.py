"""Torch compositions the Ascend backend falls back to where no fused torch_npu op exists, or where the op's fixed
shapes / dtypes / chip list do not fit. Plain torch ops only, so they run on an NPU as well as on the CPU.
Written from shared/spec/dsv4-architecture.md (not from dsv4.common.reference, which they are tested against).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4.common.ops import topk_visible

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


def round_e2m1(v: Tensor) -> Tensor:
    """Nearest e2m1 value {0, .5, 1, 1.5, 2, 3, 4, 6} (signed), ties to the even code, saturating at 6: the grid
    step is 0.5 below 2, 1 in [2, 4) and 2 above, and round-half-even on v/step picks the even code."""
    a = v.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.sign(v) * (torch.round(a / step) * step).clamp(max=FP4_MAX)


def fp4_sim(x: Tensor, block: int) -> Tensor:
    xf = x.float().unflatten(-1, (-1, block))
    s = pow2_scale(xf.abs().amax(-1, keepdim=True), FP4_MAX, FP4_MAX * 2.0 ** -126)
    return (round_e2m1(xf / s) * s).flatten(-2).to(x.dtype)


@lru_cache(maxsize=8)
def _sylvester(n: int) -> Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(x: Tensor) -> Tensor:
    n = x.shape[-1]
    return (x.float() @ _sylvester(n).to(x.device) * n ** -0.5).to(x.dtype)


def quant_int8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """npu_dynamic_quant's formula for activations it cannot take (fp32): scale = amax/127, q = round(x/scale)."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / safe.unsqueeze(-1)).clamp(-127, 127), scale


def quant_fp8_per_block(x: Tensor, block: int = 128) -> tuple[Tensor, Tensor]:
    """Activation FP8 quant of the official GEMMs: per token, 1 x block, power-of-two scales.
    Returns (float8_e4m3fn [M, K], fp32 scales [M, K/block])."""
    xf = x.float().unflatten(-1, (-1, block))
    s = pow2_scale(xf.abs().amax(-1, keepdim=True), FP8_MAX, 1e-4)
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), s.squeeze(-1)


def sparse_attention(q: Tensor, kv: Tensor, sink: Tensor, indices: Tensor, scale: float) -> Tensor:
    """Gather the indexed keys, one softmax with the sink logit as an extra zero-value column, P rounded to q.dtype
    before PV, fp32 accumulation. Processed in query chunks to bound the gathered [B, s, K, D] tensor."""
    B, S, H, D = q.shape
    out = torch.empty_like(q)
    kvf = kv.float()
    bidx = torch.arange(B, device=q.device).view(B, 1, 1)
    for a in range(0, S, GATHER_CHUNK):
        idx = indices[:, a:a + GATHER_CHUNK].long()
        ok = idx >= 0
        keys = kvf[bidx, idx.clamp(min=0)]  # [B,s,K,D]
        logit = torch.einsum("bshd,bskd->bshk", q[:, a:a + GATHER_CHUNK].float(), keys) * scale
        logit = logit.masked_fill(~ok.unsqueeze(2), float("-inf"))
        sink_col = sink.float().view(1, 1, H, 1).expand(*logit.shape[:-1], 1)
        p = torch.cat([logit, sink_col], -1).softmax(-1)[..., :-1]
        p = torch.nan_to_num(p, nan=0.0)  # no valid key and no sink: zeros
        out[:, a:a + GATHER_CHUNK] = torch.einsum("bshk,bskd->bshd", p.to(q.dtype).float(), keys).to(q.dtype)
    return out


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, kk: int) -> Tensor:
    score = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu()
    score = (score * weights.float().unsqueeze(-1)).sum(2)  # [B,S,T]
    return topk_visible(score, visible, kk)  # the interface's tie rule: equal scores -> lower index


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


def sinkhorn(c: Tensor, iters: int, eps: float) -> Tensor:
    c = c.softmax(-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def hc_mix(x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
    xf = x.flatten(-2).float()
    return (xf @ fn.float().t()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)


def hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float,
           norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[-2]
    m = hc_mix(x, fn, norm_eps)
    pre = torch.sigmoid(m[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * torch.sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = sinkhorn((m[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n)), iters, hc_eps)
    return (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype), post, comb


def hc_post(x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    mixed = torch.einsum("bsjk,bsjd->bskd", comb.float(), residual.float())
    return (mixed + post.float().unsqueeze(-1) * x.float().unsqueeze(-2)).to(x.dtype)


def hc_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_eps: float, norm_eps: float) -> Tensor:
    pre = torch.sigmoid(hc_mix(x, fn, norm_eps) * scale[0] + base) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
