"""Parity on real accelerators (markers `npu` and `cuda`): the CPU reference against the backend on its device.
Skipped, with the probe's reason, where the hardware is absent."""

from __future__ import annotations

import pytest
from parity_support import TOL, assert_no_violations, pair_runs, require

from dsv4.common.parity import compare_runs

PROFILES = [("fp32", "clamp"), ("bf16", "e4m3")]


@pytest.mark.npu
@pytest.mark.parametrize("dtype,sim", PROFILES, ids=[f"{d}-{s}" for d, s in PROFILES])
def test_reference_vs_npu(dtype: str, sim: str) -> None:
    require("ascend (NPU)")
    ref, got, pair = pair_runs("reference", "ascend (NPU)", dtype, sim)
    comp = compare_runs(ref, got, TOL, pair=pair)
    assert_no_violations(comp.violations, f"reference vs Ascend NPU [{comp.profile}]")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,sim", PROFILES, ids=[f"{d}-{s}" for d, s in PROFILES])
def test_reference_vs_gpu(dtype: str, sim: str) -> None:
    require("cuda (GPU)")
    ref, got, pair = pair_runs("reference", "cuda (GPU)", dtype, sim)
    comp = compare_runs(ref, got, TOL, pair=pair)
    assert_no_violations(comp.violations, f"reference vs CUDA GPU [{comp.profile}]")
