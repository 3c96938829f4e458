"""Shared state of the parity suite: which backends can run here (probed once), and one cached pair of runs per
(pair, profile), so the prefill/decode/hidden tests of a pair share a single (slow) model run per backend."""

from __future__ import annotations

import pytest

from dsv4.common.model.ops import Ops
from dsv4.common.parity.compare import BackendRun, Tolerances, default_prompts, parse_dtype, run_backend
from dsv4.common.parity.sources import ModelSource, default_model_source, emulation_available
from dsv4.common.runtime.backend import probe_backend, select_backend

TOL = Tolerances.load()
RAN: dict[str, int] = {}  # backend label -> model runs made in this session (terminal summary)


def _status() -> dict[str, tuple[bool, str]]:
    """label -> (can run here, reason). Probing imports torch_npu / triton, so it happens once."""
    npu, gpu = probe_backend("ascend"), probe_backend("cuda")

    def why_not(prefix: str, reason: str) -> str:
        return reason if reason.lower().startswith(prefix.lower()) else f"{prefix}: {reason}"

    out = {"reference": (True, "pure torch"),
           "ascend (NPU)": (npu.available, npu.reason if npu.available else why_not("no Ascend NPU", npu.reason)),
           "cuda (GPU)": (gpu.available, gpu.reason if gpu.available else why_not("no CUDA GPU", gpu.reason)),
           "ascend(emulated)": emulation_available("ascend")}
    ok, why = emulation_available("cuda")
    if ok and gpu.available:
        ok, why = False, "a real GPU is present: the cuda-marked tests run the kernels there instead"
    out["cuda(interpreted)"] = (ok, why)
    return out


STATUS = _status()


def require(label: str) -> None:
    """Skip the calling test, with the probe's reason, when backend `label` cannot run here."""
    ok, why = STATUS[label]
    if not ok:
        pytest.skip(f"{label} unavailable: {why}")


def make_ops(label: str) -> Ops:
    if label == "reference":
        return select_backend("reference", "cpu")
    if label == "ascend(emulated)":
        return select_backend("ascend", "cpu", emulate=True)
    if label == "cuda(interpreted)":
        return select_backend("cuda", "cpu", emulate=True)
    if label == "ascend (NPU)":
        return select_backend("ascend")
    if label == "cuda (GPU)":
        return select_backend("cuda")
    raise ValueError(label)


_SOURCES: dict[str, ModelSource] = {}
_RUNS: dict[tuple[str, str, str, str], tuple[BackendRun, BackendRun]] = {}


def pair_runs(ref_label: str, label: str, dtype: str, kv_fp8_sim: str) -> tuple[BackendRun, BackendRun, str]:
    """(reference run, candidate run, tolerance pair key) on the tiny random model; prompt length and decode steps
    come from parity.yaml's suite section for the pair. The reference is the anchor: its greedy tokens are fed to
    the candidate."""
    pair = Tolerances.pair_key(ref_label, label.replace(" (NPU)", "").replace(" (GPU)", ""))
    key = (ref_label, label, dtype, kv_fp8_sim)
    if key not in _RUNS:
        if kv_fp8_sim not in _SOURCES:
            _SOURCES[kv_fp8_sim] = default_model_source("tiny", seed=0, kv_fp8_sim=kv_fp8_sim)
        src = _SOURCES[kv_fp8_sim]
        dt = parse_dtype(dtype)
        prompts = default_prompts(512, int(TOL.setting("batch", pair, 2)), int(TOL.setting("seq_len", pair, 24)),
                                  int(TOL.setting("prompt_seed", pair, 0)))
        steps = int(TOL.setting("decode_steps", pair, 2))
        ref = run_backend(src.factory(make_ops(ref_label), dt), prompts, steps, label=ref_label)
        got = run_backend(src.factory(make_ops(label), dt), prompts, steps, teacher=ref.decode_tokens, label=label)
        for lab in (ref_label, label):
            RAN[lab] = RAN.get(lab, 0) + 1
        _RUNS[key] = (ref, got)
    ref, got = _RUNS[key]
    return ref, got, pair


def assert_no_violations(violations: list, context: str) -> None:
    assert not violations, f"{context}: " + "; ".join(str(v) for v in violations)

