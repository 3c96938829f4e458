"""The parity suite's own machinery: metrics on hand-made tensors, tolerances, op naming, bisect on a deliberately
broken op, golden record/compare (round trip, tampering, mismatched config/checkpoint) and the CLI functions."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.parity import bisect as B
from dsv4.common.parity import cli as C
from dsv4.common.parity import compare as P
from dsv4.common.parity import golden as G
from dsv4.common.parity import sources as S
from dsv4.common.parity.report import bisect_table, comparison_table, write_report

TOL = P.Tolerances.load()
SHORT = P.default_prompts(512, batch=2, seq_len=16, seed=0)  # 4 CSA entries: every attention kind runs


@pytest.fixture(scope="module")
def clamp_source() -> S.ModelSource:
    return S.default_model_source("tiny", seed=0, kv_fp8_sim="clamp")


# -- metrics on hand-made tensors --------------------------------------------------------------------------------------
def test_cosine_known_values() -> None:
    assert P.cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert P.cosine(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])) == pytest.approx(-1.0)
    assert P.cosine(torch.zeros(3), torch.zeros(3)) == 1.0
    assert P.cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_abs_and_relative_errors() -> None:
    ref = torch.tensor([1.0, -4.0, 2.0, 0.5], dtype=torch.float64)
    got = torch.tensor([1.0, -4.4, 2.0, 0.5002], dtype=torch.float64)
    assert P.max_abs_err(ref, got) == pytest.approx(0.4)
    assert P.mean_abs_err(ref, got) == pytest.approx((0.4 + 0.0002) / 4)
    assert P.max_abs_norm_err(ref, got) == pytest.approx(0.1)  # 0.4 / max|ref| = 4
    assert P.max_rel_err(ref, got) == pytest.approx(0.1)
    # relative errors 0, 0.1, 0, 0.0004: three of four below 0.1%, and below 0.5%
    assert P.err_ratio(ref, got, 1e-3) == pytest.approx(0.75)
    assert P.err_ratio(ref, got, 5e-3) == pytest.approx(0.75)
    assert P.err_ratio(ref, got, 0.2) == 1.0


def test_kl_known_value() -> None:
    ref = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    got = torch.tensor([[0.9, 0.1]], dtype=torch.float64).log()
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(P.kl_divergence(ref, got)[0]) == pytest.approx(want, rel=1e-9)
    assert float(P.kl_divergence(ref, ref + 3.0)[0]) == pytest.approx(0.0, abs=1e-12)  # shift invariance


def test_top1_topk_and_greedy() -> None:
    ref = torch.tensor([[5.0, 4.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    got = torch.tensor([[4.0, 5.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert P.top1_agreement(ref, got) == 0.5
    assert P.topk_agreement(ref, got, k=2) == 1.0  # same two best tokens, other order
    assert P.topk_agreement(ref, torch.tensor([[0.0, 0.0, 5.0, 4.0], [0.0, 1.0, 2.0, 3.0]]), k=2) == 0.5
    fed = torch.tensor([[7, 8, 9], [1, 2, 3]])
    assert P.greedy_match_length(fed, torch.tensor([[7, 8, 0], [1, 2, 3]])).tolist() == [2, 3]
    assert P.greedy_match_length(fed, fed, torch.tensor([[0, 8, 9], [1, 2, 3]])).tolist() == [0, 3]


def test_nan_and_inf_always_fail() -> None:
    ref = torch.randn(4, 8)
    got = ref.clone()
    got[1, 2] = float("nan")
    got[3, 0] = float("inf")
    m = P.logits_metrics(ref, got)
    assert m["nonfinite"] == 2 and math.isnan(m["cosine"]) and math.isnan(m["top1"])
    v = P.check_metrics("x", m, {})  # no bounds at all: still a failure
    assert [x.metric for x in v] == ["nonfinite"]
    bounds = {"cosine": P.Bound("cosine", min=0.0, why="any")}
    assert {x.metric for x in P.check_metrics("x", m, bounds)} == {"nonfinite", "cosine"}
    with pytest.raises(P.NonFiniteError, match="1 NaN and 1 Inf"):
        P.assert_finite(got, "candidate")
    with pytest.raises(P.NonFiniteError, match="reference"):
        P.tensor_metrics(got, ref)  # a NaN reference cannot judge anything


def test_op_outputs_compare_order_insensitively() -> None:
    idx = torch.tensor([[[3, 1, -1], [0, 2, 5]]])
    assert P.op_output_metrics("indexer_topk", idx, idx.flip(-1))["index_mismatch"] == 0.0
    assert P.op_output_metrics("indexer_topk", idx, idx.clone().fill_(0))["index_mismatch"] == 1.0
    w, ids = torch.tensor([[0.7, 0.3]]), torch.tensor([[4, 2]])
    m = P.op_output_metrics("moe_gate", (w, ids), (w.flip(-1), ids.flip(-1)))
    assert m["index_mismatch"] == 0.0 and m["max_abs_norm"] == 0.0


# -- tolerances --------------------------------------------------------------------------------------------------------
def test_tolerance_file_covers_every_pair_profile_scope() -> None:
    for pair in ("reference-ascend", "reference-cuda", "ascend-cuda", "golden"):
        for profile in ("fp32-clamp", "fp32-e4m3", "bf16-e4m3", "bf16-clamp"):
            for scope in P.Tolerances.SCOPES:
                bounds = TOL.bounds(pair, profile, scope)
                assert bounds and all(b.why for b in bounds.values()), (pair, profile, scope)
    assert P.Tolerances.pair_key("cuda(interpreted)", "reference") == "reference-cuda"
    assert P.Tolerances.pair_key("ascend(emulated)", "cuda") == "ascend-cuda"
    assert P.Tolerances.pair_key("golden:cuda", "ascend") == "golden"
    with pytest.raises(KeyError, match="no tolerances for backend pair"):
        TOL.bounds("reference-tpu", "fp32-clamp", "prefill")


def test_tolerance_entries_need_a_justification() -> None:
    bad = {"tolerances": {"reference-cuda": {"fp32-clamp": {"prefill": {"cosine": {"min": 0.9}}}}}}
    with pytest.raises(ValueError, match="one-line 'why'"):
        P.Tolerances(bad)


# -- op naming ---------------------------------------------------------------------------------------------------------
def test_recording_proxy_names_ops_by_layer_and_module(clamp_source: S.ModelSource) -> None:
    ref = ReferenceOps()
    model = clamp_source.factory(ref, torch.float32)
    with B.ScopeTracker(model) as tracker:
        rec = B.RecordingOps(ref, tracker)
        model.ops = rec
        model(SHORT[:1, :8])
    names = [n for n, _ in rec.records]
    assert names[0] == "layers.0/hc_pre#0"
    assert "layers.2.attn/sparse_attention#0" in names
    assert "layers.1.attn.indexer/indexer_topk#0" in names
    assert "layers.1.attn.compressor/compress_pool#0" in names
    assert "layers.3/hc_post#1" in names and "layers.3/rms_norm#1" in names
    assert names[-3:] == ["model/hc_head#0", "model/rms_norm#0", "model/linear#0"]
    assert len(names) == len(set(names))
    assert not tracker.handles  # hooks removed on exit


def test_an_op_writing_into_its_input_is_recorded_and_replayed_as_called() -> None:
    """The graph rotates rope parts in place (rope(..., out=pe)): the record is what the op wrote, the shadow
    backend replays the call on the inputs as they were before the write, and the tensor is rotated once."""
    ref = ReferenceOps()
    shadow = B.ShadowOps(ref, ReferenceOps(), {"max_abs_norm": P.Bound("max_abs_norm", max=0.0, why="same op")})
    x = torch.randn(1, 2, 3, 32, generator=torch.Generator().manual_seed(0))
    ang = torch.linspace(0.1, 2.0, 8).expand(1, 2, 8)
    cos, sin = ang.cos(), ang.sin()
    want = ref.rope(x[..., -16:], cos, sin)
    pe = x[..., -16:]
    shadow.rope(pe, cos, sin, out=pe)
    (name, rec), = shadow.records
    assert name == "model/rope#0" and torch.equal(rec, want) and torch.equal(x[..., -16:], want)
    assert shadow.results[0].violations == [] and shadow.results[0].metrics["max_abs_norm"] == 0.0


# -- a deliberately broken op ------------------------------------------------------------------------------------------
class NoisyRmsNorm(ReferenceOps):
    """rms_norm adds 1e-2 noise, but only for one norm weight (one layer), so the blame has one right answer."""

    name = "noisy-rms-norm"

    def __init__(self, target: Tensor) -> None:
        super().__init__("cpu")
        self.target = target.detach().float().cpu().clone()

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y = super().rms_norm(x, weight, eps)
        if weight.shape == self.target.shape and torch.equal(weight.float().cpu(), self.target):
            g = torch.Generator().manual_seed(123)
            y = y + 1e-2 * torch.randn(y.shape, generator=g).to(y.dtype)
        return y


class NoisyHcPost(ReferenceOps):
    name = "noisy-hc-post"

    def hc_post(self, x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        y = super().hc_post(x, residual, post, comb)
        return y + 1e-2 * torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)


def test_broken_op_fails_the_pair_comparison(clamp_source: S.ModelSource) -> None:
    ref_ops = ReferenceOps()
    target = clamp_source.factory(ref_ops, torch.float32).layers[2].ffn_norm.weight
    a = P.run_backend(clamp_source.factory(ref_ops, torch.float32), SHORT, 2, label="reference")
    b = P.run_backend(clamp_source.factory(NoisyRmsNorm(target), torch.float32), SHORT, 2, teacher=a.decode_tokens,
                      label="ascend(emulated)")
    c = P.compare_runs(a, b, TOL)  # judged with the real reference-ascend fp32-clamp bounds
    assert not c.ok
    hidden_bad = [v.where for v in c.violations if "hidden" in v.where]
    assert hidden_bad and hidden_bad[0] == "layers.2 hidden"  # layers 0-1 are untouched
    assert any(v.where == "prefill logits" for v in c.violations)
    assert "FAIL" in comparison_table([c])


def test_bisect_names_the_broken_op_and_layer(clamp_source: S.ModelSource) -> None:
    ref_ops = ReferenceOps()
    target = clamp_source.factory(ref_ops, torch.float32).layers[2].ffn_norm.weight
    res = B.bisect(clamp_source.factory, ref_ops, NoisyRmsNorm(target), SHORT, torch.float32, TOL,
                   pair="reference-ascend", label_b="noisy")
    # Block.forward's second direct rms_norm call is the ffn_norm: layers.2/rms_norm#1
    assert res.first_op == "layers.2/rms_norm#1"
    assert res.first_layer == "layers.2"
    assert [r.name for r in res.replay if r.violations] == ["layers.2/rms_norm#1"]  # replay: no accumulation
    assert res.structure_error is None
    assert "layers.2/rms_norm#1" in res.summary()


def test_bisect_blames_the_first_call_of_an_always_broken_op(clamp_source: S.ModelSource) -> None:
    res = B.bisect(clamp_source.factory, ReferenceOps(), NoisyHcPost(), SHORT[:1], torch.float32, TOL,
                   pair="reference-cuda")
    assert res.first_op == "layers.0/hc_post#0" and res.first_layer == "layers.0"
    assert {r.name.split("/")[1].split("#")[0] for r in res.replay if r.violations} == {"hc_post"}


class CrashingIndexer(ReferenceOps):
    """A candidate whose indexer raises (e.g. a fused op that rejects a shape): bisect must still give a verdict."""

    name = "crashing-indexer"

    def indexer_topk(self, *args, **kwargs):
        raise RuntimeError("npu_lightning_indexer: unsupported head count")


def test_bisect_of_a_crashing_backend_names_op_layer_and_error(clamp_source: S.ModelSource) -> None:
    res = B.bisect(clamp_source.factory, ReferenceOps(), CrashingIndexer(), SHORT[:1], torch.float32, TOL,
                   pair="reference-ascend", label_b="crashing")
    assert not res.ok
    # the first CSA layer of the tiny config (compress ratio 4) is the first to call the indexer
    first_csa = load_named_config("tiny").compress_ratios.index(4)
    assert res.first_op == f"layers.{first_csa}.attn.indexer/indexer_topk#0"
    assert res.crash and f"layers.{first_csa}.attn.indexer/indexer_topk#0 (layers.{first_csa})" in res.crash
    assert "RuntimeError: npu_lightning_indexer: unsupported head count" in res.crash
    text = res.summary()
    assert "crashed: crashing raised in" in text and "first divergent op" in text
    assert "FAIL" in bisect_table(res)


def test_bisect_of_a_backend_that_cannot_build_the_model(clamp_source: S.ModelSource) -> None:
    def factory(ops, dtype):
        if isinstance(ops, CrashingIndexer):
            raise ValueError("weight conversion failed")
        return clamp_source.factory(ops, dtype)

    res = B.bisect(factory, ReferenceOps(), CrashingIndexer(), SHORT[:1], torch.float32, TOL,
                   pair="reference-ascend", label_b="crashing")
    assert not res.ok and res.crash == "crashing raised in building the model: ValueError: weight conversion failed"


class DecodeOnlyBrokenAttention(ReferenceOps):
    """Attention that is right for prompts but wrong for single-token steps: only a decode bisect can see it."""

    def sparse_attention(self, q, kv, sink, indices, softmax_scale):
        out = super().sparse_attention(q, kv, sink, indices, softmax_scale)
        return out * 1.01 if q.shape[1] == 1 else out


def test_bisect_follows_decode_steps(clamp_source: S.ModelSource) -> None:
    res = B.bisect(clamp_source.factory, ReferenceOps(), DecodeOnlyBrokenAttention(), SHORT[:1], torch.float32,
                   TOL, pair="reference-ascend", decode_steps=2)
    # prefill agrees; the first decode step's first attention call is to blame
    assert res.first_op == "decode1:layers.0.attn/sparse_attention#0", res.first_op
    assert res.first_layer is None  # the per-layer hidden states compared are the prefill's
    assert all(r.name.startswith("decode") for r in res.replay if r.violations)
    clean = B.bisect(clamp_source.factory, ReferenceOps(), DecodeOnlyBrokenAttention(), SHORT[:1], torch.float32,
                     TOL, pair="reference-ascend")
    assert clean.first_op is None  # without decode steps the defect is invisible


def test_bisect_of_identical_backends_is_clean(clamp_source: S.ModelSource, tmp_path: Path) -> None:
    res = B.bisect(clamp_source.factory, ReferenceOps(), ReferenceOps(), SHORT[:1], torch.float32, TOL,
                   pair="reference-ascend")
    assert res.ok and len(res.replay) > 100
    report = write_report(tmp_path, [], bisects=[res])
    text = report.read_text()
    assert "Bisect" in text and "error growth" in text.lower()
    assert (tmp_path / "error_growth.png").exists() or "plot skipped" in text


# -- golden files ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden_file(tmp_path_factory: pytest.TempPathFactory, clamp_source: S.ModelSource) -> Path:
    path = tmp_path_factory.mktemp("golden") / "golden.safetensors"
    ops = ReferenceOps()
    model = clamp_source.factory(ops, torch.float32)
    run = P.run_backend(model, SHORT, 3, label="reference")
    G.record_golden(path, run, ops, model.args.arch_hash(), clamp_source.checkpoint_hash)
    return path


def test_golden_round_trip(golden_file: Path, clamp_source: S.ModelSource) -> None:
    model = clamp_source.factory(ReferenceOps(), torch.float32)
    g = G.load_golden(golden_file, model.args.arch_hash(), clamp_source.checkpoint_hash)
    meta = g.metadata
    assert meta["backend"] == "reference" and meta["dtype"] == "fp32" and meta["kv_fp8_sim"] == "clamp"
    assert meta["torch"] == torch.__version__ and meta["device"].startswith("cpu")
    assert len(g.run.hidden) == 4 and g.run.decode_tokens.shape == (2, 3)
    c = G.compare_golden(g, model, TOL, label="reference")
    assert c.ok, [str(v) for v in c.violations]
    assert c.prefill["max_abs"] == 0.0 and c.decode["greedy_match_frac"] == 1.0


def test_tampered_golden_is_refused(golden_file: Path, tmp_path: Path) -> None:
    data = bytearray(golden_file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    import json

    header = json.loads(data[8:8 + header_len])
    start, _ = header["prefill.logits"]["data_offsets"]
    pos = 8 + header_len + start + 4 * 10  # the 11th logit
    data[pos + 3] ^= 0x01  # flip a bit in its exponent/sign byte
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(G.GoldenError, match="content hash mismatch"):
        G.load_golden(bad)


def test_golden_from_other_config_or_checkpoint_is_refused(golden_file: Path) -> None:
    e4m3 = S.default_model_source("tiny", seed=0, kv_fp8_sim="e4m3")
    e4m3_hash = e4m3.factory(ReferenceOps(), torch.float32).args.arch_hash()
    with pytest.raises(G.GoldenError, match="model config"):
        G.load_golden(golden_file, config_hash=e4m3_hash)
    other = S.default_model_source("tiny", seed=1, kv_fp8_sim="clamp")
    with pytest.raises(G.GoldenError, match="checkpoint"):
        G.load_golden(golden_file, checkpoint_hash=other.checkpoint_hash)


def test_non_golden_file_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    p = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(p))
    with pytest.raises(G.GoldenError, match="not a dsv4 parity golden file"):
        G.load_golden(p)


def test_checkpoint_fingerprint_reads_headers(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    fp1 = S.checkpoint_fingerprint(tmp_path)
    save_file({"w": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert S.checkpoint_fingerprint(tmp_path) != fp1


# -- the CLI functions -------------------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dsv4")
    C.add_parity_arguments(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_record_compare_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    g = str(tmp_path / "g.safetensors")
    small = ["--kv-fp8-sim", "clamp", "--batch", "1", "--seq-len", "8", "--decode-steps", "2"]
    assert C.run_parity(_parse(["parity", "record", "--backend", "reference", "--out", g, *small])) == 0
    assert C.run_parity(_parse(["parity", "compare", g, "--backend", "reference", *small,
                                "--report", str(tmp_path / "rep")])) == 0
    assert (tmp_path / "rep" / "report.md").exists()
    assert C.run_parity(_parse(["parity", "compare", g, "--backend", "reference", *small, "--seed", "1"])) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert C.run_parity(_parse(["parity", "compare", g, "--backend", "reference", "--batch", "1", "--seq-len",
                                "8"])) == 2  # the config's e4m3 KV: another arch hash
    assert "model config" in capsys.readouterr().err


def test_cli_bisect_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ns = _parse(["parity", "bisect", "--backends", "reference", "reference", "--kv-fp8-sim", "clamp", "--batch", "1",
                 "--seq-len", "8"])
    assert C.run_parity(ns) == 0
    assert "no divergence" in capsys.readouterr().out


def test_cli_run_compares_every_available_pair(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ns = _parse(["parity", "run", "--kv-fp8-sim", "clamp", "--batch", "1", "--seq-len", "8", "--decode-steps", "1",
                 "--report", str(tmp_path)])
    code = C.run_parity(ns)
    out = capsys.readouterr().out
    usable = [c.label for c in S.available_backends() if c.available]
    if len(usable) < 2:
        assert code == 2
        return
    assert code == 0, out
    assert "| reference" in out and "prefill" in out and "decode" in out
    assert "ran  reference" in out and "skip cuda(interpreted)" in out  # the interpreter only on request
    assert (tmp_path / "report.md").exists()
