"""Ahead-of-time GPU build of every Triton specialization the CUDA backend launches, on a machine without a GPU.

The Triton interpreter (how CPU CI runs cuda/kernels) accepts kernels that a GPU build refuses: tl.dot dimensions
under 16, dot dtype pairs the tensor cores lack, shared memory beyond the SM's budget. The triton wheel ships ptxas,
so `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` builds real cubins without a driver. Two
steps, in two processes because TRITON_INTERPRET is read when the kernels are decorated:

1. `record` (TRITON_INTERPRET=1): the model graph runs on CudaOps at the shapes of SCENARIOS, with the launch choices
   a GPU run makes (`kernels._common.gpu_plan`: GPU block sizes, bf16/fp8 tensor-core dots). Every kernel launch is
   intercepted and NOT executed (the interpreter would be far too slow at V4-Flash shapes, and its bf16 dots give
   garbage anyway): what Triton specializes on is kept (pointer dtype and 16-byte alignment, ints by value class,
   constexprs, num_warps / num_stages) and launches are deduplicated. Outputs of skipped kernels are left
   uninitialised: only shapes flow on, which is all that decides the launches.
2. `compile` (no TRITON_INTERPRET): each distinct specialization is built for each target as JITFunction.run would
   build it on that GPU (its own binder and _pack_args give signature, constexprs and divisibility attributes). The
   metadata gives shared memory; ptxas -v (logged with knobs.nvidia.dump_ptxas_log) gives registers and spills
   (CompiledKernel.n_regs / n_spills exist only after loading on a device: triton/compiler/compiler.py).

`check` runs both in subprocesses and lists the failures; tests/test_cuda_compile.py and scripts/cuda_compile_table.py
are its callers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Per-block shared memory a kernel may opt into: 228 KiB per SM minus the 1 KiB the driver reserves per block, on
# both sm_90 (H100/H200) and sm_100 (B200; sm_103 B300 inherits it). Source: NVIDIA CCCL
# libcudacxx/include/cuda/__device/arch_traits.h (max_shared_memory_per_block_optin), matching the CUDA C++
# Programming Guide's compute-capability table (227 KB for 9.0 and 10.0). Triton compares metadata.shared with the
# device's opt-in maximum before loading a kernel (CompiledKernel._init_handles).
TARGETS: dict[str, tuple[int, int]] = {"sm_90": (90, 232448), "sm_100": (100, 232448)}
KERNEL_PACKAGE = "dsv4.cuda.kernels"
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class Scenario:
    """One model build and the token chunks run through it (each chunk continues the cache)."""
    name: str
    config: str  # a configs/ name
    changes: tuple[tuple[str, Any], ...]  # ModelArgs.replace(**changes)
    ep_size: int
    runs: tuple[tuple[str, str], ...]  # (activation dtype, weights mode)
    chunks: tuple[int, ...]  # tokens per forward, batch 1


# V4-Flash: one layer of each attention kind (window, CSA ratio 4, HCA ratio 128) and the MTP layer at the real dims.
# Two shrinks that change no specialization: the vocabulary (only N of the head GEMM, which Triton specializes on
# through N % 16 alone) and the local experts: ep_size 64 leaves 4 of the 256 experts on this "rank", so that small
# token counts reach every MoE row-block size, BLOCK_M = pow2(T*k // E_local) clamped to [16, 64] (moe.py): chunks of
# 136, 16 and 1 tokens give 204, 24 and 1 rows per expert -> BLOCK_M 64, 32, 16 (a deployment reaches the same three
# at other batch sizes). 136 tokens complete one 128-token HCA block, so the compressor's pooling runs.
FLASH = Scenario(
    "flash", "flash",
    (("n_layers", 3), ("compress_ratios", [0, 4, 128, 0]), ("n_hash_layers", 1), ("vocab_size", 2048),
     ("max_seq_len", 512)),
    ep_size=64, runs=(("bfloat16", "quantized"), ("float32", "dequantized"), ("float32", "quantized")),
    chunks=(136, 16, 1))
# A small model with the release's attention shapes (head_dim 512, rope 64, index_head_dim 128) and small dims
# elsewhere: 4 heads and 4 index heads (dot tiles padded to 16), dim 256, inter 128; 2 local experts of 8, k = 2:
# chunks of 136, 24 and 1 tokens -> BLOCK_M 64, 32, 16.
RELEASE_SMALL = Scenario(
    "release-small", "tiny", (("head_dim", 512), ("max_seq_len", 512)), ep_size=4,
    runs=(("bfloat16", "quantized"), ("bfloat16", "dequantized"), ("float32", "dequantized"),
          ("float32", "quantized")),
    chunks=(136, 24, 1))
SCENARIOS = {s.name: s for s in (FLASH, RELEASE_SMALL)}


# -- step 1: record (TRITON_INTERPRET=1) ---------------------------------------------------------------------------
def _abstract(value: Any) -> Any:
    """A launch argument as JSON: tensors by dtype and 16-byte alignment (all Triton specializes a pointer on)."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def _spec_key(value: Any, constexpr: bool) -> Any:
    """What Triton's binder keeps of an argument: a constexpr's value; a pointer's dtype and alignment; an int's
    class (i32/i64, divisible by 16, or the constant 1); only the type of a runtime float or bool."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if constexpr:
        return ("constexpr", value)
    if isinstance(value, dict):
        return (value["tensor"], value["aligned"])
    if isinstance(value, int) and not isinstance(value, bool):
        return native_specialize_impl(BaseBackend, value, False, True, True)
    return type(value).__name__


class LaunchRecorder:
    """Replaces InterpretedFunction.run for the backend's kernels: records the launch, skips its execution."""

    def __init__(self) -> None:
        self.launches: dict[tuple, dict] = {}
        self.where = ""

    @contextlib.contextmanager
    def active(self):
        import inspect

        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            fn = fn_self.fn
            if not fn.__module__.startswith(KERNEL_PACKAGE):
                return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
            sig = inspect.signature(fn)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            values = {k: _abstract(v) for k, v in bound.arguments.items()}
            const = {k: "constexpr" in str(p.annotation) for k, p in sig.parameters.items()}
            key = (fn.__module__, fn.__name__, tuple((k, _spec_key(v, const[k])) for k, v in values.items()),
                   tuple(sorted(options.items())))
            entry = recorder.launches.setdefault(key, {
                "kernel": f"{fn.__module__}:{fn.__name__}", "args": values, "options": options, "where": [],
                "constexprs": {k: v for k, v in values.items() if const[k]}})
            if recorder.where not in entry["where"]:
                entry["where"].append(recorder.where)
            return None

        InterpretedFunction.run = run
        try:
            yield self
        finally:
            InterpretedFunction.run = original


@contextlib.contextmanager
def _shape_only_fallbacks(ops):
    """The torch fallbacks between kernels (quant-dequant simulations, the Hadamard product, the activation FP8
    quantisation) replaced by fresh tensors of the same shape, dtype and layout: with the kernels skipped their
    values are garbage anyway, and at V4-Flash shapes they were most of the recording time."""
    import torch

    from .kernels import gemm, moe

    def fresh(x, *_args, **_kw):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def quant_act(x2d):
        M, K = x2d.shape
        if K % gemm.ACT_BLOCK:
            raise ValueError(f"FP8 activation quantisation needs K % {gemm.ACT_BLOCK} == 0, got K={K}")
        return (torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x2d.device),
                torch.empty((M, K // gemm.ACT_BLOCK), dtype=torch.float32, device=x2d.device))

    saved = (gemm.quant_act, moe.quant_act)
    for name in ("fp8_sim", "fp4_sim", "hadamard"):
        setattr(ops, name, fresh)
    gemm.quant_act = moe.quant_act = quant_act
    try:
        yield
    finally:
        gemm.quant_act, moe.quant_act = saved
        for name in ("fp8_sim", "fp4_sim", "hadamard"):
            delattr(ops, name)


def record(scenarios: list[Scenario]) -> list[dict]:
    """The distinct launches of the model graph on CudaOps for each scenario (needs TRITON_INTERPRET=1)."""
    import torch

    from dsv4.common.model.config import load_named_config
    from dsv4.common.model.parallel import ParallelConfig
    from dsv4.common.model.transformer import Transformer

    from . import create_ops
    from .kernels._common import gpu_plan, interpreting

    if not interpreting():
        raise RuntimeError("record needs TRITON_INTERPRET=1 in the environment before the kernels are imported")
    ops = create_ops("cpu", interpret=True)
    rec = LaunchRecorder()
    with rec.active(), gpu_plan(), _shape_only_fallbacks(ops), torch.no_grad():
        for sc in scenarios:
            args = load_named_config(sc.config).replace(**dict(sc.changes))
            par = ParallelConfig(ep_size=sc.ep_size)
            for dtype_name, weights in sc.runs:
                model = Transformer(args, ops, getattr(torch, dtype_name), weights=weights, parallel=par)
                cache = model.new_cache(1, args.max_seq_len)
                g = torch.Generator().manual_seed(0)
                for n in sc.chunks:
                    rec.where = f"{sc.name} {dtype_name} {weights}"
                    tokens = torch.randint(0, args.vocab_size, (1, n), generator=g)
                    _, hidden = model(tokens, cache, return_hidden="last")
                    if args.n_mtp_layers:
                        model.mtp_forward(hidden[-1], tokens, cache)
                del model, cache
    return list(rec.launches.values())


# -- step 2: compile (no TRITON_INTERPRET) -------------------------------------------------------------------------
class _PointerArg:
    """Stands for a tensor in Triton's binder: it reads only .dtype and .data_ptr()."""

    def __init__(self, dtype: str, aligned: bool) -> None:
        import torch

        self.dtype = getattr(torch, dtype)
        self._ptr = 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._ptr


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: dict, target: str) -> dict:
    """Build one recorded launch for `target` ("sm_90"/"sm_100") the way JITFunction.run would on that GPU."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    mod_name, fn_name = launch["kernel"].split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    arch, limit = TARGETS[target]
    gpu = GPUTarget("cuda", arch, 32)
    backend = make_backend(gpu)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [(_PointerArg(v["tensor"], v["aligned"]) if isinstance(v, dict) else v)
            for v in (launch["args"][p.name] for p in fn.params)]
    options = dict(launch["options"])
    bound, specialization, opts = binder(*args, **options)
    # the private step of JITFunction.run that turns the binder's output into compile inputs (triton 3.x)
    options, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, opts)
    out: dict[str, Any] = {"target": target, "limit": limit, "error": None, "shared": None, "regs": None,
                           "spill_stores": None, "spill_loads": None}
    log = io.StringIO()
    t0 = time.perf_counter()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin runs ptxas -v and prints its log when this is set
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)
    except Exception as e:  # a compile error is a finding, reported with its first line
        out["error"] = f"{type(e).__name__}: {_first_lines(str(e))}"
        return out
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["shared"] = ck.metadata.shared
    text = log.getvalue()
    regs, spills = _REGS.search(text), _SPILLS.search(text)
    if regs is None or spills is None:
        out["error"] = "no ptxas -v report (registers / spills) in the compile log"
        return out
    out["regs"] = int(regs.group(1))
    out["spill_stores"], out["spill_loads"] = int(spills.group(1)), int(spills.group(2))
    return out


def _first_lines(msg: str, n: int = 6) -> str:
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def problems(launch: dict, result: dict) -> list[str]:
    """Why a compiled specialization would fail (or run badly) on its target; empty when it is fine."""
    if result["error"]:
        return [f"compile error: {result['error']}"]
    out = []
    if result["shared"] > result["limit"]:
        out.append(f"shared memory {result['shared']} B > {result['limit']} B per block on {result['target']}")
    if result["spill_stores"] or result["spill_loads"]:
        out.append(f"register spills: {result['spill_stores']} B stored, {result['spill_loads']} B loaded")
    return out


_SHORT_DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16", "float8_e4m3fn": "fp8", "int8": "i8",
                 "int32": "i32", "int64": "i64"}


def row_key(launch: dict) -> tuple:
    """A table row: kernel, pointer dtypes, constexprs and launch options. Launches of one row differ only in
    Triton's int / alignment specializations (i32 vs i64, % 16, == 1, 16-byte aligned pointers)."""
    dtypes = tuple(v["tensor"] for v in launch["args"].values() if isinstance(v, dict))
    return (launch["kernel"], dtypes, tuple(sorted(launch["constexprs"].items(), key=str)),
            tuple(sorted(launch["options"].items())))


def _specialized(launch: dict) -> int:
    """How many arguments carry a divisibility-16 attribute (aligned pointers, ints % 16 == 0)."""
    n = 0
    for k, v in launch["args"].items():
        if isinstance(v, dict):
            n += v["aligned"]
        elif isinstance(v, int) and not isinstance(v, bool) and k not in launch["constexprs"]:
            n += v % 16 == 0
    return n


def _tile(launch: dict) -> int:
    return math.prod(v for k, v in launch["constexprs"].items() if k.startswith("BLOCK") and isinstance(v, int))


def _family(launch: dict) -> tuple:
    """row_key without the BLOCK_* constexprs: the launches of one family differ only in tile sizes."""
    kernel, dtypes, consts, options = row_key(launch)
    return kernel, dtypes, tuple(c for c in consts if not c[0].startswith("BLOCK")), options


DISTINCT = ("exact", "class", "largest")


def select(launches: list[dict], distinct: str) -> list[dict]:
    """"exact": every specialization Triton would build. "class": one launch per table row, the one with the most
    divisibility attributes: alignment is what lets Triton vectorise loads and stage them through shared memory
    (cp.async pipelining), so it is the variant with the largest shared-memory footprint. "largest": of each
    family (a row without its BLOCK_* sizes), only the launch with the largest tile (shared memory and registers
    grow with the tile), most aligned first: the quick subset of the default test run."""
    if distinct == "exact":
        return launches
    if distinct not in DISTINCT:
        raise ValueError(f"distinct must be one of {DISTINCT}, got {distinct!r}")
    key, rank = (row_key, _specialized) if distinct == "class" else (_family, lambda x: (_tile(x), _specialized(x)))
    best: dict[tuple, dict] = {}
    for launch in launches:
        k = key(launch)
        if k not in best or rank(launch) > rank(best[k]):
            best[k] = launch
    return list(best.values())


def compile_all(launches: list[dict], targets: list[str]) -> list[dict]:
    """Compile every launch for every target."""
    for launch in launches:
        launch["results"] = [compile_launch(launch, t) for t in targets]
    return launches


def group_rows(launches: list[dict]) -> list[dict]:
    """One row per row_key with the worst result per target over its builds (an error beats any number)."""
    rows: dict[tuple, dict] = {}
    for launch in launches:
        k = row_key(launch)
        kernel, dtypes = k[0], k[1]
        row = rows.setdefault(k, {
            "kernel": kernel.split(":")[1].strip("_").removesuffix("_kernel"),
            "dtypes": "/".join(dict.fromkeys(_SHORT_DTYPES.get(d, d) for d in dtypes)),
            "constexprs": " ".join(f"{n}={v}" for n, v in launch["constexprs"].items()),
            "options": launch["options"], "builds": 0, "seen": set(), "worst": {}})
        row["builds"] += 1
        row["seen"].update(w.split()[0] for w in launch["where"])
        for r in launch["results"]:
            w = row["worst"].get(r["target"])
            if w is None or r["error"]:
                row["worst"][r["target"]] = dict(r)
                continue
            if w["error"]:
                continue
            for f in ("shared", "regs", "spill_stores", "spill_loads"):
                w[f] = max(w[f], r[f])
    return sorted(rows.values(), key=lambda r: (r["kernel"], r["dtypes"], r["constexprs"]))


# -- orchestration ----------------------------------------------------------------------------------------------------
def record_subprocess(scenarios: list[str], timeout: float = 1800) -> list[dict]:
    """Step 1 in a fresh interpreter process (TRITON_INTERPRET must be set before the kernels are decorated)."""
    with tempfile.TemporaryDirectory(prefix="dsv4-cuda-record-") as tmp:
        out = Path(tmp) / "launches.json"
        env = dict(os.environ, TRITON_INTERPRET="1")
        _run(_CMD + ["record", "--out", str(out), "--scenarios", ",".join(scenarios)], env, timeout)
        return json.loads(out.read_text())


def compile_subprocess(launches: list[dict], targets: list[str], distinct: str = "exact",
                       timeout: float = 1800) -> list[dict]:
    """Step 2 in a fresh process without TRITON_INTERPRET and with an empty TRITON_CACHE_DIR (nothing is reused
    between runs). Returns the selected launches (see `select`) with their per-target results."""
    with tempfile.TemporaryDirectory(prefix="dsv4-cuda-compile-") as tmp:
        src, out = Path(tmp) / "launches.json", Path(tmp) / "compiled.json"
        src.write_text(json.dumps(launches))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton-cache")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, set to silence its warning
        _run(_CMD + ["compile", "--launches", str(src), "--out", str(out), "--targets", ",".join(targets),
                     "--distinct", distinct], env, timeout)
        return json.loads(out.read_text())


def check(scenarios: list[str], targets: list[str], distinct: str = "exact", timeout: float = 1800) -> list[dict]:
    """Record the launches of `scenarios`, compile them for `targets`; the failures are `problems` of each."""
    return compile_subprocess(record_subprocess(scenarios, timeout), targets, distinct, timeout)


_CMD = [sys.executable, "-m", "dsv4.cuda.compile_check"]


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")


def _names(value: str, known: dict, what: str) -> list[str]:
    names = [v for v in value.split(",") if v]
    bad = [v for v in names if v not in known]
    if bad or not names:
        raise SystemExit(f"--{what}: unknown {bad or value!r}; expected a comma-separated subset of {sorted(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv4.cuda.compile_check", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    r = sub.add_parser("record", help="record the distinct launches (needs TRITON_INTERPRET=1)")
    r.add_argument("--out", required=True)
    r.add_argument("--scenarios", default=",".join(SCENARIOS))
    c = sub.add_parser("compile", help="compile recorded launches for GPU targets (without TRITON_INTERPRET)")
    c.add_argument("--launches", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--targets", default=",".join(TARGETS))
    c.add_argument("--distinct", choices=DISTINCT, default="exact")
    a = ap.parse_args(argv)
    if a.step == "record":
        launches = record([SCENARIOS[n] for n in _names(a.scenarios, SCENARIOS, "scenarios")])
        Path(a.out).write_text(json.dumps(launches, indent=1))
        return 0
    targets = _names(a.targets, TARGETS, "targets")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile: unset TRITON_INTERPRET (the kernels must be JIT functions, not interpreted)")
    try:
        launches = json.loads(Path(a.launches).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--launches {a.launches}: cannot read the recorded launches ({e})") from None
    Path(a.out).write_text(json.dumps(compile_all(select(launches, a.distinct), targets), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
