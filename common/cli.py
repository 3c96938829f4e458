"""`dsv4` command line. Every command that runs the model takes --model (a checkpoint directory; without it the
embedded default, a tiny V4-shaped model with deterministic random weights), --backend and --device."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .backend import CHOICES, BackendUnavailable, default_dtype, probe_backend, select_backend
from .config import ConfigError, ModelArgs, load_named_config
from .distributed import RankFailure, process_group_cleanup

EMBEDDED_SEED = 0

DESCRIPTION = """DeepSeek-V4 inference on Ascend NPUs (torch_npu), NVIDIA GPUs (Triton) and CPU (pure torch reference),
with tools to prove numerically that they agree.

Start with:  dsv4 generate --prompt "Hello"     (runs the embedded tiny model on this machine)
             dsv4 doctor                        (which backends and fused operators this machine can use)"""


# -- shared arguments ---------------------------------------------------------------------------------------------
def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--backend", default="auto", choices=CHOICES,
                   help="ops implementation: auto picks an Ascend NPU, else a CUDA GPU, else the CPU reference")
    g.add_argument("--device", default=None, help="torch device, e.g. npu:0, cuda:1, cpu (default: the backend's)")
    g.add_argument("--emulate", action="store_true",
                   help="ascend only: run the NPU code path on CPU against the emulated torch_npu operators")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    add_backend_arguments(p)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint directory (config.json + safetensors); default: the embedded tiny model")
    g.add_argument("--config", default="tiny",
                   help="embedded default only: a config name (tiny, flash, pro) or YAML path (default: tiny)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="activation dtype (default: bf16 on accelerators, fp32 on CPU)")
    g.add_argument("--weights", default="dequantized", choices=["dequantized", "quantized"],
                   help="dequantize FP8/FP4 weights at load, or keep them quantized for the backend's GEMMs")
    g.add_argument("--max-seq-len", type=int, default=None, help="cache length (default: the config's)")
    g.add_argument("--npu-graph", action="store_true",
                   help="ascend only: run the model as a TorchAir graph (unverified without NPU hardware)")
    g = p.add_argument_group("parallelism (launch with torchrun --nproc-per-node N -m dsv4 ...)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: attention heads, output groups, vocab")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel ranks: routed experts (may exceed --tp)")
    g.add_argument("--ep-comm", default="alltoall", choices=["alltoall", "allreduce", "mc2"],
                   help="how expert-parallel ranks exchange tokens: dispatch/combine (default) or output all-reduce")


def make_ops(ns: argparse.Namespace):
    options = {"emulate": True} if getattr(ns, "emulate", False) else {}
    return select_backend(ns.backend, ns.device, **options)


def resolve_dtype(ns: argparse.Namespace, ops) -> torch.dtype:
    if getattr(ns, "dtype", None):
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[ns.dtype]
    return default_dtype(ops)


def load_model(ns: argparse.Namespace, ops=None, dtype: torch.dtype | None = None):
    """(model, tokenizer, source description) for --model / the embedded default. Under torchrun (or with
    --tp/--ep > 1) this joins the process group, each rank loads only its shard, and only rank 0 prints."""
    from .distributed import all_ranks_ok, init_parallel
    from .tokenizer import TextTokenizer
    from .weights import build_random_model

    ops = ops or make_ops(ns)
    dtype = dtype or resolve_dtype(ns, ops)
    rt = init_parallel(ops, getattr(ns, "tp", 1), getattr(ns, "ep", 1), ep_comm=getattr(ns, "ep_comm", "alltoall"))
    if not rt.is_main and not os.environ.get("DSV4_DEBUG"):
        # rank 0 speaks for the job (other ranks' failures reach it through all_ranks_ok); DSV4_DEBUG=1 keeps all
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115

    def load():
        if ns.model:
            from .checkpoint import load_checkpoint

            model = load_checkpoint(ns.model, rt.ops, dtype=dtype, weights=ns.weights, max_seq_len=ns.max_seq_len,
                                    parallel=rt.parallel, progress=rt.is_main)
            return model, TextTokenizer.from_dir(ns.model, model.args), f"checkpoint {ns.model}"
        args = load_named_config(ns.config)
        if ns.max_seq_len:
            args = args.replace(max_seq_len=ns.max_seq_len)
        model = build_random_model(args, rt.ops, dtype=dtype, seed=EMBEDDED_SEED, weights=ns.weights,
                                   parallel=rt.parallel)
        return model, TextTokenizer.byte_level(args), f"embedded default ({ns.config}, random weights, seed 0)"

    model, tokenizer, source = all_ranks_ok("loading the model", load)
    if getattr(ns, "npu_graph", False):
        if not model.ops.name.startswith("ascend"):
            raise ValueError(f"--npu-graph needs the ascend backend, not {model.ops.name!r}")
        from dsv4.ascend import compile_graph

        try:
            model = compile_graph(model)
        except RuntimeError as e:
            raise ValueError(f"--npu-graph: {e}") from None
    return model, tokenizer, source


# -- commands -----------------------------------------------------------------------------------------------------
def cmd_generate(ns: argparse.Namespace) -> int:
    from .generate import run_generate

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
    from .parity import model_source_from_loader, run_parity

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
    from .generate import add_generate_arguments

    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("doctor", help="show which backends run here and which operator path each op takes")
    add_backend_arguments(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("config", help="print a model config (tiny, flash, pro, a YAML file or a config.json)")
    p.add_argument("path", nargs="?", default="tiny")
    p.set_defaults(func=cmd_config)

    from .checkpoint import add_make_checkpoint_arguments, run_make_checkpoint

    p = sub.add_parser("make-checkpoint", help="write a deterministic random checkpoint in the official HF layout")
    add_make_checkpoint_arguments(p)
    p.set_defaults(func=run_make_checkpoint)

    from .planner import add_plan_arguments, run_plan

    p = sub.add_parser("plan", help="capacity planning: memory per card, sequences that fit, roofline speed")
    add_plan_arguments(p)
    p.set_defaults(func=run_plan)

    from .parity import add_parity_arguments

    p = add_parity_arguments(sub, extra=add_parity_model_arguments)
    p.set_defaults(func=cmd_parity)

    from .bench import add_bench_arguments, run_bench

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
