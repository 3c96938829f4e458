"""The CUDA backend's Triton kernels build for real GPUs, checked on a machine without one (issue 21).

The interpreter (tests/test_cuda_kernels.py) accepts kernels that a GPU build refuses. Here the launches the model
graph makes on CudaOps at V4-Flash shapes and on a small model with the release's attention dims are recorded as a
GPU run would make them, and compiled for sm_90 with the ptxas in the triton wheel (dsv4.cuda.compile_check, two
subprocesses, an empty Triton cache each run). A build fails the test on a compile error, on shared memory over the
227 KiB per-block limit, or on register spills.

Scope of the default run (time: about a minute on 2 cores). Of each family of launches (kernel, pointer dtypes,
non-tile constexprs, launch options) only the largest tile is built, for sm_90 only: shared memory and registers grow
with the tile. sm_100 differed from sm_90 only by a few spilled bytes in three kernels (fixed: GPU_CFG); the table
in BENCHMARKS.md (`scripts/cuda_compile_table.py --distinct class`: every row, both targets, ~7 min here) and the
slow test below build every row for both targets.

The two planted launches prove the check can fail: a tile over the shared-memory limit, and a tl.dot dimension
under 16 (which the interpreter runs without complaint). `test_gpu_tiles_in_interpreter` runs the GPU tile sizes
(fp32, where the interpreter is exact) against the reference ops, since no CPU test executed them otherwise.
"""

from __future__ import annotations

import ast
import copy
import os
from pathlib import Path

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit runs, as in tests/test_cuda_kernels.py

pytest.importorskip("triton")
pytest.importorskip("numpy")

from dsv4.cuda import compile_check as cc  # noqa: E402  (imports no kernel module)

KERNEL_DIR = Path(cc.__file__).parent / "kernels"
DEV = "cuda" if GPU else "cpu"


def _launched_kernels() -> set[str]:
    """Every `_*_kernel` @triton.jit function of cuda/kernels (read from the source: importing the modules here
    would fix TRITON_INTERPRET for the whole test session)."""
    names = set()
    for path in KERNEL_DIR.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                names.add(f"dsv4.cuda.kernels.{path.stem}:{node.name}")
    return names


@pytest.fixture(scope="module")
def recorded() -> list[dict]:
    return cc.record_subprocess(list(cc.SCENARIOS), timeout=600)


@pytest.fixture(scope="module")
def built(recorded) -> list[dict]:
    return cc.compile_subprocess(recorded, ["sm_90"], distinct="largest", timeout=600)


def _failures(launches: list[dict]) -> list[str]:
    return [f"{x['kernel']} {x['constexprs']} {x['options']} on {r['target']}: {p}"
            for x in launches for r in x["results"] for p in cc.problems(x, r)]


def test_every_kernel_is_recorded(recorded):
    assert {x["kernel"] for x in recorded} == _launched_kernels()
    # the MoE row-block sizes the scenarios are built to reach (compile_check.FLASH)
    moe = {x["constexprs"]["BLOCK_M"] for x in recorded if x["constexprs"].get("GATHER")}
    assert moe == {16, 32, 64}


def test_builds_for_sm90_within_limits(built):
    assert len(built) >= 30  # one per family; a recorder that saw nothing must not pass
    assert all(r["error"] is None and r["regs"] > 0 for x in built for r in x["results"]), _failures(built)
    assert not _failures(built), "\n".join(_failures(built))


def _planted(launch: dict, **constexprs) -> dict:
    out = copy.deepcopy(launch)
    out["args"].update(constexprs)
    out["constexprs"].update(constexprs)
    return out


def test_check_fails_planted_launches(recorded):
    """A tile over the shared-memory limit and a tl.dot the GPU cannot build must both fail the check. Triton 3.9
    pads small M/N dots on tensor cores; what it refuses is a K under 32 for 8-bit operands, 16 for 16-bit, 8 for
    fp32 (triton/backends/nvidia/compiler.py min_dot_size) -- the interpreter runs all of them."""
    attn = next(x for x in recorded if x["kernel"].endswith(":_sparse_attn_kernel") and not x["constexprs"]["UPCAST"])
    fp8 = next(x for x in recorded if x["kernel"].endswith(":_grouped_gemm_kernel") and x["constexprs"]["W_FMT"] == 1)
    big = _planted(attn, BLOCK_N=256)  # bf16 KV tiles of 256 x 512, 2 stages: > 227 KiB
    bad = _planted(fp8, BLOCK_K=16)  # e4m3 x e4m3 dot with K = 16 < 32
    over, bad_dot = cc.compile_subprocess([big, bad], ["sm_90"], timeout=300)
    assert over["results"][0]["error"] is None, over["results"][0]["error"]
    assert over["results"][0]["shared"] > cc.TARGETS["sm_90"][1]
    assert any("shared memory" in p for p in cc.problems(over, over["results"][0]))
    assert bad_dot["results"][0]["error"], "an fp8 tl.dot with K = 16 compiled for sm_90"
    assert cc.problems(bad_dot, bad_dot["results"][0])[0].startswith("compile error")


@pytest.mark.slow
def test_every_row_builds_for_sm90_and_sm100(recorded):
    built = cc.compile_subprocess(recorded, list(cc.TARGETS), distinct="class", timeout=1800)
    assert not _failures(built), "\n".join(_failures(built))


# -- the GPU tile sizes, executed -------------------------------------------------------------------------------------
@pytest.mark.skipif(GPU, reason="on a GPU the GPU tiles are what tests/test_cuda_kernels.py runs")
def test_gpu_tiles_in_interpreter():
    """The block sizes of GPU_CFG (with its fp32 variants) give the reference's numbers. fp32 only: it is the dtype
    the interpreter computes exactly, and the one whose GPU variants differ most (gemm:fp32 BLOCK_K 32 and
    BLOCK_M 64 tiles, attn:fp32 BLOCK_N 16, index:fp32 BLOCK_T 16). Tolerance as in test_cuda_kernels.py:
    fp32 reassociation only, 3e-5."""
    from dsv4.common.model.ops import LinearWeight
    from dsv4.common.model.reference import ReferenceOps
    from dsv4.cuda import create_ops
    from dsv4.cuda.kernels._common import gpu_plan

    ops, ref = create_ops("cpu", interpret=True), ReferenceOps("cpu")
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, rtol=3e-5, atol=3e-5)

    with gpu_plan(dots=False):
        x, w = rnd(70, 96), LinearWeight(rnd(130, 96, scale=0.1), None, "none")  # ragged M, N, K tiles
        close(ops.linear(x, w), ref.linear(x, w))
        T, k, E, d, inter = 40, 2, 3, 64, 96
        xe, ids, wts = rnd(T, d), torch.randint(0, E, (T, k), generator=g), torch.rand(T, k, generator=g)
        w1, w3, w2 = (LinearWeight(rnd(E, *s, scale=0.1), None, "none") for s in ((inter, d), (inter, d), (d, inter)))
        close(ops.moe_experts(xe, wts, ids, w1, w2, w3, 0.3), ref.moe_experts(xe, wts, ids, w1, w2, w3, 0.3))
        q, kv, sink = rnd(1, 2, 20, 64), rnd(1, 50, 64), rnd(20)
        idx = torch.randint(-1, 50, (1, 2, 40), generator=g)
        close(ops.sparse_attention(q, kv, sink, idx, 0.125), ref.sparse_attention(q, kv, sink, idx, 0.125))
        qi, ki, wi = rnd(1, 2, 20, 64), rnd(1, 40, 64), rnd(1, 2, 20)
        vis = torch.tensor([[25, 40]])
        close(ops.indexer_topk(qi, ki, wi, vis, 8), ref.indexer_topk(qi, ki, wi, vis, 8))
        kvp, score = rnd(1, 2, 128, 48), rnd(1, 2, 128, 48)  # a 128-token pool: narrow channel blocks
        close(ops.compress_pool(kvp, score), ref.compress_pool(kvp, score))
        X, fn, hs, hb = rnd(1, 3, 4, 80), rnd(24, 320, scale=0.1), rnd(3).abs(), rnd(24)
        got, want = ops.hc_pre(X, fn, hs, hb, 20, 1e-6, 1e-6), ref.hc_pre(X, fn, hs, hb, 20, 1e-6, 1e-6)
        for a, b in zip(got, want, strict=True):
            close(a, b)
