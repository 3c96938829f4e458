"""Peak memory of loading a synthetic ~1 GB checkpoint in the official HF layout.

Writes the checkpoint (make_checkpoint, a bigger-dims config) into a temporary directory in one process, loads it
with load_checkpoint in a fresh process (so the peak RSS is the loader's alone), and reports the peak resident set
against the bytes of the model's parameters. Appends a row to BENCHMARKS.md (section "Checkpoint loading").

    python scripts/bench_load.py                       # ~1 GB, bf16 checkpoint, bf16 model
    python scripts/bench_load.py --size-gb 0.2 --dtype fp32 --no-record

Peak RSS counts the pages of the shard being read (safetensors memory-maps it; the loader drops each shard's
mapping when done), so the expected peak is about: interpreter + parameters + one shard + one tensor's temporaries.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Checkpoint loading (scripts/bench_load.py)"
TABLE_HEADER = ("| date | command | checkpoint | shards | model params | baseline RSS | peak RSS | peak - baseline - "
                "params | load s | machine |\n|---|---|---|---|---|---|---|---|---|---|\n")


def bench_args(size_gb: float):
    """A V4-shaped config (all three attention kinds, hash + biased layers, MTP) with the routed-expert count chosen
    so that the bf16 checkpoint is about size_gb."""
    from dsv4.common.checkpoint.layout import args_for_quant, checkpoint_layout
    from dsv4.common.checkpoint.writer import spec_nbytes
    from dsv4.common.model.config import load_named_config

    base = load_named_config("tiny").replace(vocab_size=32768, dim=1024, n_heads=8, q_lora_rank=512, o_groups=4,
                                             o_lora_rank=256, moe_inter_dim=512, index_n_heads=8, n_routed_experts=8,
                                             n_activated_experts=2)

    def size(e: int) -> int:
        a = args_for_quant(base.replace(n_routed_experts=e), "none")
        return sum(spec_nbytes(s) for s in checkpoint_layout(a).values())

    per_expert = (size(16) - size(8)) / 8
    experts = max(8, int((size_gb * 1e9 - size(8)) / per_expert) + 8)
    return base.replace(n_routed_experts=experts)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child_generate(ns: argparse.Namespace) -> None:
    from dsv4.common.checkpoint.writer import make_checkpoint

    w = make_checkpoint(bench_args(ns.size_gb), ns.dir, quant=ns.quant, seed=0, shard_size_bytes=ns.shard_bytes,
                        tokenizer=False)
    print(json.dumps({"total_size": w.total_size, "shards": len(w.shards)}))


def child_load(ns: argparse.Namespace) -> None:
    import torch

    from dsv4.common.checkpoint.reader import load_checkpoint
    from dsv4.common.model.reference import ReferenceOps

    torch.ones(1) + 1  # initialise torch's allocator and thread pool before the baseline
    baseline = rss_bytes()
    t0 = time.perf_counter()
    model = load_checkpoint(ns.dir, ReferenceOps(), dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[ns.dtype],
                            weights=ns.weights, progress=False)
    seconds = time.perf_counter() - t0
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"baseline": baseline, "peak": rss_bytes(), "params": params, "seconds": seconds}))


def run_child(mode: str, ns: argparse.Namespace, directory: str) -> dict:
    cmd = [sys.executable, __file__, f"--_{mode}", "--dir", directory, "--size-gb", str(ns.size_gb), "--quant",
           ns.quant, "--dtype", ns.dtype, "--weights", ns.weights, "--shard-bytes", str(ns.shard_bytes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def record(row: str) -> Path:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured numbers, one section per tool.\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\nPeak resident set of `load_checkpoint` in a fresh process " \
            "(ru_maxrss, includes the memory-mapped pages of the shard being read) against the bytes of the loaded " \
            "model's parameters and buffers. Baseline = RSS after importing torch and dsv4.\n\n" + TABLE_HEADER
        text += row + "\n"
    else:  # append to the end of this section's table, leaving other sections alone
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        end = len(text) if nxt < 0 else nxt
        text = text[:end].rstrip("\n") + "\n" + row + "\n" + text[end:]
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size to generate (default 1.0)")
    p.add_argument("--quant", default="none", choices=["none", "fp8", "fp4"],
                   help="checkpoint formats (none = bf16; fp8/fp4 generation is slow on CPU)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="model dtype (default bf16)")
    p.add_argument("--weights", default="dequantized", choices=["dequantized", "quantized"])
    p.add_argument("--shard-bytes", type=int, default=200_000_000, help="max shard size (default 200 MB)")
    p.add_argument("--keep", default=None, metavar="DIR", help="write the checkpoint here and keep it")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--_generate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns._generate:
        child_generate(ns)
        return 0
    if ns._load:
        child_load(ns)
        return 0
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-") as tmp:
        directory = ns.keep or str(Path(tmp) / "ck")
        t0 = time.perf_counter()
        gen = run_child("generate", ns, directory)
        gen_s = time.perf_counter() - t0
        res = run_child("load", ns, directory)
    gb = 1e9
    over = res["peak"] - res["baseline"] - res["params"]
    print(f"checkpoint   {gen['total_size'] / gb:.3f} GB in {gen['shards']} shards (written in {gen_s:.1f} s)")
    print(f"parameters   {res['params'] / gb:.3f} GB ({ns.dtype}, {ns.weights})")
    print(f"baseline RSS {res['baseline'] / gb:.3f} GB")
    print(f"peak RSS     {res['peak'] / gb:.3f} GB  (peak - baseline - params = {over / gb:.3f} GB, "
          f"largest shard <= {ns.shard_bytes / gb:.3f} GB)")
    print(f"load time    {res['seconds']:.1f} s")
    if not ns.no_record:
        cmd = "python scripts/bench_load.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        row = (f"| {datetime.date.today()} | `{cmd}` | {gen['total_size'] / gb:.3f} GB {ns.quant} | {gen['shards']} "
               f"| {res['params'] / gb:.3f} GB {ns.dtype} | {res['baseline'] / gb:.3f} GB | {res['peak'] / gb:.3f} GB "
               f"| {over / gb:.3f} GB | {res['seconds']:.1f} | {machine} |")
        print(f"recorded in {record(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
