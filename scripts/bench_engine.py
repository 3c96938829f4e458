"""The serving engine without HTTP: how far its own steps take issue 14's two serving targets on this machine, and
where a step's time goes. Complements scripts/bench_serve.py (the same engine behind `dsv4 serve`).

1. Closed loop: at each concurrency c, c requests run at once (2c in all, each replaced as it finishes), each a
   `--prompt-tokens` prompt and `--max-tokens` generated tokens (greedy, ignore_eos), the engine stepped in this
   process. Reported: output tokens/s, the ratio to concurrency 1, ms per engine step, and the share of the time in
   decode forwards and in prefill forwards. Target of bench_serve: concurrency 16 >= 8x concurrency 1.
2. Where a decode forward's time goes at concurrency 1 and 16: ms per step by ops-seam method (the backend's
   primitives), the rest being the graph's own glue.
3. A step of a long prompt's chunk (`--long-chunk` tokens at context `--long-context`) against a short prompt's
   whole prefill (the short request's own step): a short request arriving just as a long chunk starts waits for
   that chunk, then for its own prefill, so its engine-side TTFT is about 1 + long / short times the idle one
   (bench_serve's target: TTFT p99 beside a long prefill <= 2x idle).

    python scripts/bench_engine.py                            # prints a markdown section
    python scripts/bench_engine.py --markdown BENCHMARKS.md   # also writes it (only this script's section)
"""

from __future__ import annotations

import argparse
import collections
import inspect
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dsv4.common.bench.report import load_average, write_marked_section
from dsv4.common.cli import build_parser
from dsv4.common.model.ops import Ops
from dsv4.common.runtime.engine import Request, SamplingParams
from dsv4.common.runtime.loading import load_model
from dsv4.common.serve.cli import build_engine


class Timers:
    """Seconds by phase (decode / prefill forwards) and, inside them, by outermost ops-seam method."""

    def __init__(self, engine) -> None:
        self.phase = collections.Counter()
        self.calls = collections.Counter()
        self.seam: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.current: str | None = None
        runner, ops = engine.runner, engine.model.ops
        forward = runner.forward

        def timed_forward(rows, slots):
            self.current = "decode" if all(len(r) == 1 for r in rows) else "prefill"
            self.calls[self.current] += 1
            t0 = time.perf_counter()
            try:
                return forward(rows, slots)
            finally:
                self.phase[self.current] += time.perf_counter() - t0
                self.current = None

        runner.forward = timed_forward
        depth = [0]
        for name, _ in inspect.getmembers(type(ops), inspect.isfunction):
            if not name.startswith("_") and hasattr(Ops, name):
                setattr(ops, name, self._seam(getattr(ops, name), name, depth))

    def _seam(self, fn, name: str, depth: list[int]):
        def seam(*a, **k):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0 and self.current is not None:
                    self.seam[self.current][name] += time.perf_counter() - t0

        return seam

    def clear(self) -> None:
        self.phase.clear()
        self.calls.clear()
        self.seam.clear()


def closed_loop(engine, timers: Timers, conc: int, a: argparse.Namespace, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.args.vocab_size

    def request() -> Request:
        prompt = torch.randint(2, vocab, (a.prompt_tokens,), generator=g).tolist()
        return Request(prompt, SamplingParams(max_tokens=a.max_tokens, ignore_eos=True))

    n, sent, done, tokens, steps = 2 * conc, 0, 0, 0, 0
    for _ in range(conc):
        engine.add(request())
        sent += 1
    timers.clear()
    t0 = time.perf_counter()
    while done < n:
        steps += 1
        for ev in engine.step():
            tokens += ev.token_id is not None
            if ev.finished:
                done += 1
                if sent < n:
                    engine.add(request())
                    sent += 1
    wall = time.perf_counter() - t0
    forwards = max(timers.calls["decode"], 1)
    return dict(tok_s=tokens / wall, ms_step=wall / steps * 1e3, decode=timers.phase["decode"] / wall,
                prefill=timers.phase["prefill"] / wall,
                seams={k: v / forwards * 1e3 for k, v in timers.seam["decode"].items()},
                decode_ms=timers.phase["decode"] / forwards * 1e3)


def long_vs_short(engine, a: argparse.Namespace, reps: int) -> tuple[list[float], list[float]]:
    """ms of a long prompt's chunk step at --long-context and of a short prompt's whole prefill, interleaved."""
    runner = engine.runner
    g = torch.Generator().manual_seed(1)
    vocab = engine.args.vocab_size
    long = torch.randint(2, vocab, (a.long_context + reps * a.long_chunk,), generator=g).tolist()
    short = torch.randint(2, vocab, (a.prompt_tokens,), generator=g).tolist()
    runner.reset(0)
    fed = 0
    while fed < a.long_context:
        n = min(engine.prefill_chunk, a.long_context - fed)
        runner.forward([long[fed:fed + n]], [0])
        fed += n
    long_ms, short_ms = [], []
    for _ in range(reps):
        runner.reset(1)
        t0 = time.perf_counter()
        runner.forward([short], [1])
        short_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        runner.forward([long[fed:fed + a.long_chunk]], [0])
        long_ms.append((time.perf_counter() - t0) * 1e3)
        fed += a.long_chunk
    return long_ms, short_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,16", help="closed-loop concurrencies (comma-separated; 1 first)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="as scripts/bench_serve.py")
    p.add_argument("--max-tokens", type=int, default=64, help="as scripts/bench_serve.py")
    p.add_argument("--long-context", type=int, default=4080, help="where the long prompt's chunk starts")
    p.add_argument("--long-chunk", type=int, default=16, help="bench_serve's --long-prefill-chunk")
    p.add_argument("--reps", type=int, default=5, help="repetitions of part 3")
    p.add_argument("--markdown", type=Path, default=None, help="also write the section into this file")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)  # bench_serve's --threads 1
    serve = build_parser().parse_args(["serve", "--config", "tiny", "--max-batch", "64", "--max-seq-len", "4608",
                                       "--max-waiting", "4096", "--long-prefill-chunk", str(ns.long_chunk)])
    model, tokenizer, _ = load_model(serve)
    engine = build_engine(serve, model, tokenizer)
    timers = Timers(engine)
    started, load_before = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load_average()
    concs = [int(c) for c in ns.concurrency.split(",")]
    closed_loop(engine, timers, 1, ns, seed=99)  # warm-up
    res = {c: closed_loop(engine, timers, c, ns, seed=c) for c in concs}
    long_ms, short_ms = long_vs_short(engine, ns, ns.reps)
    cmd = "python scripts/bench_engine.py" + (f" --markdown {ns.markdown}" if ns.markdown else "")
    out = ["## The engine alone: the serving targets without HTTP (scripts/bench_engine.py)", "",
           f"Command: `{cmd}` ({started}; load average before {load_before}, after {{after}}).", "",
           f"The engine `dsv4 serve` builds (common/serve/cli.py build_engine) with bench_serve's settings: embedded "
           f"tiny model (random weights), backend {model.ops.name}, {model.embed.weight.dtype}, max_batch 64, prefill "
           f"chunk {engine.prefill_chunk} (long prompts {ns.long_chunk}), step budget {engine.step_tokens} tokens; "
           f"{ns.prompt_tokens}-token prompts, {ns.max_tokens} generated tokens, 2c requests at concurrency c; "
           f"{platform.machine()}, 1 torch thread, torch {torch.__version__}.", "",
           "| concurrency | output tok/s | vs concurrency 1 | ms per step | decode forwards | prefill forwards | "
           "ms per decode forward |", "|---:|---:|---:|---:|---:|---:|---:|"]
    base = res[concs[0]]["tok_s"]
    for c in concs:
        r = res[c]
        out.append(f"| {c} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | {r['ms_step']:.1f} | "
                   f"{r['decode'] * 100:.0f}% | {r['prefill'] * 100:.0f}% | {r['decode_ms']:.1f} |")
    seams = sorted(set().union(*(res[c]["seams"] for c in concs)), key=lambda k: -res[concs[-1]]["seams"].get(k, 0))
    out += ["", "Where a decode forward's time goes, ms per forward by ops-seam method (outermost calls; the graph's "
            "glue is the rest):", "", "| seam | " + " | ".join(f"concurrency {c}" for c in concs) + " |",
            "|---|" + "---:|" * len(concs)]
    for s in seams[:10]:
        out.append(f"| {s} | " + " | ".join(f"{res[c]['seams'].get(s, 0):.2f}" for c in concs) + " |")
    out.append("| everything else (graph glue, cache) | " + " | ".join(
        f"{res[c]['decode_ms'] - sum(res[c]['seams'].values()):.2f}" for c in concs) + " |")
    lm, sm = statistics.median(long_ms), statistics.median(short_ms)
    out += ["", f"A {ns.long_chunk}-token chunk of a long prompt at context {ns.long_context}: {lm:.1f} ms "
            f"({min(long_ms):.1f}-{max(long_ms):.1f}); a {ns.prompt_tokens}-token prompt's whole prefill: {sm:.1f} ms "
            f"({min(short_ms):.1f}-{max(short_ms):.1f}); medians of {ns.reps}, interleaved. A short request that "
            f"arrives as a chunk starts waits about 1 + {lm:.1f} / {sm:.1f} = {1 + lm / sm:.2f}x its idle "
            "engine time."]
    section = "\n".join(out).replace("{after}", load_average()) + "\n"
    print(section)
    if ns.markdown:
        write_marked_section(ns.markdown, "bench_engine", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
