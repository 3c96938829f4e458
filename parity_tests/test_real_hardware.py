"""Parity on real accelerators (markers `npu` and `cuda`): the CPU reference against the backend on its device.
Skipped, with the probe's reason, where the hardware is absent."""

from __future__ import annotations

import pytest
from parity_support import TOL, assert_no_violations, pair_runs, require

from dsv4.common.parity.compare import compare_runs

PROFILES = [("fp32", "clamp"), ("bf16", "e4m3")]


HARDWARE = [pytest.param("ascend (NPU)", "Ascend NPU", marks=pytest.mark.npu, id="npu"),
            pytest.param("cuda (GPU)", "CUDA GPU", marks=pytest.mark.cuda, id="gpu")]


@pytest.mark.parametrize("backend, device", HARDWARE)
@pytest.mark.parametrize("dtype,sim", PROFILES, ids=[f"{d}-{s}" for d, s in PROFILES])
def test_reference_vs_hardware(backend: str, device: str, dtype: str, sim: str) -> None:
    require(backend)
    ref, got, pair = pair_runs("reference", backend, dtype, sim)
    comp = compare_runs(ref, got, TOL, pair=pair)
    assert_no_violations(comp.violations, f"reference vs {device} [{comp.profile}]")
