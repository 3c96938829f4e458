"""The 950's fused FP8 quantisation (npu_dynamic_mx_quant, emulated under its torch_npu 2.14.0 schema) and the rope
tables prepared once per decode step, against the reference ops. Both must be the reference's arithmetic exactly:
the MX op with scale_alg 1 and max_low_bound 1e-4 computes V4's ue8m0 scale 2^ceil(log2(max(amax, 1e-4) / 448)),
and the prepared rope multiplies and adds the same fp32 numbers as ReferenceOps.rope."""

from __future__ import annotations

import pytest
import torch

from dsv4.ascend import compose, create_ops
from dsv4.ascend.emulation import NpuOpError, make_torch_npu
from dsv4.common.model.reference import ReferenceOps

A5 = make_torch_npu("950dt")
REF = ReferenceOps()
E4M3 = 292  # torch_npu.float8_e4m3fn in npu_dynamic_mx_quant's doc


def spread(*shape, seed=0, dtype=torch.bfloat16):
    """Values over nine decades (blocks of every scale), with an all-zero block and one below the 1e-4 amax floor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-7, 3, shape[-1])[torch.randperm(shape[-1], generator=g)]
    x[..., 0, :64] = 0.0
    x[..., 1, :64] *= 1e-7
    return x.to(dtype)


def dequant(y, mx, block):
    nb = y.shape[-1] // block
    s = mx.view(torch.float8_e8m0fnu).float().flatten(-2)[..., :nb]
    return (y.float().unflatten(-1, (nb, block)) * s[..., None]).flatten(-2)


def test_mx_quant_hand_case_of_the_aclnn_doc():
    # hicann/ops-nn aclnnDynamicMxQuantV3.md example: bf16 (0, 8, 64, 512), block 32, scale_alg 1, maxLowBound 0.5
    # -> e4m3 bytes (0, 72, 96, 120) = (0, 4, 32, 256) and mxscale bytes (128, 0): scale 2, the even padding 0
    x = torch.tensor([[0.0, 8.0, 64.0, 512.0]], dtype=torch.bfloat16)
    y, mx = A5.npu_dynamic_mx_quant(x, dst_type=E4M3, block_size=32, scale_alg=1, max_low_bound=0.5)
    assert y.dtype == torch.float8_e4m3fn and y.view(torch.uint8).tolist() == [[0, 72, 96, 120]]
    assert mx.dtype == torch.uint8 and mx.tolist() == [[[128, 0]]]


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_quant_is_the_reference_fp8_simulation(block, dtype):
    x = spread(3, 4, 512, dtype=dtype)
    if dtype == torch.float16:
        x = x.float().clamp(-6e4, 6e4).to(dtype)
    y, mx = A5.npu_dynamic_mx_quant(x, dst_type=E4M3, block_size=block, scale_alg=1, max_low_bound=1e-4)
    assert mx.shape == (3, 4, 512 // block // 2, 2)
    assert torch.equal(dequant(y, mx, block), REF.fp8_sim(x.float(), block))  # bit for bit


def test_mx_quant_odd_block_count_and_ocp_scale():
    x = spread(2, 3, 192, seed=3)  # three 64-blocks: the scale axis is padded to 4 with a 0 byte
    y, mx = A5.npu_dynamic_mx_quant(x, dst_type=E4M3, block_size=64, scale_alg=1, max_low_bound=1e-4)
    assert mx.shape == (2, 3, 2, 2) and torch.all(mx[..., -1, -1] == 0)
    assert torch.equal(dequant(y, mx, 64), REF.fp8_sim(x.float(), 64))
    # scale_alg 0 (OCP): 2^(floor(log2 amax) - 8); by hand for amax 3 -> 2^(1 - 8)
    y0, mx0 = A5.npu_dynamic_mx_quant(torch.full((1, 32), 3.0, dtype=torch.bfloat16), dst_type=E4M3)
    assert mx0[0, 0, 0].item() == 127 - 7 and torch.all(y0.float() == 3.0 * 2 ** 7)


def test_mx_quant_documented_constraints():
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with pytest.raises(NpuOpError, match="fp32 input needs block_size 32"):
        A5.npu_dynamic_mx_quant(x.float(), dst_type=E4M3, block_size=128, scale_alg=1)
    with pytest.raises(NpuOpError, match="multiple of 32"):
        A5.npu_dynamic_mx_quant(x, dst_type=E4M3, block_size=48, scale_alg=1)
    with pytest.raises(NpuOpError, match="max_low_bound"):
        A5.npu_dynamic_mx_quant(x, dst_type=E4M3, block_size=32, scale_alg=0, max_low_bound=1e-4)
    with pytest.raises(RuntimeError, match="Unknown keyword"):  # the release schema binds the call
        A5.npu_dynamic_mx_quant(x, dst_type=E4M3, blocksize=32)
    assert not hasattr(make_torch_npu("910c"), "npu_dynamic_mx_quant")  # doc: Ascend 950PR/950DT only


def test_950_fp8_sim_and_linear_take_the_fused_op_with_the_reference_numbers():
    ops = create_ops(emulate=True, chip="950dt")
    x = spread(2, 5, 128)
    assert torch.equal(ops.fp8_sim(x, 64), REF.fp8_sim(x, 64))
    assert ops.last_path["fp8_sim"].startswith("npu_dynamic_mx_quant")
    torch.testing.assert_close(ops.fp8_sim(x, 64, "clamp"), REF.fp8_sim(x, 64, "clamp"), rtol=0, atol=0)
    assert ops.last_path["fp8_sim"].startswith("torch")  # clamp mode skips the e4m3 rounding: no fused form
    assert torch.equal(ops.fp8_sim(x.float(), 64), REF.fp8_sim(x.float(), 64))
    assert ops.last_path["fp8_sim"].startswith("torch")  # fp32 input: the op takes 32-blocks only


@pytest.mark.parametrize("chip", ["950dt", "910b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
def test_prepared_rope_tables_give_the_reference_rope(chip, dtype, inverse):
    ops = create_ops(emulate=True, chip=chip)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 4, 64, generator=g).to(dtype)
    angles = torch.rand(3, 1, 32, generator=g) * 100
    cos, sin = torch.cos(angles), torch.sin(angles)
    want = REF.rope(x, cos, sin, inverse)
    prepared = ops.prepare_rope(cos, sin)
    assert prepared[0].shape == (3, 1, 1, 64)
    assert torch.equal(ops.rope(x, *prepared, inverse), want)  # the same fp32 products and sums
    assert torch.equal(ops.rope(x, cos, sin, inverse), want)  # raw tables (the eager forward) still work
    assert ops.last_path["rope"].startswith("npu_rotary_mul" if chip == "910b" else "torch (prepared")
    assert REF.prepare_rope(cos, sin) == (cos, sin)  # the reference's hook is the identity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_950_fp4_sim_composition_is_the_reference(dtype):
    # every e2m1 grid value and every midpoint (the ties), in blocks whose amax is 6 (scale 1) and 6 * 2^k (scale
    # 2^k), plus random blocks over 45 decades and an all-zero block
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    ties = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([grid, ties, -grid[1:], -ties, torch.tensor([-0.1, 5.9, -3.99])])  # 32 values, amax 6
    g = torch.Generator().manual_seed(2)
    rand = torch.randn(8, 32, generator=g) * torch.logspace(-40, 5, 8)[:, None]
    x = torch.cat([row[None], row[None] * 2.0 ** -5, row[None] * 2.0 ** 7, rand, torch.zeros(1, 32)]).to(dtype)
    got = compose.fp4_sim(x.view(1, -1), 32)  # the torch path (fp32 / fp16 on 950, every other chip)
    want = REF.fp4_sim(x.view(1, -1), 32)
    assert torch.equal(got, want)
    assert torch.equal(got.signbit(), want.signbit())  # a negative value rounding to zero gives +0, as the reference
    ops = create_ops(emulate=True, chip="950dt")
    assert torch.equal(ops.fp4_sim(x.view(1, -1), 32), want)
    # bf16 takes the MX pair on 950 (tests/test_ascend_mx_pair.py), fp32 the composition
    assert ops.last_path["fp4_sim"].startswith("torch" if dtype == torch.float32 else "npu_dynamic_mx_quant")


def test_gathered_fp4_weight_is_dequant_weight():
    """The static step's gathered FP4 experts (one lookup per packed byte) are quant.dequant_weight's values."""
    from dsv4.common.model.ops import LinearWeight
    from dsv4.common.model.quant import dequant_weight, quantize_fp4
    from dsv4.common.model.static import gathered_weight

    g = torch.Generator().manual_seed(4)
    q, s = quantize_fp4(torch.randn(6, 64, 128, generator=g) * torch.logspace(-30, 3, 128))
    e = torch.tensor([5, 0, 0, 3])
    assert torch.equal(gathered_weight(LinearWeight(q, s, "fp4"), e), dequant_weight(q[e], s[e], "fp4"))


class CallCount:
    """Wraps an ops object's npu namespace and counts the calls of each torch_npu op."""

    def __init__(self, npu):
        self.npu, self.calls = npu, {}

    def __getattr__(self, name):
        fn = getattr(self.npu, name)

        def call(*a, **k):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **k)

        return call


@pytest.mark.parametrize("chip, quant_op", [("950dt", "npu_dynamic_mx_quant"), ("910c", "npu_dynamic_quant")])
@pytest.mark.parametrize("lead", [(5,), (1, 3)])
def test_linears_quantise_a_shared_input_once_with_each_linears_numbers(chip, quant_op, lead):
    """wq_a/wkv and the shared expert's w1/w3 share their input: `linears` quantises it once (950: the MX op of the
    FP8 G-B GEMM; 910C: the W8A8 per-token op) and must give each linear's output bit for bit."""
    from dsv4.common.model.ops import LinearWeight
    from dsv4.common.model.quant import quantize_fp8

    ops = create_ops(emulate=True, chip=chip)
    g = torch.Generator().manual_seed(7)
    ws = tuple(LinearWeight(*quantize_fp8(torch.randn(n, 256, generator=g) * 0.05), "fp8") for n in (384, 128))
    x = spread(*lead, 256, seed=8)
    want = [ops.linear(x, w) for w in ws]
    ops.npu = counted = CallCount(ops.npu)
    got = ops.linears(x, ws)
    assert counted.calls == {quant_op: 1, "npu_quant_matmul": 2}
    assert "one activation quantisation for 2 weights" in ops.last_path["linear"]
    for y, r in zip(got, want, strict=True):
        assert y.shape == (*lead, r.shape[-1]) and torch.equal(y, r)
    # a weight the fused GEMM does not take (dense here): one linear per weight, the same numbers
    mixed = (ws[0], LinearWeight(torch.randn(64, 256, generator=g), None, "none"))
    got = ops.linears(x, mixed)
    assert all(torch.equal(y, ops.linear(x, w)) for y, w in zip(got, mixed, strict=True))
    assert torch.equal(REF.linears(x.float(), ws)[1], REF.linear(x.float(), ws[1]))  # the reference's default
