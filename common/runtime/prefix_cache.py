"""Prefix (context) caching: the KV of earlier prompts' full blocks, reused by later prompts that start the same way.

What a V4 sequence needs to continue at position P (a multiple of `block_tokens`, itself a multiple of every
compression ratio, so no compressor has a block in progress at P):
  - the KV pool blocks before P (common/model/cache.py): block k holds the `block_tokens / ratio` compressed
    entries of each compressed layer and the `block_tokens / 4` indexer keys of each CSA layer for tokens
    [k * block_tokens, (k + 1) * block_tokens). An entry keeps its block alive with a pool reference, and a hit
    installs the very same block ids in the new slot's table (`KVCache.set_blocks`): shared, never copied;
  - a snapshot of the per-sequence state at P (`Entry.snapshot`, kept only at chosen boundaries), every layer's
    (the MTP layer's included):
      the window ring, all W rows (position p sits in row p % W; continuation reads positions P-W+1 .. P-1),
      the ratio-4 compressors' look-back block (main and indexer): the raw K and gate scores of the block ending
      at P (its rows of the state's two-block ring, `CompressorState.rows`), which the entry of the block starting
      at P pools through its first c channels. Nothing else of a compressor: at P % ratio == 0 no row of the block
      in progress has been fed, and Compressor.forward reads its rows [0, start % ratio) only (the rows above are
      stale from any earlier chunk).
    For speculative requests also the main model's last-block streams at position P-1: the MTP layer lags the main
    model by one position (engine_runner.prefill_speculative) and is fed position P-1 with the next chunk.
    A snapshot taken from a plain request has no MTP state (its MTP layer was never fed); speculative requests
    only hit snapshots that have it.

Keys (vLLM's design, https://docs.vllm.ai/en/latest/design/prefix_caching/): block i's key hashes its parent's key
and its own token ids, so it names the whole prefix [0, (i+1) * block_tokens) in 32 bytes. The hash is SHA-256 (as
vLLM's default `prefix_caching_hash_algo`, vllm/config/cache.py): a collision would hand one prompt another
prompt's KV, a silent wrong answer, so a table hash like Python's hash() (64 bits, built for speed, not against
collisions) is not enough; its cost, ~12 us per block of 128 ids on these CPUs, is noise beside a prefill.

Where snapshots are kept (each costs the W x D ring of every layer plus fp32 look-back states: 5.5 blocks' bytes on
the tiny model in fp32, 7.5 on V4-Flash in bf16, measured with the layouts of common/model/cache.py; so one every
block would cost several times the blocks, one per 2048 tokens about +50% on Flash):
at every multiple of `snapshot_interval` tokens inside a prompt and at the last block boundary before its end
(`boundaries`). A later prompt resumes at the longest cached prefix that has a snapshot and is shorter than itself
(at least its last token is computed, for logits to sample from), so a repeated prompt resumes at its last block
boundary and a prompt that shares only a prefix recomputes fewer than `snapshot_interval` tokens of it. And where
prompts diverge: the keys (only) of every looked-up prompt's full blocks are remembered (`seen`, 32 bytes a
block), so a prompt whose blocks match an earlier prompt's beyond the last snapshot also snapshots at the end of
that match; the next prompt over the same document then resumes there (shared document, different questions:
the second recomputes up to one interval, the third none). Blocks are kept only up to a snapshot (blocks past the
last snapshot could not be resumed from).

Eviction: LRU under a byte budget (the blocks' bytes + snapshots), and on demand when the pool's free list runs
short (`KVCache.reclaim`, called by the allocator): cached blocks nobody else holds count as free. An entry whose
block a running request also holds (refcount > 1) is never evicted. A hit refreshes its path leaf first, so on one
path a child is always older than its parent and the tail of a prefix goes before its head (vLLM frees a request's
blocks in reverse order for the same reason).

Persistence (`save` / `load`): one safetensors file with every entry's keys, rows and snapshots, the model
fingerprint and a SHA-256 of the tensors (names, dtypes, shapes, bytes); a file from another model or with changed
bytes is refused (PrefixCacheFileError: one line naming the file and what did not match).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dsv4.common.model.cache import KVCache

ROOT_KEY = bytes(32)  # the parent of block 0
SEEN_KEYS = 1 << 16  # block keys remembered to find where prompts diverge (2 MiB of keys)
FILE_FORMAT = "dsv4-prefix-cache-1"


class PrefixCacheFileError(ValueError):
    """A persisted prefix cache that cannot be used here (unreadable, another model, modified)."""


def block_keys(tokens: list[int], block_tokens: int) -> list[bytes]:
    """Chain keys of every full block of `tokens`: key_i = sha256(key_{i-1} || ids of block i as int64 LE)."""
    keys, parent = [], ROOT_KEY
    for i in range(len(tokens) // block_tokens):
        h = hashlib.sha256(parent)
        h.update(array("q", tokens[i * block_tokens:(i + 1) * block_tokens]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class Entry:
    key: bytes
    parent: bytes
    index: int  # block index: tokens [index * block_tokens, (index + 1) * block_tokens)
    block: int  # the KV pool block id (this entry holds one reference to it)
    snapshot: dict[str, Tensor] | None = None  # the state at the block's end (see the module docstring)
    has_mtp: bool = False  # the snapshot holds the MTP layer's ring and the pending streams
    nbytes: int = field(default=0)  # the block's bytes + the snapshot's


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class PrefixCacheOptions:
    """What `--prefix-cache` / `--prefix-cache-bytes` / `--prefix-cache-dir` ask for (the engine builds the cache
    with its KV cache)."""
    budget_bytes: int = 1 << 30
    snapshot_interval: int = 2048  # a multiple of the KV pool's block_tokens
    fingerprint: str = ""  # model_fingerprint(...): persisted caches of another model are refused
    path: str | None = None  # the persisted cache file: loaded at start when present, written at the end

    def build(self, cache: KVCache) -> PrefixCache:
        return PrefixCache(cache, self.budget_bytes, cache.block_tokens, self.snapshot_interval, self.fingerprint)


@dataclass
class PrefixStats:
    hits: int = 0  # lookups that resumed from a cached prefix
    misses: int = 0
    hit_tokens: int = 0  # prompt tokens not prefilled thanks to hits
    evicted_blocks: int = 0


class PrefixCache:
    """The cached blocks of one KVCache (its layer layout), keyed by prefix hash, LRU under `budget_bytes`."""

    def __init__(self, cache: KVCache, budget_bytes: int, block_tokens: int = 128,
                 snapshot_interval: int = 2048, fingerprint: str = "") -> None:
        a = cache.args
        ratios = [lc.ratio for lc in cache.layers]
        bad = [r for r in ratios if r and block_tokens % r]
        if block_tokens < 1 or bad:
            raise ValueError(f"--block-tokens {block_tokens} must be a positive multiple of every compression "
                             f"ratio ({sorted(set(r for r in ratios if r))})")
        if snapshot_interval < block_tokens or snapshot_interval % block_tokens:
            raise ValueError(f"--prefix-snapshot-interval {snapshot_interval} must be a positive multiple of "
                             f"--block-tokens ({block_tokens})")
        self.with_mtp = len(cache.layers) > a.n_layers
        if self.with_mtp and any(lc.ratio for lc in cache.layers[a.n_layers:]):
            # the MTP layer lags by one position: its compressed block at P would be incomplete at a boundary
            raise NotImplementedError("prefix caching supports window-only MTP layers (as in the release) only")
        if cache.block_tokens != block_tokens:
            raise ValueError(f"prefix cache blocks of {block_tokens} tokens over a KV pool of {cache.block_tokens}")
        self.cache, self.args, self.block_tokens = cache, a, block_tokens
        self.block_bytes = sum(t.shape[-1] * t.element_size() * n for t, n in self._row_spans(0))
        self.budget_bytes, self.snapshot_interval, self.fingerprint = budget_bytes, snapshot_interval, fingerprint
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()  # least recently used first
        self.seen: OrderedDict[bytes, None] = OrderedDict()  # keys of looked-up prompts' blocks, LRU, no data
        self.nbytes = 0
        self.stats = PrefixStats()
        cache.reclaim = self.reclaim  # the allocator asks for blocks back when its free list runs short

    # -- what is cached where --------------------------------------------------------------------------------------
    def boundaries(self, prompt_len: int, shared: int = 0) -> list[int]:
        """Positions of a prompt of this length where a snapshot is kept (see the module docstring); `shared`:
        the tokens its blocks share with an earlier prompt (from `note_prompt`), also a boundary."""
        B, step = self.block_tokens, self.snapshot_interval
        out = set(range(step, prompt_len, step))
        last = (prompt_len - 1) // B * B
        if last > 0:
            out.add(last)
        if 0 < shared < prompt_len:
            out.add(shared)
        return sorted(out)

    def note_prompt(self, tokens: list[int]) -> int:
        """Tokens of `tokens` (its full blocks before the last token) whose blocks an earlier noted prompt or a
        cached entry shares; then remember this prompt's block keys."""
        keys = block_keys(tokens[:len(tokens) - 1], self.block_tokens)
        shared = 0
        while shared < len(keys) and (keys[shared] in self.seen or keys[shared] in self.entries):
            shared += 1
        for k in keys:
            self.seen[k] = None
            self.seen.move_to_end(k)
        while len(self.seen) > SEEN_KEYS:
            self.seen.popitem(last=False)
        return shared * self.block_tokens

    def lookup(self, tokens: list[int], need_mtp: bool = False) -> tuple[int, list[bytes]]:
        """(tokens to skip, keys of their blocks): the longest cached prefix shorter than `tokens` whose last block
        has a snapshot (with the MTP state when `need_mtp`); (0, []) on a miss. Changes nothing."""
        keys = block_keys(tokens[:len(tokens) - 1], self.block_tokens)
        best = 0
        for i, k in enumerate(keys):
            e = self.entries.get(k)
            if e is None:
                break
            if e.snapshot is not None and (e.has_mtp or not need_mtp):
                best = i + 1
        return best * self.block_tokens, keys[:best]

    # -- hits ------------------------------------------------------------------------------------------------------
    def install(self, slot: int, keys: list[bytes]) -> Tensor | None:
        """Put the cached prefix `keys` (from lookup) into `slot`: its blocks' rows, the snapshot at its end and
        the length. Returns the pending MTP streams [1, 1, n, d] when the snapshot has them."""
        entries = [self.entries[k] for k in keys]
        self.cache.set_blocks(slot, [e.block for e in entries])
        last = entries[-1]
        self._restore(slot, len(keys) * self.block_tokens, last.snapshot)
        self.cache.lengths[slot] = len(keys) * self.block_tokens
        for k in reversed(keys):  # leaf first: the head of the prefix ends most recent
            self.entries.move_to_end(k)
        self.stats.hits += 1
        self.stats.hit_tokens += len(keys) * self.block_tokens
        return last.snapshot.get("mtp.pending") if last.has_mtp else None

    # -- registration ----------------------------------------------------------------------------------------------
    def register(self, slot: int, tokens: list[int], mtp_pending: Tensor | None = None) -> None:
        """`slot` holds exactly `tokens` (a boundary: len(tokens) % block_tokens == 0): cache the blocks not yet
        cached and a snapshot at the end (with the MTP state when `mtp_pending`, the streams at the last position,
        is given), then evict down to the budget. A snapshot already there is kept, unless it lacks the MTP state
        this one has."""
        P = len(tokens)
        if P % self.block_tokens or int(self.cache.lengths[slot]) != P:
            raise ValueError(f"register: slot {slot} holds {int(self.cache.lengths[slot])} tokens, not the boundary "
                             f"{P}")
        keys = block_keys(tokens, self.block_tokens)
        ids = self.cache.blocks_of(slot)
        parent = ROOT_KEY
        for i, k in enumerate(keys):
            if k not in self.entries:  # else: an equal block is cached already (the slot's own copy goes with it)
                self.cache.pool.incref([ids[i]])
                self._add(Entry(k, parent, i, ids[i]))
            parent = k
        leaf = self.entries[keys[-1]]
        has_mtp = mtp_pending is not None and self.with_mtp
        if leaf.snapshot is None or (has_mtp and not leaf.has_mtp):
            self.nbytes -= leaf.nbytes
            leaf.snapshot, leaf.has_mtp = self._capture(slot, P, mtp_pending if has_mtp else None), has_mtp
            leaf.nbytes = self._size(leaf)
            self.nbytes += leaf.nbytes
        for k in reversed(keys):
            self.entries.move_to_end(k)
        self.evict(keep=set(keys))

    def _size(self, e: Entry) -> int:
        return self.block_bytes + sum(_nbytes(t) for t in (e.snapshot or {}).values())

    def _add(self, e: Entry) -> None:
        e.nbytes = self._size(e)
        self.entries[e.key] = e
        self.nbytes += e.nbytes

    def evictable(self) -> int:
        """Cached blocks nobody else holds: free for the allocator's purposes."""
        rc = self.cache.pool.refcount
        entries = list(self.entries.values())  # one C-level copy: /metrics calls this from the HTTP thread
        return sum(1 for e in entries if rc[e.block] == 1)

    def _drop(self, k: bytes) -> int:
        e = self.entries.pop(k)
        self.nbytes -= e.nbytes
        self.stats.evicted_blocks += 1
        return len(self.cache.pool.decref([e.block]))

    def evict(self, keep: set[bytes] = frozenset(), target: int | None = None) -> None:
        """Drop least recently used entries until the cache holds at most `target` bytes (default: the budget),
        never one whose block a running request holds too; `keep` (the path just registered) goes last."""
        target = self.budget_bytes if target is None else target
        rc = self.cache.pool.refcount
        for protect in (True, False):
            for k in [k for k in self.entries if not (protect and k in keep)]:
                if self.nbytes <= target:
                    return
                if rc[self.entries[k].block] == 1:
                    self._drop(k)

    def reclaim(self, n_blocks: int) -> int:
        """Free at least n_blocks pool blocks if the cache can (LRU first, shared blocks kept); returns how many."""
        rc, freed = self.cache.pool.refcount, 0
        for k in list(self.entries):
            if freed >= n_blocks:
                break
            if rc[self.entries[k].block] == 1:
                freed += self._drop(k)
        return freed

    def clear(self) -> None:
        """Drop every entry no running request shares."""
        self.evict(target=0)

    # -- the cache's layout ----------------------------------------------------------------------------------------
    def _row_spans(self, block: int) -> list[tuple[Tensor, int]]:
        """Pool block `block`'s rows in every layer: [(rows [n, D] view of the flat store, n)]."""
        out = []
        for st in self.cache.layers:
            if st.per_block:
                lo = st.pool_offset + block * st.per_block
                out.append((st.flat_kv[lo:lo + st.per_block], st.per_block))
            if st.flat_index_kv is not None:
                n = self.block_tokens // 4
                out.append((st.flat_index_kv[block * n:(block + 1) * n], n))
        return out

    def _block_rows(self, block: int) -> dict[str, Tensor]:
        return {f"rows.{j}": t for j, (t, _) in enumerate(self._row_spans(block))}

    def _state_views(self, slot: int, with_mtp: bool, P: int) -> dict[str, Tensor]:
        """Views of slot's per-sequence state that continuation at the boundary P reads (see the module docstring)."""
        W = self.args.window_size
        n = len(self.cache.layers) if with_mtp else self.args.n_layers
        views = {}
        for i, lc in enumerate(self.cache.layers[:n]):
            views[f"layers.{i}.ring"] = lc.ring[slot, :W]
            for part, st in (("comp", lc.comp), ("index_comp", lc.index_comp)):
                if st is not None and st.overlap:
                    back = st.rows(P // st.ratio - 1)  # the block ending at P
                    views[f"layers.{i}.{part}.prev_kv"] = st.kv[slot, back]
                    views[f"layers.{i}.{part}.prev_score"] = st.score[slot, back]
        return views

    def _capture(self, slot: int, P: int, mtp_pending: Tensor | None) -> dict[str, Tensor]:
        snap = {k: v.clone() for k, v in self._state_views(slot, mtp_pending is not None, P).items()}
        if mtp_pending is not None:
            snap["mtp.pending"] = mtp_pending.detach().clone()
        return snap

    def _restore(self, slot: int, P: int, snap: dict[str, Tensor]) -> None:
        for k, view in self._state_views(slot, "mtp.pending" in snap, P).items():
            view.copy_(snap[k])

    # -- persistence -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write every entry (LRU order kept) to one safetensors file with the fingerprint and a content hash."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        meta = []
        for j, e in enumerate(self.entries.values()):
            for name, t in self._block_rows(e.block).items():
                tensors[f"e{j}.{name}"] = t.contiguous().cpu()
            for name, t in (e.snapshot or {}).items():
                tensors[f"e{j}.snap.{name}"] = t.contiguous().cpu()
            meta.append([e.key.hex(), e.parent.hex(), e.index, e.snapshot is not None, e.has_mtp])
        entries = json.dumps(meta)
        header = {"format": FILE_FORMAT, "fingerprint": self.fingerprint, "block_tokens": str(self.block_tokens),
                  "entries": entries}
        header["content_sha256"] = content_hash(tensors, header)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=header)

    def load(self, path: str | Path) -> int:
        """Read a file written by `save` into this (empty or not) cache; returns the entries loaded. Refuses a file
        from another model or block size, or whose content does not hash to what it says (PrefixCacheFileError)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  safe_open has no iteration
        except Exception as e:  # noqa: BLE001  the library's own error, reported in one line
            raise PrefixCacheFileError(f"{path}: not a readable safetensors prefix cache ({type(e).__name__}: "
                                       f"{e})") from None
        if header.get("format") != FILE_FORMAT:
            raise PrefixCacheFileError(f"{path}: format {header.get('format')!r}, expected {FILE_FORMAT!r}")
        if header.get("fingerprint") != self.fingerprint:
            raise PrefixCacheFileError(f"{path}: written for model fingerprint {header.get('fingerprint')!r}, this "
                                       f"model is {self.fingerprint!r} (another model, dtype or kv_fp8_sim)")
        if header.get("block_tokens") != str(self.block_tokens):
            raise PrefixCacheFileError(f"{path}: block_tokens {header.get('block_tokens')}, this cache uses "
                                       f"{self.block_tokens}")
        want = header.get("content_sha256")
        if want != content_hash(tensors, header):
            raise PrefixCacheFileError(f"{path}: content hash does not match the one recorded (the file was "
                                       f"modified or truncated)")
        dev, dtype = self.cache.device, self.cache.dtype
        n = 0
        for j, (key, parent, index, has_snap, has_mtp) in enumerate(json.loads(header["entries"])):
            k = bytes.fromhex(key)
            if k in self.entries:
                continue
            if self.cache.pool.num_free < 1 and not self.reclaim(1):
                break  # the pool is full of blocks in use: the rest stays on disk
            block = self.cache.pool.alloc(1)[0]
            for name, view in self._block_rows(block).items():
                saved = tensors.get(f"e{j}.{name}")
                if saved is None or saved.shape != view.shape:
                    self.cache.pool.decref([block])
                    raise PrefixCacheFileError(f"{path}: entry {j} {name} has shape "
                                               f"{None if saved is None else list(saved.shape)}, this KV cache "
                                               f"expects {list(view.shape)}")
                view.copy_(saved.to(dev, dtype))
            snap_pre = f"e{j}.snap."
            snap = {name[len(snap_pre):]: t.to(dev) for name, t in tensors.items() if name.startswith(snap_pre)}
            self._add(Entry(k, bytes.fromhex(parent), index, block, snap if has_snap else None, has_mtp))
            n += 1
        self.evict()
        return n


def content_hash(tensors: dict[str, Tensor], header: dict[str, str]) -> str:
    """SHA-256 over the header fields (but this hash) and every tensor's name, dtype, shape and bytes, by name."""
    h = hashlib.sha256()
    for k in sorted(header):
        if k != "content_sha256":
            h.update(f"{k}={header[k]};".encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(weights_id: str, model) -> str:
    """What the cached rows depend on: the weights (a checkpoint or random-model fingerprint), the arithmetic
    (arch_hash covers kv_fp8_sim and every dimension), the activation dtype, weight mode and tensor parallelism."""
    par = getattr(model, "parallel", None)
    parts = [weights_id, model.args.arch_hash(), str(model.dtype), getattr(model, "weights_mode", ""),
             f"tp{getattr(par, 'tp_size', 1)}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# -- command line (dsv4 generate / dsv4 serve) -------------------------------------------------------------------------
PREFIX_CACHE_FILE = "prefix-cache.safetensors"


def parse_bytes(text: str) -> int:
    """'1073741824', '512M', '2G' (binary units) -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(t[-1:], 1)
    try:
        n = float(t[:-1] if t[-1:] in units else t) * scale
    except ValueError:
        raise ValueError(f"--prefix-cache-bytes {text!r}: expected a size like 1073741824, 512M or 2G") from None
    if n < 1:
        raise ValueError(f"--prefix-cache-bytes {text!r} must be at least 1 byte")
    return int(n)


def add_prefix_cache_arguments(g) -> None:
    g.add_argument("--prefix-cache", action="store_true",
                   help="reuse the KV cache of earlier prompts' shared prefixes (full blocks of 128 tokens plus a "
                        "snapshot of the window and compressor state): a prompt that starts like an earlier one "
                        "prefills only the rest; same logits as without it")
    g.add_argument("--prefix-cache-bytes", default=None, metavar="SIZE",
                   help="memory the prefix cache may hold (blocks + snapshots), least recently used evicted first, "
                        "e.g. 512M, 4G (default 1G; implies --prefix-cache)")
    g.add_argument("--prefix-cache-dir", default=None, metavar="DIR",
                   help=f"persist the prefix cache as DIR/{PREFIX_CACHE_FILE}: loaded at start when present (a "
                        f"file from another model, or modified, is refused), written at exit (implies "
                        f"--prefix-cache)")
    g.add_argument("--prefix-snapshot-interval", type=int, default=2048, metavar="TOKENS",
                   help="also snapshot the state every TOKENS prompt tokens (a multiple of 128; default 2048), so a "
                        "prompt that shares only part of a cached one recomputes fewer than TOKENS of it")


def prefix_cache_wanted(ns) -> bool:
    return bool(getattr(ns, "prefix_cache", False) or getattr(ns, "prefix_cache_bytes", None)
                or getattr(ns, "prefix_cache_dir", None))


def check_prefix_cache_arguments(ns) -> None:
    """The prefix-cache flags' checks, before the model loads (one line naming the flag)."""
    if not prefix_cache_wanted(ns):
        return
    if ns.prefix_cache_bytes:
        parse_bytes(ns.prefix_cache_bytes)
    interval = ns.prefix_snapshot_interval
    if interval < 128 or interval % 128:
        raise ValueError(f"--prefix-snapshot-interval {interval} must be a positive multiple of 128")
    d = ns.prefix_cache_dir
    if d and Path(d).exists() and not Path(d).is_dir():
        raise ValueError(f"--prefix-cache-dir {d}: not a directory")


def prefix_cache_options(ns, model) -> PrefixCacheOptions | None:
    """The options the flags ask for (None: off), with the model fingerprint persisted caches are checked by."""
    if not prefix_cache_wanted(ns):
        return None
    from dsv4.common.runtime.loading import weights_fingerprint

    check_prefix_cache_arguments(ns)
    budget = parse_bytes(ns.prefix_cache_bytes) if ns.prefix_cache_bytes else PrefixCacheOptions.budget_bytes
    path = str(Path(ns.prefix_cache_dir) / PREFIX_CACHE_FILE) if ns.prefix_cache_dir else None
    return PrefixCacheOptions(budget_bytes=budget, snapshot_interval=ns.prefix_snapshot_interval,
                              fingerprint=model_fingerprint(weights_fingerprint(ns), model), path=path)
