"""Loading the model the way every command does: the backend and dtype flags, --model (a checkpoint directory) or the
embedded default (a tiny V4-shaped model with deterministic random weights), and joining the process group under
torchrun. generate, bench, parity and serve all start here."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

from dsv4.common.model.config import load_named_config
from dsv4.common.model.ops import default_dtype
from dsv4.common.runtime.backend import CHOICES, select_backend

EMBEDDED_SEED = 0


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
    from dsv4.common.checkpoint.load import build_random_model
    from dsv4.common.checkpoint.tokenizer import TextTokenizer
    from dsv4.common.runtime.distributed import all_ranks_ok, init_parallel

    ops = ops or make_ops(ns)
    dtype = dtype or resolve_dtype(ns, ops)
    rt = init_parallel(ops, getattr(ns, "tp", 1), getattr(ns, "ep", 1), ep_comm=getattr(ns, "ep_comm", "alltoall"))
    if not rt.is_main and not os.environ.get("DSV4_DEBUG"):
        # rank 0 speaks for the job (other ranks' failures reach it through all_ranks_ok); DSV4_DEBUG=1 keeps all
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115

    def load():
        if ns.model:
            from dsv4.common.checkpoint.reader import load_checkpoint

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
        # what TorchAir captures is the static decode step (common/runtime/static_decode.py, "npu-graph"), which
        # generation selects for --npu-graph; prefill stays eager. Fail here, before any work, without TorchAir
        if importlib.util.find_spec("torchair") is None:
            raise ValueError("--npu-graph: graph mode needs torchair (ships with torch_npu on NPU hosts); "
                             "it is not importable here")
    return model, tokenizer, source
