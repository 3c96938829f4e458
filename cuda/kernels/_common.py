"""Shared helpers for the kernels: interpreter detection, block-size tables, small torch-side utilities."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton

# Block sizes for H100/H200 (sm_90) and B200/B300 (sm_100): 227 KiB of shared memory per block (opt-in), 64K
# registers per SM, at most 255 per thread. Chosen for the V4-Flash shapes: attention D=512 with 64 heads, GEMMs
# with K multiple of 128 (FP8 scale blocks), expert inter dim 2048. "kind:variant" entries override a kind for one
# launch class (`cfg`). Every launch the model makes is built for both targets by dsv4.cuda.compile_check
# (tests/test_cuda_compile.py; the table with shared memory and registers is in BENCHMARKS.md). What is safe, as
# measured with triton 3.9's ptxas (shared memory of a pipelined GEMM ~ stages x (BLOCK_M + BLOCK_N) x BLOCK_K x
# operand bytes, x 2 weight tiles for the fused w1/w3 pair):
# - gemm, 1-byte operands (fp8; fp4 unpacks to bf16 in registers): 64x128x128 with 3 stages is 72 KiB (fp8) /
#   96 KiB (fp4); the fp4 tile uses 233 of 255 registers: a larger BLOCK_M or BLOCK_N spills.
# - gemm, bf16 activations x bf16 weights: 64x128x128 is 144 KiB. The fused w1/w3 (swiglu) variant at BLOCK_N
#   128 was 240 KiB (over the limit on both targets) and the fp4 fused one spilled: BLOCK_N 64 (144 / 80 KiB).
# - gemm, fp32 activations (exact fp32 "ieee" dots run on the FMA units, operands in registers): every BLOCK_K 128
#   tile was over the limit (swiglu: 270-320 KiB) or spilled thousands of bytes; BLOCK_K 32 with 64x64 fits (32-48
#   KiB, <= 192 registers). Keep BLOCK_K <= 32 there; fp8/fp4 weights need BLOCK_K 128 (grouped_gemm checks).
# - attn: bf16 16x32 rows of D=512, 2 stages: 49 KiB. fp32 at BLOCK_N 32 spilled; BLOCK_N 16 with 16 warps: 65 KiB,
#   64 registers (8 warps spilled 4 bytes on sm_100).
# - index: fp32 with all 64 heads in one tile spills above BLOCK_T 16 (or with 4 warps).
# - hc / combine: BLOCK_D 256 spilled 12-16 bytes on sm_100 (not on sm_90); 128 does not.
GPU_CFG: dict[str, dict[str, int]] = {
    "rows": {"BLOCK_M": 4},  # row-wise kernels (norms, rope): few rows per program, the full row in registers
    "attn": {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    "attn:fp32": {"BLOCK_N": 16, "num_warps": 16},
    "index": {"BLOCK_T": 64, "num_warps": 4},
    "index:fp32": {"BLOCK_T": 16, "num_warps": 8},
    "gemm": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    "gemm:fp32": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
    "gemm:swiglu": {"BLOCK_N": 64},
    "hc": {"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_D": 128},
    "pool": {"BLOCK_C": 128, "TILE": 4096},  # TILE: BLOCK_L x BLOCK_C; the 128-token pool spilled at 128 x 128
    "combine": {"BLOCK_T": 16, "BLOCK_D": 128},  # MoE gather-combine: [16, 128] fp32 accumulator
}
# Under the interpreter each program is a Python loop iteration: big blocks mean few programs; the K block of the
# GEMMs stays 128 because the FP8 activation scales come in 1x128 blocks.
INTERP_CFG: dict[str, dict[str, int]] = {
    "rows": {"BLOCK_M": 64},
    "attn": {"BLOCK_H": 16, "BLOCK_N": 64},
    "index": {"BLOCK_T": 128},
    "gemm": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128},
    "hc": {"BLOCK_M": 64, "BLOCK_K": 256, "BLOCK_D": 512},
    "pool": {"BLOCK_C": 512, "TILE": 65536},
    "combine": {"BLOCK_T": 64, "BLOCK_D": 512},
}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time of the kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set by `gpu_plan` only: "gpu" (block sizes and dot dtypes of a GPU run) or "blocks" (block sizes only).
_FORCED_PLAN: str | None = None


@contextmanager
def gpu_plan(dots: bool = True) -> Iterator[None]:
    """Inside, under the interpreter, the wrappers choose GPU_CFG block sizes, and with dots=True also the GPU's
    dot operand dtypes (no fp32 upcast). dots=True is for recording launches that are not executed (bf16 dots give
    garbage in the interpreter: cuda/compile_check.py); dots=False runs the GPU tiles correctly in fp32."""
    global _FORCED_PLAN
    before, _FORCED_PLAN = _FORCED_PLAN, "gpu" if dots else "blocks"
    try:
        yield
    finally:
        _FORCED_PLAN = before


def _interp_blocks() -> bool:
    return interpreting() and _FORCED_PLAN is None


def cfg(kind: str, variant: str | None = None) -> dict[str, int]:
    """The block sizes of `kind`; `variant` ("fp32", "swiglu") merges GPU_CFG["kind:variant"] over them on a GPU
    (the interpreter has no variants: its blocks are for speed only)."""
    table = INTERP_CFG if _interp_blocks() else GPU_CFG
    c = dict(table[kind])
    if variant is not None:
        c.update(table.get(f"{kind}:{variant}", {}))
    return c


def launch_opts(c: dict[str, int]) -> dict[str, int]:
    """The launch-only options (num_warps/num_stages) of a config; the interpreter ignores them."""
    return {k: v for k, v in c.items() if k in ("num_warps", "num_stages")}


def block_params(c: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def upcast_dots() -> bool:
    """Whether kernels must convert low-precision operands to fp32 before tl.dot: the interpreter computes bf16
    arithmetic wrongly, while a GPU runs bf16/fp8 dots natively on tensor cores."""
    return interpreting() and _FORCED_PLAN != "gpu"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact fp32 ("ieee") dots so fp32 runs match the reference; bf16/fp8 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"
