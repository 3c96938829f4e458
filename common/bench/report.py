"""The report of `dsv4 bench`: the markdown table appended to BENCHMARKS.md, the verdicts against the two targets,
and the command line that reproduces a run. Importable from common/bench.py too. Also what the benchmark scripts
(scripts/bench_*.py, count_decode_ops.py) share: their marked section of BENCHMARKS.md and the load average.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from dsv4.common.bench.measure import Agreement, ContextRow, MemoryMeter


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
        out.append(f"- Target: CPU decode per token >= 1.5x faster than nano: **{verdict}** (met at {met}/{len(rows)} "
                   "contexts; speedup nano/ours: "
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


def mem_label_text(meter: MemoryMeter) -> str:
    if meter.mod is None:
        return "peak RSS = process RSS sampled every 5 ms while that implementation ran (both models resident)"
    return "peak allocated = torch max_memory_allocated while that implementation ran"


def write_marked_section(path: Path, name: str, section: str) -> None:
    """Put `section` between `<!-- name:begin -->` and `<!-- name:end -->` in `path`: in place of that section if the
    file has it, else appended (the file is created if missing). Nothing else in the file is touched: each script
    owns its section."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section is owned by the script it names.\n"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, "n/a" where the OS has none (a shared machine's timings need them)."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
