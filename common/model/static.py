"""A decode step with static shapes: one new token for each of B rows, every shape fixed by (B, context bucket) and
no host synchronisation, so that the whole step captures as ONE graph (torch.compile fullgraph on CPU, TorchAir on
Ascend, CUDA graphs on a GPU). Prefill and speculative verification stay on the eager path (transformer.py).

What a capture needs from the graph, and how this module gives it without changing the arithmetic of
transformer.py (it calls the same modules' `project` / `entries` / `query` / `head_weights` / `output` methods and
the same ops, in the same order):
- no Python value read from a tensor (.item(), .tolist(), int(t), unique, nonzero): positions and slots are device
  tensors, and a row's place in its compressor block (pos % ratio, block complete or not) is a mask, not a branch.
  Every row computes its block's entry; where the block is not complete yet the write goes to the store's scratch
  row (whose content is undefined: it also takes the writes of unallocated blocks), so the block's own row keeps
  its value without being read back;
- index tensors of fixed width, -1 padded: the window (W rows), the indexer's top-k over the bucket's capacity of
  compressed keys (context // 4), every HCA entry up to the bucket's capacity (context // 128);
- cache writes as index_put at computed rows; each layer's store is one flat tensor [rings | block pool | scratch]
  (common/model/cache.py) and attention gathers rows of any slots by global index, so no slot's cache is copied.
  Positions become rows in `StepPlan`: ring rows directly, compressed entries and indexer keys through the block
  table (`KVCache.pool_rows`, the one translation); the ops see only indices into a flat KV tensor;
- MoE without data-dependent shapes: `routed_experts` (the reference's loop over the experts that received tokens
  uses unique/nonzero); backends whose moe_experts keeps its group sizes on the device use their own.
Values shared by every layer of a kind (rope tables at the position, window and HCA key rows, the rows entries are
written to, the indexer's key rows, the lookup from a selected CSA entry to its row, block completion and phase) are
computed once per step in `StepPlan`, in the shapes the layers consume, not once per layer.

The context bucket is a static int: positions must be < `context`. Rows beyond the batch are the caller's business
(common/runtime/static_decode.py pads by repeating a real row: duplicates write identical values to identical rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dsv4.common.model.cache import CompressorState, KVCache, LayerStore
from dsv4.common.model.config import FP4_BLOCK
from dsv4.common.model.ops import LinearWeight, Ops, topk_visible
from dsv4.common.model.quant import E2M1_VALUES, dequant_weight
from dsv4.common.model.rope import RopeTable
from dsv4.common.model.transformer import Attention, Block, Compressor, Indexer, MoE, Transformer


class StepPlan:
    """Per-step values shared by all layers. slots/pos [B] int64 on the model's device; context: static bucket.
    Cache rows are global indices into each layer's flat store (common/model/cache.py): ring rows are computed
    here, compressed entries and indexer keys are translated through the block table by `KVCache.pool_rows`.
    Everything a layer kind shares (every layer of a ratio has the same store shape, so the same rows) is built
    here once per step, in the shapes the layers consume, so a layer spends no ops on index arithmetic."""

    def __init__(self, model: Transformer, cache: KVCache, slots: Tensor, pos: Tensor, context: int) -> None:
        a = model.args
        W, B, dev = a.window_size, pos.shape[0], pos.device
        self.cache, self.slots, self.pos, self.context, self.W = cache, slots, pos, context, W
        self.pos_col = pos[:, None]  # [B,1]: the positions of the step's one token per row
        # rope tables in the backend's own form (Ops.prepare_rope), made once here for every rope call of the step
        prep = model.ops.prepare_rope
        self.cos_sin = {id(t): prep(*t.cos_sin(self.pos_col)) for t in (model.rope_window, model.rope_compressed)}
        kpos = self.pos_col - W + 1 + torch.arange(W, device=dev)  # [B,W] positions of the window
        window_rows = torch.where(kpos >= 0, slots[:, None] * W + kpos % W, -1)  # [B,W] flat ring rows
        self.ring_row = (slots * W + pos % W)[:, None]  # [B,1] where this token's KV goes (kv rows come [B,1,D])
        ratios = sorted({r for r in a.compress_ratios[:a.n_layers] if r})
        self.phase = {r: pos % r for r in ratios}  # [B] the token's row in its compressor block
        complete = {r: (pos + 1) % r == 0 for r in ratios}  # this token completes its block
        block = {r: pos // r for r in ratios}  # index of the block the token belongs to
        visible = {r: (pos + 1) // r for r in ratios}  # complete blocks the query sees
        self.index_visible = visible[4][:, None] if 4 in visible else None  # [B,1] the indexer's visible keys
        # compressed entries rotate at their block's first position, with the compressed layers' table
        self.entry_cos_sin = {r: prep(*model.rope_compressed.cos_sin((block[r] * r)[:, None])) for r in ratios}
        # per layer kind: key rows [1,B,K] (-1 = none), the [B,1] rows completed entries go to (`entry_row`), and for
        # CSA the indexer's key rows and the lookup from a selected entry to its row
        self.keys: dict[int, Tensor] = {0: window_rows[None]}
        self.entry_row: dict[tuple[int, str], Tensor] = {}
        stores = {st.ratio: st for st in cache.layers[:a.n_layers]}
        # compressor states (cache.CompressorState): the row the token's K / score go to, and for an overlap
        # compressor (a ring of two blocks) what the entry pools in one gather: [slot, ring row, channel half] for
        # its 2m rows, the block before (its look-back channels) then the token's block (its own channels)
        self.state_row: dict[int, Tensor] = {}
        self.pool_at: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for r in ratios:
            st = stores[r]
            if st.comp.overlap:
                self.state_row[r] = (block[r] % 2) * r + self.phase[r]
                j = torch.arange(2 * r, device=dev)
                own = (j >= r).long()  # [2m]: 0 = the block before, 1 = the token's block
                ring_rows = ((block[r][:, None] - 1 + own) % 2) * r + j % r  # [B,2m]
                self.pool_at[r] = (slots[:, None, None], ring_rows[:, None], own[None, None])
            else:
                self.state_row[r] = self.phase[r]
            self.entry_row[(r, "kv")] = self._entry_row(st.per_block, st.pool_offset, st.scratch, block[r],
                                                        complete[r])
            t = torch.arange(self.capacity(r), device=dev).expand(B, -1)  # [B,cap] every entry of the bucket
            if r == 4:
                # sel [B,1,k] -> rows: column 0 is "none" (-1), column j + 1 entry j's row (sel_rows)
                none = torch.full((B, 1), -1, dtype=torch.long, device=dev)
                self._csa_rows = torch.cat([none, self.entry_rows(st.per_block, st.pool_offset, t)], dim=-1)
                self.keys[4] = self.keys[0]
                iscratch = st.flat_index_kv.shape[0] - 1
                self.entry_row[(4, "index")] = self._entry_row(st.per_block, 0, iscratch, block[4], complete[4])
                # unallocated keys, beyond `visible`, read the scratch row
                rows = self.entry_rows(st.per_block, 0, t)
                self.index_key_rows = torch.where(rows >= 0, rows, iscratch)  # [B, context // 4]
            else:  # HCA: all complete entries (few: context / 128)
                t = torch.where(t < visible[r][:, None], t, -1)
                self.keys[r] = torch.cat([window_rows, self.entry_rows(st.per_block, st.pool_offset, t)], -1)[None]
        self.batch_col = torch.arange(B, device=dev)[:, None, None]  # [B,1,1] row index of a per-row lookup

    def capacity(self, ratio: int) -> int:
        """Compressed entries a query of this bucket can see (static): context // ratio, within max_seq_len."""
        return min(self.context, self.cache.max_seq_len) // ratio

    def entry_rows(self, per_block: int, offset: int, j: Tensor) -> Tensor:
        """Flat rows of the rows' entries j [B,K] (-1 = none) in a store with `per_block` rows per block."""
        return self.cache.pool_rows(self.slots, j, per_block, offset)

    def _entry_row(self, per_block: int, offset: int, scratch: int, block: Tensor, complete: Tensor) -> Tensor:
        """[B,1] flat row of the entry of each token's compressor block where this token completes it, else the
        scratch row (as where no block is allocated): an incomplete block's row keeps its value by not being
        written (the last partial block of a max_seq_len that the ratio does not divide never completes)."""
        row = self.entry_rows(per_block, offset, block[:, None])
        return torch.where(complete[:, None] & (row >= 0), row, scratch)

    def sel_rows(self, sel: Tensor) -> Tensor:
        """Key rows [1,B,k] of the indexer's selected entries sel [B,1,k] (-1 = none) in the CSA layers' store."""
        return self._csa_rows[self.batch_col, sel + 1].transpose(0, 1)


# -- attention ---------------------------------------------------------------------------------------------------------
def compressor_step(comp: Compressor, ops: Ops, x: Tensor, plan: StepPlan, state: CompressorState, flat_out: Tensor,
                    out_row: Tensor) -> None:
    """Feed one token per row (x [B,d] fp32 at plan.pos: rows, not [B,1,d], so that its projections are plain 2-D
    GEMMs) into `state` (rows plan.slots) and, where it completes a block, write the block's entry into
    flat_out[out_row] (out_row [B,1]: `StepPlan.entry_row`, the scratch row where the block is not complete). Same
    arithmetic as Compressor.forward with S = 1; needs pos >= 1 (position 0 is always a prefill)."""
    m, c, slots = comp.ratio, comp.head_dim, plan.slots
    k, z = comp.project(ops, x, plan.phase[m])  # [B,w] fp32
    # index_put_ rather than `t[i] = v`: the same write, without the view Python indexing makes of the value
    state.kv.index_put_((slots, plan.state_row[m]), k)
    state.score.index_put_((slots, plan.state_row[m]), z)
    if comp.overlap:  # the block before and this one, each in its half of the ring, gathered as the entry pools them
        at = plan.pool_at[m]
        kb = state.kv.view(*state.kv.shape[:2], 2, c)[at]  # [B,1,2m,c]
        zb = state.score.view(*state.score.shape[:2], 2, c)[at]
    else:
        kb, zb = state.kv[slots][:, None], state.score[slots][:, None]  # [B,1,m,c]: the block, complete or not
    flat_out.index_put_((out_row,), comp.entries(ops, kb, zb, plan.entry_cos_sin[m], flat_out.dtype))  # [B,1,c]


def indexer_step(idx: Indexer, ops: Ops, x: Tensor, xf: Tensor, iq: Tensor, cos: Tensor, sin: Tensor,
                 st: LayerStore, plan: StepPlan) -> Tensor:
    """[B,1,min(topk, cap)] selected compressed entries (-1 = none) over the bucket's capacity cap = context // 4.
    xf: x's rows [B,d] in fp32 (what the compressors project; made once per layer); iq: the indexer's query projection
    (Attention.project)."""
    a = idx.args
    q = idx.query(ops, iq, cos, sin)
    compressor_step(idx.compressor, ops, xf, plan, st.index_comp, st.flat_index_kv, plan.entry_row[(4, "index")])
    w = idx.head_weights(ops, x)
    keys = st.flat_index_kv[plan.index_key_rows]  # [B,cap,D_I]
    if idx.tp == 1:
        return ops.indexer_topk(q, keys, w, plan.index_visible, a.index_topk)
    score = ops.all_reduce(ops.indexer_scores(q, keys, w), "tp")  # heads split over TP ranks (as Indexer.forward)
    return topk_visible(score, plan.index_visible, a.index_topk)


def attention_step(attn: Attention, ops: Ops, x: Tensor, st: LayerStore, rope: RopeTable, plan: StepPlan) -> Tensor:
    """x [B,1,d] (attn_norm-ed) -> [B,1,d]; writes this token's KV (ring row, compressor state, entries)."""
    B = x.shape[0]
    H, D = attn.n_local_heads, attn.args.head_dim
    cos, sin = plan.cos_sin[id(rope)]
    q, kv, iq = attn.project(ops, x, cos, sin)
    flat = st.flat_kv  # [Bmax*W + pool rows + 1, D]: rings, block pool, scratch
    if attn.ratio:
        xf = x[:, 0].float()  # [B,d]: both compressors of a CSA layer project it (their own upcast is then a no-op)
        compressor_step(attn.compressor, ops, xf, plan, st.comp, flat, plan.entry_row[(attn.ratio, "kv")])
    flat.index_put_((plan.ring_row,), kv)  # [B,1,D] at rows [B,1]
    idx = plan.keys[attn.ratio]  # [1,B,K]
    if attn.ratio == 4:
        sel = indexer_step(attn.indexer, ops, x, xf, iq, cos, sin, st, plan)  # [B,1,topk] entry indices
        idx = torch.cat([idx, plan.sel_rows(sel)], dim=-1)
    # every row is one query of a single "batch" over the flat cache: q [1,B,H,D], kv [1, rows, D], idx [1,B,K]
    o = ops.sparse_attention(q.reshape(1, B, H, D), flat[None], attn.attn_sink, idx, D ** -0.5)
    return attn.output(ops, o.reshape(B, 1, H, D), cos, sin)


# -- MoE ---------------------------------------------------------------------------------------------------------------
def _gemm_input(ops: Ops, x: Tensor) -> Tensor:
    """What the reference linear multiplies a quantised weight with: x FP8-simulated in 1x128 blocks, in fp32."""
    # bf16 rows go in as they are: their FP8 simulation is exact in bf16 (e4m3 codes times powers of two), so this is
    # fp8_sim(x.float()) bit for bit, and a backend can use its fused quantisation op (which takes bf16/fp16)
    return ops.fp8_sim(x, 128).float() if x.dtype == torch.bfloat16 else ops.fp8_sim(x.float(), 128)


def _gathered_linear(ops: Ops, x: Tensor, w: LinearWeight, e: Tensor, xq: Tensor | None = None) -> Tensor:
    """x [M,1,in] @ W[e[m]]^T for each row m with the reference linear's numerics (ReferenceOps.linear): dense
    weights in x.dtype; FP8/FP4 weights dequantised, the activation FP8-simulated in 1x128 blocks (xq: that
    simulation when the caller has it already), fp32 product."""
    # torch.bmm is the kernel torch.matmul runs for these 3-D operands, called directly (matmul adds expands/views)
    if w.fmt == "none":
        return torch.bmm(x, w.weight[e].to(x.dtype).transpose(1, 2))
    xq = _gemm_input(ops, x) if xq is None else xq
    return torch.bmm(xq, gathered_weight(w, e).transpose(1, 2)).to(x.dtype)


_FP4_BYTE_VALUES: dict[str, Tensor] = {}  # device -> [256, 2] fp32, kept like reference.hadamard_matrix's tables


def gathered_weight(w: LinearWeight, e: Tensor) -> Tensor:
    """fp32 W[e[m]] [M, out, in] of a stacked FP8/FP4 weight: quant.dequant_weight's values (the same products), for
    FP4 by one lookup per packed byte (both nibbles at once: low nibble = even column) and one multiply by the 1x32
    block scales, instead of unpacking nibbles and expanding the scales to full width."""
    if w.fmt != "fp4" or w.weight.shape[-1] * 2 % FP4_BLOCK:
        return dequant_weight(w.weight[e], w.scale[e], w.fmt)
    dev = str(w.weight.device)
    table = _FP4_BYTE_VALUES.get(dev)
    if table is None:
        b = torch.arange(256)
        table = _FP4_BYTE_VALUES[dev] = torch.stack([E2M1_VALUES[b & 15], E2M1_VALUES[b >> 4]], -1).to(dev)
    packed = w.weight[e]  # [M, out, in/2] int8
    M, out, half = packed.shape
    vals = table[packed.view(torch.uint8).long()]  # [M, out, in/2, 2]
    blocks = vals.view(M, out, half * 2 // FP4_BLOCK, FP4_BLOCK) * w.scale[e].unsqueeze(-1)
    return blocks.view(M, out, half * 2)


def routed_experts(ops: Ops) -> Callable[..., Tensor]:
    """The reference's moe_experts (same contract, same per-expert arithmetic) without data-dependent shapes: each of
    the T*k (token, expert) pairs gathers its expert's weights, and the pairs are summed per token in ascending
    expert order, as the reference's per-expert loop adds them. Ops per layer do not grow with the expert count."""

    def run(x: Tensor, weights: Tensor, ids: Tensor, w1: LinearWeight, w2: LinearWeight, w3: LinearWeight,
            swiglu_limit: float, expert_offset: int = 0, n_experts: int | None = None) -> Tensor:
        T, d = x.shape
        k = ids.shape[1]
        n_local = w1.weight.shape[0]
        ids, order = ids.sort(dim=-1, stable=True)
        weights = weights.gather(-1, order)
        local = ids - expert_offset
        mine = ((local >= 0) & (local < n_local)).reshape(T * k, 1, 1)  # other ranks' experts contribute nothing
        e = local.clamp(0, n_local - 1).reshape(T * k)
        xt = x[:, None].expand(T, k, d).reshape(T * k, 1, d)
        xq = _gemm_input(ops, xt) if "none" not in (w1.fmt, w3.fmt) else None  # w1 and w3 take the same rows
        h = ops.swiglu(_gathered_linear(ops, xt, w1, e, xq), _gathered_linear(ops, xt, w3, e, xq), swiglu_limit)
        h = h * weights.reshape(T * k, 1, 1).float()
        y = torch.where(mine, _gathered_linear(ops, h.to(x.dtype), w2, e).float(), 0.0).view(T, k, d)
        out = y[:, 0]
        for j in range(1, k):
            out = out + y[:, j]
        return out

    return run


# -- the step ----------------------------------------------------------------------------------------------------------
def block_step(layer: Block, ops: Ops, X: Tensor, token_ids: Tensor, st: LayerStore, rope: RopeTable, plan: StepPlan,
               routed: Callable[..., Tensor] | None) -> Tensor:
    """Block.forward's wiring (hyper-connection around attention, then around the MoE) for one token per row."""
    a = layer.args
    x, post, comb = ops.hc_pre(X, layer.hc_attn_fn, layer.hc_attn_scale, layer.hc_attn_base, a.hc_sinkhorn_iters,
                               a.hc_eps, a.norm_eps)
    x = attention_step(layer.attn, ops, ops.rms_norm(x, layer.attn_norm.weight, a.norm_eps), st, rope, plan)
    X = ops.hc_post(x, X, post, comb)
    x, post, comb = ops.hc_pre(X, layer.hc_ffn_fn, layer.hc_ffn_scale, layer.hc_ffn_base, a.hc_sinkhorn_iters,
                               a.hc_eps, a.norm_eps)
    ffn: MoE = layer.ffn
    x = ffn(ops, ops.rms_norm(x, layer.ffn_norm.weight, a.norm_eps), token_ids, routed)
    return ops.hc_post(x, X, post, comb)


@torch.no_grad()
def decode_step(model: Transformer, cache: KVCache, tokens: Tensor, slots: Tensor, pos: Tensor, context: int,
                routed: Callable[..., Tensor] | None = None) -> Tensor:
    """Logits [B,V] fp32 of one token per row: tokens/slots/pos [B] int64 on the model's device, every pos in
    [1, context) and < cache.max_seq_len; rows' slots must differ unless the rows are identical (padding).
    Writes the tokens' KV into the cache; does NOT advance cache.lengths nor allocate blocks (the caller owns host
    bookkeeping: `cache.ensure_capacity(slot, pos + 1)` before the step; an entry of an unallocated block goes to
    the scratch row and is lost).
    `routed`: replaces ops.moe_experts (e.g. routed_experts(ops) where the backend's has data-dependent shapes)."""
    ops, a = model.ops, model.args
    plan = StepPlan(model, cache, slots, pos, context)
    h = model.embedding(tokens[:, None])  # [B,1,d]
    X = h.unsqueeze(2).repeat(1, 1, a.hc_mult, 1)  # [B,1,n,d]
    for i, layer in enumerate(model.layers):
        X = block_step(layer, ops, X, tokens, cache.layers[i], model.rope_for(i), plan, routed)
    return model._head(X, model.hc_head_fn, model.hc_head_scale, model.hc_head_base, model.norm)[:, 0]
