"""Writing checkpoints: deterministic random checkpoints of (config, quant, seed) in exactly the Hugging Face layout
(spec section 7): sharded `model-0000K-of-0000N.safetensors`, `model.safetensors.index.json`, config.json and the
tokenizer files, plus `dsv4 make-checkpoint`. The reader (common/checkpoint.py) takes what this writes; everything
here is importable from there too. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv4.common.checkpoint.layout import (
    QUANT_MODES,
    CheckpointError,
    TensorSpec,
    args_for_quant,
    checkpoint_layout,
    random_checkpoint,
)
from dsv4.common.model.config import ModelArgs, load_named_config

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_DEFAULT_MAX_SHARD = 5 * 10**9  # what HF's save_pretrained uses ("5GB")
_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I32": 4, "I64": 8}
_TORCH_DTYPE_NAME = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
                     torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.int8: "I8",
                     torch.int32: "I32", torch.int64: "I64"}


def spec_nbytes(spec: TensorSpec) -> int:
    n = _DTYPE_BYTES[spec.dtype]
    for s in spec.shape:
        n *= s
    return n


def shard_plan(layout: dict[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """Tensors (in layout order) grouped greedily into shards of at most max_shard_bytes (a larger tensor gets a
    shard of its own), as save_pretrained does."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in layout.items():
        n = spec_nbytes(spec)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


@dataclass
class WrittenCheckpoint:
    path: Path
    shards: list[Path] = field(default_factory=list)
    total_size: int = 0
    n_tensors: int = 0


def make_checkpoint(args: ModelArgs, out_dir: str | Path, quant: str = "none", seed: int = 0,
                    shard_size_bytes: int | None = None, tokenizer: bool = True,
                    structured: bool = False) -> WrittenCheckpoint:
    """Write the deterministic random checkpoint of (args, quant, seed) in the HF layout: sharded
    model-0000K-of-0000N.safetensors, model.safetensors.index.json, config.json and tokenizer files.

    quant: "none" (bf16), "fp8" (FP8 linears and experts) or "fp4" (the release: FP8 linears, FP4 experts). The
    default shard size is a quarter of the total (capped at 5 GB), so even the tiny model gets several shards.
    `structured` writes the structured random weights (layout.random_checkpoint). Memory: one shard at a time."""
    a = args_for_quant(args, quant)
    layout = checkpoint_layout(a)
    total = sum(spec_nbytes(s) for s in layout.values())
    limit = shard_size_bytes if shard_size_bytes else min(_DEFAULT_MAX_SHARD, max(1, -(-total // 4)))
    shards = shard_plan(layout, limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    file_of = {n: names[i] for i, group in enumerate(shards) for n in group}
    written = WrittenCheckpoint(out, total_size=total, n_tensors=len(layout))
    k, buffer = 0, {}
    for name, t in random_checkpoint(a, seed, structured):
        spec = layout[name]
        if tuple(t.shape) != spec.shape or _TORCH_DTYPE_NAME.get(t.dtype) != spec.dtype:  # generator/layout drift
            raise CheckpointError(f"random checkpoint: tensor '{name}' is {t.dtype} {list(t.shape)}, layout says "
                                  f"{spec.dtype} {list(spec.shape)}")
        buffer[name] = t
        if len(buffer) == len(shards[k]):
            save_file(buffer, str(out / names[k]), metadata={"format": "pt"})
            written.shards.append(out / names[k])
            k, buffer = k + 1, {}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(file_of.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / CONFIG_FILE).write_text(json.dumps(a.to_hf_config(), indent=2) + "\n")
    if tokenizer:
        from dsv4.common.checkpoint.tokenizer import save_tokenizer

        save_tokenizer(out, a)
    return written


# -- command line ------------------------------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '64MiB', '123456' -> bytes (HF's convention: GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 64MiB, 1000000)")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def add_make_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="config name (tiny, flash, pro) or YAML/JSON path")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if absent)")
    parser.add_argument("--quant", default="fp4", choices=QUANT_MODES,
                        help="weight formats: none = bf16; fp8 = FP8 linears and experts; fp4 = as released "
                             "(FP8 linears, FP4 experts). Default: fp4")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the embedded default uses 0)")
    parser.add_argument("--weight-init", choices=("plain", "structured"), default="plain",
                        help="structured: weights vary per quantisation block and have outlier channels, so "
                             "number-format bugs change the output (for parity checks)")
    parser.add_argument("--shard-size", type=parse_size, default=None, metavar="SIZE",
                        help="max shard size, e.g. 5GB or 2MiB (default: a quarter of the total, at most 5GB)")


def run_make_checkpoint(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {ns.out}: exists and is not a directory")
    if out.is_dir() and any(out.glob("*.safetensors")):
        raise ValueError(f"--out {ns.out}: already holds safetensors files; choose an empty or new directory")
    args = load_named_config(ns.config)
    w = make_checkpoint(args, ns.out, quant=ns.quant, seed=ns.seed, shard_size_bytes=ns.shard_size,
                        structured=ns.weight_init == "structured")
    print(f"wrote {w.path}: {w.n_tensors} tensors, {w.total_size / 1e6:.1f} MB in {len(w.shards)} shard(s), "
          f"quant={ns.quant}, seed={ns.seed}")
    return 0
