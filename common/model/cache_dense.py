"""The per-slot ("dense") KV layout the block pool replaced, kept as the pool's oracle and benchmark baseline only
(tests/test_block_pool.py, scripts/bench_block_pool.py): every slot owns W + max_seq_len // ratio rows per layer up
front. Eager forwards only (the static decode step and the engine need the pool, common/model/cache.py). Same
forward interface as KVCache (check_room / layer_for / write_back / lengths): a slice of slots is a view the layers
write straight into, an index tensor gathers a copy up to the forward's end position and scatters it back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsv4.common.model.cache import CompressorState, ContextLengthError, LayerCache
from dsv4.common.model.config import ModelArgs


def _view(lc: LayerCache, slots: slice) -> LayerCache:
    return LayerCache(lc.ratio, lc.window, lc.kv[slots], None if lc.comp is None else lc.comp.view(slots),
                      None if lc.index_kv is None else lc.index_kv[slots],
                      None if lc.index_comp is None else lc.index_comp.view(slots))


def _gather(lc: LayerCache, idx: Tensor, window: int, end: int) -> LayerCache:
    rows = window + (end // lc.ratio if lc.ratio else 0)
    return LayerCache(lc.ratio, window, lc.kv[idx, :rows], None if lc.comp is None else lc.comp.gather(idx),
                      None if lc.index_kv is None else lc.index_kv[idx, :end // 4],
                      None if lc.index_comp is None else lc.index_comp.gather(idx))


class SlotKVCache:
    """kv [Bmax, W + max_seq_len // ratio, D] and index_kv [Bmax, max_seq_len // 4, D_I] per layer."""

    def __init__(self, args: ModelArgs, max_batch: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", with_mtp: bool = True) -> None:
        self.args, self.max_batch, self.max_seq_len, self.dtype = args, max_batch, max_seq_len, dtype
        self.device = torch.device(device)
        n = args.n_layers + (args.n_mtp_layers if with_mtp else 0)
        self.layers = [self._layer(args.compress_ratios[i]) for i in range(n)]
        self.lengths = torch.zeros(max_batch, dtype=torch.long)

    def _layer(self, ratio: int) -> LayerCache:
        a, B, dev = self.args, self.max_batch, self.device
        rows = a.window_size + (self.max_seq_len // ratio if ratio else 0)
        lc = LayerCache(ratio, a.window_size, torch.zeros(B, rows, a.head_dim, dtype=self.dtype, device=dev))
        if ratio:
            lc.comp = CompressorState.allocate(B, ratio, a.head_dim, dev)
        if ratio == 4:
            lc.index_kv = torch.zeros(B, self.max_seq_len // 4, a.index_head_dim, dtype=self.dtype, device=dev)
            lc.index_comp = CompressorState.allocate(B, 4, a.index_head_dim, dev)
        return lc

    def layer_for(self, i: int, slots: slice | Tensor, end: int, start: Tensor | None = None,
                  in_place: bool = False) -> LayerCache:
        """A view of a slice of slots, a copy of an index tensor's rows (in_place changes nothing here)."""
        lc = self.layers[i]
        return _view(lc, slots) if isinstance(slots, slice) else _gather(lc, slots, self.args.window_size, end)

    def write_back(self, i: int, slots: slice | Tensor, part: LayerCache) -> None:
        if isinstance(slots, slice):  # a slice's view already wrote into the cache
            return
        full = self.layers[i]
        full.kv[slots, :part.kv.shape[1]] = part.kv
        if full.comp is not None:
            full.comp.scatter_(slots, part.comp)
        if full.index_kv is not None:
            full.index_kv[slots, :part.index_kv.shape[1]] = part.index_kv
            full.index_comp.scatter_(slots, part.index_comp)

    def check_room(self, slots: slice | Tensor, start_pos: Tensor, n_new: int, pool_writes: bool = True) -> None:
        end = int(start_pos.max()) + n_new
        if end > self.max_seq_len:
            raise ContextLengthError(f"request needs {end} positions but the cache holds max_seq_len="
                                     f"{self.max_seq_len}")

    def nbytes(self) -> int:
        total = 0
        for lc in self.layers:
            ts = [lc.kv, lc.index_kv] + [t for s in (lc.comp, lc.index_comp) if s is not None for t in s.tensors()]
            total += sum(t.numel() * t.element_size() for t in ts if t is not None)
        return total
