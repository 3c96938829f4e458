"""`dsv4 bench`: prefill throughput, decode time per token against context length, peak memory and KV bytes per
token, optionally side by side with an independent implementation (nano-deepseek-v4) at the same config and weights.

How a run goes. One sequence per batch slot grows through the requested contexts: prefill up to the first context
(in chunks), time `--decode-steps` one-token steps there, prefill on to the next context, and so on. Reusing the
sequence keeps a 1k/4k/16k/32k sweep at 32k prefilled tokens instead of 53k. With --compare, the two
implementations alternate chunk by chunk and step by step, so machine load (other jobs on a shared box) hits both
alike: the ratios are the figures to read, never the absolute times.

Memory: on CPU the process RSS is sampled by a thread and the peak taken per implementation while it runs (both
models stay resident, so the figure is process-wide); on devices torch's max_memory_allocated per phase.

This module holds the flags and the entry point (`run_bench`, `main`); below it, each importing none of the others
above it: runners.py (ours and nano behind one interface), measure.py (memory meters, the timed sweep, logits
agreement) and report.py (the table and verdicts).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from dsv4.common.bench.measure import (
    Agreement,
    MemoryMeter,
    cpu_model,
    device_module,
    logits_agreement,
    profile_decode,
    required_seq_len,
    sweep,
)
from dsv4.common.bench.report import command_line, mem_label_text, render
from dsv4.common.bench.runners import (
    NANO_DIFFERENCES_CONFIG,
    NANO_DIFFERENCES_FIXED,
    NANO_VERSION,
    NanoRunner,
    OursRunner,
    Runner,
    aligned_args,
    build_nano,
    build_ours,
    cache_nbytes,
    import_nano,
)
from dsv4.common.checkpoint.layout import random_checkpoint
from dsv4.common.model.cache import kv_bytes_per_token
from dsv4.common.model.config import ModelArgs, load_named_config
from dsv4.common.runtime.loading import (
    EMBEDDED_SEED,
    add_model_arguments,
    apply_threads,
    check_fits_memory,
    check_run_arguments,
    load_model,
    make_ops,
    resolve_dtype,
)


# -- arguments --------------------------------------------------------------------------------------------------------
def parse_contexts(text: str) -> list[int]:
    """'1k,4k,16k,32k' or '1024,4096' -> sorted distinct token counts (k = 1024)."""
    out = set()
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            n = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad context length {part!r} (use e.g. 1024 or 4k)") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"context length must be > 0, got {part!r}")
        out.add(n)
    if not out:
        raise argparse.ArgumentTypeError("no context lengths given")
    return sorted(out)


def parse_override(text: str) -> tuple[str, Any]:
    """'dim=1024' or 'compress_ratios=[0,4,128,0]': the value is read as YAML, so numbers and lists just work."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects FIELD=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bench")
    g.add_argument("--contexts", type=parse_contexts, default=parse_contexts("1024,4096"),
                   help="context lengths to measure decode at, e.g. 1k,4k,16k,32k (default 1024,4096)")
    g.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill forward (default 2048)")
    g.add_argument("--decode-steps", type=int, default=8,
                   help="timed one-token decode steps per context; the median is reported (default 8)")
    g.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps before them (default 2)")
    g.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    g.add_argument("--compare", default="none", choices=["none", "nano"],
                   help="run nano-deepseek-v4 side by side at the same config and weights and report ratios")
    g.add_argument("--agree-tokens", type=int, default=512,
                   help="--compare: prompt length of the logits agreement check (0 skips it; default 512)")
    g.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[], metavar="FIELD=VALUE",
                   help="embedded model only: override a config field (repeatable), e.g. --set dim=1024")
    g.add_argument("--seed", type=int, default=0, help="seed of the benchmark's token stream (default 0)")
    g.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the sweep, profile this many of our decode steps at the last context (cProfile and "
                        "torch.profiler) and print where the time goes")
    g.add_argument("--results-file", default="", metavar="FILE",
                   help="also append the table to this markdown file, e.g. BENCHMARKS.md (default: print only)")
    g.add_argument("--note", default="", help="free text added under the table (e.g. what else loaded the machine)")


# -- entry point ------------------------------------------------------------------------------------------------------
def embedded_args(ns: argparse.Namespace, max_seq_len: int) -> ModelArgs:
    args = load_named_config(ns.config)
    if ns.overrides:  # from_dict names an unknown field and says which --set broke a rule
        args = ModelArgs.from_dict({**args.to_dict(), **dict(ns.overrides)},
                                   source=f"--set {' '.join(f'{k}={v}' for k, v in ns.overrides)}")
    return args.replace(max_seq_len=max_seq_len)


def run_bench(ns: argparse.Namespace) -> int:
    contexts = list(ns.contexts)
    if ns.decode_steps < 1 or ns.warmup_steps < 0 or ns.prefill_chunk < 1 or ns.batch < 1:
        raise ValueError("--decode-steps, --prefill-chunk and --batch must be >= 1, --warmup-steps >= 0")
    if ns.overrides and ns.model:
        raise ValueError("--set applies to the embedded model only, not to --model checkpoints")
    apply_threads(ns)  # --threads, or chosen from the usable CPUs and the load (said on stderr)
    steps_per_ctx = ns.warmup_steps + ns.decode_steps
    need = required_seq_len(contexts, steps_per_ctx)
    if ns.profile:
        need += 2 * ns.profile
    if ns.max_seq_len is not None and ns.max_seq_len < need:
        raise ValueError(f"--max-seq-len {ns.max_seq_len} is too short for this sweep: it needs {need} "
                         "(the last context plus every decode step on the way)")
    max_seq_len = ns.max_seq_len or need
    compare = ns.compare == "nano"
    if compare:
        import_nano()  # fail now, with the install hint, not after building our model
    check_run_arguments(ns)

    ops = make_ops(ns)
    dtype = resolve_dtype(ns, ops)
    dtype_name = str(dtype).replace("torch.", "")
    device = ops.device
    tensors = None
    t0 = time.perf_counter()
    if ns.model:
        ns.max_seq_len = max_seq_len
        model, _, source = load_model(ns, ops, dtype)
        args = model.args
    else:
        args = embedded_args(ns, max_seq_len)
        check_fits_memory(args, ops, dtype, ns.weights, embedded=True)
        # draw the random official-layout tensors once: our model and nano both load these very tensors
        tensors = dict(random_checkpoint(args, EMBEDDED_SEED))
        model = build_ours(args, tensors, ops, dtype, ns.weights)
        source = f"embedded {ns.config}" + (" with " + ", ".join(f"{k}={v}" for k, v in ns.overrides)
                                            if ns.overrides else "") + f", random weights (seed {EMBEDDED_SEED})"
    runners: list[Runner] = [OursRunner(model, ns.batch, max_seq_len)]
    if compare:
        runners.append(NanoRunner(build_nano(args, tensors, ns.model, dtype, device)))
    print(f"[bench] built in {time.perf_counter() - t0:.1f} s: {source}; backend {ops.name} on {device}, "
          f"{dtype_name}", file=sys.stderr)

    stream = torch.randint(0, args.vocab_size, (ns.batch, need), generator=torch.Generator().manual_seed(ns.seed))
    stream = stream.to(device)
    # one short untimed forward per implementation: first-call costs (allocator, lazy init) stay out of the table
    for r in runners:
        r.reset()
        r.step(stream[:, :16])

    agreements: dict[str, Agreement] = {}
    if compare and ns.agree_tokens > 0:
        x = stream[:, :ns.agree_tokens]
        agreements["as shipped"] = logits_agreement(runners[0].full_logits(x), runners[1].full_logits(x))
        if tensors is not None:  # the config-aligned pair: same tensors, both models told to skip what they can
            al = aligned_args(args)
            ours_al = OursRunner(build_ours(al, tensors, ops, dtype, ns.weights), 1, ns.agree_tokens)
            nano_al = NanoRunner(build_nano(al, tensors, None, dtype, device))
            agreements["config-aligned"] = logits_agreement(ours_al.full_logits(x), nano_al.full_logits(x))
            del ours_al, nano_al
    tensors = None  # the drawn checkpoint is no longer needed: keep it out of the RSS the sweep measures
    gc.collect()

    load_before = os.getloadavg()
    units = len(runners) * (sum(-(-d // ns.prefill_chunk) for d in _spans(contexts, steps_per_ctx))
                            + len(contexts) * steps_per_ctx)
    meter = MemoryMeter(device)
    with torch.no_grad(), tqdm(total=units, desc="bench", unit="fwd", file=sys.stderr) as progress:
        rows = sweep(runners, contexts, stream, ns.prefill_chunk, ns.warmup_steps, ns.decode_steps, meter, device,
                     progress)
    meter.close()
    load_after = os.getloadavg()

    profile_text = ""
    if ns.profile:
        with torch.no_grad():
            profile_text = profile_decode(runners[0], stream, rows[-1].length_after, ns.profile)
        print(profile_text, file=sys.stderr)

    elt = torch.empty((), dtype=dtype).element_size()
    l1, l2 = 8192, 16384  # multiples of every compression ratio: the allocation grows exactly linearly between them
    kv = {"analytic": kv_bytes_per_token(args, elt, include_mtp=bool(args.n_mtp_layers)),
          "measured": (cache_nbytes(args, 1, l2, dtype) - cache_nbytes(args, 1, l1, dtype)) / (l2 - l1),
          "l1": l1, "l2": l2}
    if compare and len(rows) >= 2:
        kv["nano"] = ((rows[-1].kv_bytes["nano"] - rows[0].kv_bytes["nano"])
                      / (rows[-1].length_after - rows[0].length_after) / ns.batch)

    n_params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    if device.type == "cpu":
        where = f"{cpu_model()}, {os.cpu_count()} cores, {threads} torch thread{'s' if threads > 1 else ''}"
    else:
        mod = device_module(device)
        name = mod.get_device_name(device) if mod is not None and hasattr(mod, "get_device_name") else device.type
        where = f"{name} ({device}), host {cpu_model()}"
    names = [r.name for r in runners]
    info = {
        "title": f"{ns.config if not ns.model else Path(ns.model).name}"
                 + (f" (+{len(ns.overrides)} overrides)" if ns.overrides else "")
                 + f", {ops.name} backend" + (" vs nano-deepseek-v4 " + NANO_VERSION if compare else ""),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": command_line(ns),
        "machine": f"{where}; torch {torch.__version__}; backend {ops.name} on {device}; "
                   f"load average {load_before[0]:.1f} at start, {load_after[0]:.1f} at end (shared machine: read "
                   "the ratios, not the absolute times)",
        "model": f"{source}; {n_params / 1e6:.1f}M parameters; dim {args.dim}, {args.n_layers} layers "
                 f"(ratios {args.compress_ratios[:args.n_layers]}), {args.n_routed_experts} experts "
                 f"(top-{args.n_activated_experts}), window {args.window_size}, index top-k {args.index_topk}; "
                 f"{dtype_name}, weights {ns.weights}",
        "method": f"batch {ns.batch}; one sequence grown through the contexts, prefill in chunks of "
                  f"{ns.prefill_chunk} (tok/s over the span from the previous context), decode = median of "
                  f"{ns.decode_steps} one-token steps after {ns.warmup_steps} warm-up"
                  + ("; implementations alternate chunk by chunk and step by step" if compare else "")
                  + f"; {mem_label_text(meter)}; KV MiB = KV state at that context (ours: a cache sized to it"
                  + ("; nano: the tensors its cache holds)" if compare else ")"),
    }
    notes = []
    if agreements:
        notes.append("- Disagreement with nano is expected, it is not our error: nano 0.2.0 differs from the official "
                     "code (its logits match the official code to a median cosine of about 0.77 as shipped). The "
                     "config-aligned run gives both models the same settings for: "
                     + "; ".join(f"{d} ({how})" for d, how in NANO_DIFFERENCES_CONFIG)
                     + ". What no config flag of nano switches off, and so remains in both figures: "
                     + "; ".join(NANO_DIFFERENCES_FIXED) + ". In fp32 our fp32 islands make no difference.")
    if ns.note:
        notes.append(f"- Note: {ns.note}")
    table = render(info, rows, names, meter.label, kv, agreements, notes)
    print(table)
    if ns.results_file and ns.results_file != "-":
        path = Path(ns.results_file)
        prefix = "" if not path.exists() or path.read_text().endswith("\n\n") else "\n"
        with path.open("a") as f:
            f.write(prefix + table)
        print(f"[bench] appended to {path}", file=sys.stderr)
    return 0

def _spans(contexts: Iterable[int], steps_per_ctx: int) -> list[int]:
    """Prefill tokens per context of the sweep (for the progress bar's total)."""
    out, cur = [], 0
    for c in contexts:
        out.append(max(c - cur, 0))
        cur = max(c, cur) + steps_per_ctx
    return out


def main(argv: list[str] | None = None, prog: str = "bench") -> int:
    """Stand-alone entry (scripts/bench.py): the same flags as `dsv4 bench`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_bench_arguments(parser)
    ns = parser.parse_args(argv)
    ns.argv = [*prog.split(), *(sys.argv[1:] if argv is None else argv)]
    return run_bench(ns)

