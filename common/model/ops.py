"""The ops interface: every arithmetic primitive of the V4 graph, behind one seam.

The model (common/model.py) calls only these methods; a backend decides how they run. `ReferenceOps`
(common/reference.py) is the pure-torch oracle every backend is judged against. A backend subclasses `Ops`
(or `ReferenceOps`, to fall back per op with a named reason) and implements each method with the same contract.

Conventions for every op:
- Shapes in docstrings: B batch, S query tokens, H heads, D head dim, N kv rows, K gathered indices per query,
  T tokens (flattened), E experts, k experts per token, n hyper-connection streams, d model width.
- Index tensors use -1 for "no entry"; valid entries may come in any order.
- "act dtype" is the model's activation dtype (bf16 on devices, fp32 allowed on CPU). Ops return the dtype stated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LinearWeight(NamedTuple):
    """A linear layer's weight as stored in the checkpoint.

    fmt "none": `weight` [out, in] in a float dtype, `scale` None.
    fmt "fp8":  `weight` [out, in] float8_e4m3fn, `scale` [ceil(out/128), ceil(in/128)] fp32 (powers of two).
    fmt "fp4":  `weight` [out, in/2] int8, two e2m1 codes per byte (low nibble = even column),
                `scale` [out, in/32] fp32.
    Stacked expert weights carry a leading [E] dim on both tensors.
    """

    weight: Tensor
    scale: Tensor | None
    fmt: str


class Ops:
    """Interface. Every method must be implemented by a backend (or inherited from ReferenceOps)."""

    name: str = "abstract"
    device: torch.device = torch.device("cpu")

    # -- normalisation ------------------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """y = weight * x * rsqrt(mean(x^2, -1) + eps), math in fp32, returned in x.dtype. weight fp32 [x.shape[-1]]."""
        raise NotImplementedError

    def head_rms_norm(self, q: Tensor, eps: float) -> Tensor:
        """Weightless per-head RMS normalisation of q [B,S,H,D] over D, computed in q.dtype (the official code
        does this in bf16 arithmetic: `q *= rsqrt(q.square().mean(-1) + eps)`)."""
        raise NotImplementedError

    # -- rotary --------------------------------------------------------------------------------------------------------
    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, out: Tensor | None = None) -> Tensor:
        """Interleaved-pair rotary embedding. x [B,S,H,r] (act dtype), cos/sin [B,S,r/2] fp32.
        Pair i = (x[2i], x[2i+1]) as a complex number times exp(+-i*angle); fp32 math, returned in x.dtype.
        inverse=True rotates by the negative angle (the conjugate). out: a tensor of x's shape and dtype to write the
        result into and return (x itself: the graph rotates the rope part of a tensor it owns in place); the values
        are those of the call without it."""
        raise NotImplementedError

    def prepare_rope(self, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The rope tables cos/sin [B,S,r/2] fp32 in the form this backend's `rope` takes fastest, computed once per
        decode step (common/model/static.py StepPlan) and passed to every rope call of the step in place of cos/sin.
        The default is the identity; a backend's `rope` must accept its own prepared tables and the raw ones."""
        return cos, sin

    # -- simulated quantisation (QAT matching) and the Hadamard rotation -----------------------------------------------
    def fp8_sim(self, x: Tensor, block: int, mode: str = "e4m3") -> Tensor:
        """FP8 quant-dequant along the last dim in blocks: per block s = 2^ceil(log2(max(amax,1e-4)/448)),
        x -> e4m3(clamp(x/s, +-448)) * s. mode "clamp" skips the e4m3 rounding (the Flash kernel's variant).
        Returns x.dtype. The last dim must be a multiple of block."""
        raise NotImplementedError

    def fp4_sim(self, x: Tensor, block: int) -> Tensor:
        """FP4 (e2m1) quant-dequant along the last dim in blocks: s = 2^ceil(log2(max(amax, 6*2^-126)/6)),
        x -> round_to_e2m1_grid(x/s) * s, ties to even. Returns x.dtype."""
        raise NotImplementedError

    def hadamard(self, x: Tensor) -> Tensor:
        """Normalised Walsh-Hadamard transform (Sylvester order) over the last dim: x @ H_n / sqrt(n).
        fp32 math, returned in x.dtype. n must be a power of two."""
        raise NotImplementedError

    # -- linear --------------------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, w: LinearWeight) -> Tensor:
        """y = x @ W^T for x [..., in]. Unquantised weights: computed in x.dtype (weight cast to it).
        FP8/FP4 weights (the official GEMMs): the activation is FP8-quantised per token in 1x128 blocks along K
        with power-of-two scales, the weight dequantised with its block scales, fp32 accumulation; output x.dtype."""
        raise NotImplementedError

    def linears(self, x: Tensor, ws: tuple[LinearWeight, ...]) -> tuple[Tensor, ...]:
        """One input, several weights (a layer's wq_a and wkv; the shared expert's w1 and w3): (linear(x, w) for w
        in ws), equal to them bit for bit. A backend whose GEMMs quantise the activation may quantise x once for all
        of the weights (the same codes and scales each call would make). This default makes one call per weight."""
        return tuple(self.linear(x, w) for w in ws)

    def grouped_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """A block-diagonal dense linear (wo_a): x [G,M,K] holds group g's rows, weight [G*N, K] stacks group g's
        [N, K] rows as the checkpoint stores them. Returns [G,M,N] in x.dtype, group g = linear(x[g], W_g) bit for
        bit. This default is the one batched GEMM that the per-group GEMMs make (torch.bmm over the groups)."""
        G, _, K = x.shape
        return torch.bmm(x, weight.view(G, -1, K).transpose(1, 2).to(x.dtype))

    # -- attention -----------------------------------------------------------------------------------------------------
    def sparse_attention(self, q: Tensor, kv: Tensor, sink: Tensor, indices: Tensor, softmax_scale: float) -> Tensor:
        """One softmax over the gathered keys plus a per-head sink logit that only enters the denominator.
        q [B,S,H,D] act dtype; kv [B,N,D] (key = value, MQA); sink [H] fp32; indices [B,S,K] int (-1 = none).
        l_j = scale * q.kv_j; o = sum_j exp(l_j - M) kv_j / (sum_j exp(l_j - M) + exp(sink_h - M)).
        fp32 accumulation; the probabilities are rounded to q.dtype before the PV product (as the official kernel);
        returns [B,S,H,D] in q.dtype. A query with no valid index returns zeros."""
        raise NotImplementedError

    def compress_pool(self, kv: Tensor, score: Tensor) -> Tensor:
        """Gated pooling of the KV compressor: softmax over the token axis, per channel, then the weighted sum.
        kv, score [B,N,L,c] fp32 (score may hold -inf for absent tokens) -> [B,N,c] fp32."""
        raise NotImplementedError

    def indexer_topk(self, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int) -> Tensor:
        """Lightning indexer. q [B,S,H,Di], k [B,T,Di] (compressed keys), weights [B,S,H] fp32,
        visible [B,S] int: query (b,s) may only see keys t < visible[b,s].
        score[b,s,t] = sum_h weights[b,s,h] * relu(q[b,s,h] . k[b,t]) (fp32).
        Returns [B,S,min(topk,T)] int64 indices of the highest-scoring visible keys, -1 where fewer are visible.
        Equal scores resolve to the lower index (so every backend selects the same set)."""
        raise NotImplementedError

    def indexer_scores(self, q: Tensor, k: Tensor, weights: Tensor) -> Tensor:
        """The indexer's scores without selection, [B,S,T] fp32: what tensor parallelism all-reduces across the
        ranks' head shards before `topk_visible`. This default is a torch composition (a named fallback)."""
        # the bmm calls of einsum("bshd,btd->bsht") and einsum("bsht,bsh->bst") (traced: same shapes and strides),
        # without einsum's permutes and views: per (b, s) row [H,D] @ [D,T], then [1,H] @ [H,T]
        qf, kf, wf = q.float(), k.float(), weights.float()
        if q.shape[1] == 1:  # one query per row (decode): the rows are the batch
            dots = torch.bmm(qf.flatten(1, 2), kf.transpose(1, 2)).relu()  # [B,H,T]
            return torch.bmm(wf, dots)  # [B,1,H] @ [B,H,T] -> [B,1,T]
        dots = torch.matmul(qf, kf.transpose(-1, -2).unsqueeze(1)).relu()  # [B,S,H,T]
        return torch.matmul(wf.unsqueeze(-2), dots).squeeze(-2)  # [B,S,1,H] @ [B,S,H,T] -> [B,S,T]

    # -- MoE -----------------------------------------------------------------------------------------------------------
    def moe_gate(self, x: Tensor, weight: Tensor, bias: Tensor | None, tid2eid: Tensor | None,
                 token_ids: Tensor | None, topk: int, score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
        """Router. x [T,d]; weight [E,d]; bias [E] fp32 (selection only) or None; tid2eid [V,k] + token_ids [T]
        for hash routing. scores = f(x_f32 @ W_f32^T) with f = sqrt(softplus) | softmax | sigmoid;
        ids = tid2eid[token] or topk(scores + bias); w = scores[ids], normalised to sum 1 unless softmax,
        times route_scale. Returns (weights [T,k] fp32, ids [T,k] int64)."""
        raise NotImplementedError

    def swiglu(self, gate: Tensor, up: Tensor, limit: float) -> Tensor:
        """silu(g) * u in fp32; with limit > 0: u clamped to [-limit, limit], g clamped above at limit."""
        raise NotImplementedError

    def moe_experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: LinearWeight, w2: LinearWeight,
                    w3: LinearWeight, swiglu_limit: float, expert_offset: int = 0,
                    n_experts: int | None = None) -> Tensor:
        """Routed experts. x [T,d] act dtype; weights [T,k] fp32; ids [T,k] global expert ids.
        w1/w3 [E_local, I, d], w2 [E_local, d, I] (stacked, see LinearWeight); this process holds experts
        [expert_offset, expert_offset + E_local); ids outside that range contribute nothing. n_experts: the
        router's expert count (None: not known); where it is E_local at offset 0 no id names another rank's expert,
        and a backend may skip the masking of foreign ids.
        Per expert e: h = swiglu(w1 x, w3 x, limit) * weight (fp32); y = w2(h.to(x.dtype)).
        Returns the fp32 sum over the token's experts, [T,d]."""
        raise NotImplementedError

    # -- manifold-constrained hyper-connections ------------------------------------------------------------------------
    def hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float,
               norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """x [B,S,n,d]; fn [(2+n)n, n*d], scale [3], base [(2+n)n] fp32.
        m = (x_flat_f32 @ fn^T) * rsqrt(mean(x_flat^2) + norm_eps); pre = sigmoid(m[:n]*s0 + b) + hc_eps;
        post = 2*sigmoid(m[n:2n]*s1 + b); comb = Sinkhorn(softmax rows first, `iters` column normalisations).
        Returns (sum_j pre_j x_j in x.dtype [B,S,d], post [B,S,n] fp32, comb [B,S,n,n] fp32 indexed [j,k])."""
        raise NotImplementedError

    def hc_post(self, x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """X_new[k] = post[k] * x + sum_j comb[j,k] * residual[j]; fp32 math, returned in x.dtype [B,S,n,d]."""
        raise NotImplementedError

    def hc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_eps: float, norm_eps: float) -> Tensor:
        """Collapse of the n streams: pre = sigmoid((x_flat @ fn^T) * rsqrt(mean x^2 + eps) * scale + base) + hc_eps;
        y = sum_j pre_j x_j. x [B,S,n,d]; fn [n, n*d]; scale [1]; base [n]. Returns [B,S,d] in x.dtype."""
        raise NotImplementedError

    # -- collectives (identity in a single process; the distributed layer overrides them) -----------------------------
    def all_reduce(self, x: Tensor, group: str = "tp") -> Tensor:
        """Sum over the ranks of `group` ("tp" or "ep"). Identity in a single process."""
        return x

    def all_gather(self, x: Tensor, dim: int, group: str = "tp") -> Tensor:
        """Concatenate along `dim` over the ranks of `group`. Identity in a single process."""
        return x

    # ------------------------------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        """op name -> which implementation this backend uses and why (printed by `dsv4 doctor`)."""
        return {}


def topk_visible(score: Tensor, visible: Tensor, topk: int) -> Tensor:
    """[B,S,min(topk,T)] indices of the best keys t < visible[b,s], -1 padded. A stable descending sort resolves
    equal scores (e.g. all-zero ReLU rows) to the lower index, so every backend selects the same set."""
    T = score.shape[-1]
    kk = min(topk, T)
    hidden = torch.arange(T, device=score.device) >= visible[..., None]  # keys the query cannot see yet
    score = score.masked_fill(hidden, float("-inf"))
    sel = score.sort(dim=-1, descending=True, stable=True).indices[..., :kk]
    return sel.masked_fill(torch.gather(hidden, -1, sel), -1)


OP_NAMES = [
    "rms_norm", "head_rms_norm", "rope", "fp8_sim", "fp4_sim", "hadamard", "linear", "linears", "grouped_linear",
    "sparse_attention",
    "compress_pool", "indexer_topk", "moe_gate", "swiglu", "moe_experts", "hc_pre", "hc_post", "hc_head",
]


def default_dtype(ops: Ops) -> torch.dtype:
    """Dtype policy: bf16 on accelerators, fp32 on CPU (bf16 is allowed there too)."""
    return torch.float32 if ops.device.type == "cpu" else torch.bfloat16
