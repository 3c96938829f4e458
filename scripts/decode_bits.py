"""Bit-for-bit snapshot of decode steps on every backend row of scripts/count_decode_ops.py, to show that a change
to the graph, a backend or the cache layout leaves the numbers as they were.

    python scripts/decode_bits.py save /tmp/before.safetensors     # on the tree before the change (~2 min, 2 cores)
    python scripts/decode_bits.py compare /tmp/before.safetensors  # after it: every tensor that differs, exit 1 if any
    python scripts/decode_bits.py save /tmp/b.safetensors --only 950dt   # the rows whose label contains 950dt

Per row (backend, chip, dtype, weights): the tiny model with random weights, a 300-token prompt through the
reference, then 4 decode steps of batch 2 on the backend, once through the static step and once through the eager
forward (fresh caches). Saved (safetensors, "row label::tensor name"): the logits of every step and every tensor of
the cache afterwards (KV rows, indexer keys, compressor states, ...). A bf16 row can hide an fp32 ulp in an op's
intermediate: the op tests (tests/test_reference_ops.py, tests/test_ascend_*.py) compare the changed op itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs (shared/notes/toolchain.md)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import count_decode_ops as rows  # noqa: E402

from dsv4.common.checkpoint.load import build_random_model  # noqa: E402
from dsv4.common.model.config import load_named_config  # noqa: E402
from dsv4.common.model.reference import ReferenceOps  # noqa: E402
from dsv4.common.runtime.static_decode import StaticDecoder  # noqa: E402

BATCH, PROMPT, STEPS = 2, 300, 4


def _tensors(obj: object, name: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """Every tensor reachable from a cache object (its dataclasses, lists and dicts), by attribute path."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[name] = obj.detach().clone()
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{name}[{i}]", out, seen)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{name}.{k}", out, seen)
    elif type(obj).__module__.startswith("dsv4") and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            _tensors(v, f"{name}.{k}", out, seen)


def run_row(backend: str, chip: str | None, dtype: torch.dtype, weights: str, changes: dict | None = None) -> dict:
    args = load_named_config("tiny").replace(**(changes or {}))
    model = build_random_model(args, ReferenceOps(), dtype, seed=0, weights=weights)
    toks = torch.randint(2, args.vocab_size, (BATCH, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))
    out: dict[str, torch.Tensor] = {}
    for path in ("static", "eager"):
        model.ops = ReferenceOps()
        cache = model.new_cache(BATCH, 1024)
        model(toks[:, :PROMPT], cache)
        model.ops = rows.make_ops(backend, chip)
        decoder = StaticDecoder(model, cache, batch_sizes=(BATCH,), capture="eager")
        for i in range(PROMPT, PROMPT + STEPS):
            logits = model(toks[:, i:i + 1], cache) if path == "eager" else decoder.step(toks[:, i], list(range(BATCH)))
            out[f"{path}.logits{i}"] = logits.detach().clone()
        _tensors(cache, f"{path}.cache", out, set())
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() == 1:  # FP8 codes: compare the bytes
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return bool(torch.equal(a, b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("save", "compare"))
    p.add_argument("file", type=Path)
    p.add_argument("--only", default=None, help="the rows whose label contains this text")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    snap = {label: run_row(backend, chip, dtype, weights, *changes)
            for label, backend, chip, dtype, weights, *changes in rows.CASES
            if a.only is None or a.only in label}
    if a.mode == "save":
        save_file({f"{label}::{name}": t.contiguous() for label, ts in snap.items() for name, t in ts.items()},
                  str(a.file))
        print(f"saved {sum(len(v) for v in snap.values())} tensors of {len(snap)} rows to {a.file}")
        return 0
    old: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(a.file)).items():
        label, name = key.split("::", 1)
        old.setdefault(label, {})[name] = t
    bad = 0
    for label, now in snap.items():
        then = old.get(label, {})
        for name in sorted(set(then) | set(now)):
            x, y = then.get(name), now.get(name)
            if x is None or y is None:
                print(f"{label}: {name} only {'after' if x is None else 'before'}")
            elif not _same(x, y):
                detail = (f"{x.dtype}{tuple(x.shape)} -> {y.dtype}{tuple(y.shape)}" if x.shape != y.shape
                          or x.dtype != y.dtype else f"max |diff| {(x.float() - y.float()).abs().nan_to_num().max():g}")
                print(f"{label}: {name} differs ({detail})")
            else:
                continue
            bad += 1
    print(f"{bad} of {sum(len(v) for v in snap.values())} tensors differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
