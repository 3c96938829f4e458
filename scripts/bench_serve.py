"""Load test of `dsv4 serve` on 127.0.0.1: throughput and latency at several concurrencies, and the time to first
token of short requests while a long prompt prefills beside them. Bounded: a fixed number of requests per level and
a time limit per phase (a phase that runs out of time reports what finished).

1. Concurrency levels (default 1, 4, 16, 64): `--requests-per-level` x level requests (at least --min-requests), each
   a `--prompt-tokens` prompt and `--max-tokens` generated tokens (ignore_eos), streamed; at most `level` in flight.
   Reported: output tokens/s and requests/s over the level's wall time, TTFT and inter-token latency p50/p99.
   Target: output tokens/s at concurrency 16 >= 8x concurrency 1.
2. Interference: TTFT of short requests sent one after another, first on an idle server, then while a
   `--long-prompt`-token prompt prefills (the short ones counted are those that started and got their first token
   while the long prompt had not). Target: TTFT p99 beside the long prompt <= 2x idle.

The server is the real `dsv4 serve` command in its own process on the embedded tiny model; the clients are asyncio +
httpx in this process on the same machine (their cost competes for the same cores, so they read raw bytes and count
SSE events without parsing them).

    python scripts/bench_serve.py                           # prints a markdown section
    python scripts/bench_serve.py --markdown BENCHMARKS.md  # also writes it (only this script's section)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from dsv4.common.bench.report import write_marked_section
from dsv4.common.model.config import load_named_config

NAME = "bench"


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def start_server(a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """The real `dsv4 serve` in its own process (its own GIL: the load generator here does not slow it down), on
    --port 0: it binds a free port before loading and names it in its 'serving ... on http://...' line (a port picked
    here could be taken before the server binds it)."""
    argv = [sys.executable, "-m", "dsv4", "serve", "--config", a.config, "--backend", a.backend,
            "--max-seq-len", str(a.max_seq_len), "--max-batch", str(a.max_batch), "--prefill-chunk",
            str(a.prefill_chunk), "--max-waiting", "4096", "--port", "0", "--served-model-name", NAME]
    if a.device:
        argv += ["--device", a.device]
    if a.step_tokens:
        argv += ["--step-tokens", str(a.step_tokens)]
    if a.long_prefill_chunk:
        argv += ["--long-prefill-chunk", str(a.long_prefill_chunk)]
    if a.compile_decode:
        argv += ["--compile-decode", a.compile_decode]
    if a.batched_decode_min_rows is not None:
        argv += ["--batched-decode-min-rows", str(a.batched_decode_min_rows)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()  # keeps the pipe drained
    deadline = time.monotonic() + 300
    url = None
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start ({' '.join(argv)}):\n{''.join(log)}")
        if url is None:
            found = re.search(r"serving '[^']*' on (http://127\.0\.0\.1:\d+)/v1", "".join(log))
            url = found.group(1) if found else None
        try:
            if url is not None and httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


async def one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: start, first-token and per-token arrival times. The client shares the server's
    cores, so it reads raw bytes and only counts the SSE events (`data: ...` blocks, blank-line separated); it
    parses JSON only for an event that carries an error."""
    t0 = time.perf_counter()
    times: list[float] = []
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        buf = b""
        async for chunk in r.aiter_raw():
            now = time.perf_counter()
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                    continue
                if b'"error"' in ev and "error" in json.loads(ev[6:]):
                    raise RuntimeError(json.loads(ev[6:])["error"]["message"])
                times.append(now)
    return {"start": t0, "times": times}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prompt_of(n: int, i: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(4, vocab, (n,), generator=g).tolist()


async def level(url: str, conc: int, n_req: int, a: argparse.Namespace, vocab: int) -> dict:
    sem = asyncio.Semaphore(conc)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(timeout=a.time_limit, limits=limits) as client:
        async def run(i: int) -> None:
            async with sem:
                results.append(await one(client, url, prompt_of(a.prompt_tokens, i, vocab), a.max_tokens))

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(run(i)) for i in range(n_req)]
        done, pending = await asyncio.wait(tasks, timeout=a.time_limit)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
    for t in done:
        t.result()  # a failed request fails the benchmark loudly
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - x for r in results for x, b in zip(r["times"], r["times"][1:], strict=False)]
    toks = sum(len(r["times"]) for r in results)
    return {"conc": conc, "requests": len(results), "asked": n_req, "wall": wall, "tokens": toks, "tok_s": toks / wall,
            "req_s": len(results) / wall, "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "itl50": pct(itl, 50),
            "itl99": pct(itl, 99)}


async def interference(url: str, a: argparse.Namespace, vocab: int) -> dict:
    async with httpx.AsyncClient(timeout=a.time_limit) as client:
        idle = []
        for i in range(a.short_requests):
            r = await one(client, url, prompt_of(a.prompt_tokens, 5000 + i, vocab), 1)
            idle.append(r["times"][0] - r["start"])
        long_task = asyncio.create_task(one(client, url, prompt_of(a.long_prompt, 9999, vocab), 1))
        beside, t_end = [], time.perf_counter() + a.time_limit
        i = 0
        while not long_task.done() and time.perf_counter() < t_end:
            r = await one(client, url, prompt_of(a.prompt_tokens, 6000 + i, vocab), 1)
            i += 1
            if not long_task.done():  # only those that finished while the long prompt was still prefilling
                beside.append(r["times"][0] - r["start"])
        long_r = await long_task
        for i in range(a.short_requests):  # idle again: the machine's load drifts, so idle brackets the long phase
            r = await one(client, url, prompt_of(a.prompt_tokens, 7000 + i, vocab), 1)
            idle.append(r["times"][0] - r["start"])
        alone = float("nan")
        if a.long_alone:  # the same long prompt with nothing beside it: what the short requests cost it
            r = await one(client, url, prompt_of(a.long_prompt, 9998, vocab), 1)
            alone = r["times"][0] - r["start"]
    return {"idle": idle, "beside": beside, "long_ttft": long_r["times"][0] - long_r["start"], "long_alone": alone}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def section(a: argparse.Namespace, rounds: list[dict], total_s: float) -> str:
    """One run's markdown: per level the median over rounds; each target as the median of its per-round ratios
    (a ratio is only read within one round, whose levels ran minutes apart under the same machine load)."""
    concs = list(rounds[0]["levels"])
    rows = []
    for c in concs:
        xs = [r["levels"][c] for r in rounds]
        med = {k: median([x[k] for x in xs]) for k in ("tok_s", "req_s", "ttft50", "ttft99", "itl50", "itl99")}
        ratio = median([r["levels"][c]["tok_s"] / r["levels"][1]["tok_s"] for r in rounds]) if 1 in concs else None
        done = "/".join(str(v) for v in (min(x["requests"] for x in xs), xs[0]["asked"]))
        rows.append(f"| {c} | {done} | {med['tok_s']:.1f} | {f'{ratio:.1f}x' if ratio else '-'} | "
                    f"{med['req_s']:.2f} | {med['ttft50'] * 1e3:.0f} | {med['ttft99'] * 1e3:.0f} | "
                    f"{med['itl50'] * 1e3:.1f} | {med['itl99'] * 1e3:.1f} |")
    loads = ", ".join(f"{r['load'][0]:.1f}-{r['load'][1]:.1f}" for r in rounds)
    lines = [
        "## Serving: continuous batching under load (scripts/bench_serve.py)",
        "",
        f"Command: `{' '.join(['python scripts/bench_serve.py', *sys.argv[1:]])}`",
        "",
        f"Setup: `dsv4 serve` (its own process) on 127.0.0.1, streaming clients (asyncio + httpx, events "
        f"counted from raw bytes) in the benchmark's process; embedded {a.config} model (random weights), backend "
        f"{a.backend}, its default dtype, max_batch "
        f"{a.max_batch}, prefill chunk {a.prefill_chunk} (long prompts {a.long_prefill_chunk}), step budget "
        f"{a.step_tokens or a.prefill_chunk + a.max_batch} tokens; requests: {a.prompt_tokens}-token prompts, "
        f"{a.max_tokens} generated tokens (greedy, ignore_eos); "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, server threads "
        f"{a.threads or 'default'}. {len(rounds)} rounds, each the whole sweep then the interference phase; every "
        f"number is the median over the rounds, each ratio the median of its per-round ratios. 1-min load average "
        f"at the start-end of each round: {loads} (the machine is shared). Total {total_s:.0f} s.",
        "",
        "| concurrency | requests done | output tok/s | vs concurrency 1 | req/s | TTFT p50 ms | TTFT p99 ms | "
        "ITL p50 ms | ITL p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    if 16 in concs and 1 in concs:
        per = [r["levels"][16]["tok_s"] / r["levels"][1]["tok_s"] for r in rounds]
        m = median(per)
        lines.append(f"Target (output tok/s at concurrency 16 >= 8x concurrency 1): {m:.1f}x (rounds: "
                     f"{', '.join(f'{x:.1f}x' for x in per)}), {'met' if m >= 8 else 'NOT met'}.")
        lines.append("")
        cpu = [r["levels"][1]["cpu_per_tok"] / r["levels"][16]["cpu_per_tok"] for r in rounds]
        per_tok = ", ".join(f"concurrency {c} {median([r['levels'][c]['cpu_per_tok'] for r in rounds]) * 1e3:.1f} ms"
                            for c in concs)
        lines.append("The server process's CPU time per output token (all its threads; what other processes on the "
                     f"machine take does not count): {per_tok}; concurrency 1 over 16: {median(cpu):.1f}x (rounds: "
                     f"{', '.join(f'{x:.1f}x' for x in cpu)}), the ratio with a core to itself.")
        lines.append("")
    if rounds[0].get("inter"):
        it = [r["inter"] for r in rounds]
        per = [pct(i["beside"], 99) / pct(i["idle"], 99) for i in it]
        m = median(per)
        idle = [x for i in it for x in i["idle"]]
        beside = [x for i in it for x in i["beside"]]
        long_t = median([i["long_ttft"] for i in it])
        alone_t = median([i["long_alone"] for i in it])
        alone = f"; alone {alone_t:.2f} s" if alone_t == alone_t else ""
        lines += [
            f"Interference, per round: {a.short_requests} short requests ({a.prompt_tokens}-token prompts, 1 token) "
            f"one after another on the idle server before and {a.short_requests} after, and more while a "
            f"{a.long_prompt}-token prompt prefilled beside "
            f"them ({len(beside)} in all; the long prompt's own TTFT beside them {long_t:.2f} s{alone}, medians "
            f"over the rounds). The table pools the rounds' samples; the target is the median of the per-round "
            f"ratios.",
            "",
            "| short-request TTFT | p50 ms | p99 ms |",
            "|---|---:|---:|",
            f"| idle | {pct(idle, 50) * 1e3:.0f} | {pct(idle, 99) * 1e3:.0f} |",
            f"| beside the {a.long_prompt}-token prefill | {pct(beside, 50) * 1e3:.0f} | {pct(beside, 99) * 1e3:.0f} |",
            "",
            f"Target (TTFT p99 beside the long prefill <= 2x idle): {m:.2f}x (rounds: "
            f"{', '.join(f'{x:.2f}x' for x in per)}), {'met' if m <= 2 else 'NOT met'}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--backend", default="reference")
    p.add_argument("--device", default=None)
    p.add_argument("--max-seq-len", type=int, default=4608, help="room for the long prompt")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=256, help="the server default")
    p.add_argument("--long-prefill-chunk", type=int, default=16)
    p.add_argument("--compile-decode", default=None,
                   help="the server's --compile-decode (eager: the static-shape step uncaptured, all rows at once)")
    p.add_argument("--step-tokens", type=int, default=None)
    p.add_argument("--batched-decode-min-rows", type=int, default=None,
                   help="the server's --batched-decode-min-rows (0: decode always through the eager forward)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests-per-level", type=int, default=2, help="requests = this x concurrency ...")
    p.add_argument("--min-requests", type=int, default=8, help="... but at least this many")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--long-prompt", type=int, default=4096)
    p.add_argument("--short-requests", type=int, default=10)
    p.add_argument("--no-interference", action="store_true", help="only the concurrency levels (quick looks)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat the sweep and the interference phase: medians over the rounds, ratios per round")
    p.add_argument("--no-long-alone", dest="long_alone", action="store_false",
                   help="skip timing the long prompt alone after the interference phase")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (OMP_NUM_THREADS)")
    p.add_argument("--markdown", type=Path, default=None, help="write the section into this file")
    a = p.parse_args()
    proc, url = start_server(a)
    vocab = load_named_config(a.config).vocab_size
    t0 = time.perf_counter()
    try:
        asyncio.run(level(url, 1, 2, a, vocab))  # warm-up
        rounds: list[dict] = []
        for rnd in range(a.rounds):  # the machine is shared: ratios are taken within a round, then the median
            load0 = os.getloadavg()[0]
            levels = {}
            for c in [int(x) for x in a.concurrency.split(",")]:
                cpu0 = cpu_seconds(proc.pid)
                levels[c] = asyncio.run(level(url, c, max(a.min_requests, a.requests_per_level * c), a, vocab))
                levels[c]["cpu_per_tok"] = (cpu_seconds(proc.pid) - cpu0) / max(levels[c]["tokens"], 1)
                print(f"round {rnd + 1}, concurrency {c}: {levels[c]['tok_s']:.1f} tok/s", file=sys.stderr)
            inter = None if a.no_interference else asyncio.run(interference(url, a, vocab))
            if inter:
                print(f"round {rnd + 1}, interference: idle p99 {pct(inter['idle'], 99) * 1e3:.0f} ms, beside p99 "
                      f"{pct(inter['beside'], 99) * 1e3:.0f} ms, long {inter['long_ttft']:.1f} s", file=sys.stderr)
            rounds.append({"levels": levels, "inter": inter, "load": (load0, os.getloadavg()[0])})
    finally:
        proc.terminate()
        proc.wait(60)
    text = section(a, rounds, time.perf_counter() - t0)
    print(text)
    if a.markdown:
        write_marked_section(a.markdown, "bench_serve", text)
        print(f"wrote {a.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
