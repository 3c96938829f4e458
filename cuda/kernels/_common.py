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
    "index": {"BLOCK_T": 64, "num_warps": 4},
    "gemm": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    "hc": {"BLOCK_M": 32, "BLOCK_K": 128, "BLOCK_D": 256},
    "pool": {"BLOCK_C": 128},
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
    "pool": {"BLOCK_C": 512},
    "combine": {"BLOCK_T": 64, "BLOCK_D": 512},
}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time of the kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set by `gpu_plan` only: the launch recorder (cuda/compile_check.py) runs the wrappers under the interpreter but
# needs the launches a GPU run would make.
_FORCE_GPU_PLAN = False


@contextmanager
def gpu_plan() -> Iterator[None]:
    """Inside: the wrappers choose block sizes and dot dtypes as on a GPU (GPU_CFG, no fp32 upcast) even under the
    interpreter. For recording launches that are not executed (bf16 dots give garbage in the interpreter)."""
    global _FORCE_GPU_PLAN
    before, _FORCE_GPU_PLAN = _FORCE_GPU_PLAN, True
    try:
        yield
    finally:
        _FORCE_GPU_PLAN = before


def _interp_plan() -> bool:
    return interpreting() and not _FORCE_GPU_PLAN


def cfg(kind: str) -> dict[str, int]:
    return dict((INTERP_CFG if _interp_plan() else GPU_CFG)[kind])


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
    return _interp_plan()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact fp32 ("ieee") dots so fp32 runs match the reference; bf16/fp8 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"
