"""Checkpoint files: reading the official DeepSeek-V4 safetensors layouts into the model (spec section 7), validated
against the config before anything is copied. Writing deterministic random checkpoints in the Hugging Face layout
(`make_checkpoint`, `dsv4 make-checkpoint`) is writer.py; the names and split rules are layout.py.

Layouts read:
- HF: sharded `model-0000K-of-0000N.safetensors` + `model.safetensors.index.json` (or unindexed `*.safetensors`),
  short names (`layers.0.attn.wq_a.weight`); long HF names and a `model.` prefix are accepted too.
- The official converted model-parallel format `model{rank}-mp{N}.safetensors` (inference/convert.py): for N > 1 the
  column-parallel tensors are split along dim 0, the row-parallel ones along dim 1, routed experts by index; one
  process reassembles them. convert.py also dequantises wo_a to bf16 and may store FP4 experts as F4.

Memory: shards are opened with safe_open (memory-mapped) and read one tensor at a time, so the peak is about the
model's parameters plus one tensor (and its dequantisation temporaries) plus at most `remap_bytes` of mapped pages.
Nothing is copied into a model before every header (names, dtypes, shapes, shard files) has been validated.
No pickle anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from dsv4.common.checkpoint.layout import (
    EXPERT_NAME,
    CheckpointError,
    TensorSpec,
    checkpoint_layout,
    expert_index,
    tp_split_dim,
)
from dsv4.common.checkpoint.load import load_tensor_into, model_target, model_targets
from dsv4.common.checkpoint.writer import CONFIG_FILE, INDEX_FILE
from dsv4.common.model.config import FP8_BLOCK, HF_FIELD_MAP, ConfigError, ModelArgs
from dsv4.common.model.parallel import ParallelConfig

_MP_FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors$")

# long HF / legacy name segments -> the release's short names (convert.py's renames and its V3-era mapping; matched
# per dotted segment, so e.g. "mlp" inside another word is left alone)
SEGMENT_RENAMES = {
    "self_attn": "attn",
    "mlp": "ffn",
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
    "weight_scale_inv": "scale",
    "e_score_correction_bias": "bias",
    "embed_tokens": "embed",
    "lm_head": "head",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_layernorm": "kv_norm",
}

# official model parallelism (convert.py's mapping): module name -> split dim; 0 = column-parallel (output rows),
# 1 = row-parallel (input columns). A weight's scale is split along the same dim. Everything else is replicated,
# routed experts are distributed by index instead.
# safetensors dtypes accepted per TensorSpec.kind. Dense values convert exactly into the model's dtype whatever float
# width they came in; quantised formats must be exactly what the config declares.
_ACCEPTED = {
    "dense": ("BF16", "F16", "F32"),
    "fp32": ("F32", "BF16", "F16"),
    "fp8": ("F8_E4M3",),
    "fp4": ("I8", "F4"),  # F4: convert.py views packed FP4 as float4_e2m1fn_x2
    "scale": ("F8_E8M0", "F32"),  # F32: scale_fmt fp32 checkpoints
    "index": ("I32", "I64"),  # tid2eid: both seen in third-party probes of the release (spec 7.1)
}
_KIND_HINT = {
    "dense": "the config declares this tensor unquantised (bf16)",
    "fp32": "an fp32 tensor",
    "fp8": "the config declares FP8 e4m3 weights (quantization_config)",
    "fp4": "the config declares packed FP4 routed experts (expert_dtype fp4)",
    "scale": "UE8M0 block scales",
    "index": "token -> expert ids",
}


# -- names -------------------------------------------------------------------------------------------------------------
def canonical_name(key: str) -> str | None:
    """The release's short name for a checkpoint key, or None for keys the model has no use for: the MTP copies of
    the embedding and head, which convert.py drops too (the model shares the main embed/head with MTP)."""
    name = key[len("model."):] if key.startswith("model.") else key
    name = ".".join(SEGMENT_RENAMES.get(part, part) for part in name.split("."))
    if name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight")):
        return None
    return name


def tp_slice(name: str, shape: Iterable[int], tp_rank: int, tp_size: int) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the part of tensor `name` (of full `shape`) that tensor-parallel rank `tp_rank` of
    `tp_size` holds, or None when every rank holds all of it. Equal contiguous chunks, as convert.py cuts them."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
    dim = tp_split_dim(name)
    if tp_size == 1 or dim is None:
        return None
    n = tuple(shape)[dim]
    if n % tp_size:
        raise CheckpointError(f"tensor '{name}': dim {dim} of size {n} is not divisible by tp_size={tp_size}")
    chunk = n // tp_size
    return dim, tp_rank * chunk, (tp_rank + 1) * chunk


# -- reading -----------------------------------------------------------------------------------------------------------
@dataclass
class _Part:
    file: Path
    key: str  # the key as stored in the file
    shape: tuple[int, ...]  # torch storage shape (F4: packed bytes, [.., n/2])
    dtype: str  # safetensors dtype name


@dataclass
class Entry:
    """One canonical tensor: a single stored tensor, or (model-parallel files) parts concatenated along cat_dim."""

    name: str
    parts: list[_Part]
    cat_dim: int | None = None

    @property
    def file(self) -> Path:
        return self.parts[0].file

    @property
    def key(self) -> str:
        return self.parts[0].key

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        if self.cat_dim is not None:
            shape[self.cat_dim] = sum(p.shape[self.cat_dim] for p in self.parts)
        return tuple(shape)


def _narrow(t: Tensor, sl: tuple[int, int, int]) -> Tensor:
    """The (dim, start, stop) slice of a tensor read whole (tp_slice), as its own contiguous tensor."""
    dim, start, stop = sl
    return t.narrow(dim, start, stop - start).contiguous()


def _wrap(file: Path, what: str, e: Exception) -> CheckpointError:
    return CheckpointError(f"{file}: {what}: {e}")


def read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (torch storage shape, safetensors dtype)} from a file's header, reading no tensor data. Opening checks
    that the header parses and that the file covers every tensor's bytes (so truncation is caught here)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as h:
            out = {}
            for key in h.keys():
                sl = h.get_slice(key)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if dtype == "F4":  # the header counts 4-bit elements; torch holds them two per byte
                    shape = shape[:-1] + (shape[-1] // 2,)
                out[key] = (shape, dtype)
            return out
    except (SafetensorError, OSError) as e:
        raise _wrap(file, "not a readable safetensors file (truncated or corrupt?)", e) from None


class CheckpointReader:
    """Index of a checkpoint directory (or one .safetensors file) built from headers only; reads tensors lazily.

    `entries` maps canonical names to where they are stored. `read(name)` returns one tensor (FP8/FP4/E8M0 as
    stored, F4 viewed as int8 bytes); with tp_size > 1 only the rank's slice is read (safe_open's get_slice)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, Entry] = {}
        self.skipped: list[str] = []  # keys the model does not use (MTP copies of embed/head)
        self.files: list[Path] = []
        self.format = ""
        self.mp_size = 1
        # a file is re-opened after this many bytes have been read through its mapping: dropping the handle unmaps
        # the pages already read, so a multi-GB shard never becomes resident as a whole (header re-parse is cheap)
        self.remap_bytes = 64 * 2**20
        self._handles: dict[Path, Any] = {}
        self._mapped: dict[Path, int] = {}
        self._scan()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def close(self) -> None:
        for f in list(self._handles):
            self.release(f)

    def release(self, file: Path) -> None:
        """Drop a file's handle, unmapping its pages (they count in the resident set while mapped)."""
        self._handles.pop(file, None)
        self._mapped.pop(file, None)

    # -- scanning ----------------------------------------------------------------------------------------------------
    def _scan(self) -> None:
        p = self.path
        if p.is_file():
            self.format, self.files = "single", [p]
            self._add_file(p, read_header(p))
            return
        if not p.is_dir():
            raise CheckpointError(f"{p}: checkpoint path not found")
        if (p / INDEX_FILE).exists():
            self.format = "hf"
            self._scan_index(p / INDEX_FILE)
            return
        mp_files = [f for f in p.glob("model*-mp*.safetensors") if _MP_FILE.match(f.name)]
        if mp_files:
            self.format = "mp"
            self._scan_mp(mp_files)
            return
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{p}: no {INDEX_FILE} and no *.safetensors files")
        self.format, self.files = "single" if len(files) == 1 else "unindexed", files
        for f in files:
            self._add_file(f, read_header(f))

    def _add(self, file: Path, key: str, shape: tuple[int, ...], dtype: str,
             into: dict[str, list[tuple[int, _Part]]] | None = None, rank: int = 0) -> None:
        name = canonical_name(key)
        if name is None:
            self.skipped.append(key)
            return
        part = _Part(file, key, shape, dtype)
        if into is not None:
            into.setdefault(name, []).append((rank, part))
            return
        if name in self.entries:
            prev = self.entries[name]
            raise CheckpointError(f"{file}: tensor '{key}' and tensor '{prev.key}' ({prev.file}) are both "
                                  f"'{name}' after name normalisation")
        self.entries[name] = Entry(name, [part])

    def _add_file(self, file: Path, header: dict[str, tuple[tuple[int, ...], str]]) -> None:
        for key, (shape, dtype) in header.items():
            self._add(file, key, shape, dtype)

    def _scan_index(self, index: Path) -> None:
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _wrap(index, "not a readable JSON index", e) from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: expected {{\"weight_map\": {{tensor name: shard file}}}}")
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        # every shard must exist before anything is read
        for fname, keys in by_file.items():
            if not (index.parent / fname).is_file():
                raise CheckpointError(f"{index.parent / fname}: shard named by {index.name} is missing "
                                      f"(it should hold tensor '{keys[0]}' and {len(keys) - 1} more)")
        self.files = [index.parent / f for f in sorted(by_file)]
        for f in self.files:
            header = read_header(f)
            listed = by_file[f.name]
            for key in listed:
                if key not in header:
                    raise CheckpointError(f"{f}: tensor '{key}' is listed in {index.name} but not in this shard")
            extra = sorted(set(header) - set(listed))
            if extra:
                raise CheckpointError(f"{f}: tensor '{extra[0]}' is in this shard but not in {index.name}")
            self._add_file(f, header)

    def _scan_mp(self, mp_files: list[Path]) -> None:
        by_rank: dict[int, Path] = {}
        sizes = set()
        for f in mp_files:
            m = _MP_FILE.match(f.name)
            assert m is not None
            by_rank[int(m.group(1))] = f
            sizes.add(int(m.group(2)))
        if len(sizes) != 1:
            raise CheckpointError(f"{self.path}: model-parallel files of several sizes {sorted(sizes)}")
        n = self.mp_size = sizes.pop()
        for r in range(n):
            if r not in by_rank:
                raise CheckpointError(f"{self.path / f'model{r}-mp{n}.safetensors'}: missing (model-parallel rank "
                                      f"{r} of {n})")
        self.files = [by_rank[r] for r in range(n)]
        parts: dict[str, list[tuple[int, _Part]]] = {}
        for r, f in enumerate(self.files):
            for key, (shape, dtype) in read_header(f).items():
                self._add(f, key, shape, dtype, into=parts, rank=r)
        for name, held in parts.items():
            ranks = [r for r, _ in held]
            if len(set(ranks)) != len(ranks):
                raise CheckpointError(f"{held[0][1].file}: tensor '{name}' appears twice in one rank's file")
            if expert_index(name) is not None:  # each routed expert lives in exactly one rank's file
                if len(held) != 1:
                    raise CheckpointError(f"{held[1][1].file}: routed expert tensor '{name}' is also in "
                                          f"{held[0][1].file}; experts are split across ranks by index")
                self.entries[name] = Entry(name, [held[0][1]])
                continue
            if sorted(ranks) != list(range(n)):
                r = min(set(range(n)) - set(ranks))
                raise CheckpointError(f"{self.files[r]}: tensor '{name}' is missing from rank {r}'s file")
            held.sort(key=lambda rp: rp[0])
            dim = tp_split_dim(name) if n > 1 else None
            ordered = [p for _, p in held]
            for p in ordered[1:]:
                a, b = list(p.shape), list(ordered[0].shape)
                if dim is not None and len(a) == len(b) and dim < len(a):
                    a[dim] = b[dim] = 0
                if a != b or p.dtype != ordered[0].dtype:
                    raise CheckpointError(f"{p.file}: tensor '{p.key}' is {p.dtype} {list(p.shape)} but "
                                          f"{ordered[0].dtype} {list(ordered[0].shape)} in {ordered[0].file}")
            self.entries[name] = Entry(name, ordered if dim is not None else ordered[:1], dim)

    # -- reading -----------------------------------------------------------------------------------------------------
    def _handle(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            try:
                h = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise _wrap(file, "cannot open", e) from None
            self._handles[file] = h
        return h

    def _read_part(self, part: _Part, sl: tuple[int, int, int] | None) -> Tensor:
        h = self._handle(part.file)
        try:
            if sl is None or part.dtype == "F4":
                t = h.get_tensor(part.key)
            else:
                dim, start, stop = sl
                t = h.get_slice(part.key)[(slice(None),) * dim + (slice(start, stop),)]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _wrap(part.file, f"tensor '{part.key}'", e) from None
        self._mapped[part.file] = self._mapped.get(part.file, 0) + t.numel() * t.element_size()
        if self._mapped[part.file] > self.remap_bytes:
            self.release(part.file)
        if t.dtype == torch.float4_e2m1fn_x2:
            t = t.view(torch.int8)
        if sl is not None and part.dtype == "F4":
            t = _narrow(t, sl)
        return t

    def read(self, name: str, tp_rank: int = 0, tp_size: int = 1) -> Tensor:
        """Tensor `name` (canonical) as stored; with tp_size > 1, only the slice rank tp_rank holds (tp_slice)."""
        e = self.entries[name]
        sl = tp_slice(name, e.shape, tp_rank, tp_size)
        if sl is not None and e.dtype == "F8_E4M3" and (sl[2] - sl[1]) % FP8_BLOCK:
            raise CheckpointError(f"{e.file}: tensor '{e.key}': a {tp_size}-way split of dim {sl[0]} "
                                  f"({e.shape[sl[0]]}) cuts through {FP8_BLOCK}x{FP8_BLOCK} FP8 scale blocks")
        if len(e.parts) == 1:
            return self._read_part(e.parts[0], sl)
        full = torch.cat([self._read_part(p, None) for p in e.parts], dim=e.cat_dim)
        return full if sl is None else _narrow(full, sl)

    def names_by_file(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {f: [] for f in self.files}
        for name, e in self.entries.items():
            out[e.file].append(name)
        return out


# -- validation --------------------------------------------------------------------------------------------------------
def _count_field(field_name: str) -> str:
    hf = HF_FIELD_MAP.get(field_name)
    return f"{field_name}" + (f" ({hf} in config.json)" if hf and hf != field_name else "")


def _check_counts(reader: CheckpointReader, args: ModelArgs, source: str) -> None:
    """Layer, MTP and expert counts of the checkpoint against the config, so that a mismatched config reads as one."""
    checks = (("layers", re.compile(r"^layers\.(\d+)\."), args.n_layers, "n_layers"),
              ("MTP layers", re.compile(r"^mtp\.(\d+)\."), args.n_mtp_layers, "n_mtp_layers"),
              ("routed experts", EXPERT_NAME, args.n_routed_experts, "n_routed_experts"))
    for what, pattern, declared, field_name in checks:
        seen: dict[int, str] = {}
        for name in reader.entries:
            m = pattern.search(name)
            if m:
                seen.setdefault(int(m.group(1)), name)
        if not seen:
            continue
        top = max(seen)
        if top >= declared:
            e = reader.entries[seen[top]]
            raise CheckpointError(f"{e.file}: tensor '{e.key}' is for index {top} of {what}, but {source} declares "
                                  f"{_count_field(field_name)} = {declared}: the config does not match the checkpoint")
        if top + 1 < declared:
            raise CheckpointError(f"{reader.path}: the checkpoint has tensors for {top + 1} {what} but {source} "
                                  f"declares {_count_field(field_name)} = {declared}: the config does not match the "
                                  f"checkpoint (missing tensor e.g. for index {top + 1})")


def validate_checkpoint(reader: CheckpointReader, args: ModelArgs, source: str = "the config") -> None:
    """Check every tensor's presence, name, dtype and shape against the layout `args` declares, from the headers
    (plus the small tid2eid tables' value range). Raises CheckpointError naming the file and tensor."""
    layout = checkpoint_layout(args)
    _check_counts(reader, args, source)
    for name, e in reader.entries.items():
        if name not in layout:
            alias = f" (read as '{name}')" if name != e.key else ""
            raise CheckpointError(f"{e.file}: unexpected tensor '{e.key}'{alias}: the model declared by {source} "
                                  "has no such tensor")

    def dense_wo_a(name: str) -> bool:
        # convert.py dequantises wo_a to bf16 and drops its scale; the model keeps wo_a dense anyway
        w = reader.entries.get(name[: -len("scale")] + "weight")
        return name.endswith(".attn.wo_a.scale") and w is not None and w.dtype in _ACCEPTED["dense"]

    missing = [n for n in layout if n not in reader.entries and not dense_wo_a(n)]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{reader.path}: missing tensor(s) {missing[:8]}{more} (expected by {source})")
    for name, e in reader.entries.items():
        _check_entry(e, name, layout[name], layout, source)
    for name, e in reader.entries.items():
        if name.endswith(".tid2eid"):  # small ([vocab, k]); bad ids would only fail later, deep in a forward
            ids = reader.read(name)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= args.n_routed_experts):
                raise CheckpointError(f"{e.file}: tensor '{e.key}': expert ids must be in [0, "
                                      f"{args.n_routed_experts}), found [{int(ids.min())}, {int(ids.max())}]")


def _check_entry(e: Entry, name: str, spec: TensorSpec, layout: dict[str, TensorSpec], source: str) -> None:
    accepted = _ACCEPTED[spec.kind]
    if spec.kind == "fp8" and name.endswith(".attn.wo_a.weight"):
        accepted = accepted + _ACCEPTED["dense"]
    if e.dtype not in accepted:
        raise CheckpointError(f"{e.file}: tensor '{e.key}' has dtype {e.dtype}, expected {' or '.join(accepted)} "
                              f"({_KIND_HINT[spec.kind]}; from {source})")
    if tuple(e.shape) != tuple(spec.shape):
        hint = ""
        if spec.kind == "scale":
            w = layout.get(name[: -len("scale")] + "weight")
            hint = (" (FP4 scales are [out, in/32])" if w is not None and w.kind == "fp4"
                    else " (FP8 scales are [ceil(out/128), ceil(in/128)])")
        elif spec.kind == "fp4":
            hint = " (packed FP4: [out, in/2] bytes)"
        raise CheckpointError(f"{e.file}: tensor '{e.key}' has shape {list(e.shape)}, expected {list(spec.shape)}"
                              f"{hint} from {source}")


# -- loading -----------------------------------------------------------------------------------------------------------
def _experts_range(model: torch.nn.Module, stacked_name: str, targets: dict[str, Tensor]) -> tuple[int, int]:
    module = model.get_submodule(stacked_name.rsplit(".", 2)[0])
    offset = getattr(module, "offset", 0)
    return offset, offset + targets[stacked_name].shape[0]


def _load(model: torch.nn.Module, reader: CheckpointReader, source: str, progress: bool) -> None:
    validate_checkpoint(reader, model.args, source)  # headers only: nothing is copied before this passes
    targets = model_targets(model)
    filled: set[str] = set()
    par = getattr(model, "parallel", None) or ParallelConfig()
    tp_rank, tp_size = par.tp_rank, par.tp_size  # each rank reads only its tensor-parallel slices

    def get_scale(name: str) -> Tensor | None:
        return reader.read(name, tp_rank, tp_size) if name in reader.entries else None

    for file, names in reader.names_by_file().items():
        for name in tqdm(names, desc=f"loading {file.name}", unit="tensor", disable=not progress):
            if name.endswith(".scale"):
                continue  # read together with its weight
            stacked, expert = model_target(model, name)
            if expert is not None and stacked in targets:
                lo, hi = _experts_range(model, stacked, targets)
                if not lo <= expert < hi:
                    continue  # another expert-parallel rank's expert: never read
            got = load_tensor_into(model, targets, name, reader.read(name, tp_rank, tp_size), get_scale,
                                   source=str(file), sliced=True)
            if got:
                filled.add(got)
        reader.release(file)
    missing = sorted(set(targets) - filled - {n for n in targets if n.endswith(".scale")})
    if missing:  # validation makes this unreachable; kept so that a layout/model drift cannot pass silently
        raise CheckpointError(f"{reader.path}: model tensor(s) not filled: {missing[:8]}")


def load_into_model(model: torch.nn.Module, path: str | Path, progress: bool = True) -> torch.nn.Module:
    """Fill an existing Transformer from a checkpoint (any accepted layout), validated against `model.args`. The
    model's experts (offset, count) decide which routed experts are read; the others are skipped unread."""
    with CheckpointReader(path) as reader:
        _load(model, reader, "the model's args", progress)
    return model


def config_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory or file")
    return (p if p.is_dir() else p.parent) / CONFIG_FILE


def load_checkpoint(path: str | Path, ops: Any, dtype: torch.dtype | None = None, weights: str = "dequantized",
                    ep_rank: int = 0, ep_size: int = 1, max_seq_len: int | None = None,
                    max_batch_size: int | None = None, args: ModelArgs | None = None,
                    progress: bool = True, parallel: ParallelConfig | None = None) -> torch.nn.Module:
    """A Transformer built from `path`'s config.json (or `args`) and filled from its safetensors.

    weights "dequantized" turns FP8/FP4 into dense `dtype` at load; "quantized" keeps them for the backend's GEMMs.
    With ep_size > 1 the model holds, and the loader reads, only the routed experts of `ep_rank`; `parallel` (a full
    TP/EP layout) takes precedence over ep_rank/ep_size, and tensor-parallel slices are read with get_slice."""
    from dsv4.common.model.ops import default_dtype
    from dsv4.common.model.transformer import Transformer

    if args is None:
        cfg = config_path(path)
        try:
            args = ModelArgs.from_hf_config(cfg)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        source = str(cfg)
    else:
        source = "the given args"
    changes = {k: v for k, v in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)) if v}
    if max_seq_len and max_seq_len > args.max_position_embeddings:
        raise CheckpointError(f"max_seq_len {max_seq_len} (--max-seq-len) exceeds max_position_embeddings "
                              f"{args.max_position_embeddings} of {source}")
    if changes:
        args = args.replace(**changes)
    with CheckpointReader(path) as reader:
        validate_checkpoint(reader, args, source)  # fail before allocating a model
        if parallel is None:
            if not 0 <= ep_rank < ep_size:
                raise ValueError(f"ep_rank must be in [0, {ep_size}), got {ep_rank}")
            parallel = ParallelConfig(ep_size=ep_size, ep_rank=ep_rank)
        model = Transformer(args, ops, dtype=dtype or default_dtype(ops), weights=weights, parallel=parallel)
        _load(model, reader, source, progress)
    return model.to(ops.device)

