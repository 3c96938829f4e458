"""The model side of the serving engine: the one model, its KV cache, and every call that touches them.

The scheduler (common/runtime/engine.py) decides what runs; this runner runs it. Each public method takes plain
Python values (token ids, slot numbers, positions), so a call can be replayed on other ranks: under torchrun, rank 0
broadcasts every call (`Mirror`) before running it, and the other ranks sit in `follow()` running the same calls in
the same order. Every rank thus feeds the same batch through the same collectives, and the caches stay identical.
Sampling needs no broadcast: rank 0 samples and the chosen ids travel with the next call. KV blocks are allocated
inside the mirrored calls (the forward's check_room) and freed by the mirrored `release`: the allocator is
deterministic, so every rank's block tables stay identical without a broadcast.

Speculative decoding (MTP, greedy only) lives here too, because its accept/reject decisions change the cache: every
rank computes them from the same all-gathered logits, so they agree without a message.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from dsv4.common.model.cache import BLOCK_QUANTUM, KVCache, check_pool_args
from dsv4.common.runtime.engine_decode import BatchedDecode
from dsv4.common.runtime.guards import check_logits
from dsv4.common.runtime.prefix_cache import PrefixCache, PrefixCacheOptions
from dsv4.common.runtime.static_decode import CAPTURE_MODES, StaticDecoder

STOP_FOLLOWING = "__stop__"


class Mirror:
    """Rank 0's side of the call broadcast (torch.distributed, default group)."""

    def __init__(self, src: int = 0) -> None:
        import torch.distributed as dist

        self.dist, self.src = dist, src

    def send(self, name: str, args: tuple) -> None:
        self.dist.broadcast_object_list([(name, args)], src=self.src)

    def receive(self) -> tuple[str, tuple]:
        box: list = [None]
        self.dist.broadcast_object_list(box, src=self.src)
        return box[0]


def mirrored(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(self: ModelRunner, *args):
        if self.mirror is not None and not self.following:
            self.mirror.send(fn.__name__, args)
        return fn(self, *args)

    return call


def slot_index(slots: list[int]) -> slice | Tensor:
    """A slice when the slots are one ascending run (the cache is then written in place), else an index tensor.
    The index lives on the CPU, like the cache's `lengths`, which it also indexes (a CPU index serves device
    tensors too; a device index cannot index a CPU tensor)."""
    lo = slots[0]
    if slots == list(range(lo, lo + len(slots))):
        return slice(lo, lo + len(slots))
    return torch.tensor(slots, dtype=torch.long)


class ModelRunner:
    def __init__(self, model, max_batch: int, max_seq_len: int, mirror: Mirror | None = None,
                 compile_decode: str | None = None, compile_batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
                 block_tokens: int = BLOCK_QUANTUM, kv_blocks: int | None = None,
                 prefix_cache: PrefixCacheOptions | None = None, batched_decode_min_rows: int | None = None) -> None:
        """block_tokens / kv_blocks: the KV block pool (common/model/cache.py); kv_blocks None = max_seq_len tokens
        for every slot (the bytes of the per-slot layout). prefix_cache: runtime/prefix_cache.py over that pool."""
        self.model, self.max_batch, self.max_seq_len, self.mirror = model, max_batch, max_seq_len, mirror
        check_pool_args(model.args, block_tokens, kv_blocks)
        self.block_tokens = block_tokens
        self.n_blocks = kv_blocks or max_batch * -(-max_seq_len // block_tokens)
        self.prefix_options = prefix_cache
        self._prefix: PrefixCache | None = None
        if prefix_cache is not None and prefix_cache.snapshot_interval % block_tokens:
            raise ValueError(f"--prefix-snapshot-interval {prefix_cache.snapshot_interval} must be a multiple of "
                             f"--block-tokens ({block_tokens})")
        if compile_decode is not None and compile_decode not in CAPTURE_MODES:
            raise ValueError(f"compile_decode must be one of {', '.join(CAPTURE_MODES)}, got {compile_decode!r}")
        self.compile_decode, self.compile_batch_sizes = compile_decode, compile_batch_sizes
        self.static: StaticDecoder | None = None  # built with the cache, on the first plain decode step
        self.batched_decode_min_rows = batched_decode_min_rows  # None: plain decodes always run the eager forward
        self.batched: BatchedDecode | None = None  # built with the cache, on the first batched decode step
        self.following = False
        self.device = model.embed.weight.device
        self._cache: KVCache | None = None  # allocated on first use: validation alone must cost nothing
        a = model.args
        self.draft = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # MTP guess after each slot's cur
        self.pending: dict[int, Tensor] = {}  # speculative prefill: last-block streams [1,1,n,d] awaiting a token
        # a draft at position p is cheap to take back unless it completes some compressor's block (see spec_step)
        self.block_ratios = sorted({r for r in a.compress_ratios[:a.n_layers] if r})

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = self.model.new_cache(self.max_batch, self.max_seq_len, self.block_tokens, self.n_blocks)
        return self._cache

    @property
    def prefix(self) -> PrefixCache | None:
        """The prefix cache (common/runtime/prefix_cache.py) over this runner's KV cache, None when off."""
        if self._prefix is None and self.prefix_options is not None:
            self._prefix = self.prefix_options.build(self.cache)
        return self._prefix

    @property
    def built_prefix(self) -> PrefixCache | None:
        """The prefix cache if it exists already (never allocates: safe to read from another thread)."""
        return self._prefix

    def _tokens(self, rows: list[list[int]]) -> Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # -- plain calls ---------------------------------------------------------------------------------------------------
    @mirrored
    def ping(self) -> None:
        """Nothing: an idle rank 0 calls it now and then so the other ranks' wait never times out."""

    @mirrored
    def reset(self, slot: int) -> None:
        """A new sequence in `slot`: position 0 (the compressor states re-initialise there), no blocks."""
        self._release(slot)

    @mirrored
    def release(self, slot: int) -> None:
        """The slot's sequence ended (finished, cancelled or failed): its KV blocks go back to the pool. Mirrored, so
        every rank's pool hands out the same block ids next (tables stay identical on all ranks)."""
        self._release(slot)

    def _release(self, slot: int) -> None:
        if self._cache is not None:
            self._cache.release(slot)
        self.pending.pop(slot, None)

    def blocks_used(self) -> int:
        return 0 if self._cache is None else self._cache.pool.num_used

    def blocks_cached_only(self) -> int:
        """Blocks the prefix cache alone holds (reclaimable); read from the HTTP thread too."""
        return 0 if self._prefix is None else self._prefix.evictable()

    @mirrored
    def forward(self, rows: list[list[int]], slots: list[int]) -> Tensor:
        """Logits [B,S,V] of one forward: row i continues slot slots[i] at its own cached length. A plain decode
        step (one token per row) goes through the captured static step when compile_decode is set; that step runs
        eager itself when the batch or context fits no captured shape. Otherwise, with batched_decode_min_rows set,
        a plain decode step of that many rows or more runs every row's compressors at once (engine_decode.py)."""
        if self.compile_decode is not None and all(len(r) == 1 for r in rows):
            if self.static is None:
                self.static = StaticDecoder(self.model, self.cache, self.compile_batch_sizes, self.compile_decode)
            return self.static.step(self._tokens(rows)[:, 0], slots)[:, None]
        if self.batched_decode_min_rows is not None and all(len(r) == 1 for r in rows):
            return self._batched_decode(rows, slots)
        return self.model(self._tokens(rows), self.cache, slots=slot_index(slots))

    # -- prefix cache: every rank runs the same calls, so every rank's prefix cache (and LRU order) stays the same ---
    @mirrored
    def use_prefix(self, slot: int, prompt: list[int], speculative: bool) -> tuple[int, int]:
        """Resume `slot` (just reset) at the longest cached prefix of `prompt` that has a snapshot. Returns (the
        prompt tokens now in the cache, 0 on a miss; the tokens whose blocks an earlier prompt shares, where a
        snapshot is worth taking). Every rank finds the same in its identical cache."""
        pc = self.prefix
        shared = pc.note_prompt(prompt)
        n, keys = pc.lookup(prompt, need_mtp=speculative)
        if not n:
            pc.stats.misses += 1
            return 0, shared
        pending = pc.install(slot, keys)
        if speculative:  # the MTP layer is one position behind: it is fed position n-1 with the next chunk
            self.pending[slot] = pending
        return n, shared

    @mirrored
    def register_prefix(self, slot: int, tokens: list[int], speculative: bool) -> None:
        """`slot` holds exactly `tokens`, a snapshot boundary: cache its blocks and the state at its end."""
        self.prefix.register(slot, tokens, self.pending.get(slot) if speculative else None)

    @mirrored
    def clear_prefix(self) -> None:
        if self.prefix is not None:
            self.prefix.clear()

    @mirrored
    def load_prefix(self) -> int:
        opts = self.prefix_options
        if opts is None or not opts.path or not os.path.exists(opts.path):
            return 0
        return self.prefix.load(opts.path)

    def save_prefix(self) -> int:
        """Rank 0 writes the file (every rank's cache is the same)."""
        opts = self.prefix_options
        if opts is None or not opts.path or self.following or self._prefix is None:
            return 0
        self._prefix.save(opts.path)
        return len(self._prefix.entries)
    def _batched_decode(self, rows: list[list[int]], slots: list[int]) -> Tensor:
        """A one-token step of enough rows through engine_decode.BatchedDecode (every row's compressors at once);
        fewer rows, or a one-token prompt at position 0, through the eager forward. Logits [B,1,V]."""
        if self.batched is None:
            self.batched = BatchedDecode(self.model, self.cache, self.batched_decode_min_rows)
        if not self.batched.wants(slots):
            return self.model(self._tokens(rows), self.cache, slots=slot_index(slots))
        return self.batched.step(self._tokens(rows)[:, 0], slots)[:, None]

    # -- speculative (MTP) ---------------------------------------------------------------------------------------------
    @mirrored
    def prefill_speculative(self, slot: int, piece: list[int], c0: int) -> Tensor:
        """A prefill chunk at positions [c0, c0+S) that also feeds the MTP layer's cache, which lags the main model
        by one position (position i needs token i+1). Returns the main logits [1,S,V]."""
        model, cache, sl = self.model, self.cache, slice(slot, slot + 1)
        logits, hidden = model(self._tokens([piece]), cache, slots=sl, return_hidden="last")
        X = hidden[-1]
        pending = self.pending.get(slot)
        streams = X if pending is None else torch.cat([pending, X], dim=1)
        nxt = piece if pending is not None else piece[1:]  # the next tokens of positions q0 .. c0+S-2
        if nxt:
            q0 = c0 - (pending is not None)
            model.mtp_forward(streams[:, :-1], self._tokens([nxt]), cache, sl, start=torch.tensor([q0]))
        self.pending[slot] = X[:, -1:]
        return logits

    @mirrored
    def first_draft(self, slot: int, first_token: int, prompt_len: int) -> None:
        """MTP at the prompt's last position (its streams + the first generated token) guesses the token after."""
        lm = self.model.mtp_forward(self.pending.pop(slot), self._tokens([[first_token]]), self.cache,
                                    slice(slot, slot + 1), start=torch.tensor([prompt_len - 1]))
        self.draft[slot] = lm[0, -1].argmax()

    def _completes_block(self, pos: int) -> bool:
        return any((pos + 1) % r == 0 for r in self.block_ratios)

    def _snapshot(self, b: int, ring_row: int) -> list[tuple[Tensor, Tensor]]:
        """Copies of slot b's compressor states and its ring row `ring_row` in every main layer (all small)."""
        views: list[Tensor] = []
        for lc in self.cache.layers[:self.model.args.n_layers]:
            views.append(lc.ring[b, ring_row])
            for st in (lc.comp, lc.index_comp):
                if st is not None:
                    views += [t[b] for t in st.tensors()]
        return [(v, v.clone()) for v in views]

    def _restore(self, b: int, snap: list[tuple[Tensor, Tensor]], cur: int) -> None:
        for view, saved in snap:
            view.copy_(saved)
        self.cache.lengths[b] -= 2  # back to L, then re-feed the valid token alone
        self.model(self._tokens([[cur]]), self.cache, slots=slice(b, b + 1))

    @mirrored
    def spec_step(self, slots: list[int], cur: list[int]) -> tuple[list[list[int]], list[bool]]:
        """Verify [cur, draft] at positions [L, L+1] of each slot in one forward; g1/g2 = the greedy picks after L
        and L+1. Returns ([[g1, g2]] per row, accepted per row). Accepted (g1 == draft): the tokens are g1, g2 and
        the cache is exactly as after feeding both. Rejected: the token is g1; the cache holds one position too
        many. Taking it back:
          - lengths: L+2 -> L+1.
          - ring row (L+1) % W got the draft's KV: harmless, the true token at L+1 rewrites it before any query
            reads it, and no later query looks back at position L+1-W.
          - compressor state, when the draft did NOT complete a block: the draft only wrote the row of the block in
            progress after L's; the next chunk reads rows before its start only, so that row is never read. A block
            completed at L (by the valid token) was pooled from valid rows only. Compressed rows written for a block
            are rewritten when the block truly completes, and queries see entries by position. Nothing to do.
          - when the draft completed a block ((L+2) % ratio == 0 for some layer), the chunk pooled the draft into it,
            overwrote the overlap look-back rows and never stored row L in the pending rows. Those steps snapshot the
            compressor states (and ring row (L+1) % W, which holds position L+1-W, still inside L's window) before
            verifying; a rejection restores them and re-feeds token L alone.
        The MTP layer is then fed positions [L, L+1] with their true next tokens [g1, g2]; a rejected slot keeps the
        draft from position L, and its bogus position L+1 entry sits in a ring row that is rewritten before use."""
        model, cache = self.model, self.cache
        W = model.args.window_size
        idx = slot_index(slots)
        rows = torch.tensor(slots, dtype=torch.long)
        start = cache.lengths[idx].clone()
        snaps = {}
        for b, L in zip(slots, start.tolist(), strict=True):
            if self._completes_block(L + 1):
                snaps[b] = self._snapshot(b, (L + 1) % W)
        draft = self.draft[rows]
        x = torch.stack([self._tokens(cur), draft], dim=1)
        logits, hidden = model(x, cache, slots=idx, return_hidden="last")
        check_logits(logits[:, 0])  # NaN/Inf must not be accepted as drafts: the requests of this step fail
        g = logits.argmax(-1)  # [B,2]
        acc = g[:, 0] == draft
        acc_list = acc.tolist()
        for b, c, ok in zip(slots, cur, acc_list, strict=True):
            if ok:
                continue
            if b not in snaps:
                cache.lengths[b] -= 1  # L+2 -> L+1: the cheap, exact take-back
                continue
            self._restore(b, snaps[b], c)
        lm = model.mtp_forward(hidden[-1], g, cache, idx, start=start)  # [B,2,V]
        self.draft[rows] = torch.where(acc, lm[:, 1].argmax(-1), lm[:, 0].argmax(-1))
        return g.tolist(), acc_list

    # -- other ranks ---------------------------------------------------------------------------------------------------
    def stop_followers(self) -> None:
        if self.mirror is not None:
            self.mirror.send(STOP_FOLLOWING, ())

    def follow(self) -> None:
        """Ranks other than 0: run rank 0's calls until it says stop. A call that fails here fails the same way on
        rank 0 (same inputs, same arithmetic), where the scheduler fails that request and carries on."""
        assert self.mirror is not None
        self.following = True
        while True:
            name, args = self.mirror.receive()
            if name == STOP_FOLLOWING:
                return
            try:
                getattr(self, name)(*args)
            except Exception:  # noqa: BLE001  rank 0 saw the same failure and reports it
                pass
