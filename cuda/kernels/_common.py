"""Shared helpers for the kernels: interpreter detection, block-size tables, small torch-side utilities."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton

# Block sizes for H100/H200 (sm_90, 228 KB shared memory, 64K registers per SM). Chosen for the V4-Flash shapes:
# attention D=512 with 64 heads, GEMMs with K multiple of 128 (FP8 scale blocks), expert inter dim 2048.
GPU_CFG: dict[str, dict[str, int]] = {
    "rows": {"BLOCK_M": 4},  # row-wise kernels (norms, rope): few rows per program, the full row in registers
    "attn": {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    "attn:fp32": {"BLOCK_N": 16},
    "index": {"BLOCK_T": 64, "num_warps": 4},
    "index:fp32": {"BLOCK_T": 16, "num_warps": 8},
    "gemm": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    "gemm:fp32": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
    "gemm:swiglu": {"BLOCK_N": 64},
    "hc": {"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_D": 256},
    "pool": {"BLOCK_C": 128, "TILE": 4096},
    "combine": {"BLOCK_T": 16, "BLOCK_D": 256},  # MoE gather-combine: [16, 256] fp32 accumulator
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
