"""Time to first token of a request over a shared 16k-token prefix: cold, vs resumed from the prefix cache
(common/runtime/prefix_cache.py). Embedded tiny model, random weights (seed 0), fp32, reference backend, one engine
per case, all in one run.

Cases, interleaved `--repeats` times so that load from other processes hits them alike:
  cold      doc + question B on an engine without a prefix cache (the whole prompt prefilled),
  first     doc + question A on an engine with the cache (prefilled whole, registering blocks and snapshots),
  hit       doc + question B on that engine afterwards (only the tail after the last snapshot is prefilled),
  partial   the doc less its last 100 tokens + question B on that engine: the shared part ends between two
            snapshots, so the hit resumes at the last `--interval` boundary before it and prefills the rest.
The hits' greedy tokens are checked equal to cold runs' (the partial one against a cold engine once).

    python scripts/bench_prefix_cache.py                          # prints a markdown section
    python scripts/bench_prefix_cache.py --markdown BENCHMARKS.md   # also writes it (only this script's section)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dsv4.common.bench.report import load_average, write_marked_section
from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.runtime.engine import Engine, Request, SamplingParams
from dsv4.common.runtime.prefix_cache import PrefixCacheOptions


def ttft(eng: Engine, prompt: list[int], new_tokens: int) -> tuple[float, Request]:
    r = eng.add(Request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True)))
    list(eng.run_until_idle())
    assert r.finish_reason == "length", r.error
    return r.stats.first_token_at - r.stats.arrival, r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", type=int, default=16384, help="shared prefix tokens")
    p.add_argument("--question", type=int, default=64, help="tokens after the prefix (different per request)")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk")
    p.add_argument("--interval", type=int, default=2048, help="--prefix-snapshot-interval")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--markdown", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    max_seq = a.prefix + a.question + a.new_tokens + 128
    args = load_named_config("tiny").replace(max_seq_len=max_seq)
    model = build_random_model(args, ReferenceOps(), torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(2, args.vocab_size, (a.prefix,), generator=g).tolist()
    qa, qb = (torch.randint(2, args.vocab_size, (a.question,), generator=g).tolist() for _ in range(2))

    def engine(cache: bool) -> Engine:
        opts = PrefixCacheOptions(budget_bytes=1 << 30, snapshot_interval=a.interval) if cache else None
        return Engine(model, max_batch=1, max_seq_len=max_seq, prefill_chunk=a.chunk, prefix_cache=opts)

    load0 = load_average()
    times: dict[str, list[float]] = {"cold": [], "first": [], "hit": [], "partial": []}
    cached = held = partial_cached = 0
    short = doc[:a.prefix - 100] + qb
    _, partial_cold = ttft(engine(False), short, a.new_tokens)
    for _ in range(a.repeats):
        t, cold = ttft(engine(False), doc + qb, a.new_tokens)
        times["cold"].append(t)
        eng = engine(True)
        t, _ = ttft(eng, doc + qa, a.new_tokens)
        times["first"].append(t)
        t, hit = ttft(eng, doc + qb, a.new_tokens)
        times["hit"].append(t)
        t, part = ttft(eng, short, a.new_tokens)
        times["partial"].append(t)
        if hit.output != cold.output or part.output != partial_cold.output:
            raise SystemExit(f"a hit's tokens {hit.output} / {part.output} differ from the cold runs' "
                             f"{cold.output} / {partial_cold.output}")
        cached, held, partial_cached = hit.stats.cached_tokens, eng.prefix_cache_bytes, part.stats.cached_tokens
    load1 = load_average()
    med = {k: statistics.median(v) for k, v in times.items()}
    host = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread"
    given = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python scripts/bench_prefix_cache.py", *given])
    out = [f"## Prefix cache: TTFT over a shared {a.prefix:,}-token prefix (scripts/bench_prefix_cache.py)", "",
           f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC).", "",
           f"Setup: embedded tiny model (dim {args.dim}, layers {args.compress_ratios[:args.n_layers]}), random "
           f"weights seed 0, fp32, reference backend, {host}; max_seq_len {max_seq}, prefill chunk {a.chunk}, "
           f"snapshot interval {a.interval}. Prompts: a {a.prefix:,}-token document + a {a.question}-token "
           f"question (A or B), {a.new_tokens} new tokens, greedy. Medians of {a.repeats} interleaved repeats; "
           f"load average {load0} at start, {load1} at end (shared machine).", "",
           "| case | TTFT s | prompt tokens prefilled | vs cold |", "|---|---:|---:|---:|",
           f"| cold: doc + B, no prefix cache | {med['cold']:.2f} | {a.prefix + a.question:,} | 1.00x |",
           f"| first: doc + A, prefix cache on (registers) | {med['first']:.2f} | {a.prefix + a.question:,} | "
           f"{med['cold'] / med['first']:.2f}x |",
           f"| hit: doc + B after A | {med['hit']:.3f} | {a.prefix + a.question - cached:,} | "
           f"**{med['cold'] / med['hit']:.1f}x** |",
           f"| partial: doc[:-100] + B after A | {med['partial']:.3f} | {len(short) - partial_cached:,} | "
           f"{med['cold'] / med['partial']:.1f}x |", "",
           f"The hit resumed at token {cached:,} (the last snapshot boundary the two prompts share) and gave the "
           f"cold run's tokens; the partial one resumed at {partial_cached:,}. The cache then held "
           f"{held / 2**20:.1f} MiB (blocks + snapshots). Target: at least "
           f"10x lower TTFT on the hit: {'met' if med['cold'] / med['hit'] >= 10 else 'NOT met'}."]
    section = "\n".join(out) + "\n"
    print(section)
    if a.markdown:
        write_marked_section(a.markdown, "bench_prefix_cache", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
