"""`dsv4` command line: argument wiring only. Each command's work lives in its package (runtime, checkpoint, parity,
planner, bench); the model loading every command shares is dsv4.common.runtime.loading."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from dsv4.common.model.config import ConfigError, ModelArgs, load_named_config
from dsv4.common.runtime.backend import BackendUnavailable, probe_backend
from dsv4.common.runtime.distributed import RankFailure, describe_collective_failure, process_group_cleanup
from dsv4.common.runtime.guards import NonFiniteLogitsError
from dsv4.common.runtime.loading import (
    add_backend_arguments,
    add_model_arguments,
    apply_threads,
    check_fits_memory,
    check_run_arguments,
    load_model,
    make_ops,
)

DESCRIPTION = """DeepSeek-V4 inference on Ascend NPUs (torch_npu), NVIDIA GPUs (Triton) and CPU (pure torch reference),
with tools to prove numerically that they agree.

Start with:  dsv4 generate --prompt "Hello"     (runs the embedded tiny model on this machine)
             dsv4 doctor                        (which backends and fused operators this machine can use)"""


# -- commands -----------------------------------------------------------------------------------------------------
def cmd_generate(ns: argparse.Namespace) -> int:
    from dsv4.common.runtime.generate import run_generate

    if not ns.prompt:  # before minutes of loading
        raise ValueError("give at least one --prompt")
    for i, p in enumerate(ns.prompt):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the terminal could not decode reach us as lone surrogates
            raise ValueError(f"--prompt #{i + 1} is not valid UTF-8 (byte {e.object[e.start:e.end]!r} at position "
                             f"{e.start}); check the terminal's or the file's encoding") from None
    model, tokenizer, source = load_model(ns)
    print(f"[dsv4] model: {source}; backend: {model.ops.name}; dtype: {str(model.dtype).replace('torch.', '')}",
          file=sys.stderr)
    rc = run_generate(ns, model, tokenizer)
    if ns.speculative and not ns.model and rc == 0:
        # measured: the random MTP head's drafts match neither the greedy continuation nor the main head's own
        # prediction of the same token (0 of 38 and 0 of 48 on the tiny default); tests/test_generate.py drives
        # the accept path with an oracle draft instead
        print("[dsv4] MTP acceptance near 0 is expected here: the embedded default has random weights, so its MTP "
              "layer's drafts are unrelated to the main model's tokens (a trained checkpoint's MTP layer agrees "
              "with it most of the time)", file=sys.stderr)
    return rc


def add_parity_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint directory (default: the embedded model of --config with random weights)")
    p.add_argument("--weights", default="dequantized", choices=["dequantized", "quantized"],
                   help="dequantize FP8/FP4 weights at load, or keep them quantized for the backend's GEMMs")
    p.add_argument("--max-seq-len", type=int, default=None, help="cache length (default: the config's)")


def cmd_parity(ns: argparse.Namespace) -> int:
    from dsv4.common.parity.cli import model_source_from_loader, run_parity

    if not ns.model:  # the embedded model of --config: refuse what cannot fit before any backend builds it
        names = [ns.dtype] if isinstance(ns.dtype, str) else (ns.dtype or ["fp32"])  # endpoint: one or none
        dtype = torch.float32 if "fp32" in names else torch.bfloat16
        where = argparse.Namespace(device=torch.device(ns.device or "cpu"))
        check_fits_memory(load_named_config(ns.config or "tiny"), where, dtype, ns.weights, embedded=True)
    source = model_source_from_loader(ns, lambda ns_, ops, dtype: load_model(ns_, ops, dtype)[0], ns.model)
    return run_parity(ns, source)


def cmd_doctor(ns: argparse.Namespace) -> int:
    from dsv4.ascend import doctor_lines  # versions from package metadata: never imports torch_npu

    print("\n".join(doctor_lines()))
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


# Ordinary mistakes and bad inputs end with one line naming the flag, file, tensor or field (exit 2); DSV4_DEBUG=1
# shows the traceback instead. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, BackendUnavailable, ValueError, FileNotFoundError, RankFailure, MemoryError,
               NonFiniteLogitsError, ImportError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 0
    try:
        with process_group_cleanup():
            if hasattr(ns, "threads"):
                check_run_arguments(ns)
                apply_threads(ns)
            try:
                rc = int(ns.func(ns) or 0)
            except RuntimeError as e:  # under torchrun: a peer died mid-collective (before the group is destroyed)
                why = describe_collective_failure(e)
                if why is None or os.environ.get("DSV4_DEBUG"):
                    raise
                raise RankFailure(why) from None
            sys.stdout.flush()  # a pipe closed early fails here, inside the handler below, not at interpreter exit
            return rc
    except BrokenPipeError:  # `dsv4 config flash | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not complain either
        return 141  # 128 + SIGPIPE, what a shell reports for a process ended by a closed pipe
    except KeyboardInterrupt:
        print("dsv4: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("DSV4_DEBUG"):
            raise
        rank = int(os.environ.get("RANK", 0))
        # ranks other than 0 print nothing (load_model silences them): their own error still reaches the terminal
        print(f"dsv4: error: {e}" if rank == 0 else f"dsv4: rank {rank}: error: {e}",
              file=sys.stderr if rank == 0 else sys.__stderr__)
        return 2
