"""Which decode path is cheaper for a batch of one-token rows: the eager forward or the batched step.

The engine (common/runtime/engine_runner.py) sends a decode step of `--batched-decode-min-rows` (4) or more rows
through common/runtime/engine_decode.py's batched step, which feeds every row's compressors at once, each at its own
position, unless all rows sit at one position: the eager forward then runs its compressors once for the whole batch.
This script measures both paths on the same caches for rows at one position and at all-different positions, so that
rule (BatchedDecode.wants) rests on a number.

    python scripts/bench_decode_rows.py                        # prints a markdown section
    python scripts/bench_decode_rows.py --markdown BENCHMARKS.md    # also writes it (only this script's section)
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dsv4.common.bench.report import load_average, write_marked_section
from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.cache import KVCache
from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.runtime.engine_decode import BatchedDecode

PROMPT = 32  # the serving benchmark's prompt length (scripts/bench_serve.py)


def step_ms(model, rows: int, spread: bool, steps: int, reps: int) -> tuple[dict[str, list[float]], str]:
    """ms per decode step of `rows` rows, eager forward vs batched step, repetitions interleaved; and the path the
    engine takes for these rows (BatchedDecode.wants with the engine's default row threshold)."""
    lengths = [PROMPT + (3 * b if spread else 0) for b in range(rows)]
    msl = max(lengths) + steps * (reps + 1) + 8
    seq = torch.randint(2, 512, (rows, msl), generator=torch.Generator().manual_seed(0))
    base = KVCache(model.args, rows, msl, torch.float32)
    for b, n in enumerate(lengths):
        model(seq[b:b + 1, :n], base, slots=slice(b, b + 1))
    slots = torch.arange(rows)
    takes = "batched step" if BatchedDecode(model, base).wants(slots.tolist()) else "eager forward"
    times: dict[str, list[float]] = {"eager forward": [], "batched step": []}
    for rep in range(reps):
        for name in (list(times) if rep % 2 == 0 else list(times)[::-1]):
            cache = copy.deepcopy(base)
            batched = BatchedDecode(model, cache, min_rows=1) if name == "batched step" else None
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = seq[slots, cache.lengths[slots]]
                if batched is None:
                    model(tok[:, None], cache, slots=slots)
                else:
                    batched.step(tok, slots.tolist())
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return times, takes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="4,8,16", help="decode rows per step (comma-separated)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per repetition")
    p.add_argument("--reps", type=int, default=5, help="repetitions, the two paths interleaved")
    p.add_argument("--markdown", type=Path, default=None, help="also write the section into this file")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    args = load_named_config("tiny").replace(kv_fp8_sim="clamp")
    model = build_random_model(args, ReferenceOps(), torch.float32, seed=0)
    started, load_before = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load_average()
    out = ["## Decode rows: eager forward vs batched step (scripts/bench_decode_rows.py)", "",
           f"Command: `python scripts/bench_decode_rows.py{' --markdown ' + str(ns.markdown) if ns.markdown else ''}`"
           f" ({started}; load average before {load_before}, after {{after}}).", "",
           f"Embedded tiny model (random weights), fp32, reference ops, 1 thread, {platform.machine()}, torch "
           f"{torch.__version__}; {PROMPT}-token prompts, rows at one position or 3 tokens apart; {ns.steps} steps "
           f"per repetition, {ns.reps} repetitions interleaved; ms per decode step, median (min-max).", "",
           "| rows | positions | eager forward | batched step | batched / eager | engine takes |",
           "|---:|---|---:|---:|---:|---|"]
    for rows in (int(r) for r in ns.rows.split(",")):
        for spread in (False, True):
            t, takes = step_ms(model, rows, spread, ns.steps, ns.reps)
            e, b = (statistics.median(t[k]) for k in ("eager forward", "batched step"))
            cell = {k: f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for k, v in t.items()}
            out.append(f"| {rows} | {'all different' if spread else 'one'} | {cell['eager forward']} | "
                       f"{cell['batched step']} | {b / e:.2f} | {takes} |")
            print(out[-1], file=sys.stderr, flush=True)
    section = "\n".join(out).replace("{after}", load_average()) + "\n"
    print(section)
    if ns.markdown:
        write_marked_section(ns.markdown, "bench_decode_rows", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
