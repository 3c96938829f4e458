"""Loading the model the way every command does: the backend and dtype flags, --model (a checkpoint directory) or the
embedded default (a tiny V4-shaped model with deterministic random weights), and joining the process group under
torchrun. generate, bench, parity and serve all start here."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from dsv4.common.model.config import load_named_config
from dsv4.common.model.ops import default_dtype
from dsv4.common.runtime.backend import CHOICES, select_backend
from dsv4.common.runtime.static_decode import check_capture_runs, compile_mode

EMBEDDED_SEED = 0


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--backend", default="auto", choices=CHOICES,
                   help="ops implementation: auto picks an Ascend NPU, else a CUDA GPU, else the CPU reference")
    g.add_argument("--device", default=None, help="torch device, e.g. npu:0, cuda:1, cpu (default: the backend's)")
    g.add_argument("--emulate", action="store_true",
                   help="ascend: run the NPU code path on CPU against the emulated torch_npu operators; cuda: run "
                        "the Triton kernels in the interpreter on CPU")
    add_threads_argument(g)


def add_threads_argument(g) -> None:
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: chosen from the CPUs this process may use and the machine's "
                        "load; on a loaded 2-core machine 1 thread is many times faster than 2)")


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


# -- argument checks (before anything is built: one line naming the flag, never a traceback) --------------------------
def check_device(device: str | None) -> None:
    """Refuse a --device this machine cannot use, with the reason (torch's own error is a traceback listing every
    device type torch knows, and `npu` is not among them until torch_npu is imported)."""
    if device is None:
        return
    kind, _, index = device.partition(":")
    if index and not index.isdigit():
        raise ValueError(f"--device {device!r}: the index after ':' must be a number (e.g. cuda:0)")
    if kind == "cpu":
        return
    if kind == "npu":
        from dsv4.common.runtime.backend import probe_backend

        info = probe_backend("ascend", device)
        if not info.available:
            raise ValueError(f"--device {device!r}: no usable Ascend NPU here ({info.reason})")
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = ("CPU-only torch build" if torch.version.cuda is None
                     else f"torch built for CUDA {torch.version.cuda}")
            raise ValueError(f"--device {device!r}: no CUDA GPU here (torch.cuda.is_available() is False; {build})")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    raise ValueError(f"--device {device!r}: expected cpu, cuda[:N] or npu[:N]")


def check_run_arguments(ns: argparse.Namespace) -> None:
    """Flag checks shared by every command that loads a model (generate, bench, parity, serve)."""
    check_device(getattr(ns, "device", None))
    for flag in ("tp", "ep", "threads"):
        v = getattr(ns, flag, None)
        if v is not None and v < 1:
            raise ValueError(f"--{flag} must be >= 1, got {v}")
    tp, ep, world = getattr(ns, "tp", None) or 1, getattr(ns, "ep", None) or 1, int(os.environ.get("WORLD_SIZE", 1))
    if max(tp, ep) != world:
        how = (f"launch with torchrun --nproc-per-node {max(tp, ep)} -m dsv4 ..." if world == 1 else
               f"torchrun started {world} processes; pass --tp/--ep so that the larger is {world}")
        raise ValueError(f"--tp {tp} --ep {ep} needs {max(tp, ep)} processes, this job has {world}: {how}")
    msl = getattr(ns, "max_seq_len", None)
    if msl is not None and msl < 1:
        raise ValueError(f"--max-seq-len must be >= 1 (tokens the cache holds), got {msl}")
    from dsv4.common.runtime.prefix_cache import check_prefix_cache_arguments

    check_prefix_cache_arguments(ns)
    if getattr(ns, "emulate", False) and getattr(ns, "backend", None) not in ("ascend", "cuda"):
        raise ValueError(f"--emulate applies to --backend ascend (emulated torch_npu operators) or cuda (Triton "
                         f"interpreter), not to --backend {getattr(ns, 'backend', None)}")


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(torch CPU threads, why). OpenMP threads spin while they wait: with more threads than idle CPUs, decode on a
    shared 2-core machine measured 15-70x slower with 2 threads than with 1. So the default is the CPUs this process
    may run on (sched_getaffinity: cgroups/taskset) minus the load already on them (1-minute load average), split
    among the ranks torchrun started on this host, at least 1. OMP_NUM_THREADS, when set, is respected."""
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    idle = max(1, int(cpus - load + 0.5))
    return max(1, idle // local_ranks), (f"{cpus} CPUs usable, load average {load:.1f}"
                                         + (f", {local_ranks} ranks on this host" if local_ranks > 1 else ""))


def apply_threads(ns: argparse.Namespace) -> int:
    """Set torch's CPU threads from --threads or choose_threads, and say so on stderr (rank 0 only)."""
    if getattr(ns, "_threads_applied", False):
        return torch.get_num_threads()
    n, why = choose_threads(getattr(ns, "threads", None))
    torch.set_num_threads(n)
    ns._threads_applied = True
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"[dsv4] torch threads: {n} ({why}; --threads N overrides)", file=sys.stderr)
    return n


# -- memory: estimated before allocating -------------------------------------------------------------------------------
def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes free for a new model, where the figure comes from), or None when it cannot be told."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"
        except (ValueError, OSError, AttributeError):
            return None
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "mem_get_info"):
        try:
            return int(mod.mem_get_info(device)[0]), f"torch.{device.type}.mem_get_info"
        except Exception:  # a device that cannot answer: no estimate, no refusal
            return None
    return None


def estimate_model_bytes(args, dtype: torch.dtype, weights: str, embedded: bool, tp: int = 1,
                         ep: int = 1) -> tuple[int, int]:
    """(bytes this rank's model will hold, parameters in the whole model) from the checkpoint layout, without
    allocating. The embedded default also holds the random checkpoint it was drawn from while it loads."""
    from dsv4.common.checkpoint.layout import checkpoint_layout, expert_index

    elt = torch.empty((), dtype=dtype).element_size()
    stored_elt = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I32": 4, "I64": 8}
    model_bytes = stored_bytes = params = 0.0
    for name, spec in checkpoint_layout(args).items():
        n = 1
        for s in spec.shape:
            n *= s
        share = 1 / ep if expert_index(name) is not None else 1 / tp
        stored = n * stored_elt.get(spec.dtype, 2)
        stored_bytes += stored * share
        if spec.kind == "scale":
            model_bytes += (n * 4 if weights == "quantized" else 0) * share
            continue
        values = n * 2 if spec.kind == "fp4" else n  # packed FP4: two values per byte
        params += values
        if weights == "quantized" and spec.kind in ("fp8", "fp4"):
            model_bytes += stored * share
        else:
            model_bytes += values * (4 if spec.kind == "fp32" else elt) * share
    return int(model_bytes + (stored_bytes if embedded else 0)), int(params)


def check_fits_memory(args, ops, dtype: torch.dtype, weights: str, embedded: bool, parallel=None) -> None:
    """Refuse, with the figures, a model that cannot fit this device's free memory (instead of being killed by the
    OOM killer, or a device out-of-memory traceback, minutes into loading)."""
    free = available_memory(ops.device)
    if free is None:
        return
    tp, ep = (parallel.tp_size, parallel.ep_size) if parallel is not None else (1, 1)
    need, params = estimate_model_bytes(args, dtype, weights, embedded, tp, ep)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if ops.device.type == "cpu" else 1
    need *= local  # ranks on one host share its RAM
    if need > free[0]:
        gib = 2**30
        what = "the model" + (" and the random checkpoint it is drawn from" if embedded else "")
        raise MemoryError(f"{what} need(s) about {need / gib:.1f} GiB ({params / 1e9:.2f}B parameters, "
                          f"{str(dtype).replace('torch.', '')}, weights {weights}"
                          + (f", {local} ranks on this host" if local > 1 else "")
                          + f") but {ops.device} has {free[0] / gib:.1f} GiB free ({free[1]}); use a smaller --config, "
                          "--weights quantized, more --tp/--ep ranks, or a machine with more memory")


def make_ops(ns: argparse.Namespace):
    options = {"emulate": True} if getattr(ns, "emulate", False) else {}
    return select_backend(ns.backend, ns.device, **options)


def resolve_dtype(ns: argparse.Namespace, ops) -> torch.dtype:
    if getattr(ns, "dtype", None):
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[ns.dtype]
    return default_dtype(ops)


def weights_fingerprint(ns: argparse.Namespace) -> str:
    """Identity of the weights --model / the embedded default loads (checkpoint headers, or config and seed)."""
    from dsv4.common.checkpoint.fingerprint import checkpoint_fingerprint, random_fingerprint

    if getattr(ns, "model", None):
        return checkpoint_fingerprint(ns.model)
    return random_fingerprint(load_named_config(ns.config).arch_hash(), EMBEDDED_SEED)


def load_model(ns: argparse.Namespace, ops=None, dtype: torch.dtype | None = None):
    """(model, tokenizer, source description) for --model / the embedded default. Under torchrun (or with
    --tp/--ep > 1) this joins the process group, each rank loads only its shard, and only rank 0 prints."""
    from dsv4.common.checkpoint.load import build_random_model
    from dsv4.common.checkpoint.tokenizer import TextTokenizer
    from dsv4.common.runtime.distributed import all_ranks_ok, init_parallel

    check_run_arguments(ns)
    ops = ops or make_ops(ns)
    mode = compile_mode(ns)  # a capture this machine cannot run fails here, before the model loads
    check_capture_runs(mode, ops, f"--compile-decode {mode}" if getattr(ns, "compile_decode", None) else "--npu-graph")
    dtype = dtype or resolve_dtype(ns, ops)
    rt = init_parallel(ops, getattr(ns, "tp", 1), getattr(ns, "ep", 1), ep_comm=getattr(ns, "ep_comm", "alltoall"))
    if not rt.is_main and not os.environ.get("DSV4_DEBUG"):
        # rank 0 speaks for the job (other ranks' failures reach it through all_ranks_ok); DSV4_DEBUG=1 keeps all
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115

    def load():
        if ns.model:
            from dsv4.common.checkpoint.reader import config_path, load_checkpoint
            from dsv4.common.model.config import ModelArgs

            check_fits_memory(ModelArgs.load(config_path(ns.model)), rt.ops, dtype, ns.weights, False, rt.parallel)

            model = load_checkpoint(ns.model, rt.ops, dtype=dtype, weights=ns.weights, max_seq_len=ns.max_seq_len,
                                    parallel=rt.parallel, progress=rt.is_main)
            return model, TextTokenizer.from_dir(ns.model, model.args), f"checkpoint {ns.model}"
        args = load_named_config(ns.config)
        if ns.max_seq_len:
            if ns.max_seq_len > args.max_position_embeddings:
                raise ValueError(f"--max-seq-len {ns.max_seq_len} exceeds the model's max_position_embeddings "
                                 f"({args.max_position_embeddings})")
            args = args.replace(max_seq_len=ns.max_seq_len)
        check_fits_memory(args, rt.ops, dtype, ns.weights, True, rt.parallel)
        model = build_random_model(args, rt.ops, dtype=dtype, seed=EMBEDDED_SEED, weights=ns.weights,
                                   parallel=rt.parallel)
        return model, TextTokenizer.byte_level(args), f"embedded default ({ns.config}, random weights, seed 0)"

    model, tokenizer, source = all_ranks_ok("loading the model", load)
    return model, tokenizer, source
