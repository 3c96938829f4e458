"""The block allocator behind the KV cache (common/model/cache.py): ids of fixed-size token blocks, a free list and
reference counts. Pure host-side bookkeeping: no tensors, so every rank that makes the same calls in the same order
hands out the same ids (the serving runner's Mirror relies on it).

    pool = BlockPool(n_blocks)
    ids = pool.alloc(3)        # refcount 1 each; raises PoolExhausted (nothing allocated) when fewer are free
    pool.incref(ids)           # a second holder (e.g. a prefix cache keeping full blocks alive)
    pool.decref(ids)           # back on the free list once nobody holds a block; returns the ids freed
Freed blocks go to the back of the free list, so a just-freed block is reused last (a prefix cache that still
knows its contents gets the longest chance to find it again before it is overwritten).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class PoolExhausted(RuntimeError):
    """Fewer free blocks than asked for; nothing was allocated. `needed` / `free` say how far off it was."""

    def __init__(self, needed: int, free: int, total: int) -> None:
        super().__init__(f"KV block pool exhausted: {needed} block(s) needed, {free} free of {total} "
                         f"(raise --kv-blocks, lower --max-batch or wait for running requests to finish)")
        self.needed, self.free, self.total = needed, free, total


class BlockPool:
    def __init__(self, n_blocks: int) -> None:
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.n_blocks = n_blocks
        self.refcount = [0] * n_blocks
        self._free: deque[int] = deque(range(n_blocks))  # lowest ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.n_blocks - len(self._free)

    def alloc(self, n: int) -> list[int]:
        """n fresh blocks, refcount 1 each; all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise PoolExhausted(n, len(self._free), self.n_blocks)
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            self.refcount[b] = 1
        return ids

    def incref(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        for b in ids:
            self._check(b)
            if self.refcount[b] == 0:
                raise ValueError(f"block {b} is free: only a held block can gain a holder")
        for b in ids:
            self.refcount[b] += 1

    def decref(self, ids: Iterable[int]) -> list[int]:
        """Drop one hold on each block; the blocks nobody holds any more go back to the free list (returned)."""
        ids = list(ids)
        for b in ids:
            self._check(b)
            if self.refcount[b] == 0:
                raise ValueError(f"block {b} is already free (double free)")
        freed = []
        for b in ids:
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self._free.append(b)
                freed.append(b)
        return freed

    free = decref

    def is_shared(self, b: int) -> bool:
        return self.refcount[b] > 1

    def _check(self, b: int) -> None:
        if not 0 <= b < self.n_blocks:
            raise ValueError(f"block id {b} outside [0, {self.n_blocks})")
