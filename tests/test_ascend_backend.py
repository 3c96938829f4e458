"""Ascend backend plumbing: chip capability selection, probe() without an NPU, lazy import, weight conversion and
its accuracy report, and the same op checks on a real NPU (marked `npu`, skipped here with the reason)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dsv4.ascend as ascend
from dsv4.ascend import capability as cap
from dsv4.ascend.convert import (
    conversion_error,
    convert_for_chip,
    dequant_any,
    fp4_to_fp8,
    fp4_to_fp8_is_exact,
    to_w4a8,
    to_w8a8,
)
from dsv4.common.model.ops import LinearWeight
from dsv4.common.model.quant import quantize_fp4, quantize_fp8
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.runtime.backend import probe_backend, select_backend


def fp8w(seed=0, out=256, inp=256):
    q, s = quantize_fp8(torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return LinearWeight(q, s, "fp8")


def fp4w(seed=1, out=128, inp=256, lead=()):
    q, s = quantize_fp4(torch.randn(*lead, out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return LinearWeight(q, s, "fp4")


# -- capability table and selection -------------------------------------------------------------------------------
def test_910b_picks_w8a8_and_composed_mhc():
    ops = ascend.create_ops(emulate=True, chip="910b")
    d = ops.describe()
    assert "W8A8" in d["linear"] and "torch" in d["hc_pre"] and "finalize" in d["moe_experts"]
    assert "weight-only int4" in d["moe_experts"]
    x = torch.randn(1, 2, 4, 64).bfloat16()
    ops.hc_pre(x, torch.randn(24, 256) * 0.05, torch.ones(3), torch.zeros(24), 20, 1e-6, 1e-6)
    assert ops.last_path["hc_pre"].startswith("torch")
    ops.linear(torch.randn(3, 256).bfloat16(), fp8w())
    assert "W8A8" in ops.last_path["linear"]


def test_950dt_picks_fused_mhc_and_fp8():
    ops = ascend.create_ops(emulate=True)  # default emulated chip
    assert ops.chip == "950dt"
    d = ops.describe()
    assert d["linear"].startswith("npu_dynamic_mx_quant FP8") and d["hc_pre"].startswith("npu_mhc_pre")
    x = torch.randn(1, 2, 4, 64).bfloat16()
    ops.hc_pre(x, torch.randn(24, 256) * 0.05, torch.ones(3), torch.zeros(24), 20, 1e-6, 1e-6)
    assert ops.last_path["hc_pre"] == "npu_mhc_pre + npu_mhc_sinkhorn"
    ops.linear(torch.randn(3, 256).bfloat16(), fp8w())
    # the FP8 GEMM is npu_quant_matmul's G-B form (wheel meta + TorchAir converter), its activation the fused MX op
    assert ops.last_path["linear"].startswith("npu_dynamic_mx_quant + npu_quant_matmul (FP8 G-B")
    ops.linear(torch.randn(3, 256), fp8w())  # fp32 activations: the op takes fp32 with 32-blocks only
    assert ops.last_path["linear"].startswith("torch FP8-simulated")


def test_products_gate_ops_and_env_var_picks_chip(monkeypatch):
    a3 = ascend.create_ops(emulate=True, chip="910c")  # npu_swiglu's doc lists A2 only
    assert not a3.has("npu_swiglu") and a3.describe()["swiglu"].startswith("torch")
    a3.swiglu(torch.randn(3, 8), torch.randn(3, 8), 10.0)
    assert a3.last_path["swiglu"] == "torch"
    monkeypatch.setenv("DSV4_ASCEND_CHIP", "910C")
    assert ascend.create_ops(emulate=True).chip == "910c"
    assert ascend.create_ops(emulate=True, chip="950pr").chip == "950pr"  # the option wins over the env var
    with pytest.raises(ValueError):
        cap.normalise_chip("h100")


@pytest.mark.parametrize("name,chip", [("Ascend910B3", "910b"), ("Ascend910_9391", "910c"),
                                       ("Ascend950DT", "950dt"), ("Ascend950PR", "950pr"), ("Ascend310P", "910b")])
def test_chip_from_device_name(name, chip):
    assert cap.chip_from_device_name(name) == chip


def test_capability_table_matches_the_2_14_0_docs():
    for op in ("npu_mhc_pre", "npu_mhc_sinkhorn", "npu_mhc_post"):
        assert cap.CAPABILITIES[op].chips == cap.A5
    for chip in cap.CHIPS:
        assert cap.op_in_table("npu_lightning_indexer", chip) and cap.op_in_table("npu_sparse_flash_attention", chip)
    assert cap.op_in_table("npu_moe_finalize_routing", "910b") and not cap.op_in_table("npu_moe_finalize_routing",
                                                                                        "910c")


# -- probe / import / registry ------------------------------------------------------------------------------------
def test_probe_without_npu_names_torch_npu():
    ok, reason = ascend.probe(None)
    assert ok is False and "torch_npu" in reason
    info = probe_backend("ascend")
    assert not info.available and "torch_npu" in info.reason


def test_import_does_not_import_torch_npu():
    code = "import sys, dsv4.ascend, dsv4.ascend.capability; assert 'torch_npu' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_registry_and_constants():
    ops = select_backend("ascend", emulate=True, chip="910b")
    assert ops.name == "ascend" and ops.chip == "910b" and ops.device.type == "cpu"
    assert ascend.HCCL == "hccl" and ascend.GRAPH_MODE_VERIFIED is False
    with pytest.raises(RuntimeError, match="torchair"):
        ascend.compile_graph(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="no Ascend NPU"):
        ascend.create_ops()


# -- conversion --------------------------------------------------------------------------------------------------------
def test_w8a8_conversion_format_and_error():
    w = fp8w()
    c = to_w8a8(w)
    assert c.fmt == "w8a8" and c.weight.dtype == torch.int8 and c.scale.shape == (256,)
    W = dequant_any(w)
    assert torch.allclose(c.scale, W.abs().amax(-1) / 127)
    # symmetric rounding: at most half a step per element
    assert ((dequant_any(c) - W).abs() <= c.scale[:, None] / 2 + 1e-8).all()
    rep = conversion_error(w, "w8a8")
    assert set(rep) >= {"max_abs", "mean_abs", "rel_rms"}
    assert 0 < rep["rel_rms"] < 0.02 and rep["mean_abs"] < rep["max_abs"]


def test_w4a8_conversion_format_and_error():
    w = fp4w(lead=(2,))
    c = to_w4a8(w)
    assert c.fmt == "w4a8" and c.weight.dtype == torch.int32
    assert c.weight.shape == (2, 256, 128 // 8) and c.scale.shape == (2, 256 // 32, 128)
    W = dequant_any(w)
    err = (dequant_any(c) - W).abs()
    assert (err <= c.scale.repeat_interleave(32, dim=-2).transpose(-1, -2) / 2 + 1e-8).all()
    rep = conversion_error(fp4w(), "w4a8")
    assert 0 < rep["rel_rms"] < 0.15  # measured ~0.09: 16 uniform levels vs the non-uniform e2m1 grid


def test_fp4_to_fp8_is_lossless_and_chip_policy():
    w = fp4w(lead=(3,))
    c = fp4_to_fp8(w)
    assert c.fmt == "fp8" and c.weight.dtype == torch.float8_e4m3fn and c.scale.shape == (3, 1, 2)
    assert fp4_to_fp8_is_exact(w)
    assert convert_for_chip(w, "950dt").fmt == "fp8"
    assert convert_for_chip(w, "910b", expert=True).fmt == "w4a8"
    assert convert_for_chip(fp8w(), "910c").fmt == "w8a8"
    assert convert_for_chip(fp4w(lead=(2,)), "910c", expert=True).fmt == "w8a8"  # no int4 GEMM documented on A3


def test_mxfp8_experts_are_exact():
    """950 experts for npu_grouped_matmul's MX form: e4m3 codes [E, out, in] with e8m0 bytes [E, out, in/64, 2].
    From FP4 the values are the checkpoint's exactly (e2m1 values are e4m3 values, the ue8m0 scales kept), from
    FP8 128x128 blocks too (each block scale repeated per 32 columns); an odd count of 32-blocks is padded."""
    for w in (fp4w(lead=(3,)), fp4w(lead=(2,), inp=224), LinearWeight(*quantize_fp8(
            torch.randn(2, 256, 384, generator=torch.Generator().manual_seed(3)) * 0.05), "fp8")):
        c = convert_for_chip(w, "950dt", expert=True)
        out, inp = w.weight.shape[-2], dequant_any(w).shape[-1]
        assert c.fmt == "mxfp8" and c.weight.dtype == torch.float8_e4m3fn and c.weight.shape[-2:] == (out, inp)
        assert c.scale.dtype == torch.uint8 and c.scale.shape[-3:] == (out, -(-inp // 64), 2)
        assert torch.equal(dequant_any(c), dequant_any(w))
    assert convert_for_chip(fp4w(), "950dt").fmt == "fp8"  # dense weights: the FP8 G-B linear


def test_native_weight_conversion_is_cached():
    ops = ascend.create_ops(emulate=True, chip="910b")
    w = fp8w()
    assert ops.native_weight(w) is ops.native_weight(w)
    ops16 = ascend.create_ops(emulate=True, chip="950dt", weights="bf16")
    x = torch.randn(4, 256)
    torch.testing.assert_close(ops16.linear(x.bfloat16(), w).float(), x.bfloat16().float() @ dequant_any(w).t(),
                               rtol=2 ** -7, atol=1e-2)


# -- the same checks on a real NPU --------------------------------------------------------------------------------
_NPU_OK, _NPU_WHY = ascend.probe("npu")


@pytest.mark.npu
@pytest.mark.skipif(not _NPU_OK, reason=f"no Ascend NPU: {_NPU_WHY}")
class TestOnNpu:
    """AscendOps on hardware vs ReferenceOps on the CPU: the emulation's contracts, checked against the real ops."""

    def setup_method(self):
        self.ops = ascend.create_ops("npu:0")
        self.ref = ReferenceOps()

    def cmp(self, got, want, rtol=2 ** -7, atol=1e-2):
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=rtol, atol=atol)

    def test_norm_rope(self):
        x, w = torch.randn(4, 8, 256).bfloat16(), torch.randn(256)
        self.cmp(self.ops.rms_norm(x.npu(), w.npu(), 1e-6), self.ref.rms_norm(x, w, 1e-6))
        xr, ang = torch.randn(2, 5, 4, 64).bfloat16(), torch.rand(2, 5, 32)
        self.cmp(self.ops.rope(xr.npu(), ang.cos().npu(), ang.sin().npu()), self.ref.rope(xr, ang.cos(), ang.sin()))

    def test_linear(self):
        w = fp8w()
        x = torch.randn(9, 256).bfloat16()
        got = self.ops.linear(x.npu(), LinearWeight(w.weight.npu(), w.scale.npu(), "fp8")).cpu().float()
        want = self.ref.linear(x, w).float()
        assert ((got - want).square().mean().sqrt() / want.square().mean().sqrt()) < 4e-2

    def test_moe_experts(self):
        T, E, d = 9, 4, 128
        x = torch.randn(T, d).bfloat16()
        ids = torch.randint(0, E - 1, (T, 2))  # expert E-1 gets no token
        wts = torch.rand(T, 2)
        ws = [LinearWeight(torch.randn(E, d, d) * 0.1, None, "none") for _ in range(3)]
        dev = [LinearWeight(t.weight.bfloat16().npu(), None, "none") for t in ws]
        got = self.ops.moe_experts(x.npu(), wts.npu(), ids.npu(), *dev, 10.0)
        want = self.ref.moe_experts(x, wts, ids, *[LinearWeight(t.weight.bfloat16(), None, "none") for t in ws],
                                    10.0)
        self.cmp(got, want, atol=5e-2)

    def test_indexer_topk(self):
        q, k = torch.randn(1, 6, 8, 128).bfloat16(), torch.randn(1, 10, 128).bfloat16()
        w, vis = torch.randn(1, 6, 8), torch.tensor([[0, 2, 4, 6, 8, 10]])
        got = self.ops.indexer_topk(q.npu(), k.npu(), w.npu(), vis.npu(), 4).cpu()
        want = self.ref.indexer_topk(q, k, w.bfloat16().float(), vis, 4)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
