"""Routed experts: permutation by expert, grouped w1/w3 GEMM with the clamped SwiGLU and route weight fused,
grouped w2 GEMM, and a gather-combine kernel (no atomics: each token sums its own k rows, deterministic)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cfg, pow2
from .gemm import gemm_cfg, grouped_gemm, make_tiles, quant_act


@triton.jit
def _combine_kernel(y_ptr, inv_ptr, o_ptr, T, D, KS, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[t] = sum over the token's slots of the expert output rows y[inv[t, slot]] (inv = -1: not on this rank)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = toks < T
    dmask = dims < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for slot in range(0, KS):
        r = tl.load(inv_ptr + toks * KS + slot, mask=tmask, other=-1).to(tl.int64)
        ok = r >= 0
        acc += tl.load(y_ptr + tl.where(ok, r, 0)[:, None] * D + dims[None, :],
                       mask=(ok & tmask)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    tl.store(o_ptr + toks[:, None].to(tl.int64) * D + dims[None, :], acc, mask=tmask[:, None] & dmask[None, :])


def permute(ids: Tensor, n_local: int, expert_offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort the T*k (token, slot) assignments by local expert (torch: argsort + bincount, a named fallback).
    Returns (order: position -> flat assignment, counts [E_local], inv [T,k]: assignment -> position or -1,
    valid [T*k])."""
    T, k = ids.shape
    local = ids.long() - expert_offset
    valid = ((local >= 0) & (local < n_local)).flatten()
    key = torch.where(valid, local.flatten(), n_local)  # assignments of other ranks sort last and are never read
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_local + 1)[:n_local]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=ids.device)
    inv = torch.where(valid, pos, -1).view(T, k).to(torch.int32).contiguous()
    return order, counts, inv, valid


def moe_experts(x: Tensor, weights: Tensor, ids: Tensor, w1: tuple, w2: tuple, w3: tuple, limit: float,
                expert_offset: int = 0) -> Tensor:
    """x [T,d]; weights/ids [T,k]; w1/w3 [E,I,d], w2 [E,d,I] as (weight, scale, fmt). Returns fp32 [T,d]."""
    T, d = x.shape
    k = ids.shape[1]
    E = w1[0].shape[0]
    inter = w1[0].shape[1]
    out = torch.zeros((T, d), dtype=torch.float32, device=x.device)
    if T == 0 or k == 0:
        return out
    order, counts, inv, _ = permute(ids, E, expert_offset)
    src_tok = (order // k).to(torch.int32).contiguous()  # the A row (token) of each sorted position
    route_w = weights.float().flatten()[order].contiguous()
    P = T * k
    # tiles no taller than an average expert's rows (decode: a few tokens per expert), but >= 16 for tl.dot
    a_dtype = x.dtype if w1[2] == "none" else torch.float8_e4m3fn  # what both expert GEMMs read
    bm = min(gemm_cfg(a_dtype)["BLOCK_M"], pow2(max(1, P // max(E, 1)), 16))
    tiles = make_tiles(counts, bm, P)
    if w1[2] == "none":
        a, a_s = x.contiguous(), None
    else:
        a, a_s = quant_act(x)
    # rows past the valid assignments stay zero: they are never combined, and zeros keep quant_act finite on them
    h = torch.zeros((P, inter), dtype=x.dtype, device=x.device)
    grouped_gemm(a, a_s, src_tok, w1[0], w1[1], w1[2], tiles, P, x.dtype, w3=w3[0], w3_scale=w3[1], limit=limit,
                 route_w=route_w, block_m=bm, out=h)
    if w2[2] == "none":
        a2, a2_s = h, None
    else:
        a2, a2_s = quant_act(h)
    y = grouped_gemm(a2, a2_s, None, w2[0], w2[1], w2[2], tiles, P, x.dtype, block_m=bm)
    cc = cfg("combine")
    bt, bd = cc["BLOCK_T"], min(cc["BLOCK_D"], pow2(d))
    _combine_kernel[(triton.cdiv(T, bt), triton.cdiv(d, bd))](y, inv, out, T, d, k, BLOCK_T=bt, BLOCK_D=bd)
    return out
