"""KV cache for incremental decoding: plain tensors per layer, owned by the caller, never hidden in modules. The
compressed entries and indexer keys live in a pool of fixed-size token blocks (memory by tokens, not by slots).

What a sequence holds (spec 5.7), for `max_batch` slots:
  per slot (small, fixed): the sliding-window ring of every layer (the token at position p in ring row p % W), the
            compressors' pending states (`CompressorState`) and `lengths[b]` (tokens cached; the next token of slot
            b has position lengths[b]);
  per block (as the sequence grows): block k of a slot covers tokens [k*T, (k+1)*T), T = block_tokens (a multiple
            of 128, the lcm of the compression ratios 4 and 128, so no compressor block straddles two blocks).
            One block id serves every layer (MTP included): in a ratio-r layer it owns the T/r pool rows
            [id*T/r, (id+1)*T/r) (compressed entries k*T/r ...), in a CSA layer also the T/4 indexer-key rows.
            `block_table[b, k]` is the id of slot b's k-th block (-1 = none).
Storage per attention layer (`LayerStore`):
  flat_kv        [Bmax*W + n_blocks*T/r + 1, D]: rows [0, Bmax*W) the rings (slot b's ring row q at b*W + q),
                 then the pool rows, then one scratch row (reads of unallocated entries, no-op writes; never read
                 unmasked). Ratio-0 layers have rings only (+ the scratch row).
  flat_index_kv  [n_blocks*T/4 + 1, D_I] (CSA layers): indexer keys, Hadamard-rotated and FP4-simulated; + scratch.
Entry j of slot b in a ratio-r layer sits at flat row Bmax*W + block_table[b, j // (T/r)] * (T/r) + j % (T/r)
(`pool_rows`). That translation is the only place where positions become pool rows: the eager one-token path and the
static decode step (common/model/static.py) attend through flat row indices built with it, the eager multi-token path
gathers through it (`layer_for`), so the ops contract stays "indices into a flat KV tensor" everywhere.

API (the serving engine and the prefix cache build on it):
  KVCache(args, max_batch, max_seq_len, dtype, device, with_mtp, block_tokens=128, n_blocks=None)
      n_blocks default: max_batch * ceil(max_seq_len / block_tokens), the bytes of one full-length sequence per slot.
  pool: BlockPool (common/model/block_pool.py): alloc / incref / decref, num_free, num_used, refcount.
  blocks_needed(n_tokens)           blocks that hold n_tokens positions.
  ensure_capacity(slot, n_tokens)   allocate the slot's missing blocks (PoolExhausted, nothing taken, if short).
  release(slot)                     drop the slot's holds on its blocks (freed at refcount 0), lengths[slot] = 0.
  set_blocks(slot, ids)             the slot's table becomes `ids` (each gains a hold; the old ones lose theirs):
                                    shared, already filled blocks of a prefix. A forward writes only into blocks
                                    the slot holds alone (check_room refuses otherwise), so a shared block must be
                                    full and lie before the positions still to be fed.
  blocks_of(slot)                   the slot's block ids in order.
  copy_slot(src, dst)               deep copy of a sequence (fresh blocks).
  layer_for / write_back / check_room: the model's forward (below); reset(slots), nbytes(), pool_stats().
A forward names its sequences by a slice or an index tensor of slots; `check_room` (once per forward) allocates
the blocks the new positions need. Then, per layer, one of two forms (`LayerCache`), the same arithmetic on the same
values either way:
  in place (one-token forwards: decode, MTP's one-token step): `layer_for(in_place=True)` hands the layer the flat
      store and translation tables ([B, W + n] gathered column -> flat row; kept across decode steps until a block
      table changes); the layer writes its ring row, entries and indexer keys straight into the store and attends
      over it by translated rows; nothing is copied but the indexer keys it scores;
  gathered (multi-token chunks): `layer_for` copies each layer's rows up to the forward's end position into
      [B, W + end // r, D] tensors (what the chunk's attention concatenates its own rows to) and `write_back`
      scatters back the ring and the entries the forward can have changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dsv4.common.model.block_pool import BlockPool, PoolExhausted
from dsv4.common.model.config import ModelArgs

BLOCK_QUANTUM = 128  # lcm of V4's compression ratios (4: CSA and the indexer, 128: HCA)

__all__ = ["BLOCK_QUANTUM", "BlockPool", "CompressorState", "ContextLengthError", "KVCache", "LayerCache",
           "LayerStore", "PoolExhausted", "SharedBlockWrite", "check_pool_args", "kv_bytes_per_token"]


class ContextLengthError(ValueError):
    """A request would exceed the cache's max_seq_len."""


class SharedBlockWrite(ValueError):
    """A forward would write into a block another holder shares (a prefix cache's block must stay as it is)."""


@dataclass
class CompressorState:
    """A compressor's pending rows per slot (raw K and gate scores of the tokens fed, fp32). Ratio m compressors
    without overlap keep the block in progress: m rows, row = position % m. An overlap compressor (m = 4) also
    pools the block before it, so it keeps TWO blocks as a ring: block j in rows [(j % 2) m, (j % 2) m + m)
    (`rows`), the one in progress and the one before it. A completed block becomes the next one's look-back where
    it lies: nothing is copied when a block completes, and the static decode step reads the 2m rows it pools with
    one gather (common/model/static.py). The official code keeps the same [Bmax, 2m, 2c] state with a fixed
    look-back half and copies each completed block into it (spec 5.7); the values pooled are the same."""

    kv: Tensor  # [Bmax, R, w] fp32: R = m, or 2m with overlap (w = 2c: look-back channels [0, c), own [c, 2c))
    score: Tensor  # [Bmax, R, w] fp32, gate logits + ape of the same rows; -inf where nothing was fed
    ratio: int

    @classmethod
    def allocate(cls, batch: int, ratio: int, head_dim: int, device: torch.device) -> CompressorState:
        k = 2 if ratio == 4 else 1  # overlap: two blocks of rows, each row twice as wide
        kv = torch.zeros(batch, k * ratio, k * head_dim, device=device)
        return cls(kv, torch.full_like(kv, float("-inf")), ratio)

    @property
    def overlap(self) -> bool:
        return self.kv.shape[1] == 2 * self.ratio

    def rows(self, block: int) -> slice:
        """The rows holding block `block` (of every slot: the eager path feeds slots that share their position)."""
        first = (block % 2) * self.ratio if self.overlap else 0
        return slice(first, first + self.ratio)

    def view(self, slots: slice) -> CompressorState:
        return CompressorState(self.kv[slots], self.score[slots], self.ratio)

    def gather(self, idx: Tensor) -> CompressorState:
        return CompressorState(self.kv[idx], self.score[idx], self.ratio)

    def scatter_(self, idx: Tensor, part: CompressorState) -> None:
        for full, t in zip(self.tensors(), part.tensors(), strict=True):
            full[idx] = t

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.kv, self.score


@dataclass
class LayerCache:
    """What one layer's forward sees for its B rows, in one of two forms; the graph reads and writes the rows only
    through the methods below, so both forms run the same arithmetic on the same values.
    Gathered (`kv` set): kv [B, W + n, D] (ring, then compressed entries 0..n-1), index_kv [B, n4, D_I]: the
    per-slot layout's tensors or views of them (cache_dense.py), or `KVCache.layer_for`'s copy of the rows up to the
    forward's end, where `rows` / `index_rows` are the flat store rows it came from and `span` (start, end) [B] the
    positions the forward feeds, which bound what `write_back` writes.
    In place (`store` set, kv None: `KVCache.layer_for(in_place=True)`, one-token forwards): nothing is copied; the
    layer writes into and attends over the flat store, `rows` [B, W + n + 1] translating a gathered column (ring row
    q, entry W + j; the last column -1) into its flat row and `index_rows` [B, n4] an indexer key into its row of
    flat_index_kv."""
    ratio: int
    window: int
    kv: Tensor | None
    comp: CompressorState | None = None
    index_kv: Tensor | None = None
    index_comp: CompressorState | None = None
    rows: Tensor | None = None
    index_rows: Tensor | None = None
    span: tuple[Tensor, Tensor] | None = None
    plan: _ForwardRows | None = None  # the forward's shared row indices (KVCache internals)
    store: LayerStore | None = None  # in place: the layer's flat store
    slots: Tensor | None = None  # in place: [B] the rows' slots, on the store's device

    @property
    def dtype(self) -> torch.dtype:
        return (self.kv if self.store is None else self.store.flat_kv).dtype

    def write_window(self, pos: Tensor, kv: Tensor) -> None:
        """The KV rows kv [B,k,D] of positions pos [B,k] (k <= W) into the ring (position p in ring row p % W)."""
        W = self.window
        if self.store is None:
            self.kv[torch.arange(pos.shape[0], device=pos.device)[:, None], pos % W] = kv
        else:
            self.store.flat_kv[self.slots[:, None] * W + pos % W] = kv

    def write_entries(self, lo: int, hi: int, first: int, entries: Tensor) -> None:
        """Compressed entries [hi-lo, nb, D] of rows lo..hi-1 as their entries first..first+nb-1."""
        nb = entries.shape[1]
        if not nb:
            return
        cols = slice(self.window + first, self.window + first + nb)
        if self.store is None:
            self.kv[lo:hi, cols] = entries
        else:
            self.store.flat_kv[self.rows[lo:hi, cols]] = entries

    def write_index_entries(self, lo: int, hi: int, first: int, entries: Tensor) -> None:
        """Indexer keys [hi-lo, nb, D_I] of rows lo..hi-1 as their keys first..first+nb-1."""
        nb = entries.shape[1]
        if not nb:
            return
        if self.store is None:
            self.index_kv[lo:hi, first:first + nb] = entries
        else:
            self.store.flat_index_kv[self.index_rows[lo:hi, first:first + nb]] = entries

    def index_keys(self, n: int) -> Tensor:
        """[B, n, D_I] indexer keys 0..n-1 of the rows: a view when gathered, gathered from the store in place (the
        indexer scores every visible key, so they travel either way)."""
        if self.store is None:
            return self.index_kv[:, :n]
        return _rows_of(self.store.flat_index_kv, self.index_rows[:, :n])

    def attention_inputs(self, q: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """sparse_attention's (q, kv, indices) for queries q [B,S,H,D] attending over the cache's own rows at gathered
        columns idx [B,S,K] (-1 = none). Gathered: as they are. In place: the static step's form (static.py), every
        query one row of a single batch over the flat store: q [1, B*S, H, D], kv [1, rows, D], indices [1, B*S, K]
        translated to flat rows, so the ops contract stays "indices into a flat KV tensor" (the output, reshaped to
        q's shape, holds the same values: each query's keys are the same rows)."""
        if self.store is None:
            return q, self.kv, idx
        B, S, K = idx.shape
        # column -1 ("none") wraps around to the table's last column, which holds -1 (`KVCache.column_rows`)
        rows = self.rows.gather(1, idx.reshape(B, S * K) % self.rows.shape[1])
        return q.reshape(1, B * S, *q.shape[2:]), self.store.flat_kv[None], rows.view(1, B * S, K)


@dataclass
class LayerStore:
    """One layer's storage (see the module docstring): rings + pool rows + scratch row, flat."""
    ratio: int
    window: int
    max_batch: int
    flat_kv: Tensor  # [Bmax*W + n_blocks * per_block + 1, D]
    per_block: int  # pool rows per block: block_tokens // ratio (0 for a window-only layer)
    comp: CompressorState | None = None
    flat_index_kv: Tensor | None = None  # [n_blocks * block_tokens // 4 + 1, D_I]
    index_comp: CompressorState | None = None

    @property
    def ring(self) -> Tensor:
        """[Bmax, W, D] view of the rings."""
        return self.flat_kv[:self.max_batch * self.window].view(self.max_batch, self.window, -1)

    @property
    def pool_offset(self) -> int:
        return self.max_batch * self.window

    @property
    def scratch(self) -> int:
        return self.flat_kv.shape[0] - 1

    def states(self) -> list[CompressorState]:
        return [s for s in (self.comp, self.index_comp) if s is not None]


def check_pool_args(args: ModelArgs, block_tokens: int, n_blocks: int | None) -> None:
    """One clear error for a block size or pool size that cannot work (named as the CLI flags name them)."""
    quantum = math.lcm(BLOCK_QUANTUM, *[r for r in args.compress_ratios if r])
    if not isinstance(block_tokens, int) or block_tokens < 1 or block_tokens % quantum:
        raise ValueError(f"block_tokens (--block-tokens) must be a positive multiple of {quantum} (the lcm of the "
                         f"compression ratios: a compressor block may not straddle two KV blocks), "
                         f"got {block_tokens!r}")
    if n_blocks is not None and (not isinstance(n_blocks, int) or n_blocks < 1):
        raise ValueError(f"n_blocks (--kv-blocks) must be a positive integer, got {n_blocks!r}")


def _slot_tensor(slots: slice | Tensor | int) -> Tensor:
    if isinstance(slots, int):
        return torch.tensor([slots], dtype=torch.long)
    if isinstance(slots, slice):
        return torch.arange(slots.start or 0, slots.stop, dtype=torch.long)
    return slots.to("cpu", torch.long)


class KVCache:
    """All layers' caches for `max_batch` sequences of up to `max_seq_len` tokens, compressed rows in a block pool."""

    def __init__(self, args: ModelArgs, max_batch: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", with_mtp: bool = True, block_tokens: int = BLOCK_QUANTUM,
                 n_blocks: int | None = None) -> None:
        check_pool_args(args, block_tokens, n_blocks)
        self.args, self.max_batch, self.max_seq_len, self.dtype = args, max_batch, max_seq_len, dtype
        self.device = torch.device(device)
        self.block_tokens = block_tokens
        self.max_blocks_per_seq = -(-max_seq_len // block_tokens)
        self.n_blocks = n_blocks or max_batch * self.max_blocks_per_seq
        self.pool = BlockPool(self.n_blocks)
        self.block_table = torch.full((max_batch, self.max_blocks_per_seq), -1, dtype=torch.long, device=self.device)
        self._blocks: list[list[int]] = [[] for _ in range(max_batch)]  # host copy of block_table's rows
        n = args.n_layers + (args.n_mtp_layers if with_mtp else 0)
        self.layers = [self._layer(args.compress_ratios[i]) for i in range(n)]
        self.lengths = torch.zeros(max_batch, dtype=torch.long)
        # when the free list runs short: reclaim(n) frees up to n blocks held by no sequence (a prefix cache's,
        # runtime/prefix_cache.py); None: nothing to reclaim
        self.reclaim: Callable[[int], int] | None = None
        self._memo: _ForwardRows | None = None  # the last forward's row indices (dropped when a table changes)
        # entry rows of the last slot set, whole blocks of them, kept across forwards until a table changes: a decode
        # step's rows differ from the previous step's only by the entries its new position completes
        self._entry_memo: dict[tuple, Tensor] = {}
        self._entry_slots: tuple | None = None

    def _layer(self, ratio: int) -> LayerStore:
        a, B, dev, T = self.args, self.max_batch, self.device, self.block_tokens
        per_block = T // ratio if ratio else 0
        rows = B * a.window_size + self.n_blocks * per_block + 1
        st = LayerStore(ratio, a.window_size, B, torch.zeros(rows, a.head_dim, dtype=self.dtype, device=dev),
                        per_block)
        if ratio:
            st.comp = CompressorState.allocate(B, ratio, a.head_dim, dev)
        if ratio == 4:
            st.flat_index_kv = torch.zeros(self.n_blocks * T // 4 + 1, a.index_head_dim, dtype=self.dtype, device=dev)
            st.index_comp = CompressorState.allocate(B, 4, a.index_head_dim, dev)
        return st

    # -- blocks --------------------------------------------------------------------------------------------------------
    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_tokens)

    def blocks_of(self, slot: int) -> list[int]:
        return list(self._blocks[slot])

    def ensure_capacity(self, slot: int, n_tokens: int) -> list[int]:
        """Allocate the blocks slot needs to hold positions [0, n_tokens); returns the new ids."""
        return self._ensure([slot], [n_tokens])[0]

    def _ensure(self, slots: list[int], ends: list[int]) -> list[list[int]]:
        """All or nothing: PoolExhausted leaves every table as it was."""
        need = [max(self.blocks_needed(e) - len(self._blocks[s]), 0) for s, e in zip(slots, ends, strict=True)]
        for s, e in zip(slots, ends, strict=True):
            if e > self.max_seq_len:
                raise ContextLengthError(f"slot {s} needs {e} positions but the cache holds max_seq_len="
                                         f"{self.max_seq_len}")
        if sum(need) > self.pool.num_free and self.reclaim is not None:
            self.reclaim(sum(need) - self.pool.num_free)  # a prefix cache frees blocks only it holds
        if sum(need) > self.pool.num_free:
            raise PoolExhausted(sum(need), self.pool.num_free, self.n_blocks)
        new = [self.pool.alloc(k) for k in need]
        if any(new):
            self._tables_changed()
        for s, ids in zip(slots, new, strict=True):
            if ids:
                k0 = len(self._blocks[s])
                self._blocks[s] += ids
                self.block_table[s, k0:k0 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        return new

    def _tables_changed(self) -> None:
        self._memo = None
        self._entry_memo.clear()

    def release(self, slot: int) -> None:
        """The slot forgets its sequence: its holds on its blocks are dropped (freed unless shared), length 0."""
        ids, self._blocks[slot] = self._blocks[slot], []
        self._tables_changed()
        if ids:
            self.pool.decref(ids)
            self.block_table[slot] = -1
        self.lengths[slot] = 0

    def set_blocks(self, slot: int, ids: list[int]) -> None:
        """slot's table becomes `ids` (held blocks, e.g. a prefix cache's): each gains a hold, the old ones lose
        theirs. lengths, ring and compressor states are the caller's to set to match."""
        ids = [int(b) for b in ids]
        if len(ids) > self.max_blocks_per_seq:
            raise ValueError(f"{len(ids)} blocks exceed max_blocks_per_seq={self.max_blocks_per_seq}")
        self.pool.incref(ids)  # first: re-installing a slot's own blocks must not free them in between
        self._tables_changed()
        old, self._blocks[slot] = self._blocks[slot], ids
        if old:
            self.pool.decref(old)
        self.block_table[slot] = -1
        if ids:
            self.block_table[slot, :len(ids)] = torch.tensor(ids, dtype=torch.long)

    def copy_slot(self, src: int, dst: int) -> None:
        """dst becomes a copy of src's sequence in fresh blocks (rings, entries, indexer keys, states, length)."""
        if src == dst:
            return
        self.release(dst)
        self._ensure([dst], [len(self._blocks[src]) * self.block_tokens])
        s_ids = torch.tensor(self._blocks[src], dtype=torch.long, device=self.device)
        d_ids = torch.tensor(self._blocks[dst], dtype=torch.long, device=self.device)
        for st in self.layers:
            st.ring[dst] = st.ring[src]
            if st.per_block:
                k = torch.arange(st.per_block, device=self.device)
                rows = lambda ids, pb=st.per_block, k=k: (ids[:, None] * pb + k).flatten()  # noqa: E731
                off = st.pool_offset
                st.flat_kv[off + rows(d_ids)] = st.flat_kv[off + rows(s_ids)]
            if st.flat_index_kv is not None:
                k = torch.arange(self.block_tokens // 4, device=self.device)
                d, s = (d_ids[:, None] * k.numel() + k).flatten(), (s_ids[:, None] * k.numel() + k).flatten()
                st.flat_index_kv[d] = st.flat_index_kv[s]
            for state in st.states():
                for t in state.tensors():
                    if t is not None:
                        t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def pool_stats(self) -> dict[str, int]:
        return {"blocks_total": self.n_blocks, "blocks_used": self.pool.num_used, "blocks_free": self.pool.num_free,
                "block_tokens": self.block_tokens}

    # -- index translation ---------------------------------------------------------------------------------------------
    def pool_rows(self, slots: Tensor, j: Tensor, per_block: int, offset: int) -> Tensor:
        """Flat store rows of entries j [B,K] (-1 = none) of slots [B] in a layer with `per_block` rows per block
        whose pool starts at row `offset`; -1 where j < 0 or the entry's block is not allocated. THE translation
        from positions to pool rows (eager gather and static step alike). Static shapes, no host read."""
        jj = j.clamp(min=0)
        k = (jj // per_block).clamp(max=self.max_blocks_per_seq - 1)
        blk = self.block_table[slots[:, None], k]  # [B,K]
        return torch.where((j >= 0) & (blk >= 0), offset + blk * per_block + jj % per_block, -1)

    def _rows_memo(self, slots_key: tuple) -> dict[tuple, Tensor]:
        """Row indices of the last slot set (key: its slots as a tuple), kept until a block table changes
        (`_tables_changed`): consecutive decode steps of the same sequences reuse them."""
        if slots_key != self._entry_slots:
            self._entry_memo.clear()
            self._entry_slots = slots_key
        return self._entry_memo

    def _block_rows(self, slots_key: tuple, slots: Tensor, n: int, per_block: int, offset: int,
                    scratch: int) -> Tensor:
        """[B, n'] (n' >= n, whole blocks) flat rows of entries 0..n'-1 of `slots` (key: the slots as a tuple) in a
        store with `per_block` rows per block, the scratch row where no block is allocated: pool_rows, computed once
        per slot set and block table (`_rows_memo`)."""
        memo = self._rows_memo(slots_key)
        key = ("entries", per_block, offset, scratch)
        rows = memo.get(key)
        if rows is None or rows.shape[1] < n:
            cap = min(-(-max(n, 1) // per_block), self.max_blocks_per_seq) * per_block
            j = torch.arange(cap, device=slots.device).expand(slots.numel(), -1)
            ent = self.pool_rows(slots, j, per_block, offset)
            rows = memo[key] = torch.where(ent >= 0, ent, scratch)
        return rows

    def column_rows(self, slots_key: tuple, slots: Tensor, st: LayerStore, n: int) -> Tensor:
        """[B, W + n' + 1] (n' >= n) the flat row of each column of the gathered layout [ring | entries] of layer
        store st: ring row q of slot b at b*W + q, entry j at column W + j through the block table (`pool_rows`; the
        scratch row where no block is allocated), and a last column -1. The in-place forward's translation table,
        kept in `_rows_memo`."""
        memo = self._rows_memo(slots_key)
        key = ("columns", st.ratio, st.scratch)
        rows = memo.get(key)
        if rows is None or rows.shape[1] - 1 < st.window + n:
            parts = [slots[:, None] * st.window + torch.arange(st.window, device=slots.device)]
            if st.ratio:
                parts.append(self._block_rows(slots_key, slots, n, st.per_block, st.pool_offset, st.scratch))
            parts.append(torch.full_like(parts[0][:, :1], -1))  # where column -1 ("none") wraps to: stays -1
            rows = memo[key] = torch.cat(parts, dim=1)
        return rows

    # -- the model's forward -------------------------------------------------------------------------------------------
    def layer_for(self, i: int, slots: slice | Tensor, end: int, start: Tensor | None = None,
                  in_place: bool = False) -> LayerCache:
        """Layer i's rows for a forward over `slots` that feeds positions [start[b], start[b] + S) of each row and
        ends before position `end` (= max(start) + S); start defaults to the cached lengths. in_place (the model's
        one-token forwards): the layer reads and writes the flat store through translated rows, nothing is copied;
        otherwise a gathered copy of the rows up to `end`, which `write_back` writes back."""
        st = self.layers[i]
        idx = _slot_tensor(slots)
        if in_place:
            lc = self._in_place(st, idx, end)
        else:
            start = (self.lengths[idx] if start is None else start.to("cpu", torch.long)).clone()
            plan = self._plan(idx, end, start)
            rows = plan.kv_rows(st)
            lc = LayerCache(st.ratio, st.window, _rows_of(st.flat_kv, rows), rows=rows, span=(plan.start, plan.stop),
                            plan=plan)
            if st.flat_index_kv is not None:
                lc.index_rows = plan.index_rows(st)
                lc.index_kv = _rows_of(st.flat_index_kv, lc.index_rows)
        # compressor states are per slot: a slice of slots is a view the layer updates in place, an index tensor a copy
        state = (lambda s: s.view(slots)) if isinstance(slots, slice) else (lambda s: s.gather(idx))
        if st.comp is not None:
            lc.comp = state(st.comp)
        if st.index_comp is not None:
            lc.index_comp = state(st.index_comp)
        return lc

    def _in_place(self, st: LayerStore, idx: Tensor, end: int) -> LayerCache:
        """An in-place LayerCache of store st for slots idx [B] (host) and a forward ending before `end`: only the
        translation tables, kept across decode steps of the same slots (`_rows_memo`)."""
        key = tuple(idx.tolist())
        memo = self._rows_memo(key)
        slots = memo.get(("slots",))
        if slots is None:
            slots = memo[("slots",)] = idx.to(self.device)
        lc = LayerCache(st.ratio, st.window, None, store=st, slots=slots,
                        rows=self.column_rows(key, slots, st, end // st.ratio if st.ratio else 0))
        if st.flat_index_kv is not None:
            lc.index_rows = self.index_key_rows(key, slots, st, end // 4)
        return lc

    def index_key_rows(self, slots_key: tuple, slots: Tensor, st: LayerStore, n: int) -> Tensor:
        """[B, n'] (n' >= n, whole blocks) the flat_index_kv rows of indexer keys 0..n'-1 of a CSA layer store st
        (the scratch row where no block is allocated), kept in `_rows_memo`."""
        return self._block_rows(slots_key, slots, n, self.block_tokens // 4, 0, st.flat_index_kv.shape[0] - 1)

    def write_back(self, i: int, slots: slice | Tensor, part: LayerCache) -> None:
        """Scatter a forward's changes back: the ring rows of the positions fed, the entries of blocks completed
        inside the span (those only: every other pool row is unchanged, and shared blocks lie before the span),
        the compressor states. In place, only the states of an index tensor of slots (the rows are written)."""
        st = self.layers[i]
        if not isinstance(slots, slice):  # a slice's states were views, already written
            idx = _slot_tensor(slots)
            for full, state in ((st.comp, part.comp), (st.index_comp, part.index_comp)):
                if full is not None:
                    full.scatter_(idx, state)
        if part.store is not None:
            return
        plan = part.plan
        tgt, cols = plan.kv_writes(st, part.rows)
        st.flat_kv[tgt] = part.kv.gather(1, cols[..., None].expand(-1, -1, part.kv.shape[-1]))
        if st.flat_index_kv is not None:
            tgt, cols = plan.index_writes(st, part.index_rows)
            st.flat_index_kv[tgt] = part.index_kv.gather(1, cols[..., None].expand(-1, -1, part.index_kv.shape[-1]))

    def _plan(self, idx: Tensor, end: int, start: Tensor) -> _ForwardRows:
        """The row indices of one forward, shared by its layers (computed once per ratio, not once per layer)."""
        key = (tuple(idx.tolist()), end, tuple(start.tolist()))
        if self._memo is None or self._memo.key != key:
            self._memo = _ForwardRows(self, key, idx, end, start)
        return self._memo

    def check_room(self, slots: slice | Tensor, start_pos: Tensor, n_new: int, pool_writes: bool = True) -> None:
        """Before a forward feeding positions [start_pos[b], start_pos[b] + n_new): max_seq_len, slot range, and the
        blocks of those positions (allocated here, all or nothing; each must be the slot's alone unless the forward
        writes no pool rows, pool_writes=False: a window-only layer such as MTP's writes its per-slot ring only)."""
        end = int(start_pos.max()) + n_new
        if end > self.max_seq_len:
            raise ContextLengthError(
                f"request needs {end} positions but the cache holds max_seq_len={self.max_seq_len} "
                f"(prompt + generated tokens must fit; raise --max-seq-len up to "
                f"{self.args.max_position_embeddings})")
        if isinstance(slots, slice) and slots.stop > self.max_batch:
            raise ValueError(f"batch slots {slots.start}..{slots.stop - 1} exceed max_batch={self.max_batch}")
        if not isinstance(slots, slice) and not (0 <= int(slots.min()) and int(slots.max()) < self.max_batch):
            raise ValueError(f"batch slots {slots.tolist()} outside [0, max_batch={self.max_batch})")
        idx = _slot_tensor(slots).tolist()
        starts = start_pos.to("cpu").tolist()
        self._ensure(idx, [s + n_new for s in starts])
        if pool_writes:
            self.check_writable(idx, starts, n_new)

    def check_writable(self, slots: list[int], starts: list[int], n_new: int) -> None:
        T = self.block_tokens
        for s, p in zip(slots, starts, strict=True):
            for k in range(p // T, (p + n_new - 1) // T + 1):
                b = self._blocks[s][k]
                if self.pool.is_shared(b):
                    raise SharedBlockWrite(
                        f"slot {s}: positions {p}..{p + n_new - 1} fall in block {k} (id {b}), which is shared "
                        f"(refcount {self.pool.refcount[b]}): only full blocks before the positions still to be fed "
                        f"may be shared")

    def reset(self, slots: slice | int | None = None) -> None:
        """Forget the sequences in `slots` (all by default): their blocks are released, lengths 0 (the compressor
        states re-initialise at position 0 anyway)."""
        for s in _slot_tensor(slice(0, self.max_batch) if slots is None else slots).tolist():
            self.release(s)

    def nbytes(self) -> int:
        """Bytes of the KV storage (rings, pool, scratch rows, compressor states; not the small block table)."""
        total = 0
        for st in self.layers:
            ts = [st.flat_kv, st.flat_index_kv] + [t for s in st.states() for t in s.tensors()]
            total += sum(t.numel() * t.element_size() for t in ts if t is not None)
        return total


def _rows_of(flat: Tensor, rows: Tensor) -> Tensor:
    """flat[rows] for rows [B,K]: index_select on the flattened rows (3x faster than advanced indexing on CPU)."""
    return flat.index_select(0, rows.flatten()).view(*rows.shape, flat.shape[-1])


class _ForwardRows:
    """Flat store rows one forward gathers from and writes to, per ratio (eager path). key: (slots, end, starts)."""

    def __init__(self, cache: KVCache, key: tuple, idx: Tensor, end: int, start: Tensor) -> None:
        self.cache, self.key, self.end, self.W = cache, key, end, cache.args.window_size
        self.dev = cache.device
        self.slots = idx.to(self.dev)
        self.start = start
        self.stop = start + (end - int(start.max())) if start.numel() else start
        self._writes: dict[tuple, tuple[Tensor, Tensor]] = {}

    def kv_rows(self, st: LayerStore) -> Tensor:
        """[B, W + end // r]: the rows' rings, then their entries 0..end//r - 1 (unallocated: the scratch row)."""
        n = self.end // st.ratio if st.ratio else 0
        return self.cache.column_rows(self.key[0], self.slots, st, n)[:, :self.W + n]

    def index_rows(self, st: LayerStore) -> Tensor:
        """[B, end // 4]: the rows' indexer keys 0..end//4 - 1 (unallocated: the scratch row)."""
        n = self.end // 4
        return self.cache.index_key_rows(self.key[0], self.slots, st, n)[:, :n]

    def _span_cols(self, lo: Tensor, hi: Tensor, first_col: int) -> tuple[Tensor, Tensor] | None:
        """Columns first_col + j for lo[b] <= j < hi[b] as [B, K] (K = the widest span) and which are real."""
        a, b = int(lo.min()), int(hi.max())
        if b <= a:
            return None
        j = torch.arange(a, b, device=self.dev).expand(lo.numel(), -1)
        keep = (j >= lo.to(self.dev)[:, None]) & (j < hi.to(self.dev)[:, None])
        return j + first_col, keep

    def kv_writes(self, st: LayerStore, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(target store rows [B,K], source columns [B,K] of the gathered kv): the ring rows of the last
        min(S, W) positions fed, and the entries of blocks completed in the span; padding goes to the scratch row."""
        key = ("kv", st.ratio, st.scratch)
        if key not in self._writes:
            keep_n = min(int((self.stop - self.start).max()), self.W)
            pos = self.stop.to(self.dev)[:, None] - keep_n + torch.arange(keep_n, device=self.dev)
            cols, keep = [pos % self.W], [torch.ones_like(pos, dtype=torch.bool)]
            if st.ratio:
                span = self._span_cols(self.start // st.ratio, self.stop // st.ratio, self.W)
                if span is not None:
                    cols.append(span[0])
                    keep.append(span[1])
            c, k = torch.cat(cols, dim=1), torch.cat(keep, dim=1)
            self._writes[key] = (torch.where(k, rows.gather(1, c), st.scratch), c)
        return self._writes[key]

    def index_writes(self, st: LayerStore, rows: Tensor) -> tuple[Tensor, Tensor]:
        key = ("index", st.flat_index_kv.shape[0])
        if key not in self._writes:
            scratch = st.flat_index_kv.shape[0] - 1
            span = self._span_cols(self.start // 4, self.stop // 4, 0)
            if span is None:
                empty = torch.zeros(self.slots.numel(), 0, dtype=torch.long, device=self.dev)
                self._writes[key] = (empty, empty)
            else:
                self._writes[key] = (torch.where(span[1], rows.gather(1, span[0]), scratch), span[0])
        return self._writes[key]


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int = 2, include_mtp: bool = False) -> float:
    """Asymptotic cache bytes per token of context (window rings and compressor states are per sequence, not per
    token): each ratio-r layer stores D values per r tokens, each ratio-4 layer also D_I per 4 tokens."""
    n = args.n_layers + (args.n_mtp_layers if include_mtp else 0)
    per = 0.0
    for r in args.compress_ratios[:n]:
        if r:
            per += args.head_dim / r
        if r == 4:
            per += args.index_head_dim / 4
    return per * dtype_bytes
