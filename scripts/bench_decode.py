"""Decode cost per token against context length, and KV cache bytes per token against baselines.

1. Time: one sequence on the tiny dims with max_seq_len 33k. In one run the cache is prefilled (in chunks) to each
   context length in turn, and at each length `--steps` single-token decode steps are timed after `--warmup` ones
   (the decode steps advance the context; the next prefill continues from there). Target: decode at 32k costs no more
   than 2x decode at 1k.
2. Bytes: V4's cache per token (each ratio-r layer D/r values, plus D_I/4 for ratio-4 indexer keys) against a
   dense-attention cache of the same dims (every token's D-dim KV in every layer), measured from KVCache.nbytes();
   and V4-Flash/Pro at 1M tokens against a V3-style MLA cache (512 latent + 64 rope per token per layer, bf16)
   of the same depth, from the formulas.

    python scripts/bench_decode.py                       # prints a markdown section
    python scripts/bench_decode.py --markdown BENCHMARKS.md   # also writes it (only this script's section)
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

from dsv4.common.bench.report import write_marked_section
from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.cache import KVCache, kv_bytes_per_token
from dsv4.common.model.config import ModelArgs, load_named_config
from dsv4.common.model.ops import default_dtype
from dsv4.common.planner import plan as planner
from dsv4.common.runtime.backend import select_backend

MIB, GIB = 2.0 ** 20, 2.0 ** 30


def sync(device: torch.device) -> None:
    """Wait for queued device work so that wall-clock timing covers it (CPU work is synchronous)."""
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


def time_decode(model, contexts: list[int], steps: int, warmup: int, chunk: int, seed: int) -> list[dict]:
    """Prefill one cache up to each context length in turn (in chunks) and keep a copy at each; then time decode
    steps round-robin over the copies (one step at each length, repeat), so that load from other processes on the
    machine hits every length alike instead of whichever length happened to be measured during a busy spell."""
    device = model.embed.weight.device
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(2, model.args.vocab_size, (contexts[-1] + warmup + steps,), generator=gen).to(device)
    cache = model.new_cache(1, model.args.max_seq_len)
    snaps, prefill_s = [], []
    t0 = time.perf_counter()
    for ctx in contexts:
        while int(cache.lengths[0]) < ctx:
            n = int(cache.lengths[0])
            model(toks[None, n:min(n + chunk, ctx)], cache)
        sync(device)
        prefill_s.append(time.perf_counter() - t0)
        snaps.append(copy.deepcopy(cache))
        print(f"  prefilled to {ctx} ({prefill_s[-1]:.1f} s)", file=sys.stderr)
    del cache
    times: list[list[float]] = [[] for _ in contexts]
    for i in range(warmup + steps):
        for j, c in enumerate(snaps):
            n = int(c.lengths[0])
            sync(device)
            t = time.perf_counter()
            model(toks[None, n:n + 1], c)
            sync(device)
            if i >= warmup:
                times[j].append(time.perf_counter() - t)
    rows = []
    for ctx, ts, ps in zip(contexts, times, prefill_s, strict=True):
        rows.append(dict(context=ctx, ms_median=1e3 * statistics.median(ts), ms_mean=1e3 * statistics.fmean(ts),
                         ms_min=1e3 * min(ts), prefill_s=ps))
        r = rows[-1]
        print(f"  ctx {ctx:>6}: decode median {r['ms_median']:.2f} ms/token (mean {r['ms_mean']:.2f}, "
              f"min {r['ms_min']:.2f})", file=sys.stderr)
    return rows


def dense_bytes_per_token(args: ModelArgs, dtype_bytes: int) -> float:
    """Dense-attention baseline of the same dims: every token's D-dim KV cached in every layer."""
    return args.n_layers * args.head_dim * dtype_bytes


def v4_values_per_token(args: ModelArgs) -> float:
    """The analytic formula, written out here independently of cache.py."""
    total = 0.0
    for r in args.compress_ratios[:args.n_layers]:
        total += (args.head_dim / r if r else 0.0) + (args.index_head_dim / 4 if r == 4 else 0.0)
    return total


def bytes_section(tiny: ModelArgs, ctx: int) -> list[str]:
    lines = []
    per_v4 = kv_bytes_per_token(tiny, 2)
    assert per_v4 == v4_values_per_token(tiny) * 2
    per_dense = dense_bytes_per_token(tiny, 2)
    # measured: the bf16 cache of one slot at `ctx` positions, MTP layer excluded (the dense baseline has none)
    cache = KVCache(tiny, 1, ctx, torch.bfloat16, with_mtp=False)
    measured = cache.nbytes()
    lines += [
        f"KV cache bytes, tiny dims (D={tiny.head_dim}, D_I={tiny.index_head_dim}, layers "
        f"{tiny.compress_ratios[:tiny.n_layers]}), bf16, one sequence:",
        "",
        f"| cache | bytes per token (asymptotic) | at {ctx:,} tokens (measured `KVCache.nbytes()`) |",
        "|---|---:|---:|",
        f"| V4 (window ring + compressed + indexer + states) | {per_v4:.0f} | {measured / MIB:.2f} MiB |",
        f"| dense attention, same dims (D per token per layer) | {per_dense:.0f} | "
        f"{per_dense * ctx / MIB:.2f} MiB |",
        f"| ratio V4 / dense | {per_v4 / per_dense:.3f} | {measured / (per_dense * ctx):.3f} |",
        "",
    ]
    lines += ["Full-size models at 1M tokens (formula; bf16; one sequence; MTP layer excluded):", "",
              "| model | V4 bytes/token | V4 cache at 1M | V3-style MLA (576 per token per layer) at 1M | V4 / MLA |",
              "|---|---:|---:|---:|---:|"]
    for name in ("flash", "pro"):
        a = load_named_config(name)
        v4 = planner.kv_cache_bytes(a, 2 ** 20, "bf16", mtp=False)
        assert v4.per_token_marginal == kv_bytes_per_token(a, 2) == v4_values_per_token(a) * 2
        mla = planner.mla_kv_bytes_per_token(a, "bf16") * 2 ** 20
        assert planner.mla_kv_bytes_per_token(a, "bf16") == a.n_layers * (512 + 64) * 2
        lines.append(f"| V4-{name.capitalize()} ({a.n_layers} layers) | {v4.per_token_marginal:.0f} | "
                     f"{v4.per_sequence / GIB:.2f} GiB | {mla / GIB:.2f} GiB | {v4.per_sequence / mla:.3f} |")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="1024,4096,16384,32768", help="comma-separated context lengths")
    p.add_argument("--max-seq-len", type=int, default=33 * 1024)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per context length")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--backend", default="reference")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: tiny ops gain nothing from more, and on a shared machine "
                        "thread hand-offs dominate and make timings noisy); 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", type=Path, default=None, help="write the section into this file (e.g. BENCHMARKS.md)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    contexts = [int(c) for c in a.contexts.split(",")]
    ops = select_backend(a.backend, a.device)
    dtype = default_dtype(ops)
    args = load_named_config("tiny").replace(max_seq_len=a.max_seq_len)
    if contexts[-1] + a.steps + a.warmup > args.max_seq_len:
        p.error("max-seq-len too small for the largest context plus the decode steps")
    print(f"building tiny model ({ops.name}, {dtype}, {torch.get_num_threads()} threads)...", file=sys.stderr)
    model = build_random_model(args, ops, dtype, seed=0)
    t0 = time.perf_counter()
    rows = time_decode(model, contexts, a.steps, a.warmup, a.prefill_chunk, a.seed)
    wall = time.perf_counter() - t0

    base = rows[0]["ms_median"]
    cmd = "python scripts/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    host = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    out = [
        "## Decode cost vs context length, and KV bytes per token (scripts/bench_decode.py)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Setup: tiny dims (dim {args.dim}, {args.n_layers} layers {args.compress_ratios[:args.n_layers]} + MTP, "
        f"window {args.window_size}, index_topk {args.index_topk}), max_seq_len {args.max_seq_len}, "
        f"backend {ops.name} on {ops.device}, {str(dtype).replace('torch.', '')}, one sequence; {host}. "
        f"One run: prefill in chunks of {a.prefill_chunk} up to each length (a copy of the cache kept at each), "
        f"then {a.warmup} warm-up and {a.steps} timed single-token decode steps per length, interleaved across the "
        f"lengths. Total {wall:.0f} s.",
        "",
        "| context | decode ms/token (median) | mean | min | median vs first |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r['context']:,} | {r['ms_median']:.2f} | {r['ms_mean']:.2f} | {r['ms_min']:.2f} | "
                   f"{r['ms_median'] / base:.2f}x |")
    ratio = rows[-1]["ms_median"] / base
    ratio_min = rows[-1]["ms_min"] / rows[0]["ms_min"]
    verdict = "met" if ratio <= 2.0 else "NOT met"
    out += ["", f"Target (decode at {rows[-1]['context']:,} <= 2x decode at {rows[0]['context']:,}): "
            f"{ratio:.2f}x by medians ({ratio_min:.2f}x by minima), {verdict}.", ""]
    out += bytes_section(args, rows[-1]["context"])
    section = "\n".join(out)
    print(section)
    if a.markdown:
        write_marked_section(a.markdown, "bench_decode", section)
        print(f"wrote {a.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
