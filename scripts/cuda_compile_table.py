"""Print the GPU build table of the CUDA backend's Triton kernels (issue 21), made on a machine without a GPU.

Records every kernel launch of the model graph on CudaOps at the shapes of dsv4.cuda.compile_check.SCENARIOS (V4-Flash
layers, and a small model with the release's attention dims), compiles each distinct specialization for each target
with the ptxas in the triton wheel, and prints one markdown row per (kernel, dtypes, constexprs, launch options):
shared memory, registers and spills per target, the worst over the int/alignment specializations of that row.
Exit status 1 when any build fails, exceeds the target's shared memory per block, or spills registers.

    python scripts/cuda_compile_table.py [--scenarios flash,release-small] [--targets sm_90,sm_100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dsv4.cuda.compile_check import DISTINCT, SCENARIOS, TARGETS, check, group_rows, problems


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--distinct", choices=DISTINCT, default="exact",
                    help="exact: every specialization Triton would build; class: one per table row; largest: the "
                         "largest tile of each family (see dsv4.cuda.compile_check.select)")
    ap.add_argument("--json", help="also write the raw per-launch results here")
    a = ap.parse_args(argv)
    targets = [t for t in a.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            print(f"--targets: unknown target {t!r}; expected some of {sorted(TARGETS)}", file=sys.stderr)
            return 2
    scenarios = [s for s in a.scenarios.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            print(f"--scenarios: unknown scenario {s!r}; expected some of {sorted(SCENARIOS)}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    launches = check(scenarios, targets, distinct=a.distinct)
    wall = time.perf_counter() - t0
    if a.json:
        Path(a.json).write_text(json.dumps(launches, indent=1))
    head = "| kernel | dtypes | constexprs | warps/stages | builds |"
    for t in targets:
        head += f" {t} smem KiB | {t} regs | {t} spills |"
    print(head)
    print("|" + "---|" * (5 + 3 * len(targets)))
    bad = []
    for row in group_rows(launches):
        opts = row["options"]
        line = (f"| {row['kernel']} | {row['dtypes']} | {row['constexprs']} | "
                f"{opts.get('num_warps', 4)}/{opts.get('num_stages', 3)} | {row['builds']} |")
        for t in targets:
            r = row["worst"][t]
            if r["error"]:
                line += " error | - | - |"
            else:
                line += f" {_kib(r['shared'])} | {r['regs']} | {r['spill_stores'] + r['spill_loads']} |"
        print(line)
    for launch in launches:
        for r in launch["results"]:
            for p in problems(launch, r):
                bad.append(f"{launch['kernel']} {launch['constexprs']} on {r['target']}: {p}")
    limits = ", ".join(f"{t} {TARGETS[t][1]} B" for t in targets)
    n_builds = sum(len(x["results"]) for x in launches)
    print(f"\n{len(launches)} specializations x {len(targets)} targets = {n_builds} builds in {wall:.0f} s; "
          f"shared memory limit per block: {limits}; (default num_warps/num_stages: 4/3)")
    for b in bad:
        print(f"FAIL {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
