"""Planted bugs the parity suite must catch: each is applied to a backend at run time (monkeypatching the Ascend
emulation's AscendOps, or the emulated torch_npu module under one instance, or the CUDA backend in the Triton
interpreter), then (1) the comparison `dsv4 parity run` makes (common/parity/suite.run_case, the release-shape
config with structured weights, bf16, configs/parity.yaml bounds of the pair) must fail, and (2) bisect must name
the op the bug is in. The unpatched controls must pass the same checks (test_controls_pass)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported (the CUDA cases)

from dsv4.ascend.backend import AscendOps  # noqa: E402
from dsv4.common.model.ops import LinearWeight  # noqa: E402
from dsv4.common.parity.bisect import bisect  # noqa: E402
from dsv4.common.parity.compare import Tolerances, default_prompts  # noqa: E402
from dsv4.common.parity.sources import default_model_source, make_backend  # noqa: E402
from dsv4.common.parity.suite import RELEASE, Case, default_plan, run_case  # noqa: E402

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


def groups_crossed(orig, self, x, weight):  # wo_a's groups multiply the other groups' rows
    return orig(self, x.roll(1, 0), weight)


MUTATIONS = {
    # name: (chip, weights, AscendOps method, wrapper, op bisect must name)
    "rms_norm eps 1e-5": ("950dt", "dequantized", "rms_norm", rms_eps, "/rms_norm#"),
    "sinkhorn 19 iterations": ("950dt", "dequantized", "hc_pre", sinkhorn_short, "/hc_pre#"),
    "hc_post drops post*x": ("950dt", "dequantized", "hc_post", post_term_dropped, "/hc_post#"),
    "window one key short": ("950dt", "dequantized", "sparse_attention", window_short, "/sparse_attention#"),
    "fp8 block scale transposed": ("950dt", "quantized", "linear", scale_transposed, "/linear#"),
    "wo_a groups crossed": ("950dt", "dequantized", "grouped_linear", groups_crossed, "/grouped_linear#"),
}


class OneOpChanged:
    """An emulated torch_npu module with operator `name` replaced by change(original), every other operator
    unchanged."""

    def __init__(self, module: object, name: str, change) -> None:
        self._module, self._name, self._change = module, name, change

    def __getattr__(self, name: str):
        op = getattr(self._module, name)
        return self._change(op) if name == self._name else op


def per_tensor_quant(op):  # npu_dynamic_quant with ONE scale for the whole tensor, not one per token
    def per_tensor(x, **kw):
        xf = x.float()
        scale = xf.abs().amax() / 127.0
        return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale.expand(x.shape[:-1]).clone()

    return per_tensor


def doubled_mx_scale(op):  # npu_dynamic_mx_quant reports every block's scale one binade high (a wrong exponent)
    def doubled(x, **kw):
        y, mx = op(x, **kw)
        return y, mx + 1

    return doubled


def swapped_mx_weight_scale_pairs(op):  # npu_grouped_matmul reads each pair of per-32 weight scales swapped
    def swapped(x, weight, **kw):
        if kw.get("scale_dtype") is not None:  # the MX form: scale [E, N, K/64, 2]
            kw = {**kw, "scale": [kw["scale"][0].flip(-1).contiguous()]}
        return op(x, weight, **kw)

    return swapped


def npu_changed(name: str, change):
    """make_backend, with the Ascend backends' emulated torch_npu module running OneOpChanged(name, change)."""

    def make(label: str):
        ops = make_backend(label)
        if label.startswith("ascend"):
            ops.npu = OneOpChanged(ops.npu, name, change)
        return ops

    return make


def _case(chip: str, weights: str, anchor: str = "reference", pair: str = "reference-ascend_emulated") -> Case:
    return Case(f"mutation {chip}/{weights}", RELEASE, weights, True, torch.bfloat16, anchor,
                [(f"ascend(emulated,{chip})", pair)], require_fused=True, seq_len=SEQ, decode_steps=STEPS,
                replay_ops=True)


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


@pytest.mark.parametrize("prompt_seed", [3, 10])
def test_default_suite_passes_on_other_prompts(prompt_seed):
    """The release cases of `dsv4 parity run`, unpatched, on prompts other than the default: seeds 3 and 10 are
    the worst of seeds 0-11, among the 22 configs/parity.yaml's reference-ascend_emulated bounds were measured on
    (950DT with FP8 weights: bf16 ulps of the fused ops flip FP8 activation roundings). Bounds fitted to seed 0
    alone failed a correct backend on each of seeds 1-11."""
    anchors: dict = {}
    for case in default_plan(TOL):
        if case.name.startswith("release") and not case.reported_only:
            res = run_case(case, TOL, prompt_seed=prompt_seed, log=lambda _: None, anchor_runs=anchors)
            for comp in res.comparisons:
                assert comp.ok, f"{case.name}, {comp.got}, prompt seed {prompt_seed}: {comp.violations}"


def test_fallback_for_a_supported_fused_op_fails_the_pair(monkeypatch):
    """950DT supports npu_sparse_flash_attention: a run that silently takes the torch attention instead fails its
    pair (naming the op), however close its numbers are; --allow-fallback accepts it."""
    monkeypatch.setattr(AscendOps, "_sfa_fits", lambda self, q, kv: "planted fallback")
    case = _case("950dt", "dequantized")
    res = run_case(case, TOL, log=lambda _: None)
    label = case.candidates[0][0]
    assert "npu_sparse_flash_attention" not in res.reached[label]
    assert [v.metric for v in res.comparisons[0].violations] == ["fell back for npu_sparse_flash_attention"]
    assert run_case(case, TOL, allow_fallback=True, log=lambda _: None).comparisons[0].ok


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
    make = npu_changed("npu_dynamic_quant", per_tensor_quant)
    ok, first, summary = _check(_case("910b", "quantized", "reference(w8a8,910b)", "reference-ascend_w8a8"), make)
    assert not ok, "per-tensor activation scale passed the W8A8 parity pair"
    assert first is not None and any(op in first for op in ("/linear#", "/linears#", "/moe_experts#")), summary


def test_wrong_mx_scale_fails_parity_and_bisect_names_the_linear():
    """950DT with FP8 weights (as `dsv4 parity run`'s "FP8 weights (950)" pair): a doubled npu_dynamic_mx_quant
    scale must fail the reference-ascend_emulated bounds, and bisect must name the first op it reaches (the first
    FP8 linear of layer 0: wq_a, which shares its input with wkv through `linears`)."""
    ok, first, summary = _check(_case("950dt", "quantized"), npu_changed("npu_dynamic_mx_quant", doubled_mx_scale))
    assert not ok, "a doubled FP8 activation scale passed the parity pair"
    assert first is not None and "/linears#" in first, summary


def test_swapped_mx_weight_scales_fail_parity_and_bisect_names_the_experts():
    """950DT's MoE experts run npu_grouped_matmul's MX form (e8m0 per-32 weight scales, pair layout [E, N, K/64,
    2]): a grouped GEMM reading each pair of scales swapped must fail the pair and be blamed on moe_experts. (The
    activation's pairs would not show: its per-32 scales come four equal ones per V4 128-block.)"""
    make = npu_changed("npu_grouped_matmul", swapped_mx_weight_scale_pairs)
    ok, first, summary = _check(_case("950dt", "quantized"), make)
    assert not ok, "swapped MX weight scales passed the parity pair"
    assert first is not None and "/moe_experts#" in first, summary


# -- CUDA (Triton interpreter): few and tiny, the interpreter is ~100x slower than torch --------------------------
CUDA_MUTATIONS = {
    # name: (CudaOps method, wrapper, op bisect must name)
    "cuda window one key short": ("sparse_attention", window_short, "/sparse_attention#"),
}


# ~45 s on 2 cores (three interpreted forwards), in the default run: the issue asks for the CUDA backend's planted
# bugs there too. Measured: a 19-iteration Sinkhorn in the CUDA hc_pre ESCAPES this tiny fp32 case (its free-run
# logits stay within the fp32-clamp bounds of reference-cuda, which allow Triton's summation order), so it is not
# listed; on the Ascend path the same bug is caught (bit-identical pair)
@pytest.mark.parametrize("bug", list(CUDA_MUTATIONS))
def test_planted_cuda_bug_fails_parity_and_bisect_names_op(bug, monkeypatch):
    pytest.importorskip("triton")
    from dsv4.cuda.backend import CudaOps

    method, change, op = CUDA_MUTATIONS[bug]
    monkeypatch.setattr(CudaOps, *_wrap(CudaOps, method, change))
    # the tiny config in fp32 with continuous KV (tight fp32-clamp bounds of reference-cuda), 1x8 prompt, prefill
    case = Case("mutation cuda", "tiny", "dequantized", False, torch.float32, "reference",
                [("cuda(interpreted)", "reference-cuda")], kv_fp8_sim="clamp", seq_len=8, decode_steps=0)
    res = run_case(case, TOL, log=lambda _: None)
    assert not res.comparisons[0].ok, f"{bug}: the parity comparison passed"
    src = default_model_source("tiny", 0, "clamp")
    b = bisect(src.factory, make_backend("reference"), make_backend("cuda(interpreted)"),
               default_prompts(src.vocab_size, 1, 8), torch.float32, TOL, pair="reference-cuda")
    assert b.first_op is not None and op in b.first_op, f"{bug}: bisect named {b.first_op!r}\n{b.summary()}"
