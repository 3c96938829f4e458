"""Every backend pair that can run on this machine, on the tiny random model: fp32 and bf16, prefill and decode.

Profiles (see configs/parity.yaml): fp32-clamp is the tight elementwise check (the model is continuous with
kv_fp8_sim=clamp); fp32-e4m3 and bf16-e4m3 (the real rounding) are judged by distribution metrics. The Triton
interpreter costs ~6 s of CPU per forward (launch overhead), so only its fp32-clamp pair (prefill + decode, ~15 s)
runs by default; its fp32-e4m3 and bf16-e4m3 pairs (~25 s each) are marked slow: `pytest -m slow parity_tests`.
"""

from __future__ import annotations

import pytest
from parity_support import TOL, assert_no_violations, pair_runs, require

from dsv4.common.parity.compare import compare_runs

PROFILES = [("fp32", "clamp"), ("fp32", "e4m3"), ("bf16", "e4m3")]
CANDIDATES = ["ascend(emulated)", "cuda(interpreted)"]
PHASES = ["prefill", "decode", "hidden"]


def _cases():
    for cand in CANDIDATES:
        for dtype, sim in PROFILES:
            marks = [pytest.mark.slow] if cand.startswith("cuda") and (dtype, sim) != ("fp32", "clamp") else []
            for phase in PHASES:
                yield pytest.param(cand, dtype, sim, phase, marks=marks, id=f"reference-{cand}-{dtype}-{sim}-{phase}")


@pytest.mark.parametrize("cand,dtype,sim,phase", list(_cases()))
def test_pair_parity(cand: str, dtype: str, sim: str, phase: str) -> None:
    require(cand)
    ref, got, pair = pair_runs("reference", cand, dtype, sim)
    comp = compare_runs(ref, got, TOL, pair=pair)
    mine = [v for v in comp.violations if v.where.startswith(phase) or (phase == "hidden" and "hidden" in v.where)]
    assert_no_violations(mine, f"reference vs {cand} [{comp.profile}] {phase}")
