"""Pure-torch reference implementation of the ops interface: the oracle every backend is judged against.

Written for clarity over speed, but bounded in memory (attention and experts are processed in pieces) so that
long prompts and the benchmarks run on a CPU. Every formula follows shared/spec/dsv4-architecture.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4.common.model.ops import OP_NAMES, LinearWeight, Ops, topk_visible
from dsv4.common.model.quant import E2M1_VALUES, FP8_MAX, dequant_weight, pow2_ceil, round_to_e2m1_codes

ATTN_QUERY_CHUNK = 256  # queries per gather in sparse_attention: bounds the [S, K, D] gather


def f32(t: Tensor) -> Tensor:
    """t in fp32. A no-op `.float()` still costs a dispatch, and a decode step of a small model is dispatch-bound."""
    return t if t.dtype == torch.float32 else t.float()


def like(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


_HADAMARD: dict[tuple[int, str], Tensor] = {}
_BATCH_INDEX: dict[tuple[int, str], Tensor] = {}


def batch_index(B: int, device: torch.device | str) -> Tensor:
    """[B,1,1] int64 row numbers 0..B-1 (the batch index of a per-row gather), made once per (B, device) and kept
    (as hadamard_matrix: a decode step would otherwise build it in every layer)."""
    key = (B, str(device))
    t = _BATCH_INDEX.get(key)
    if t is None:
        t = _BATCH_INDEX[key] = torch.arange(B, device=device).view(B, 1, 1)
    return t


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> Tensor:
    """Sylvester-ordered Hadamard matrix H_n (entries +-1), fp32, built once per (n, device) and kept in a plain
    dict: a graph capture (torch.compile) then reads the stored tensor instead of tracing its construction."""
    key = (n, str(device))
    h = _HADAMARD.get(key)
    if h is not None:
        return h
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    _HADAMARD[key] = h = h.to(device)
    return h


def sinkhorn(c: Tensor, iters: int, eps: float) -> Tensor:
    """Sinkhorn onto doubly-stochastic matrices, as the official kernel: a softmax over the last dim counts as the
    first row normalisation, then a column normalisation, then (iters-1) x (row, column). c [..., n, n] fp32 [j, k]."""
    c = c.softmax(-1).add_(eps)
    c.div_(c.sum(-2, keepdim=True).add_(eps))  # in place: the same arithmetic, fewer allocations per tiny op
    for _ in range(iters - 1):
        c.div_(c.sum(-1, keepdim=True).add_(eps))
        c.div_(c.sum(-2, keepdim=True).add_(eps))
    return c


class ReferenceOps(Ops):
    name = "reference"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    # -- normalisation ------------------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = f32(x)
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        return like(f32(weight) * y, x.dtype)

    def head_rms_norm(self, q: Tensor, eps: float) -> Tensor:
        return q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)

    # -- rotary --------------------------------------------------------------------------------------------------------
    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, out: Tensor | None = None) -> Tensor:
        xf = f32(x).unflatten(-1, (-1, 2))  # [B,S,H,r/2,2]
        a, b = xf[..., 0], xf[..., 1]
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B,S,1,r/2]
        if inverse:
            s = -s
        y = like(torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2), x.dtype)
        return y if out is None else out.copy_(y)

    # -- simulated quantisation ----------------------------------------------------------------------------------------
    def fp8_sim(self, x: Tensor, block: int, mode: str = "e4m3") -> Tensor:
        xf = f32(x).unflatten(-1, (-1, block))
        s = pow2_ceil(xf.abs().amax(-1, keepdim=True).clamp(min=1e-4) / FP8_MAX)
        q = (xf / s).clamp(-FP8_MAX, FP8_MAX)
        q = q.to(torch.float8_e4m3fn).float() if mode == "e4m3" else f32(like(q, x.dtype))
        return like((q * s).flatten(-2), x.dtype)

    def fp4_sim(self, x: Tensor, block: int) -> Tensor:
        xf = f32(x).unflatten(-1, (-1, block))
        s = pow2_ceil(xf.abs().amax(-1, keepdim=True).clamp(min=6.0 * 2.0 ** -126) / 6.0)
        q = E2M1_VALUES.to(x.device)[round_to_e2m1_codes(xf / s)]
        return like((q * s).flatten(-2), x.dtype)

    def hadamard(self, x: Tensor) -> Tensor:
        n = x.shape[-1]
        h = hadamard_matrix(n, x.device)
        return like(f32(x) @ h * n ** -0.5, x.dtype)

    # -- linear --------------------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, w: LinearWeight) -> Tensor:
        if w.fmt == "none":
            return F.linear(x, like(w.weight, x.dtype))
        # the official FP8/FP4 GEMMs quantise the activation per token in 1x128 blocks (ue8m0 scales)
        xq = self.fp8_sim(f32(x), 128)
        return like(F.linear(xq, dequant_weight(w.weight, w.scale, w.fmt)), x.dtype)

    # -- attention -----------------------------------------------------------------------------------------------------
    def sparse_attention(self, q: Tensor, kv: Tensor, sink: Tensor, indices: Tensor, softmax_scale: float) -> Tensor:
        B, S, H, D = q.shape
        batch = batch_index(B, q.device)
        if S <= ATTN_QUERY_CHUNK:  # one chunk (every decode step): no output buffer to copy into
            return like(self._attend(q, kv, sink, indices, softmax_scale, batch), q.dtype)
        out = torch.empty_like(q)
        for s0 in range(0, S, ATTN_QUERY_CHUNK):
            part = slice(s0, s0 + ATTN_QUERY_CHUNK)
            out[:, part] = self._attend(q[:, part], kv, sink, indices[:, part], softmax_scale, batch)  # copy_ casts
        return out

    @staticmethod
    def _attend(q: Tensor, kv: Tensor, sink: Tensor, indices: Tensor, softmax_scale: float, batch: Tensor) -> Tensor:
        """sparse_attention of the queries q [B,s,H,D] (indices [B,s,K]) in fp32 [B,s,H,D]."""
        B, s, H, D = q.shape
        qs = f32(q)
        idx = indices.long()
        keys = kv[batch, idx.clamp(min=0)].float()  # [B,s,K,D]: gather first, so only used rows convert
        K = keys.shape[2]
        # one bmm per (b, s) query row, [H,D] @ [D,K] (what einsum "bshd,bskd->bshk" runs, without its permutes)
        logits = torch.bmm(qs.flatten(0, 1), keys.flatten(0, 1).transpose(1, 2)).view(B, s, H, K) * softmax_scale
        logits = logits.masked_fill((idx < 0)[:, :, None, :], float("-inf"))  # -1: no key
        sink_col = f32(sink).view(1, 1, H, 1).expand(B, s, H, 1)
        probs = torch.cat([logits, sink_col], dim=-1).softmax(-1)[..., :-1]
        probs = f32(like(probs, q.dtype))  # the kernel rounds P to the activation dtype before PV
        return torch.bmm(probs.flatten(0, 1), keys.flatten(0, 1)).view(B, s, H, D)  # [H,K] @ [K,D] per row

    def compress_pool(self, kv: Tensor, score: Tensor) -> Tensor:
        return (f32(score).softmax(dim=2) * f32(kv)).sum(dim=2)

    def indexer_topk(self, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int) -> Tensor:
        return topk_visible(self.indexer_scores(q, k, weights), visible, topk)

    # -- MoE -----------------------------------------------------------------------------------------------------------
    def moe_gate(self, x: Tensor, weight: Tensor, bias: Tensor | None, tid2eid: Tensor | None,
                 token_ids: Tensor | None, topk: int, score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
        logits = f32(x) @ f32(weight).t()
        if score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif score_func == "softmax":
            scores = logits.softmax(-1)
        else:
            scores = logits.sigmoid()
        if tid2eid is not None:
            ids = tid2eid[token_ids].long()
        else:
            sel = scores + f32(bias) if bias is not None else scores
            ids = sel.topk(topk, dim=-1).indices
        w = scores.gather(-1, ids)
        if score_func != "softmax":
            w = w / w.sum(-1, keepdim=True)
        return w * route_scale, ids

    def swiglu(self, gate: Tensor, up: Tensor, limit: float) -> Tensor:
        g, u = f32(gate), f32(up)
        if limit > 0:
            u = u.clamp(-limit, limit)
            g = g.clamp(max=limit)
        return F.silu(g) * u

    def moe_experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: LinearWeight, w2: LinearWeight,
                    w3: LinearWeight, swiglu_limit: float, expert_offset: int = 0,
                    n_experts: int | None = None) -> Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        n_local = w1.weight.shape[0]
        for g in ids.unique().tolist():  # only experts that received tokens (idle ones cost ops at E = 256)
            e = g - expert_offset
            if not 0 <= e < n_local:
                continue
            tok, slot = torch.nonzero(ids == g, as_tuple=True)
            xe = x[tok]
            h = self.swiglu(self.linear(xe, _expert(w1, e)), self.linear(xe, _expert(w3, e)), swiglu_limit)
            h = h * f32(weights[tok, slot, None])
            out.index_add_(0, tok, f32(self.linear(like(h, x.dtype), _expert(w2, e))))
        return out

    # -- hyper-connections ---------------------------------------------------------------------------------------------
    def _hc_mix(self, x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
        xf = f32(x.flatten(-2))
        rs = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
        return (xf @ f32(fn).t()) * rs

    def hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float,
               norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n = x.shape[-2]
        m = self._hc_mix(x, fn, norm_eps)
        pre = torch.sigmoid(m[..., :n] * scale[0] + base[:n]) + hc_eps
        post = 2 * torch.sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = (m[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
        comb = sinkhorn(comb, iters, hc_eps)
        y = like((pre.unsqueeze(-1) * f32(x)).sum(-2), x.dtype)
        return y, post, comb

    def hc_post(self, x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        y = post.unsqueeze(-1) * f32(x).unsqueeze(-2) + torch.einsum("bsjk,bsjd->bskd", comb, f32(residual))
        return like(y, x.dtype)

    def hc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_eps: float, norm_eps: float) -> Tensor:
        m = self._hc_mix(x, fn, norm_eps)
        pre = torch.sigmoid(m * scale[0] + base) + hc_eps
        return like((pre.unsqueeze(-1) * f32(x)).sum(-2), x.dtype)

    def describe(self) -> dict[str, str]:
        return {name: "pure torch (reference)" for name in OP_NAMES}


def _expert(w: LinearWeight, e: int) -> LinearWeight:
    return LinearWeight(w.weight[e], None if w.scale is None else w.scale[e], w.fmt)


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
