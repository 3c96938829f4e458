"""`dsv4` command line: argument wiring only. Each command's work lives in its package (runtime, checkpoint, parity,
planner, bench); the model loading every command shares is dsv4.common.runtime.loading."""

from __future__ import annotations

import argparse
import sys

import torch

from dsv4.common.model.config import ConfigError, ModelArgs, load_named_config
from dsv4.common.runtime.backend import BackendUnavailable, probe_backend
from dsv4.common.runtime.distributed import RankFailure, process_group_cleanup
from dsv4.common.runtime.loading import add_backend_arguments, add_model_arguments, load_model, make_ops

DESCRIPTION = """DeepSeek-V4 inference on Ascend NPUs (torch_npu), NVIDIA GPUs (Triton) and CPU (pure torch reference),
with tools to prove numerically that they agree.

Start with:  dsv4 generate --prompt "Hello"     (runs the embedded tiny model on this machine)
             dsv4 doctor                        (which backends and fused operators this machine can use)"""


# -- commands -----------------------------------------------------------------------------------------------------
def cmd_generate(ns: argparse.Namespace) -> int:
    from dsv4.common.runtime.generate import run_generate

    model, tokenizer, source = load_model(ns)
    print(f"[dsv4] model: {source}; backend: {model.ops.name}; dtype: {str(model.dtype).replace('torch.', '')}",
          file=sys.stderr)
    return run_generate(ns, model, tokenizer)


def add_parity_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint directory (default: the embedded model of --config with random weights)")
    p.add_argument("--weights", default="dequantized", choices=["dequantized", "quantized"],
                   help="dequantize FP8/FP4 weights at load, or keep them quantized for the backend's GEMMs")
    p.add_argument("--max-seq-len", type=int, default=None, help="cache length (default: the config's)")


def cmd_parity(ns: argparse.Namespace) -> int:
    from dsv4.common.parity.cli import model_source_from_loader, run_parity

    source = model_source_from_loader(ns, lambda ns_, ops, dtype: load_model(ns_, ops, dtype)[0], ns.model)
    return run_parity(ns, source)


def cmd_doctor(ns: argparse.Namespace) -> int:
    print(f"torch {torch.__version__}")
    for name in ("reference", "ascend", "cuda"):
        info = probe_backend(name, ns.device)
        print(f"  backend {name:<9} {'available' if info.available else 'unavailable':<11} {info.reason}")
    try:
        ops = make_ops(ns)
    except BackendUnavailable as e:
        print(f"selected backend: error: {e}")
        return 1
    print(f"selected backend: {ops.name} on {ops.device}")
    described = ops.describe()
    width = max((len(k) for k in described), default=0)
    for op, how in described.items():
        print(f"  {op:<{width}}  {how}")
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    args = ModelArgs.load(ns.path) if ns.path and not ns.path.isidentifier() else load_named_config(ns.path or "tiny")
    for k, v in args.to_dict().items():
        print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text (greedy by default), streaming tokens as they come")
    add_model_arguments(p)
    from dsv4.common.runtime.generate import add_generate_arguments

    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("doctor", help="show which backends run here and which operator path each op takes")
    add_backend_arguments(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("config", help="print a model config (tiny, flash, pro, a YAML file or a config.json)")
    p.add_argument("path", nargs="?", default="tiny")
    p.set_defaults(func=cmd_config)

    from dsv4.common.checkpoint.writer import add_make_checkpoint_arguments, run_make_checkpoint

    p = sub.add_parser("make-checkpoint", help="write a deterministic random checkpoint in the official HF layout")
    add_make_checkpoint_arguments(p)
    p.set_defaults(func=run_make_checkpoint)

    from dsv4.common.planner.cli import add_plan_arguments, run_plan

    p = sub.add_parser("plan", help="capacity planning: memory per card, sequences that fit, roofline speed")
    add_plan_arguments(p)
    p.set_defaults(func=run_plan)

    from dsv4.common.parity.cli import add_parity_arguments

    p = add_parity_arguments(sub, extra=add_parity_model_arguments)
    p.set_defaults(func=cmd_parity)

    from dsv4.common.serve.cli import add_serve_arguments, cmd_serve

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (needs the [serve] extra)")
    add_model_arguments(p)
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    from dsv4.common.bench.cli import add_bench_arguments, run_bench

    p = sub.add_parser("bench", help="benchmark prefill/decode speed and memory, side by side with a baseline")
    add_model_arguments(p)
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 0
    try:
        with process_group_cleanup():
            return int(ns.func(ns) or 0)
    except (ConfigError, BackendUnavailable, ValueError, FileNotFoundError, RankFailure) as e:
        print(f"dsv4: error: {e}", file=sys.stderr)
        return 2
