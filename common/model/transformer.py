"""The one DeepSeek-V4 model graph, written against the ops interface (common/ops.py).

Reads like the official inference/model.py (shared/spec/dsv4-architecture.md), with three differences of form,
none of arithmetic: every primitive goes through `ops` (a backend decides how it runs), the KV cache is an object
passed in (common/model/cache.py) rather than buffers inside modules, and any chunk of tokens at any start position
goes through one code path (prefill, chunked prefill and one-token decode alike). Layers touch their cache rows only
through `LayerCache`'s write_* / index_keys / attention_inputs, so a one-token forward can run over the block pool
in place (translated flat rows) and a chunk over a gathered copy with the same arithmetic.
The captured decode step (common/model/static.py, which says what a capture needs from the graph) reuses the
modules' `project` / `entries` / `query` / `head_weights` / `output` methods below with static shapes, so the
arithmetic lives here once; the host reads in this file (uniform_groups, int(...max())) are the eager path's.
Parameter names are the checkpoint's short names (spec 7.1), except that routed experts are stacked:
`layers.{i}.ffn.experts.w1.weight` is [E, I, d] where the checkpoint has one tensor per expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv4.common.model.cache import BLOCK_QUANTUM, CompressorState, KVCache, LayerCache
from dsv4.common.model.config import FP4_BLOCK, FP8_BLOCK, KV_FP8_BLOCK, ModelArgs
from dsv4.common.model.ops import LinearWeight, Ops, topk_visible
from dsv4.common.model.parallel import SINGLE, ParallelConfig
from dsv4.common.model.rope import RopeTable, rope_frequencies

# the compressors' wkv / wgate are stored bf16 and computed in fp32 (spec 5.4): kept fp32 as the official model keeps
# them, rather than converted at every call (a full weight conversion per layer per decode step)
FP32_PARAM_SUFFIXES = ("norm.weight", "attn_sink", "ape", "gate.bias", "hc_attn_fn", "hc_attn_base",
                       "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale", "hc_head_fn", "hc_head_base",
                       "hc_head_scale", ".scale", "compressor.wkv.weight", "compressor.wgate.weight")


# -- small modules ----------------------------------------------------------------------------------------------------
class Linear(nn.Module):
    """A weight in its storage format: fmt "none" (dense), "fp8" (e4m3 + 128x128 block scales) or "fp4"
    (packed e2m1 + 1x32 scales). Stacked expert weights have a leading `n_stack` dim."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "none", n_stack: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        lead = (n_stack,) if n_stack else ()
        if fmt == "none":
            self.weight = nn.Parameter(torch.empty(*lead, out_features, in_features), requires_grad=False)
            self.register_parameter("scale", None)
        elif fmt == "fp8":
            self.weight = nn.Parameter(torch.empty(*lead, out_features, in_features, dtype=torch.float8_e4m3fn),
                                       requires_grad=False)
            sshape = (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))
            self.scale = nn.Parameter(torch.empty(*lead, *sshape), requires_grad=False)
        elif fmt == "fp4":
            self.weight = nn.Parameter(torch.empty(*lead, out_features, in_features // 2, dtype=torch.int8),
                                       requires_grad=False)
            self.scale = nn.Parameter(torch.empty(*lead, out_features, in_features // FP4_BLOCK),
                                      requires_grad=False)
        else:
            raise ValueError(f"unknown weight format {fmt!r}")

    @property
    def lw(self) -> LinearWeight:
        return LinearWeight(self.weight, self.scale, self.fmt)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)  # fp32 (stored bf16 in the checkpoint)


def _fp32_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


def uniform_groups(start: Tensor) -> list[tuple[int, int, int]]:
    """Contiguous runs of equal start position in a batch: [(b_lo, b_hi, start)]."""
    s = start.tolist()
    groups, lo = [], 0
    for b in range(1, len(s) + 1):
        if b == len(s) or s[b] != s[lo]:
            groups.append((lo, b, s[lo]))
            lo = b
    return groups


# -- attention --------------------------------------------------------------------------------------------------------
class Compressor(nn.Module):
    """Gated pooling of `ratio` tokens into one KV entry (spec 5.4). Ratio 4 overlaps: each entry also pools the
    previous block through the first half of the channels (an 8-token receptive field, stride 4)."""

    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, is_indexer: bool) -> None:
        super().__init__()
        self.args, self.ratio, self.head_dim, self.is_indexer = args, ratio, head_dim, is_indexer
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * head_dim
        self.ape = _fp32_param(ratio, width)
        self.wkv = Linear(args.dim, width)
        self.wgate = Linear(args.dim, width)
        self.norm = RMSNorm(head_dim)

    def forward(self, ops: Ops, x: Tensor, start: int, state: CompressorState, rope: RopeTable,
                dtype: torch.dtype) -> Tensor:
        """Feed tokens [start, start+S) of x [B,S,d]; keep the incomplete block in `state`. Returns the entries
        [B, nb, c] in `dtype` of the nb blocks completed by them (nb may be 0): entries start // ratio onwards. All
        batch rows share `start`."""
        B, S, _ = x.shape
        m, c, r = self.ratio, self.head_dim, start % self.ratio
        first = start // m  # the block in progress: the first block of this span
        if start == 0 and self.overlap:  # a new sequence: nothing to look back on (the rows of "block -1")
            state.kv[:, state.rows(-1)].zero_()
            state.score[:, state.rows(-1)].fill_(float("-inf"))
        cur = state.rows(first)
        k, z = self.project(ops, x, torch.arange(start, start + S, device=x.device) % m)
        k = torch.cat([state.kv[:, cur][:, :r], k], dim=1)  # prepend the block in progress: positions [start-r, ...)
        z = torch.cat([state.score[:, cur][:, :r], z], dim=1)
        nb = (r + S) // m
        out = k.new_empty(B, 0, c, dtype=dtype)
        if nb:
            kb = k[:, :nb * m].unflatten(1, (nb, m))  # [B,nb,m,w]
            zb = z[:, :nb * m].unflatten(1, (nb, m))
            if self.overlap:
                back = state.rows(first - 1)
                prev_k = torch.cat([state.kv[:, back][:, None], kb[:, :-1]], dim=1)  # the block before each block
                prev_z = torch.cat([state.score[:, back][:, None], zb[:, :-1]], dim=1)
                kb_pool = torch.cat([prev_k[..., :c], kb[..., c:]], dim=2)  # [B,nb,2m,c]
                zb_pool = torch.cat([prev_z[..., :c], zb[..., c:]], dim=2)
                last = state.rows(first + nb - 1)  # the last completed block: the next one's look-back
                state.kv[:, last] = kb[:, -1]
                state.score[:, last] = zb[:, -1]
            else:
                kb_pool, zb_pool = kb, zb
            block_pos = ((first + torch.arange(nb, device=x.device)) * m).expand(B, nb)  # each block's first token
            out = self.entries(ops, kb_pool, zb_pool, rope.cos_sin(block_pos), dtype)
        rem = r + S - nb * m
        pending = state.rows(first + nb).start  # the block now in progress
        state.kv[:, pending:pending + rem] = k[:, nb * m:]
        state.score[:, pending:pending + rem] = z[:, nb * m:]
        return out

    def project(self, ops: Ops, x: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
        """Raw K rows and gate scores (+ the ape row of the token's place in its block) of tokens x [B,S,d] whose
        positions are pos, phase = pos % ratio ([S] or [B,S]): fp32 [B,S,w] each. Any leading shape: the static
        decode step projects rows x [B,d] with phase [B]."""
        xf = x.float()
        return ops.linear(xf, self.wkv.lw), ops.linear(xf, self.wgate.lw) + self.ape[phase]

    def entries(self, ops: Ops, kb: Tensor, zb: Tensor, cos_sin: tuple[Tensor, Tensor], dtype: torch.dtype) -> Tensor:
        """Complete blocks kb/zb [B,nb,L,c] fp32 -> cache entries [B,nb,c] in `dtype`: pooled, normalised, rotated
        at each block's first position (cos_sin [B,nb,rd/2]) and quantisation-simulated as the cache stores them."""
        rd = self.args.rope_head_dim
        pooled = ops.compress_pool(kb, zb)  # [B,nb,c] fp32
        pooled = ops.rms_norm(pooled.to(dtype), self.norm.weight, self.args.norm_eps)
        cos, sin = cos_sin
        pe = pooled[..., None, -rd:]  # [B,nb,1,rd], rotated in place (pooled is this call's own tensor)
        ops.rope(pe, cos, sin, out=pe)
        if self.is_indexer:
            return ops.fp4_sim(ops.hadamard(pooled), FP4_BLOCK)
        nope = pooled[..., :-rd]
        nope.copy_(ops.fp8_sim(nope, KV_FP8_BLOCK, self.args.kv_fp8_sim))
        return pooled


class Indexer(nn.Module):
    """Lightning indexer of CSA layers (spec 5.5): picks index_topk compressed entries per query."""

    def __init__(self, args: ModelArgs, fmt: str, par: ParallelConfig) -> None:
        super().__init__()
        self.args, self.tp = args, par.tp_size
        self.n_local_heads = args.index_n_heads // par.tp_size
        self.wq_b = Linear(args.q_lora_rank, self.n_local_heads * args.index_head_dim, fmt)
        self.weights_proj = Linear(args.dim, self.n_local_heads)
        self.compressor = Compressor(args, 4, args.index_head_dim, is_indexer=True)

    def forward(self, ops: Ops, x: Tensor, iq: Tensor, pos: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache,
                rope: RopeTable) -> Tensor:
        """iq: this layer's query projection wq_b(qr) [B,S,H_I*D_I] (Attention.project makes it)."""
        a = self.args
        q = self.query(ops, iq, cos, sin)
        for lo, hi_b, start in uniform_groups(pos[:, 0]):
            new = self.compressor(ops, x[lo:hi_b], start, cache.index_comp.view(slice(lo, hi_b)), rope, cache.dtype)
            cache.write_index_entries(lo, hi_b, start // 4, new)
        w = self.head_weights(ops, x)
        visible = (pos + 1) // 4  # only fully completed blocks count
        keys = cache.index_keys(int(visible.max()))
        if self.tp == 1:
            return ops.indexer_topk(q, keys, w, visible, a.index_topk)
        # heads are split over the TP ranks: sum the partial scores before selecting
        score = ops.all_reduce(ops.indexer_scores(q, keys, w), "tp")
        return topk_visible(score, visible, a.index_topk)

    def query(self, ops: Ops, iq: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Indexer queries [B,S,H_I,D_I] from their projection iq = wq_b(qr) [B,S,H_I*D_I] of the query latent:
        rotated, Hadamard, FP4-simulated."""
        B, S, _ = iq.shape
        rd = self.args.rope_head_dim
        q = iq.view(B, S, self.n_local_heads, self.args.index_head_dim)
        pe = q[..., -rd:]
        ops.rope(pe, cos, sin, out=pe)  # in place: q is the GEMM's own output
        return ops.fp4_sim(ops.hadamard(q), FP4_BLOCK)

    def head_weights(self, ops: Ops, x: Tensor) -> Tensor:
        """Per-head score weights [B,S,H_I] fp32."""
        a = self.args
        return ops.linear(x, self.weights_proj.lw).float() * (a.index_head_dim ** -0.5 * a.index_n_heads ** -0.5)


class Attention(nn.Module):
    """Shared-KV (MQA) attention over a sliding window plus, by layer kind, compressed entries: none (ratio 0),
    the indexer's top-k of 4-token entries (CSA) or every 128-token entry (HCA). One softmax with a sink."""

    def __init__(self, args: ModelArgs, layer_id: int, fmt: str, par: ParallelConfig) -> None:
        super().__init__()
        self.args, self.ratio = args, args.compress_ratios[layer_id]
        # TP splits the query heads and the output groups; the single KV head is computed on every rank
        self.n_local_heads, self.n_local_groups = args.n_heads // par.tp_size, args.o_groups // par.tp_size
        H, D, G = self.n_local_heads, args.head_dim, self.n_local_groups
        heads_per_group = args.n_heads // args.o_groups
        self.wq_a = Linear(args.dim, args.q_lora_rank, fmt)
        self.q_norm = RMSNorm(args.q_lora_rank)
        self.wq_b = Linear(args.q_lora_rank, H * D, fmt)
        self.wkv = Linear(args.dim, D, fmt)
        self.kv_norm = RMSNorm(D)
        self.wo_a = Linear(heads_per_group * D, G * args.o_lora_rank)  # convert.py dequantises wo_a: always dense
        self.wo_b = Linear(G * args.o_lora_rank, args.dim, fmt)
        self.attn_sink = _fp32_param(H)
        if self.ratio:
            self.compressor = Compressor(args, self.ratio, D, is_indexer=False)
        if self.ratio == 4:
            self.indexer = Indexer(args, fmt, par)

    def forward(self, ops: Ops, x: Tensor, pos: Tensor, cache: LayerCache, rope: RopeTable) -> Tensor:
        """x [B,S,d] (attn_norm-ed); pos [B,S] absolute positions, consecutive per row; cache holds this batch's
        slots with every position < pos[:, 0] already fed."""
        a = self.args
        B, S, _ = x.shape
        D, W = a.head_dim, a.window_size
        cos, sin = rope.cos_sin(pos)  # [B,S,rd/2]
        q, kv, iq = self.project(ops, x, cos, sin)

        # compressed entries first: a block completed inside this chunk is visible to its later queries
        start = pos[:, 0]
        if self.ratio:
            for lo, hi, s0 in uniform_groups(start):
                entries = self.compressor(ops, x[lo:hi], s0, cache.comp.view(slice(lo, hi)), rope, cache.dtype)
                cache.write_entries(lo, hi, s0 // self.ratio, entries)

        # key rows: [ring (W) | compressed | this chunk (S > 1 only)]; a single token goes straight into its ring slot
        if S == 1:
            cache.write_window(pos, kv)
            chunk_row = None
        else:  # the chunk's rows follow the cache rows in use
            chunk_row = W + (int(pos[:, -1].max() + 1) // self.ratio if self.ratio else 0)
        idx = [self.window_indices(pos, start, chunk_row)]
        if self.ratio == 4:
            sel = self.indexer(ops, x, iq, pos, cos, sin, cache, rope)
            idx.append(torch.where(sel >= 0, sel + W, -1))
        elif self.ratio:
            visible = (pos + 1) // self.ratio  # entries whose block is complete
            t = torch.arange(int(visible.max()), device=x.device)
            idx.append(torch.where(t < visible[..., None], t + W, -1))
        idx = torch.cat(idx, dim=-1)
        if S == 1:  # the cache's own rows (in place: the flat store through translated rows, nothing copied)
            q_in, keys, idx = cache.attention_inputs(q, idx)
        else:  # only the rows in use travel with the chunk, not the whole max_seq_len cache
            q_in, keys = q, torch.cat([cache.kv[:, :chunk_row], kv], dim=1)
        o = ops.sparse_attention(q_in, keys, self.attn_sink, idx, D ** -0.5).reshape(q.shape)
        if S > 1:  # the ring keeps the last W tokens of the chunk
            keep = min(S, W)
            cache.write_window(pos[:, -keep:], kv[:, -keep:])

        return self.output(ops, o, cos, sin)

    def project(self, ops: Ops, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [B,S,d] -> (rotated queries q [B,S,H,D], the chunk's KV rows [B,S,D] as the cache stores them:
        FP8-simulated nope part, rotated rope part, and in a CSA layer the indexer's query projection wq_b(qr)
        [B,S,H_I*D_I] of the query latent qr, else None)."""
        a = self.args
        B, S, _ = x.shape
        H, D, rd, eps = self.n_local_heads, a.head_dim, a.rope_head_dim, a.norm_eps
        q_lat, kv = ops.linears(x, (self.wq_a.lw, self.wkv.lw))  # one input: a backend may quantise x once
        qr = ops.rms_norm(q_lat, self.q_norm.weight, eps)
        if self.ratio == 4:  # the indexer projects qr too: both of its GEMMs in one call (one quantisation of qr)
            q, iq = ops.linears(qr, (self.wq_b.lw, self.indexer.wq_b.lw))
        else:
            q, iq = ops.linear(qr, self.wq_b.lw), None
        q = ops.head_rms_norm(q.view(B, S, H, D), eps)  # [B,S,H,D]
        pe = q[..., -rd:]
        ops.rope(pe, cos, sin, out=pe)  # rotated in place (q is head_rms_norm's own output)
        kv = ops.rms_norm(kv, self.kv_norm.weight, eps)  # [B,S,D], the norm's own output: both parts change in place
        nope, pe = kv[..., :-rd], kv[:, :, None, -rd:]
        nope.copy_(ops.fp8_sim(nope, KV_FP8_BLOCK, a.kv_fp8_sim))
        ops.rope(pe, cos, sin, out=pe)
        return q, kv, iq

    def output(self, ops: Ops, o: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Attention output o [B,S,H,D] -> [B,S,d]: undo q's rotation, grouped low-rank projection, all-reduce."""
        a = self.args
        B, S, H, D = o.shape
        rd, G = a.rope_head_dim, self.n_local_groups
        pe = o[..., -rd:]
        ops.rope(pe, cos, sin, inverse=True, out=pe)  # undo q's rotation, in place (o is attention's own output)
        # [G,B*S,H*D/G]: each group's rows contiguous, so its GEMM sees the same layout eager and captured
        o = o.reshape(B * S, G, H * D // G).movedim(1, 0).contiguous()
        o = ops.grouped_linear(o, self.wo_a.weight)  # [G,B*S,R_o]: wo_a is block-diagonal, [R_o, H*D/G] per group
        y = ops.linear(o.movedim(0, 1).reshape(B * S, G * a.o_lora_rank), self.wo_b.lw)  # [B*S, d]
        return ops.all_reduce(y, "tp").view(B, S, -1)  # row-parallel over the groups

    def window_indices(self, pos: Tensor, start: Tensor, chunk_row: int | None) -> Tensor:
        """[B,S,W] key rows of the last W positions (including the query's own); -1 before position 0."""
        W = self.args.window_size
        kpos = pos[..., None] - W + 1 + torch.arange(W, device=pos.device)  # [B,S,W]
        if chunk_row is None:
            rows = kpos % W
        else:
            in_chunk = kpos >= start[:, None, None]
            rows = torch.where(in_chunk, chunk_row + kpos - start[:, None, None], kpos % W)
        return torch.where(kpos >= 0, rows, -1)


# -- MoE --------------------------------------------------------------------------------------------------------------
class Gate(nn.Module):
    def __init__(self, args: ModelArgs, hash_routed: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim), requires_grad=False)
        if hash_routed:  # token id -> its k experts (spec 6.1); the weights still come from the learned scores
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, args.n_activated_experts,
                                                        dtype=torch.int32))
            self.bias = None
        else:
            self.tid2eid = None
            self.bias = _fp32_param(args.n_routed_experts)


class Experts(nn.Module):
    """Routed experts stacked along a leading dim (this process holds [offset, offset + n_local))."""

    def __init__(self, args: ModelArgs, fmt: str, n_local: int, offset: int = 0) -> None:
        super().__init__()
        self.offset = offset
        self.w1 = Linear(args.dim, args.moe_inter_dim, fmt, n_stack=n_local)
        self.w2 = Linear(args.moe_inter_dim, args.dim, fmt, n_stack=n_local)
        self.w3 = Linear(args.dim, args.moe_inter_dim, fmt, n_stack=n_local)


class SharedExpert(nn.Module):
    def __init__(self, args: ModelArgs, fmt: str) -> None:
        super().__init__()
        self.w1 = Linear(args.dim, args.moe_inter_dim, fmt)
        self.w2 = Linear(args.moe_inter_dim, args.dim, fmt)
        self.w3 = Linear(args.dim, args.moe_inter_dim, fmt)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, fmt: str, expert_fmt: str, par: ParallelConfig) -> None:
        super().__init__()
        self.args = args
        self.gate = Gate(args, hash_routed=layer_id < args.n_hash_layers)
        first, n_local = par.experts(args)  # EP: this rank's routed experts
        self.experts = Experts(args, expert_fmt, n_local, first)
        self.shared_experts = SharedExpert(args, fmt)  # replicated on every TP rank, as in the official split

    def forward(self, ops: Ops, x: Tensor, token_ids: Tensor, routed: Callable[..., Tensor] | None = None) -> Tensor:
        """`routed` replaces ops.moe_experts (same contract): the static decode step passes a form without
        data-dependent shapes (common/model/static.py)."""
        a, shape = self.args, x.shape
        x = x.flatten(0, 1)  # [T,d]
        w, ids = ops.moe_gate(x, self.gate.weight, self.gate.bias, self.gate.tid2eid, token_ids.flatten(),
                              a.n_activated_experts, a.score_func, a.route_scale)
        e = self.experts
        # fp32; under expert parallelism the ops dispatch tokens to the experts' ranks and combine the results
        y = (routed or ops.moe_experts)(x, w, ids, e.w1.lw, e.w2.lw, e.w3.lw, a.swiglu_limit, e.offset,
                                        a.n_routed_experts)
        s = self.shared_experts  # no SwiGLU clamp on the shared expert (spec 6.2)
        h = ops.swiglu(*ops.linears(x, (s.w1.lw, s.w3.lw)), 0.0)
        y = y + ops.linear(h.to(x.dtype), s.w2.lw)  # the product in x.dtype promotes to y's fp32 exactly
        return y.to(x.dtype).view(shape)


# -- blocks -----------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Attention and MoE, each wrapped in a manifold-constrained hyper-connection over n residual streams."""

    def __init__(self, args: ModelArgs, layer_id: int, fmt: str, expert_fmt: str,
                 par: ParallelConfig = SINGLE) -> None:
        super().__init__()
        self.args, self.layer_id = args, layer_id
        n, mix = args.hc_mult, (2 + args.hc_mult) * args.hc_mult
        self.attn_norm = RMSNorm(args.dim)
        self.ffn_norm = RMSNorm(args.dim)
        self.attn = Attention(args, layer_id, fmt, par)
        self.ffn = MoE(args, layer_id, fmt, expert_fmt, par)
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = (
            _fp32_param(mix, n * args.dim), _fp32_param(mix), _fp32_param(3))
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = (
            _fp32_param(mix, n * args.dim), _fp32_param(mix), _fp32_param(3))

    def forward(self, ops: Ops, X: Tensor, pos: Tensor, token_ids: Tensor, cache: LayerCache,
                rope: RopeTable) -> Tensor:
        a = self.args
        x, post, comb = ops.hc_pre(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                                   a.hc_sinkhorn_iters, a.hc_eps, a.norm_eps)
        x = self.attn(ops, ops.rms_norm(x, self.attn_norm.weight, a.norm_eps), pos, cache, rope)
        X = ops.hc_post(x, X, post, comb)
        x, post, comb = ops.hc_pre(X, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                                   a.hc_sinkhorn_iters, a.hc_eps, a.norm_eps)
        x = self.ffn(ops, ops.rms_norm(x, self.ffn_norm.weight, a.norm_eps), token_ids)
        return ops.hc_post(x, X, post, comb)


class MTPBlock(Block):
    """Multi-token prediction (spec 8): combines the main streams at position i with the embedding of token i+1
    and predicts token i+2. Shares embed and head with the main model."""

    def __init__(self, args: ModelArgs, layer_id: int, fmt: str, expert_fmt: str,
                 par: ParallelConfig = SINGLE) -> None:
        super().__init__(args, layer_id, fmt, expert_fmt, par)
        n = args.hc_mult
        self.e_proj = Linear(args.dim, args.dim, fmt)
        self.h_proj = Linear(args.dim, args.dim, fmt)
        self.enorm, self.hnorm, self.norm = RMSNorm(args.dim), RMSNorm(args.dim), RMSNorm(args.dim)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (
            _fp32_param(n, n * args.dim), _fp32_param(n), _fp32_param(1))


# -- the model --------------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops, dtype: torch.dtype = torch.float32,
                 weights: str = "dequantized", parallel: ParallelConfig = SINGLE) -> None:
        """weights "dequantized": every linear is dense in `dtype` (FP8/FP4 checkpoints are dequantised at load);
        "quantized": FP8/FP4 weights stay in their format with scales and the backend's linear consumes them."""
        super().__init__()
        if weights not in ("dequantized", "quantized"):
            raise ValueError(f"weights must be 'dequantized' or 'quantized', got {weights!r}")
        parallel.validate(args)
        self.args, self.ops, self.dtype, self.weights_mode, self.parallel = args, ops, dtype, weights, parallel
        quant = weights == "quantized"
        fmt = "fp8" if quant and args.dtype == "fp8" else "none"
        expert_fmt = {"fp4": "fp4", "fp8": "fp8", "bf16": "none"}[args.expert_dtype] if quant else "none"
        n = args.hc_mult
        vocab_local = args.vocab_size // parallel.tp_size  # TP: vocabulary-parallel embedding and head
        self.vocab_start = parallel.tp_rank * vocab_local
        self.embed = nn.Embedding(vocab_local, args.dim)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(args, i, fmt, expert_fmt, parallel) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim)
        self.head = Linear(args.dim, vocab_local)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (
            _fp32_param(n, n * args.dim), _fp32_param(n), _fp32_param(1))
        self.mtp = nn.ModuleList(MTPBlock(args, args.n_layers + i, fmt, expert_fmt, parallel)
                                 for i in range(args.n_mtp_layers))
        rd = args.rope_head_dim
        self.rope_window = RopeTable(rope_frequencies(rd, args.rope_theta, 0, 1.0, args.beta_fast, args.beta_slow))
        self.rope_compressed = RopeTable(rope_frequencies(rd, args.compress_rope_theta, args.original_seq_len,
                                                          args.rope_factor, args.beta_fast, args.beta_slow))
        self.cast_dense_(dtype)

    def cast_dense_(self, dtype: torch.dtype) -> None:
        """Dense bf16-class weights go to the activation dtype; fp32 islands and quantised tensors stay as they are."""
        for name, p in self.named_parameters():
            if p.dtype in (torch.float8_e4m3fn, torch.int8):
                continue
            p.data = p.data.float() if name.endswith(FP32_PARAM_SUFFIXES) else p.data.to(dtype)
        self.dtype = dtype

    def rope_for(self, layer_id: int) -> RopeTable:
        return self.rope_compressed if self.args.compress_ratios[layer_id] else self.rope_window

    def new_cache(self, max_batch: int, max_seq_len: int | None = None, block_tokens: int = BLOCK_QUANTUM,
                  n_blocks: int | None = None) -> KVCache:
        """A block-pool cache (common/model/cache.py); n_blocks default: max_seq_len tokens for every slot."""
        return KVCache(self.args, max_batch, max_seq_len or self.args.max_seq_len, self.dtype,
                       self.embed.weight.device, with_mtp=bool(self.args.n_mtp_layers), block_tokens=block_tokens,
                       n_blocks=n_blocks)

    @torch.no_grad()
    def forward(self, tokens: Tensor, cache: KVCache | None = None, slots: slice | Tensor | None = None,
                return_hidden: bool | str = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits [B,S,V] fp32 for every position of `tokens` [B,S].

        Without a cache this is a full forward from position 0. With a cache, the chunk continues the sequences in
        `slots` (a slice or an index tensor [B] of any slots; default: the first B) at their cached lengths, which
        may differ per row, and the cache is advanced. With return_hidden, also
        returns the hidden streams [B,S,n,d] after each block; return_hidden="last" keeps only the last block's
        (what the MTP module needs) instead of holding every layer's alive."""
        B, S = tokens.shape
        if cache is None:
            cache = self.new_cache(B, S)
        slots = slice(0, B) if slots is None else slots
        start = cache.lengths[slots].to(tokens.device)
        cache.check_room(slots, start, S)
        pos = start[:, None] + torch.arange(S, device=tokens.device)  # [B,S]
        ops, a = self.ops, self.args
        h = self.embedding(tokens)  # [B,S,d]
        X = h.unsqueeze(2).repeat(1, 1, a.hc_mult, 1)  # [B,S,n,d]: n identical streams
        hidden = []
        end = int(start.max()) + S
        for i, layer in enumerate(self.layers):
            lc = cache.layer_for(i, slots, end, start=start, in_place=S == 1)
            X = layer(ops, X, pos, tokens, lc, self.rope_for(i))
            cache.write_back(i, slots, lc)
            if return_hidden and (return_hidden != "last" or i == len(self.layers) - 1):
                hidden.append(X)
        logits = self._head(X, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm)
        cache.lengths[slots] += S
        return (logits, hidden) if return_hidden else logits

    def embedding(self, tokens: Tensor) -> Tensor:
        """Vocabulary-parallel lookup: each TP rank holds a slice of rows, the others contribute zeros."""
        local = tokens - self.vocab_start
        n = self.embed.weight.shape[0]
        inside = (local >= 0) & (local < n)
        h = F.embedding(local.clamp(0, n - 1), self.embed.weight) * inside.unsqueeze(-1).to(self.embed.weight.dtype)
        return self.ops.all_reduce(h, "tp")

    def _head(self, X: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm: RMSNorm) -> Tensor:
        a, ops = self.args, self.ops
        y = ops.hc_head(X, fn, scale, base, a.hc_eps, a.norm_eps)
        y = ops.rms_norm(y, norm.weight, a.norm_eps)
        return ops.all_gather(ops.linear(y.float(), self.head.lw), dim=-1)  # fp32 logits

    @torch.no_grad()
    def mtp_forward(self, streams: Tensor, next_tokens: Tensor, cache: KVCache, slots: slice | Tensor | None = None,
                    start: Tensor | None = None) -> Tensor:
        """Draft logits [B,S,V]: for position i, the main streams at i and the token at i+1 predict token i+2.
        streams [B,S,n,d] (the last block's output); next_tokens [B,S]; `start` [B] the position of the first
        row (defaults to the cache length before the main forward that produced `streams`)."""
        if not self.args.n_mtp_layers:
            raise ValueError("this model has no MTP layer (n_mtp_layers = 0)")
        a, ops, mtp = self.args, self.ops, self.mtp[0]
        B, S = next_tokens.shape
        slots = slice(0, B) if slots is None else slots
        if start is None:
            start = cache.lengths[slots] - S
        pos = start.to(next_tokens.device)[:, None] + torch.arange(S, device=next_tokens.device)
        e = ops.rms_norm(self.embedding(next_tokens), mtp.enorm.weight, a.norm_eps)
        X = ops.linear(e, mtp.e_proj.lw).unsqueeze(2) + ops.linear(
            ops.rms_norm(streams, mtp.hnorm.weight, a.norm_eps), mtp.h_proj.lw)
        layer_id = a.n_layers
        # the main forward allocated these positions; a window-only MTP layer writes no pool rows, so a prefix's
        # shared blocks under its lagging position do not matter
        cache.check_room(slots, pos[:, 0], S, pool_writes=bool(a.compress_ratios[layer_id]))
        lc = cache.layer_for(layer_id, slots, int(pos[:, -1].max()) + 1, start=pos[:, 0], in_place=S == 1)
        X = mtp(ops, X, pos, next_tokens, lc, self.rope_for(layer_id))
        cache.write_back(layer_id, slots, lc)
        return self._head(X, mtp.hc_head_fn, mtp.hc_head_scale, mtp.hc_head_base, mtp.norm)
