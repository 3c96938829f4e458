"""Benchmark the KV block pool (common/model/cache.py) against the per-slot layout it replaced (cache_dense.py).

(a) Capacity: which mixes of short and long sequences fit in a pool of the SAME bytes as the slot layout. The slot
    layout holds max_batch sequences whatever their length; the pool holds blocks. Counted through the real allocator
    (KVCache.ensure_capacity until PoolExhausted) on the meta device (shapes only: nothing is allocated), with the
    pool's extra slots (rings and compressor states, per slot) paid out of the same byte budget.
(b) is the prefix cache's (another benchmark).
(c) Decode speed: ms per decode step of the embedded tiny model (random weights, fp32, CPU) through the block pool
    (the eager one-token forward writes and attends over the pool in place, through block-table-translated flat
    rows) vs the per-slot layout, in one run, repetitions interleaved (the CPU is shared), medians; and the engine's
    default for 4+ decode rows at different positions beside them: the batched step (runtime/engine_decode.py),
    which also attends by flat row index and copies no rows, but feeds every row's compressors at once (the rows
    here share one position, where the engine takes the eager forward: the column shows the batched step's cost).

    python scripts/bench_block_pool.py [--config flash] [--max-seq-len 65536] [--slots 8] [--contexts 900,3000]
        [--reps 7] [--parts a,c] [--write]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dsv4.common.bench.report import load_average
from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.block_pool import PoolExhausted
from dsv4.common.model.cache import KVCache
from dsv4.common.model.cache_dense import SlotKVCache
from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.runtime.engine_decode import BatchedDecode

ROOT = Path(__file__).resolve().parents[1]


# -- (a) capacity ------------------------------------------------------------------------------------------------------
def same_bytes_pool(args, slots: int, max_seq_len: int, pool_slots: int, dtype: torch.dtype) -> tuple[KVCache, int]:
    """A pool cache with `pool_slots` slots whose nbytes() is at most the slot layout's (the largest n_blocks that
    fits), and the slot layout's bytes."""
    budget = SlotKVCache(args, slots, max_seq_len, dtype, "meta").nbytes()
    base = KVCache(args, pool_slots, max_seq_len, dtype, "meta", n_blocks=1).nbytes()
    per_block = KVCache(args, pool_slots, max_seq_len, dtype, "meta", n_blocks=2).nbytes() - base
    n_blocks = 1 + (budget - base) // per_block
    cache = KVCache(args, pool_slots, max_seq_len, dtype, "meta", n_blocks=n_blocks)
    assert cache.nbytes() <= budget
    return cache, budget


def fill(cache: KVCache, lengths: list[int]) -> int:
    """Admit sequences of `lengths` in order while the allocator gives them blocks (and slots remain); how many."""
    cache.reset()
    for n, length in enumerate(lengths):
        if n == cache.max_batch:
            return n
        try:
            cache.ensure_capacity(n, length)
        except PoolExhausted:
            return n
    return len(lengths)


def capacity(ns) -> list[str]:
    args = load_named_config(ns.config)
    dtype = torch.bfloat16
    L, B, short = ns.max_seq_len, ns.slots, ns.short
    pools = [same_bytes_pool(args, B, L, int(n), dtype) for n in ns.pool_slots.split(",")]
    budget = pools[0][1]
    out = [f"Config `{ns.config}` bf16, max_seq_len {L:,}, long = {L:,} tokens, short = {short:,} tokens (prompt + "
           f"output). The slot layout with {B} slots is {budget / 2**30:.2f} GiB. Each pool below has the same "
           f"bytes or fewer, the per-slot rings and compressor states of its slots included, so more slots leave "
           f"fewer blocks: "
           + "; ".join(f"{c.max_batch} slots -> {c.n_blocks:,} blocks of {c.block_tokens} tokens "
                       f"({c.nbytes() / 2**30:.2f} GiB)" for c, _ in pools)
           + ". Counted through `KVCache.ensure_capacity` until `PoolExhausted` (or no slot is left).", "",
           "| long sequences | short that fit beside them: slot layout | "
           + " | ".join(f"pool, {c.max_batch} slots" for c, _ in pools) + " |",
           "|---|---|" + "---|" * len(pools)]
    for n_long in sorted({0, 1, 2, B // 2, B - 1, B}):
        cells = []
        for cache, _ in pools:
            longs = fill(cache, [L] * n_long)
            if longs < n_long:
                cells.append(f"only {longs} long fit")
                continue
            cells.append(str(fill(cache, [L] * n_long + [short] * (cache.max_batch + 1)) - n_long))
        out.append(f"| {n_long} | {max(B - n_long, 0)} | " + " | ".join(cells) + " |")
    return out


# -- (c) decode speed --------------------------------------------------------------------------------------------------
def decode_times(model, ns, ctx: int) -> dict[tuple[str, str], list[float]]:
    """ms per decode step of ns.batch rows at context ctx+, per (layout, slot kind), repetitions interleaved."""
    args, B, steps = model.args, ns.batch, ns.steps
    msl = ctx + steps * (ns.reps + 2) + 8
    seq = torch.randint(2, 512, (B, msl), generator=torch.Generator().manual_seed(0))
    slots_idx = torch.tensor(list(range(B))[::-1])  # the engine's scattered-slot path (an index tensor)
    layouts = {"slot layout": SlotKVCache(args, B, msl, torch.float32),
               "block pool": KVCache(args, B, msl, torch.float32),
               "block pool, batched step": KVCache(args, B, msl, torch.float32)}
    for cache in layouts.values():
        for b in range(B):
            model(seq[b:b + 1, :ctx], cache, slots=slice(b, b + 1))
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(ns.reps):
        order = list(layouts) if rep % 2 == 0 else list(layouts)[::-1]
        for how in ("slice", "index"):
            for name in order:
                cache = copy.deepcopy(layouts[name])
                slots = slice(0, B) if how == "slice" else slots_idx
                rows = torch.arange(B) if how == "slice" else slots_idx
                batched = BatchedDecode(model, cache, min_rows=1) if name.endswith("batched step") else None
                t0 = time.perf_counter()
                for _ in range(steps):
                    pos = cache.lengths[rows]
                    if batched is None:
                        model(seq[rows, pos][:, None], cache, slots=slots)
                    else:
                        batched.step(seq[rows, pos], rows.tolist())
                times.setdefault((name, how), []).append((time.perf_counter() - t0) / steps * 1e3)
    return times


def decode_speed(ns) -> list[str]:
    torch.set_num_threads(1)
    args = load_named_config("tiny").replace(kv_fp8_sim="clamp")
    model = build_random_model(args, ReferenceOps(), torch.float32, seed=0)
    started, load_before = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load_average()
    out = [f"Embedded tiny model (random weights), fp32, 1 thread, {ns.batch} rows decoding, {ns.steps} steps per "
           f"repetition, {ns.reps} repetitions interleaved (layout order alternating); ms per decode step, median "
           f"(min-max):", "",
           "| context | slots | slot layout | block pool | pool / slot | block pool, batched step (engine default "
           "from 4 rows at different positions) | batched / slot |", "|---|---|---|---|---|---|---|"]
    for ctx in (int(c) for c in ns.contexts.split(",")):
        times = decode_times(model, ns, ctx)
        for how, label in (("slice", "one run (slice; the slot layout attends through views)"),
                           ("index", "scattered (index tensor; the slot layout gathers)")):
            d, p, q = (times[(name, how)] for name in ("slot layout", "block pool", "block pool, batched step"))
            md, mp, mq = (statistics.median(t) for t in (d, p, q))
            out.append(f"| {ctx} | {label} | {md:.1f} ({min(d):.1f}-{max(d):.1f}) | {mp:.1f} ({min(p):.1f}-"
                       f"{max(p):.1f}) | {mp / md:.2f} | {mq:.1f} ({min(q):.1f}-{max(q):.1f}) | {mq / md:.2f} |")
    out += ["", f"Run at {started}; load average (1 / 5 / 15 min) {load_before} at start, {load_average()} at end "
                f"(a shared machine: the min-max ranges show how much other work moved single repetitions)."]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="flash", help="config for the capacity count (a)")
    p.add_argument("--max-seq-len", type=int, default=65536)
    p.add_argument("--slots", type=int, default=8, help="slots of the slot layout (its max_batch)")
    p.add_argument("--pool-slots", default="16,32,64",
                   help="slot counts of the pool caches compared, comma-separated (a slot costs its rings, states)")
    p.add_argument("--short", type=int, default=2048, help="tokens of a short sequence (prompt + output)")
    p.add_argument("--batch", type=int, default=4, help="(c): rows decoding together")
    p.add_argument("--contexts", default="900,3000", help="(c): tokens in each row before timing, comma-separated")
    p.add_argument("--steps", type=int, default=12, help="(c): decode steps per repetition")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--parts", default="a,c", help="which parts to run, comma-separated: a (capacity), c (decode)")
    p.add_argument("--write", action="store_true", help="append the section to BENCHMARKS.md")
    ns = p.parse_args()
    cmd = "python scripts/bench_block_pool.py " + " ".join(sys.argv[1:])
    parts = set(ns.parts.split(","))
    if not parts or not parts <= {"a", "c"}:
        p.error(f"--parts takes a comma-separated subset of a,c, got {ns.parts!r}")
    lines = ["", "## KV block pool vs the per-slot layout (issue 16: 4a, 4c)", "", f"Command: `{cmd.strip()}`", ""]
    if "a" in parts:
        lines += ["### (a) Sequences that fit in the same bytes", ""] + capacity(ns) + [""]
    if "c" in parts:
        lines += ["### (c) Decode through the block pool vs the per-slot layout", ""] + decode_speed(ns)
    text = "\n".join(lines) + "\n"
    print(text)
    if ns.write:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
