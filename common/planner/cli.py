"""`dsv4 plan`: the capacity planner's arguments and output (the arithmetic is plan.py and below)."""

from __future__ import annotations

import argparse
import sys

from dsv4.common.planner.claims import claims, format_claims
from dsv4.common.planner.hardware import hardware_names, load_hardware
from dsv4.common.planner.plan import ACTIVATION_RESERVE_GIB, USABLE_FRACTION, format_plan, plan
from dsv4.common.planner.pool import DEFAULT_BLOCK_TOKENS, parse_workload
from dsv4.common.planner.sizes import (
    KV_DTYPES,
    REPLICATED,
    TP_OUT,
    WEIGHT_FORMATS,
    PlanError,
    load_model,
)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="flash", help="flash | pro | tiny | path to a YAML/config.json")
    parser.add_argument("--hardware", default="ascend-950dt",
                        help="device in configs/hardware.yaml (ascend-950pr, ascend-950dt (alias ascend-950), "
                             "ascend-910b, ascend-910c, h200, b200, b300) or 'list'")
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel size of attention and dense parts")
    parser.add_argument("--ep", type=int, default=8, help="expert-parallel size; cards = max(tp, ep)")
    parser.add_argument("--context", type=int, default=131072, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="concurrent sequences over the deployment")
    parser.add_argument("--weights", default="fp8", choices=WEIGHT_FORMATS,
                        help="fp8 = the release (FP8 linears, FP4 experts); fp4; bf16; w8a8; w4a8")
    parser.add_argument("--kv-dtype", default="bf16", choices=KV_DTYPES)
    parser.add_argument("--no-mtp", action="store_true", help="leave out the MTP block's weights and cache")
    parser.add_argument("--shared-expert", default=TP_OUT, choices=(TP_OUT, REPLICATED))
    parser.add_argument("--usable-fraction", type=float, default=USABLE_FRACTION)
    parser.add_argument("--reserve-gib", type=float, default=ACTIVATION_RESERVE_GIB)
    parser.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS,
                        help="tokens per KV block of the pool (a multiple of 128) for the 'seqs by the pool' rows")
    parser.add_argument("--workload", default=None, metavar="TOKENS[:SHARE],...",
                        help="sequence-length mix for the pool rows, e.g. 1024:0.9,131072:0.1 (default: all "
                             "sequences of --context tokens)")
    parser.add_argument("--ttft-ms", type=float, default=None,
                        help="also print the prefix-cache hit rate a --context-token prompt needs for this TTFT")
    parser.add_argument("--claims", action="store_true",
                        help="also print KV and attention FLOPs against MLA / DSA baselines at --context")


def run_plan(args: argparse.Namespace) -> int:
    """0: printed a plan that fits; 1: printed a plan whose batch does not fit; 2: no plan (error on stderr)."""
    try:
        if args.hardware == "list":
            for n in hardware_names():
                hw = load_hardware(n)
                print(f"{n:14s} {hw.hbm_gib:6g} GiB {hw.hbm_tbps:4g} TB/s  {hw.description}")
            return 0
        p = plan(args.model, args.hardware, tp=args.tp, ep=args.ep, context=args.context, batch=args.batch,
                 weights=args.weights, kv_dtype=args.kv_dtype, mtp=not args.no_mtp,
                 shared_expert=args.shared_expert, usable_fraction=args.usable_fraction,
                 reserve_gib=args.reserve_gib, block_tokens=args.block_tokens,
                 workload=parse_workload(args.workload) if args.workload else None, ttft_ms=args.ttft_ms)
        print(format_plan(p))
        if args.claims:
            print(format_claims(p.model, claims(load_model(args.model)[1], args.context, args.kv_dtype)))
        return 0 if p.fits else 1
    except PlanError as e:
        print(f"dsv4 plan: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4 plan", description="DeepSeek-V4 capacity planner")
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
