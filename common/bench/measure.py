"""The measuring side of `dsv4 bench`: machine description and memory meters, logits agreement, and the sweep that
grows one batch of sequences through the contexts and times prefill and decode. Importable from common/bench.py too.
"""

from __future__ import annotations

import cProfile
import io
import os
import platform
import pstats
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from dsv4.common.bench.runners import OursRunner, Runner


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


def device_module(device: torch.device):
    """torch.cuda / torch.npu for accelerator devices, None for CPU."""
    if device.type == "cpu":
        return None
    return getattr(torch, device.type, None)


def sync(device: torch.device) -> None:
    mod = device_module(device)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize(device)


class MemoryMeter:
    """Peak memory of phases. CPU: a sampling thread tracks RSS (a phase's peak starts at the RSS it began with);
    devices: the allocator's peak statistic, reset at each phase start."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device, self.interval = device, interval_s
        self.mod = device_module(device)
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
