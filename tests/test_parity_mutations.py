"""Planted bugs the parity suite must catch: each is applied to a backend at run time (monkeypatching the Ascend
emulation's AscendOps, or the emulated torch_npu module under one instance, or the CUDA backend in the Triton
interpreter), then (1) the comparison `dsv4 parity run` makes (common/parity/suite.run_case, the release-shape
config with structured weights, bf16, configs/parity.yaml bounds of the pair) must fail, and (2) bisect must name
the op the bug is in. The unpatched controls must pass the same checks (test_controls_pass)."""

from __future__ import annotations

import functools

import pytest
import torch

from dsv4.ascend.backend import AscendOps
from dsv4.common.model.ops import LinearWeight
from dsv4.common.parity.bisect import bisect
from dsv4.common.parity.compare import Tolerances, default_prompts
from dsv4.common.parity.sources import default_model_source, make_backend
from dsv4.common.parity.suite import RELEASE, Case, run_case

TOL = Tolerances.load()
# 40 tokens: inside the 128-key window, 10 CSA entries (the indexer keeps all); every planted bug below sits in
# the prefill, so bisect replays the prefill only (decode steps add a lightning-indexer near-tie flip of the
# bf16 head weights, configs/parity.yaml reference-ascend_emulated)
SEQ, STEPS = 40, 1
PROMPTS = default_prompts(512, 2, SEQ)


def _wrap(cls: type, name: str, change):
    orig = getattr(cls, name)

    @functools.wraps(orig)
    def buggy(self, *args, **kwargs):
        return change(orig, self, *args, **kwargs)

    return name, buggy


# -- the bugs: (AscendOps method, wrapper) -------------------------------------------------------------------------
def rms_eps(orig, self, x, weight, eps):  # 1e-5 where V4 says 1e-6
    return orig(self, x, weight, eps * 10)


def sinkhorn_short(orig, self, x, fn, scale, base, iters, hc_eps, norm_eps):  # 19 Sinkhorn iterations, not 20
    return orig(self, x, fn, scale, base, iters - 1, hc_eps, norm_eps)


def post_term_dropped(orig, self, x, residual, post, comb):  # hc_post forgets post * x: only the residual mix
    return orig(self, torch.zeros_like(x), residual, post, comb)


def window_short(orig, self, q, kv, sink, indices, softmax_scale):  # the oldest visible key is not attended
    first = torch.where(indices >= 0, indices, torch.iinfo(indices.dtype).max).amin(-1, keepdim=True)
    return orig(self, q, kv, sink, torch.where(indices == first, -1, indices), softmax_scale)


def scale_transposed(orig, self, x, w):  # FP8 block scales read [in-block, out-block]
    if w.fmt == "fp8" and w.scale.shape[-1] == w.scale.shape[-2] and w.scale.shape[-1] > 1:
        w = LinearWeight(w.weight, w.scale.transpose(-1, -2).contiguous(), w.fmt)
    return orig(self, x, w)


MUTATIONS = {
    # name: (chip, weights, AscendOps method, wrapper, op bisect must name)
    "rms_norm eps 1e-5": ("950dt", "dequantized", "rms_norm", rms_eps, "/rms_norm#"),
    "sinkhorn 19 iterations": ("950dt", "dequantized", "hc_pre", sinkhorn_short, "/hc_pre#"),
    "hc_post drops post*x": ("950dt", "dequantized", "hc_post", post_term_dropped, "/hc_post#"),
    "window one key short": ("950dt", "dequantized", "sparse_attention", window_short, "/sparse_attention#"),
    "fp8 block scale transposed": ("950dt", "quantized", "linear", scale_transposed, "/linear#"),
}


class PerTensorQuant:
    """An emulated torch_npu module whose npu_dynamic_quant uses ONE scale for the whole tensor instead of one per
    token (a quantisation-granularity slip), every other operator unchanged."""

    def __init__(self, module: object) -> None:
        self._module = module

    def __getattr__(self, name: str):
        op = getattr(self._module, name)
        if name != "npu_dynamic_quant":
            return op

        def per_tensor(x, **kw):
            xf = x.float()
            scale = xf.abs().amax() / 127.0
            return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale.expand(x.shape[:-1]).clone()

        return per_tensor


def _case(chip: str, weights: str, anchor: str = "reference", pair: str = "reference-ascend_emulated") -> Case:
    return Case(f"mutation {chip}/{weights}", RELEASE, weights, True, torch.bfloat16, anchor,
                [(f"ascend(emulated,{chip})", pair)], require_fused=True, seq_len=SEQ, decode_steps=STEPS)


def _check(case: Case, make=make_backend) -> tuple[bool, str | None, str]:
    """(parity run passed, bisect's first divergent op, the bisect summary) for one case."""
    res = run_case(case, TOL, make=make, log=lambda _: None)
    label, pair = case.candidates[0]
    src = default_model_source(case.config, 0, None, case.weights, case.structured)
    b = bisect(src.factory, make(case.anchor), make(label), PROMPTS, case.dtype, TOL, pair=pair,
               label_a=case.anchor, label_b=label)
    return res.comparisons[0].ok, b.first_op, b.summary()


def test_controls_pass():
    for chip, weights in (("950dt", "dequantized"), ("950dt", "quantized")):
        ok, first, summary = _check(_case(chip, weights))
        assert ok and first is None, summary
    ok, first, summary = _check(_case("910b", "quantized", "reference(w8a8,910b)", "reference-ascend_w8a8"))
    assert ok and first is None, summary


@pytest.mark.parametrize("bug", list(MUTATIONS))
def test_planted_ascend_bug_fails_parity_and_bisect_names_op(bug, monkeypatch):
    chip, weights, method, change, op = MUTATIONS[bug]
    monkeypatch.setattr(AscendOps, *_wrap(AscendOps, method, change))
    ok, first, summary = _check(_case(chip, weights))
    assert not ok, f"{bug}: the parity comparison passed"
    assert first is not None and op in first, f"{bug}: bisect named {first!r}\n{summary}"


def test_per_tensor_activation_scale_fails_w8a8_parity():
    """The 910B W8A8 path against the reference running the same integer weights: a per-tensor activation scale
    in npu_dynamic_quant (instead of per token) must fail the tight pair and be blamed on the linear op."""

    def make(label: str):
        ops = make_backend(label)
        if label.startswith("ascend"):
            ops.npu = PerTensorQuant(ops.npu)
        return ops

    ok, first, summary = _check(_case("910b", "quantized", "reference(w8a8,910b)", "reference-ascend_w8a8"), make)
    assert not ok, "per-tensor activation scale passed the W8A8 parity pair"
    assert first is not None and ("/linear#" in first or "/moe_experts#" in first), summary
