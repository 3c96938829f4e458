"""Parity suite: the default `dsv4 parity run` plan. Every fused torch_npu path is reached, on each emulated chip:
the release attention shape (configs/tiny-release-attn.yaml) with structured weights, in bf16, with dequantised and
quantised weights; the quantised integer path of 910B / 910C against the reference running the SAME integer
weights (reference(w8a8,<chip>)), and the FP8-vs-W8A8 cost as a separately reported pair; plus the plain tiny fp32
comparison. Each Ascend run records which fused ops it reached and fails where it fell back for an op its chip
supports (capability table, through AscendOps.has), unless fallbacks are allowed."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv4.common.model.ops import Ops
from dsv4.common.parity.bisect import first_replayed_violation
from dsv4.common.parity.compare import (
    Comparison,
    Tolerances,
    Violation,
    compare_runs,
    default_prompts,
    run_backend,
)
from dsv4.common.parity.sources import ModelSource, default_model_source, make_backend

RELEASE = "tiny-release-attn"
EMULATED_CHIPS = ("910b", "910c", "950dt")
A5 = ("950pr", "950dt")

# the fused torch_npu operators a single-process V4 forward can reach. Not listed, on purpose:
# npu_moe_gating_top_k (V4 scores with sqrt(softplus), the op with softmax/sigmoid only) and the MC2 dispatch /
# combine ops (expert parallelism only; tests/test_ascend_release_attn.py covers them on 2 ranks)
REACHABLE = ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_dynamic_quant", "npu_quant_matmul",
             "npu_dynamic_mx_quant", "npu_anti_mx_quant", "npu_lightning_indexer", "npu_sparse_flash_attention",
             "npu_mhc_pre", "npu_mhc_sinkhorn", "npu_mhc_post", "npu_moe_init_routing_v2", "npu_grouped_matmul",
             "npu_moe_finalize_routing")


def expected_fused(ops: Any, weights: str) -> set[str]:
    """The fused ops `ops` (an AscendOps) must reach at the release shape in bf16: those its chip has per the
    capability table (ops.has), less the documented exceptions: SFA with attention sinks is 950-only
    (capability.UNVERIFIED); npu_quant_matmul runs only on quantised weights (W8A8 on 910B / 910C, the FP8 G-B
    form on 950, from the wheel's meta + TorchAir converter), and npu_dynamic_quant only for W8A8."""
    out = {op for op in REACHABLE if ops.has(op)}
    if ops.chip not in A5:
        out.discard("npu_sparse_flash_attention")
    if weights != "quantized":
        out -= {"npu_dynamic_quant", "npu_quant_matmul"}
    elif getattr(ops, "fp8_native", False):
        out.discard("npu_dynamic_quant")
    return out


class CallRecorder:
    """Wraps a torch_npu module (real or emulated) and records the name of every operator called through it. It
    exposes exactly the module's attributes, so AscendOps.has() answers as before."""

    def __init__(self, module: object) -> None:
        self._module, self.called = module, set()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._module, name)
        if not callable(attr) or not name.startswith("npu_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.called.add(name)
            return attr(*args, **kwargs)

        return call


def record_calls(ops: Ops) -> CallRecorder | None:
    """Install a CallRecorder on a backend with a torch_npu module (`ops.npu`); None for other backends."""
    npu = getattr(ops, "npu", None)
    if npu is None:
        return None
    if not isinstance(npu, CallRecorder):
        ops.npu = CallRecorder(npu)
    return ops.npu


@dataclass
class Case:
    """One block of the default run: a model, a dtype, an anchor backend and the candidates judged against it,
    each with the configs/parity.yaml pair key that fits what the two compute."""

    name: str
    config: str
    weights: str
    structured: bool
    dtype: torch.dtype
    anchor: str
    candidates: list[tuple[str, str]]  # (backend label, pair key)
    require_fused: bool = False  # Ascend candidates must reach expected_fused()
    # also replay the prefill op by op on the anchor's inputs, judged by the pair's tight 'op' bounds: for pairs
    # computing the same formulas, where the whole-model bounds must leave room for flipped discrete steps
    replay_ops: bool = False
    kv_fp8_sim: str | None = None
    seq_len: int | None = None
    decode_steps: int | None = None
    reported_only: bool = False  # a measured cost, judged by its own (loose) bounds: shown, labelled as such


@dataclass
class CaseResult:
    case: Case
    comparisons: list[Comparison]
    reached: dict[str, set[str]] = field(default_factory=dict)
    expected: dict[str, set[str]] = field(default_factory=dict)


def default_plan(tol: Tolerances) -> list[Case]:
    """The cases of the default `dsv4 parity run` (prompt sizes from configs/parity.yaml suite settings)."""
    emu = [f"ascend(emulated,{c})" for c in EMULATED_CHIPS]
    seq = int(tol.setting("seq_len", "release", 80))
    steps = int(tol.setting("decode_steps", "release", 2))
    rel = dict(config=RELEASE, structured=True, dtype=torch.bfloat16, seq_len=seq, decode_steps=steps,
               replay_ops=True)
    return [
        Case("tiny fp32", "tiny", "dequantized", False, torch.float32, "reference",
             [("ascend(emulated)", "reference-ascend")]),
        Case("release bf16, dequantized weights", weights="dequantized", anchor="reference",
             candidates=[(b, "reference-ascend_emulated") for b in emu], require_fused=True, **rel),
        Case("release bf16, FP8 weights (950)", weights="quantized", anchor="reference",
             candidates=[("ascend(emulated,950dt)", "reference-ascend_emulated")], require_fused=True, **rel),
        *[Case(f"release bf16, W8A8 weights ({c})", weights="quantized", anchor=f"reference(w8a8,{c})",
               candidates=[(f"ascend(emulated,{c})", "reference-ascend_w8a8")], require_fused=True, **rel)
          for c in ("910b", "910c")],
    ]


def interpreted_plan(tol: Tolerances) -> list[Case]:
    """With --include-interpreted: the CUDA kernels in the Triton interpreter (~100x slower than torch), tiny model,
    fp32 with continuous KV (the tight fp32-clamp bounds), the interpreter pair's short prompt."""
    return [Case("tiny fp32 clamp, Triton interpreter", "tiny", "dequantized", False, torch.float32, "reference",
                 [("cuda(interpreted)", "reference-cuda")], kv_fp8_sim="clamp",
                 seq_len=int(tol.setting("seq_len", "reference-cuda", 12)),
                 decode_steps=int(tol.setting("decode_steps", "reference-cuda", 1)))]


def requantized_plan(tol: Tolerances) -> list[Case]:
    """The FP8-vs-W8A8 accuracy cost of 910B / 910C (a chip property, not a bug): reported, loose bounds."""
    seq = int(tol.setting("seq_len", "release", 80))
    steps = int(tol.setting("decode_steps", "release", 2))
    return [Case("release bf16, FP8 reference vs W8A8 chips (cost)", RELEASE, "quantized", True, torch.bfloat16,
                 "reference", [(f"ascend(emulated,{c})", "reference-ascend_requantized") for c in ("910b", "910c")],
                 seq_len=seq, decode_steps=steps, reported_only=True)]


@functools.lru_cache(maxsize=8)
def _source(config: str, kv_fp8_sim: str | None, weights: str, structured: bool) -> ModelSource:
    # one source per model: its factory keeps the built CPU model per dtype, so cases sharing a model build it once
    return default_model_source(config, 0, kv_fp8_sim, weights, structured)


def run_case(case: Case, tol: Tolerances, allow_fallback: bool = False, prompt_seed: int = 0,
             make: Callable[[str], Ops] = make_backend, log: Callable[[str], None] = print,
             source: ModelSource | None = None, anchor_runs: dict | None = None) -> CaseResult:
    """Run the anchor, then each candidate teacher-forced on the anchor's greedy tokens; compare with the case's
    pair keys; for Ascend candidates of a require_fused case, add a violation per expected fused op not reached.
    `anchor_runs` (a dict kept by the caller across cases) reuses an anchor run of the same model and prompts."""
    source = source or _source(case.config, case.kv_fp8_sim, case.weights, case.structured)
    vocab = source.vocab_size or 512
    seq = case.seq_len or int(tol.setting("seq_len", None, 24))
    steps = case.decode_steps if case.decode_steps is not None else int(tol.setting("decode_steps", None, 4))
    prompts = default_prompts(vocab, int(tol.setting("batch", None, 2)), seq, prompt_seed)
    t0 = time.perf_counter()
    key = (case.config, case.kv_fp8_sim, case.weights, case.structured, case.dtype, case.anchor, seq, steps,
           prompt_seed)
    ref = anchor_runs.get(key) if anchor_runs is not None else None
    if ref is None:
        ref = run_backend(source.factory(make(case.anchor), case.dtype), prompts, steps, label=case.anchor)
        log(f"  [{case.name}] ran {case.anchor} in {time.perf_counter() - t0:.1f}s")
        if anchor_runs is not None:
            anchor_runs[key] = ref
    res = CaseResult(case, [])
    for label, pair in case.candidates:
        t0 = time.perf_counter()
        ops = make(label)
        rec = record_calls(ops)
        got = run_backend(source.factory(ops, case.dtype), prompts, steps, teacher=ref.decode_tokens, label=label)
        comp = compare_runs(ref, got, tol, pair=pair)
        if rec is not None:
            res.reached[label] = set(rec.called)
            if case.require_fused:
                res.expected[label] = expected_fused(ops, case.weights)
                missing = sorted(res.expected[label] - res.reached[label])
                if missing and not allow_fallback:
                    comp.violations += [Violation(f"fused ops of {label}", f"fell back for {op}", float("nan"),
                                                  f"reached ({getattr(ops, 'chip', '?')} supports it; "
                                                  "--allow-fallback to accept)") for op in missing]
        if case.replay_ops:
            bad = first_replayed_violation(source.factory, make(case.anchor), make(label), prompts, case.dtype, tol,
                                           pair, case.anchor)
            if bad is not None:
                comp.violations += [Violation(f"op replay (same inputs) {v.where}", v.metric, v.value, v.bound)
                                    for v in bad.violations]
        log(f"  [{case.name}] ran {label} in {time.perf_counter() - t0:.1f}s")
        res.comparisons.append(comp)
    return res



def reached_lines(results: list[CaseResult]) -> list[str]:
    """Per Ascend run: the fused ops it reached, and those it should have reached but did not."""
    out = []
    for r in results:
        for label, reached in r.reached.items():
            miss = sorted(r.expected.get(label, set()) - reached)
            out.append(f"fused [{r.case.name}] {label}: {', '.join(sorted(reached)) or 'none'}"
                       + (f"; FELL BACK for {', '.join(miss)}" if miss else ""))
    return out
