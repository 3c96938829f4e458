"""KV cache for incremental decoding: plain tensors per layer, owned by the caller, never hidden in modules.

Layout per attention layer (spec 5.7):
  kv        [Bmax, W + max_seq_len // ratio, D]  act dtype. Rows [0, W): the sliding-window ring (the token at
            absolute position p lives in row p % W). Rows W + j: compressed entry j (block j of `ratio` tokens).
  comp      the compressor's pending state (ratio != 0): the raw K and gate-score rows of the block in progress
            (row p % ratio) and, for the overlapping ratio-4 compressor, the last complete block (look-back half).
  index_kv  [Bmax, max_seq_len // 4, D_I] the lightning indexer's compressed keys (ratio 4 only),
            already Hadamard-rotated and FP4-simulated; index_comp is its compressor's state.
`lengths[b]` counts the tokens cached for batch slot b; the next token of slot b has position lengths[b].

Slots: a forward names its sequences either by a slice (a view: the layers write straight into the cache) or by an
index tensor of any slots (continuous batching: the rows of one forward sit wherever their requests were admitted).
An index tensor gathers a copy of those slots' rows up to the forward's end position (`layer_for`) and writes it
back afterwards (`write_back`), so the model's arithmetic sees the same [B, ...] tensors either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsv4.common.model.config import ModelArgs


class ContextLengthError(ValueError):
    """A request would exceed the cache's max_seq_len."""


@dataclass
class CompressorState:
    kv: Tensor  # [Bmax, m, k*c] fp32, block in progress (row = position % m)
    score: Tensor  # [Bmax, m, k*c] fp32, gate logits + ape of the same rows
    prev_kv: Tensor | None  # [Bmax, m, 2c] fp32, last complete block (overlap only)
    prev_score: Tensor | None  # [Bmax, m, 2c] fp32, -inf before the first block

    @classmethod
    def allocate(cls, batch: int, ratio: int, head_dim: int, device: torch.device) -> CompressorState:
        overlap = ratio == 4
        width = (2 if overlap else 1) * head_dim
        kv = torch.zeros(batch, ratio, width, device=device)
        score = torch.full((batch, ratio, width), float("-inf"), device=device)
        if not overlap:
            return cls(kv, score, None, None)
        return cls(kv, score, torch.zeros_like(kv), torch.full_like(score, float("-inf")))

    def view(self, slots: slice) -> CompressorState:
        return CompressorState(self.kv[slots], self.score[slots],
                               None if self.prev_kv is None else self.prev_kv[slots],
                               None if self.prev_score is None else self.prev_score[slots])

    def gather(self, idx: Tensor) -> CompressorState:
        return CompressorState(*(None if t is None else t[idx] for t in self._tensors()))

    def scatter_(self, idx: Tensor, part: CompressorState) -> None:
        for full, t in zip(self._tensors(), part._tensors(), strict=True):
            if full is not None:
                full[idx] = t

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return self.kv, self.score, self.prev_kv, self.prev_score


@dataclass
class LayerCache:
    ratio: int
    kv: Tensor
    comp: CompressorState | None = None
    index_kv: Tensor | None = None
    index_comp: CompressorState | None = None

    def view(self, slots: slice) -> LayerCache:
        return LayerCache(
            self.ratio, self.kv[slots],
            None if self.comp is None else self.comp.view(slots),
            None if self.index_kv is None else self.index_kv[slots],
            None if self.index_comp is None else self.index_comp.view(slots),
        )

    def gather(self, idx: Tensor, window: int, end: int) -> LayerCache:
        """A copy of slots `idx` [B] holding all that positions < end can touch: the ring, the compressed entries
        of the blocks complete before `end`, the indexer keys likewise, and the (small) compressor states."""
        rows = window + (end // self.ratio if self.ratio else 0)
        return LayerCache(
            self.ratio, self.kv[idx, :rows],
            None if self.comp is None else self.comp.gather(idx),
            None if self.index_kv is None else self.index_kv[idx, :end // 4],
            None if self.index_comp is None else self.index_comp.gather(idx),
        )

    def scatter_(self, idx: Tensor, part: LayerCache) -> None:
        """Write a gathered copy back (after the forward changed it)."""
        self.kv[idx, :part.kv.shape[1]] = part.kv
        if self.comp is not None:
            self.comp.scatter_(idx, part.comp)
        if self.index_kv is not None:
            self.index_kv[idx, :part.index_kv.shape[1]] = part.index_kv
            self.index_comp.scatter_(idx, part.index_comp)


class KVCache:
    """All layers' caches for `max_batch` sequences of up to `max_seq_len` tokens."""

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
        lc = LayerCache(ratio, torch.zeros(B, rows, a.head_dim, dtype=self.dtype, device=dev))
        if ratio:
            lc.comp = CompressorState.allocate(B, ratio, a.head_dim, dev)
        if ratio == 4:
            lc.index_kv = torch.zeros(B, self.max_seq_len // 4, a.index_head_dim, dtype=self.dtype, device=dev)
            lc.index_comp = CompressorState.allocate(B, 4, a.index_head_dim, dev)
        return lc

    def layer_for(self, i: int, slots: slice | Tensor, end: int) -> LayerCache:
        """Layer i's cache for a forward over `slots` that ends before position `end` (see the module docstring)."""
        lc = self.layers[i]
        return lc.view(slots) if isinstance(slots, slice) else lc.gather(slots, self.args.window_size, end)

    def write_back(self, i: int, slots: slice | Tensor, part: LayerCache) -> None:
        if not isinstance(slots, slice):  # a slice's view already wrote into the cache
            self.layers[i].scatter_(slots, part)

    def check_room(self, slots: slice | Tensor, start_pos: Tensor, n_new: int) -> None:
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

    def reset(self, slots: slice | None = None) -> None:
        """Forget the sequences in `slots` (the compressor state is re-initialised at position 0 anyway)."""
        self.lengths[slots or slice(None)] = 0

    def nbytes(self) -> int:
        total = 0
        for lc in self.layers:
            for t in (lc.kv, lc.index_kv):
                if t is not None:
                    total += t.numel() * t.element_size()
            for st in (lc.comp, lc.index_comp):
                if st is not None:
                    for t in (st.kv, st.score, st.prev_kv, st.prev_score):
                        if t is not None:
                            total += t.numel() * t.element_size()
        return total


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
