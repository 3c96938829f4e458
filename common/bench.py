"""`dsv4 bench`: prefill throughput, decode time per token against context length, peak memory and KV bytes per
token, optionally side by side with an independent implementation (nano-deepseek-v4) at the same config and weights.

How a run goes. One sequence per batch slot grows through the requested contexts: prefill up to the first context
(in chunks), time `--decode-steps` one-token steps there, prefill on to the next context, and so on. Reusing the
sequence keeps a 1k/4k/16k/32k sweep at 32k prefilled tokens instead of 53k. With --compare, the two
implementations alternate chunk by chunk and step by step, so machine load (other jobs on a shared box) hits both
alike: the ratios are the figures to read, never the absolute times.

Memory: on CPU the process RSS is sampled by a thread and the peak taken per implementation while it runs (both
models stay resident, so the figure is process-wide); on devices torch's max_memory_allocated per phase.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import io
import os
import platform
import pstats
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from .cache import KVCache, kv_bytes_per_token
from .config import ModelArgs, load_named_config

DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
NANO_VERSION = "0.2.0"
NANO_MISSING = (f"--compare nano needs the nano-deepseek-v4 package: pip install nano-deepseek-v4=={NANO_VERSION} "
                "(an independent pure-PyTorch DeepSeek-V4; the version the comparison was written against)")
# the known differences of nano-deepseek-v4 0.2.0 from the official code (shared/notes/toolchain.md), and which of
# them the "config-aligned" agreement run removes by giving BOTH models the same setting
NANO_DIFFERENCES_CONFIG = [
    ("no YaRN; theta 10000 for q/kv on compressed layers",
     "both: compress_rope_theta = rope_theta, ours original_seq_len = 0 (no YaRN)"),
    ("shared expert's SwiGLU clamped", "both: swiglu_limit = 1e4 (no clamp anywhere)"),
    ("no FP8 simulation of KV", "ours: kv_fp8_sim = clamp (no e4m3 rounding)"),
]
NANO_DIFFERENCES_FIXED = [
    "hyper-connection comb: sigmoid instead of softmax before Sinkhorn; post without the factor 2; residual mixed "
    "with C instead of C^T",
    "indexer without FP4 simulation (its missing Hadamard alone would not matter: H is orthogonal and rotates both "
    "q and k, so q.k is unchanged)",
]
ALIGN_SWIGLU_LIMIT = 1e4


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
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a loaded machine 1 is far steadier than 2")
    g.add_argument("--seed", type=int, default=0, help="seed of the benchmark's token stream (default 0)")
    g.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the sweep, profile this many of our decode steps at the last context (cProfile and "
                        "torch.profiler) and print where the time goes")
    g.add_argument("--results-file", default=str(DEFAULT_RESULTS),
                   help="markdown file the table is appended to ('' or '-' to print only; default BENCHMARKS.md)")
    g.add_argument("--note", default="", help="free text added under the table (e.g. what else loaded the machine)")


# -- machine and memory -----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; elsewhere the peak so far, the best available)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device_module(device: torch.device):
    """torch.cuda / torch.npu for accelerator devices, None for CPU."""
    if device.type == "cpu":
        return None
    return getattr(torch, device.type, None)


def sync(device: torch.device) -> None:
    mod = _device_module(device)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize(device)


class MemoryMeter:
    """Peak memory of phases. CPU: a sampling thread tracks RSS (a phase's peak starts at the RSS it began with);
    devices: the allocator's peak statistic, reset at each phase start."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device, self.interval = device, interval_s
        self.mod = _device_module(device)
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.mod is None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            r = rss_bytes()
            with self._lock:
                self._peak = max(self._peak, r)

    def start(self) -> None:
        if self.mod is None:
            with self._lock:
                self._peak = rss_bytes()
        else:
            self.mod.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.mod is None:
            r = rss_bytes()  # a phase shorter than one sampling interval still counts its end state
            with self._lock:
                self._peak = max(self._peak, r)
                return self._peak
        return int(self.mod.max_memory_allocated(self.device))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def label(self) -> str:
        return "peak RSS" if self.mod is None else "peak allocated"


# -- the implementations under test -----------------------------------------------------------------------------------
def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable through attributes, dicts and lists (a cache object's whole state)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v) for v in vars(obj).values())
    return 0


def cache_nbytes(args: ModelArgs, batch: int, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes our KVCache allocates for `batch` sequences of `max_seq_len` (built on the meta device: shapes only,
    nothing is allocated, so any length of any config costs nothing to measure)."""
    return KVCache(args, batch, max_seq_len, dtype, "meta", with_mtp=bool(args.n_mtp_layers)).nbytes()


class Runner:
    """One implementation: a model plus its cache for one growing batch of sequences."""

    name = "?"

    def reset(self) -> None:
        raise NotImplementedError

    def step(self, tokens: Tensor) -> Tensor:
        """Feed tokens [B,S] after everything fed so far; return logits [B,S,V]."""
        raise NotImplementedError

    def full_logits(self, tokens: Tensor) -> Tensor:
        """Logits of a fresh full forward (no cache kept)."""
        raise NotImplementedError

    def state_bytes(self, length: int) -> int:
        """Bytes the KV state holds (ours: allocates) for the batch at `length` tokens."""
        raise NotImplementedError


class OursRunner(Runner):
    name = "ours"

    def __init__(self, model, batch: int, max_seq_len: int) -> None:
        self.model, self.batch, self.max_seq_len = model, batch, max_seq_len
        self.cache: KVCache | None = None

    def reset(self) -> None:
        self.cache = None  # drop the old cache before allocating the next one
        self.cache = self.model.new_cache(self.batch, self.max_seq_len)

    def step(self, tokens: Tensor) -> Tensor:
        return self.model(tokens, self.cache)

    def full_logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def state_bytes(self, length: int) -> int:
        # our cache is preallocated for max_seq_len: report what a cache sized exactly to `length` allocates
        return cache_nbytes(self.model.args, self.batch, length, self.model.dtype)


class NanoRunner(Runner):
    name = "nano"

    def __init__(self, model) -> None:
        self.model = model
        self.cache = None

    def reset(self) -> None:
        self.cache = None

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        out = self.model(tokens, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits

    @torch.no_grad()
    def full_logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens).logits

    def state_bytes(self, length: int) -> int:
        return tensor_bytes(self.cache)  # nano's cache grows with the sequence: measure what it holds


def import_nano():
    try:
        import nano_deepseek_v4
    except ImportError as e:
        raise ImportError(NANO_MISSING) from e
    if getattr(nano_deepseek_v4, "__version__", NANO_VERSION) != NANO_VERSION:
        print(f"[bench] warning: nano-deepseek-v4 {nano_deepseek_v4.__version__} installed; the comparison and its "
              f"notes were written against {NANO_VERSION}", file=sys.stderr)
    return nano_deepseek_v4


def nano_config(args: ModelArgs, nano):
    """Our ModelArgs as nano's DeepSeekV4Config, through the official config.json field names (the mapping nano
    itself uses for release checkpoints). nano ignores rope_scaling, kv_fp8_sim and the weight formats."""
    return nano.DeepSeekV4Config.from_official_json(args.to_hf_config())


def build_nano(args: ModelArgs, tensors: dict[str, Tensor] | None, checkpoint_dir: str | None,
               dtype: torch.dtype, device: torch.device):
    """nano's model with the same weights as ours: the identical official-layout tensors (FP8/FP4 + E8M0 scales)
    fed through nano's own official-name converter, or nano's loader on the same checkpoint directory."""
    nano = import_nano()
    from nano_deepseek_v4.checkpoint import convert_deepseek_official_state_dict

    model = nano.DeepSeekV4ForCausalLM(nano_config(args, nano)).eval()
    if checkpoint_dir:
        report = nano.load_deepseek_official_checkpoint(model, checkpoint_dir)
        missing, unconverted = report.missing_keys, report.conversion.unconverted_keys
    else:
        converted, conversion = convert_deepseek_official_state_dict(tensors, model)
        incompatible = model.load_state_dict(converted, strict=False)
        missing, unconverted = list(incompatible.missing_keys), conversion.unconverted_keys
    # nano registers a router bias on hash layers and a hash table on biased layers; the checkpoint has neither and
    # they are unused there. MTP tensors we do not run are harmless too. Anything else missing is a real mismatch.
    real = [k for k in missing if not k.endswith(("e_score_correction_bias", "tid2eid"))]
    if real or unconverted:
        raise RuntimeError(f"nano-deepseek-v4 did not take our weights: missing {real[:6]}, "
                           f"unconverted {list(unconverted)[:6]}")
    return model.to(device=device, dtype=dtype)


def build_ours(args: ModelArgs, tensors: dict[str, Tensor], ops, dtype: torch.dtype, weights: str):
    """What build_random_model does, from tensors already drawn (so nano can be given the very same ones)."""
    from .model import Transformer
    from .weights import load_state_dict_official

    model = Transformer(args, ops, dtype=dtype, weights=weights)
    load_state_dict_official(model, tensors, source="random checkpoint (seed 0)")
    return model.to(ops.device)


def aligned_args(args: ModelArgs) -> ModelArgs:
    """The config-level switches that remove the nano differences a config can remove (NANO_DIFFERENCES_CONFIG).
    The weight layout does not depend on any of them, so the same tensors load."""
    return args.replace(compress_rope_theta=args.rope_theta, original_seq_len=0, kv_fp8_sim="clamp",
                        swiglu_limit=ALIGN_SWIGLU_LIMIT)


# -- measurements -----------------------------------------------------------------------------------------------------
@dataclass
class Agreement:
    tokens: int
    cos_median: float
    cos_min: float
    max_abs: float
    top1: float

    def text(self) -> str:
        return (f"cosine median {self.cos_median:.4f} (min {self.cos_min:.4f}), max |diff| {self.max_abs:.3g}, "
                f"top-1 agreement {100 * self.top1:.1f}% over {self.tokens} positions")


def logits_agreement(a: Tensor, b: Tensor) -> Agreement:
    """Per-position cosine, max abs difference and argmax agreement of two [B,S,V] logits tensors."""
    a, b = a.float().flatten(0, -2), b.float().flatten(0, -2)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return Agreement(a.shape[0], cos.median().item(), cos.min().item(), (a - b).abs().max().item(),
                     (a.argmax(-1) == b.argmax(-1)).float().mean().item())


@dataclass
class ContextRow:
    context: int  # nominal context of the decode measurement
    prefill_tokens: int  # tokens prefilled to reach it (from the previous context)
    prefill_s: dict[str, float] = field(default_factory=dict)
    decode_ms: dict[str, float] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    kv_bytes: dict[str, int] = field(default_factory=dict)
    length_after: int = 0  # tokens in the cache after this context's decode steps


def required_seq_len(contexts: list[int], steps_per_context: int) -> int:
    """Cache length a sweep needs: the last context plus every decode step taken on the way (rounded up to a
    multiple of 128 so every compression block of the last context fits)."""
    need = contexts[-1] + len(contexts) * steps_per_context
    return -(-need // 128) * 128


def sweep(runners: list[Runner], contexts: list[int], stream: Tensor, chunk: int, warmup: int, steps: int,
          meter: MemoryMeter, device: torch.device, progress: tqdm) -> list[ContextRow]:
    """Grow one batch of sequences through `contexts`; at each, time `steps` decode steps per runner. Runners
    alternate per chunk and per step so that load changes affect all of them alike."""
    rows, cur = [], 0
    for r in runners:
        r.reset()

    def timed(r: Runner, tokens: Tensor, row: ContextRow) -> float:
        meter.start()
        sync(device)
        t0 = time.perf_counter()
        r.step(tokens)
        sync(device)
        dt = time.perf_counter() - t0
        row.peak_bytes[r.name] = max(row.peak_bytes.get(r.name, 0), meter.peak())
        progress.update(1)
        return dt

    for ctx in contexts:
        row = ContextRow(ctx, max(ctx - cur, 0))
        for r in runners:
            row.prefill_s[r.name] = 0.0
        while cur < ctx:
            n = min(chunk, ctx - cur)
            for r in runners:
                row.prefill_s[r.name] += timed(r, stream[:, cur:cur + n], row)
            cur += n
        samples: dict[str, list[float]] = {r.name: [] for r in runners}
        for i in range(warmup + steps):
            tok = stream[:, cur:cur + 1]
            for r in runners:
                dt = timed(r, tok, row)
                if i >= warmup:
                    samples[r.name].append(dt)
            cur += 1
        for r in runners:
            row.decode_ms[r.name] = 1e3 * statistics.median(samples[r.name]) if samples[r.name] else float("nan")
            row.kv_bytes[r.name] = r.state_bytes(cur)
        row.length_after = cur
        rows.append(row)
    return rows


def profile_decode(runner: OursRunner, stream: Tensor, start: int, steps: int, top: int = 18) -> str:
    """Where one decode step of ours spends its time: cProfile by Python function (tottime), then torch.profiler
    by operator (self CPU time). Runs `steps` further steps on the sweep's cache."""
    out = io.StringIO()
    prof = cProfile.Profile()
    prof.enable()
    for i in range(steps):
        runner.step(stream[:, start + i:start + i + 1])
    prof.disable()
    stats = pstats.Stats(prof, stream=out)
    out.write(f"== cProfile, {steps} decode steps at context {start}, by tottime ==\n")
    stats.sort_stats("tottime").print_stats(top)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as tp:
        for i in range(steps):
            runner.step(stream[:, start + steps + i:start + steps + i + 1])
    out.write(f"== torch.profiler, {steps} decode steps, by self CPU time ==\n")
    out.write(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return out.getvalue()


# -- report -----------------------------------------------------------------------------------------------------------
def fmt_mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f}"


def fmt_ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def command_line(ns: argparse.Namespace) -> str:
    argv = getattr(ns, "argv", None)
    if argv is not None:  # set by scripts/bench.py
        return shlex.join(argv)
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    if prog == "dsv4":
        return shlex.join(["dsv4", *sys.argv[1:]])
    # called as a function (tests): rebuild the equivalent command from the parsed values
    parts = ["dsv4", "bench", "--config", str(ns.config), "--backend", ns.backend,
             "--contexts", ",".join(str(c) for c in ns.contexts), "--prefill-chunk", str(ns.prefill_chunk),
             "--decode-steps", str(ns.decode_steps), "--warmup-steps", str(ns.warmup_steps),
             "--batch", str(ns.batch), "--compare", ns.compare]
    for key, value in ns.overrides:
        parts += ["--set", f"{key}={value}"]
    for flag, value in (("--model", ns.model), ("--dtype", ns.dtype), ("--device", ns.device),
                        ("--max-seq-len", ns.max_seq_len), ("--threads", ns.threads)):
        if value is not None:
            parts += [flag, str(value)]
    if ns.weights != "dequantized":
        parts += ["--weights", ns.weights]
    return shlex.join(parts) + "  (reconstructed: called from Python)"


def verdicts(rows: list[ContextRow], compare: bool) -> list[str]:
    """The two targets, as measured ratios."""
    out = []
    if compare:
        speedups = [r.decode_ms["nano"] / r.decode_ms["ours"] for r in rows]
        met = sum(s >= 1.5 for s in speedups)
        verdict = "met" if met == len(rows) else "MISSED"
        out.append(f"- Target: CPU decode per token >= 1.5x faster than nano: **{verdict}** at {met}/{len(rows)} "
                   "contexts (speedup nano/ours: "
                   + ", ".join(f"{fmt_ctx(r.context)} {s:.2f}x" for r, s in zip(rows, speedups, strict=True)) + ")")
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        growth = hi.decode_ms["ours"] / lo.decode_ms["ours"]
        out.append(f"- Target: decode at the longest context <= 2x the shortest: ours {fmt_ctx(hi.context)} / "
                   f"{fmt_ctx(lo.context)} = {growth:.2f}x: **{'met' if growth <= 2 else 'MISSED'}**"
                   + (f" (nano: {hi.decode_ms['nano'] / lo.decode_ms['nano']:.2f}x)" if compare else ""))
    return out


def render(info: dict[str, str], rows: list[ContextRow], names: list[str], mem_label: str,
           kv: dict[str, float], agreements: dict[str, Agreement], notes: list[str]) -> str:
    compare = len(names) > 1
    lines = [f"## dsv4 bench: {info['title']} ({info['date']})", "",
             f"- Command: `{info['command']}`",
             f"- Machine: {info['machine']}",
             f"- Model: {info['model']}",
             f"- Method: {info['method']}", ""]
    if compare:
        head = ("| context | prefill tok/s ours | nano | ours/nano | decode ms/tok ours | nano | ours/nano | "
                f"{mem_label} MiB ours | nano | KV MiB ours | nano |")
    else:
        head = f"| context | prefill tok/s | decode ms/tok | {mem_label} MiB | KV MiB |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tps = {n: r.prefill_tokens / r.prefill_s[n] if r.prefill_s[n] > 0 else float("nan") for n in names}
        if compare:
            lines.append(
                f"| {fmt_ctx(r.context)} | {tps['ours']:.0f} | {tps['nano']:.0f} | {tps['ours'] / tps['nano']:.2f} | "
                f"{r.decode_ms['ours']:.2f} | {r.decode_ms['nano']:.2f} | "
                f"{r.decode_ms['ours'] / r.decode_ms['nano']:.2f} | {fmt_mib(r.peak_bytes['ours'])} | "
                f"{fmt_mib(r.peak_bytes['nano'])} | {fmt_mib(r.kv_bytes['ours'])} | {fmt_mib(r.kv_bytes['nano'])} |")
        else:
            lines.append(f"| {fmt_ctx(r.context)} | {tps['ours']:.0f} | {r.decode_ms['ours']:.2f} | "
                         f"{fmt_mib(r.peak_bytes['ours'])} | {fmt_mib(r.kv_bytes['ours'])} |")
    lines.append("")
    kv_line = (f"- KV bytes per token (per sequence): ours analytic {kv['analytic']:.1f}, measured "
               f"{kv['measured']:.1f} (KVCache.nbytes() growth from {kv['l1']} to {kv['l2']} tokens): "
               f"{'agree' if abs(kv['analytic'] - kv['measured']) < 1e-6 else 'DISAGREE'}")
    if "nano" in kv:
        kv_line += f"; nano measured {kv['nano']:.1f} (its cache state growth over the sweep)"
    lines.append(kv_line)
    lines += verdicts(rows, compare)
    for label, ag in agreements.items():
        lines.append(f"- Logits agreement ours vs nano, {label}: {ag.text()}")
    lines += notes
    lines.append("")
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------------------------------
def embedded_args(ns: argparse.Namespace, max_seq_len: int) -> ModelArgs:
    args = load_named_config(ns.config)
    if ns.overrides:
        args = args.replace(**dict(ns.overrides))
        args.validate(f"--set {' '.join(f'{k}={v}' for k, v in ns.overrides)}")
    return args.replace(max_seq_len=max_seq_len)


def run_bench(ns: argparse.Namespace) -> int:
    from .cli import EMBEDDED_SEED, load_model, make_ops, resolve_dtype
    from .weights import random_checkpoint

    contexts = list(ns.contexts)
    if ns.decode_steps < 1 or ns.warmup_steps < 0 or ns.prefill_chunk < 1 or ns.batch < 1:
        raise ValueError("--decode-steps, --prefill-chunk and --batch must be >= 1, --warmup-steps >= 0")
    if ns.overrides and ns.model:
        raise ValueError("--set applies to the embedded model only, not to --model checkpoints")
    if ns.threads:
        torch.set_num_threads(ns.threads)
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

    ops = make_ops(ns)
    dtype = resolve_dtype(ns, ops)
    device = ops.device
    tensors = None
    t0 = time.perf_counter()
    if ns.model:
        ns.max_seq_len = max_seq_len
        model, _, source = load_model(ns, ops, dtype)
        args = model.args
    else:
        args = embedded_args(ns, max_seq_len)
        # draw the random official-layout tensors once: our model and nano both load these very tensors
        tensors = dict(random_checkpoint(args, EMBEDDED_SEED))
        model = build_ours(args, tensors, ops, dtype, ns.weights)
        source = f"embedded {ns.config}" + (" with " + ", ".join(f"{k}={v}" for k, v in ns.overrides)
                                            if ns.overrides else "") + f", random weights (seed {EMBEDDED_SEED})"
    runners: list[Runner] = [OursRunner(model, ns.batch, max_seq_len)]
    if compare:
        runners.append(NanoRunner(build_nano(args, tensors, ns.model, dtype, device)))
    print(f"[bench] built in {time.perf_counter() - t0:.1f} s: {source}; backend {ops.name} on {device}, "
          f"{str(dtype).replace('torch.', '')}", file=sys.stderr)

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
        mod = _device_module(device)
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
                 f"{str(dtype).replace('torch.', '')}, weights {ns.weights}",
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
                     "code (shared/notes/toolchain.md). The config-aligned run gives both models the same settings "
                     "for: " + "; ".join(f"{d} ({how})" for d, how in NANO_DIFFERENCES_CONFIG)
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


def mem_label_text(meter: MemoryMeter) -> str:
    if meter.mod is None:
        return "peak RSS = process RSS sampled every 5 ms while that implementation ran (both models resident)"
    return "peak allocated = torch max_memory_allocated while that implementation ran"


def _spans(contexts: Iterable[int], steps_per_ctx: int) -> list[int]:
    """Prefill tokens per context of the sweep (for the progress bar's total)."""
    out, cur = [], 0
    for c in contexts:
        out.append(max(c - cur, 0))
        cur = max(c, cur) + steps_per_ctx
    return out


def main(argv: list[str] | None = None, prog: str = "bench") -> int:
    """Stand-alone entry (scripts/bench.py): the same flags as `dsv4 bench`."""
    from .cli import add_model_arguments

    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_bench_arguments(parser)
    ns = parser.parse_args(argv)
    ns.argv = [*prog.split(), *(sys.argv[1:] if argv is None else argv)]
    return run_bench(ns)

