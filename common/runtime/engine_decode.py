"""Plain decode steps of many rows in one uncaptured pass: the static-shape step's per-row compressors
(common/model/static.py) with the backend's own MoE, for the serving engine's eager path.

Why: the eager forward (common/model/transformer.py) feeds each group of rows that share a start position to the
compressors separately, so 16 decode rows at 16 different positions cost 16 compressor calls per compressed layer
(measured on the tiny model, 2 CPU cores: 85 ms per step for 16 rows against 31 ms for one; the compressors were
~40% of it). The static step feeds every row at once, each at its own position (a row's place in its block is a
mask, not a branch), through the same modules' methods and ops. Uncaptured, it needs none of its capture
constraints, so this runner:
  - keeps the backend's moe_experts (the reference's loops over the experts that received tokens; the static step's
    `routed_experts` gathers one expert weight per (token, expert) pair, which costs more than it saves uncaptured);
  - sizes the step's context to the batch's longest position (max position + 1) instead of a power-of-two bucket,
    so the indexer and HCA scan only rows that can be visible (padding more rows changes no result, only time).
One row (or a few) stays on the eager forward, which is faster there (measured 31 ms eager against 35 ms static at
one row; equal at two, static faster from four). Rows all at one position also stay eager: its compressors then run
once for the batch, and it is 5-10% cheaper (scripts/bench_decode_rows.py). Numerics: equal to the eager forward up
to GEMM batch-shape rounding (measured max 2e-6 on logits, asserted within tests/test_static_decode.py's 1e-5);
greedy tokens are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dsv4.common.model.cache import KVCache
from dsv4.common.model.static import decode_step

BATCHED_DECODE_MIN_ROWS = 4  # from this many decode rows the batched step is faster than the eager forward (above)


class BatchedDecode:
    """One-token decode steps of rows of `cache` at any positions, all rows in one pass (uncaptured)."""

    def __init__(self, model, cache: KVCache, min_rows: int = BATCHED_DECODE_MIN_ROWS) -> None:
        if min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        self.model, self.cache, self.min_rows = model, cache, min_rows
        self.device = model.embed.weight.device
        self.steps = 0

    def wants(self, slots: Sequence[int]) -> bool:
        """Whether a one-token step of these slots should run here: enough rows, none at position 0 (a one-token
        prompt's prefill, which initialises the compressor states: the eager forward's job), and not all at one
        position: there the eager forward runs its compressors once for all rows and is the cheaper of the two
        (scripts/bench_decode_rows.py; such batches are requests that started together with equal prompt lengths)."""
        if len(slots) < self.min_rows:
            return False
        pos = self.cache.lengths[list(slots)]
        return int(pos.min()) >= 1 and int(pos.max()) > int(pos.min())

    def step(self, tokens: Tensor, slots: Sequence[int]) -> Tensor:
        """Logits [B,V] fp32 of tokens [B] fed at the slots' cached lengths (each >= 1: position 0 is a prefill);
        advances cache.lengths[slots] by one. Slots must differ."""
        cache = self.cache
        slots_host = torch.as_tensor(list(slots), dtype=torch.long)
        pos = cache.lengths[slots_host].clone()
        cache.check_room(slots_host, pos, 1)  # ContextLengthError with the advice, as the eager forward raises it
        if int(pos.min()) < 1:
            raise ValueError("a decode row at position 0: the first token of a sequence is a prefill")
        dev = self.device
        logits = decode_step(self.model, cache, tokens.to(dev), slots_host.to(dev), pos.to(dev), int(pos.max()) + 1,
                             routed=None)  # None: the backend's own moe_experts (data-dependent shapes are fine here)
        cache.lengths[slots_host] += 1
        self.steps += 1
        return logits
