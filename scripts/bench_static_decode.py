"""CPU decode ms/token, side by side in one run: the eager forward, the static-shape step uncaptured, the same step
compiled (torch.compile fullgraph, inductor), and nano-deepseek-v4 0.2.0 (the `[bench]` extra) at the shortest
context. Embedded tiny model, random weights (seed 0), fp32, batch 1, the same weights for ours and nano.

One cache per context is prefilled once (chunked), then decode steps alternate between the implementations and the
contexts step by step, so that load from other processes on the machine hits all of them alike. Each static shape
is compiled (and warmed) before timing.

    python scripts/bench_static_decode.py                          # prints a markdown section
    python scripts/bench_static_decode.py --markdown BENCHMARKS.md   # also writes it (only this script's section)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dsv4.common.bench.report import load_average, write_marked_section
from dsv4.common.bench.runners import build_nano
from dsv4.common.checkpoint.layout import random_checkpoint
from dsv4.common.checkpoint.load import load_state_dict_official
from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.model.transformer import Transformer
from dsv4.common.runtime.static_decode import StaticDecoder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="1024,32768")
    p.add_argument("--steps", type=int, default=15, help="timed decode steps per implementation and context")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk")
    p.add_argument("--no-nano", action="store_true")
    p.add_argument("--markdown", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    contexts = [int(c) for c in a.contexts.split(",")]
    max_seq = contexts[-1] + a.warmup + a.steps + 64
    args = load_named_config("tiny").replace(max_seq_len=max_seq)
    tensors = dict(random_checkpoint(args, 0))
    model = Transformer(args, ReferenceOps(), torch.float32)
    load_state_dict_official(model, tensors, source="random checkpoint (seed 0)")
    nano = None if a.no_nano else build_nano(args, tensors, None, torch.float32, torch.device("cpu"))
    del tensors
    load0 = load_average()
    toks = torch.randint(2, args.vocab_size, (1, max_seq), generator=torch.Generator().manual_seed(0))
    caches = {}
    t0 = time.perf_counter()
    for ctx in contexts:
        cache = model.new_cache(1, max_seq)
        for c0 in range(0, ctx, a.chunk):
            model(toks[:, c0:min(c0 + a.chunk, ctx)], cache)
        caches[ctx] = cache
        print(f"  prefilled {ctx} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    # one cache copy per implementation and context, all at the same position
    impls: dict[tuple[str, int], object] = {}
    compile_s = {}
    for ctx in contexts:
        impls[("eager", ctx)] = caches[ctx]
        for mode in ("static", "compiled"):
            c = copy.deepcopy(caches[ctx])
            impls[(mode, ctx)] = StaticDecoder(model, c, (1,), "eager" if mode == "static" else "inductor")
    nano_cache = None
    if nano is not None:
        with torch.no_grad():
            nano_cache = nano(toks[:, :contexts[0]], use_cache=True).past_key_values
    for ctx in contexts:  # compile each shape before timing (one step each; every copy then advances alike below)
        t = time.perf_counter()
        impls[("compiled", ctx)].step(toks[0, ctx:ctx + 1], [0])
        compile_s[ctx] = time.perf_counter() - t
        impls[("static", ctx)].step(toks[0, ctx:ctx + 1], [0])
        model(toks[:, ctx:ctx + 1], impls[("eager", ctx)])
        print(f"  compiled the {ctx} bucket ({compile_s[ctx]:.0f} s)", file=sys.stderr)
    if nano is not None:
        with torch.no_grad():
            nano_cache = nano(toks[:, contexts[0]:contexts[0] + 1], past_key_values=nano_cache,
                              use_cache=True).past_key_values
    times: dict[tuple[str, int], list[float]] = {k: [] for k in impls}
    if nano is not None:
        times[("nano", contexts[0])] = []
    for i in range(a.warmup + a.steps):
        for ctx in contexts:
            n = ctx + 1 + i
            tok = toks[:, n:n + 1]
            for key in [("eager", ctx), ("static", ctx), ("compiled", ctx)] + (
                    [("nano", ctx)] if nano is not None and ctx == contexts[0] else []):
                t = time.perf_counter()
                if key[0] == "eager":
                    model(tok, impls[key])
                elif key[0] == "nano":
                    with torch.no_grad():
                        nano_cache = nano(tok, past_key_values=nano_cache, use_cache=True).past_key_values
                else:
                    impls[key].step(tok[0], [0])
                if i >= a.warmup:
                    times[key].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    load1 = load_average()
    cmd = "python scripts/bench_static_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    host = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 torch thread"
    out = ["## Decode step: eager vs static vs compiled, and vs nano-deepseek-v4 (scripts/bench_static_decode.py)", "",
           f"Command: `{cmd.strip()}`", "",
           f"Setup: embedded tiny model (dim {args.dim}, layers {args.compress_ratios[:args.n_layers]}, "
           f"{args.n_routed_experts} experts), random weights seed 0 (ours and nano load the same tensors), fp32, "
           f"reference backend, batch 1, max_seq_len {max_seq}; {host}. One run: each context prefilled once, "
           f"then {a.warmup} warm-up and {a.steps} timed steps per row, alternating step by step over all rows. "
           f"compiled = the static step under torch.compile(fullgraph=True, inductor), one graph per bucket "
           f"(compile + first step: " + ", ".join(f"{c:,}: {compile_s[c]:.0f} s" for c in contexts) + "). "
           f"Shared machine (other helpers' work running): load average {load0} at start, {load1} at end; read "
           "the ratios, which come from the same interleaved run.", "",
           "| context | eager ms/token | static (uncaptured) | compiled | nano | eager / compiled | nano / eager | "
           "nano / compiled |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ctx in contexts:
        e, s, c = med[("eager", ctx)], med[("static", ctx)], med[("compiled", ctx)]
        nn = med.get(("nano", ctx))
        out.append(f"| {ctx:,} | {e:.2f} | {s:.2f} | {c:.2f} | {'' if nn is None else f'{nn:.2f}'} | "
                   f"{e / c:.2f}x | {'' if nn is None else f'{nn / e:.2f}x'} | "
                   f"{'' if nn is None else f'{nn / c:.2f}x'} |")
    section = "\n".join(out) + "\n"
    print(section)
    if a.markdown:
        write_marked_section(a.markdown, "bench_static_decode", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
