"""The 950's MX quantise/dequantise pair (npu_dynamic_mx_quant -> npu_anti_mx_quant, emulated under the torch_npu
2.14.0 schemas) as V4's FP4 and FP8 simulations: the emulated ops against the CANN doc examples and formulas, the
scale claim behind dst_type_max = 6 + 2^-21 over every bf16 and fp16 value, the documented constraints, and the
backend's fp4_sim / fp8_sim against ReferenceOps bit for bit (tolerance 0: the pair's arithmetic is exact)."""

from __future__ import annotations

import pytest
import torch

from dsv4.ascend import create_ops
from dsv4.ascend.backend_quant import FP4_SIM_DST_MAX
from dsv4.ascend.emulation import NpuOpError, make_torch_npu
from dsv4.common.model.reference import ReferenceOps

A5 = make_torch_npu("950dt")
REF = ReferenceOps()
E4M3, E2M1 = 292, 296  # torch_npu.float8_e4m3fn / float4_e2m1fn_x2 (npu_dynamic_mx_quant's doc)
TINY = 6.0 * 2.0 ** -126  # V4's FP4 amax floor: blocks at or below it have a subnormal S in the kernel


def fp4_pair(x: torch.Tensor, dst_type_max: float = FP4_SIM_DST_MAX) -> torch.Tensor:
    codes, mx = A5.npu_dynamic_mx_quant(x, dst_type=E2M1, block_size=32, scale_alg=2, dst_type_max=dst_type_max)
    return A5.npu_anti_mx_quant(codes, mx, dst_type=x.dtype, src_type=E2M1)


def same_values(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal values bit for bit, except that the e2m1 cast keeps the sign of a zero (-0 where the reference
    re-applies no sign): the bits may differ only where both are zero."""
    assert got.dtype == want.dtype and torch.equal(got, want)
    flipped = got.signbit() != want.signbit()
    assert torch.all(got[flipped] == 0)


def rich_bf16(rows: int, seed: int) -> torch.Tensor:
    """Every e2m1 grid value and midpoint (the ties) at scales 1, 2^-5, 2^7, random blocks over 70 decades (amax
    above V4's floor), an all-zero block and a block at the largest bf16 binade."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    ties = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([grid, ties, -grid[1:], -ties, torch.tensor([-0.1, 5.9, -3.99])])  # 32 values, amax 6
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(rows, 32, generator=g) * torch.logspace(-35, 35, rows)[:, None]
    big = torch.linspace(-1.0, 1.0, 32)[None] * 3.3e38
    return torch.cat([row[None], row[None] * 2.0 ** -5, row[None] * 2.0 ** 7, rand, torch.zeros(1, 32), big]
                     ).to(torch.bfloat16)


# -- npu_anti_mx_quant ----------------------------------------------------------------------------------------------
def test_anti_mx_quant_hand_case_of_the_aclnn_doc():
    # hicann/ops-nn aclnnAntiMxQuant.md example: e4m3 bytes (0, 72, 96, 120) = (0, 4, 32, 256), mxscale (128, 0)
    # (scale 2), dstType bf16 -> bf16 bits (0, 16640, 17024, 17408) = (0, 8, 64, 512)
    x = torch.tensor([[0, 72, 96, 120]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    y = A5.npu_anti_mx_quant(x, torch.tensor([[[128, 0]]], dtype=torch.uint8), dst_type=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.view(torch.int16).tolist() == [[0, 16640, 17024, 17408]]
    # the schema's defaults: dst_type 15 (torch.bfloat16's code), src_type 292 (e4m3)
    assert torch.equal(A5.npu_anti_mx_quant(x, torch.tensor([[[128, 0]]], dtype=torch.uint8)), y)


def test_fp4_codes_pack_two_per_byte_low_nibble_first():
    # amax 6 -> S = 6 / (6 + 2^-21) just below 1, rounded up to 1 (byte 127): the codes are x's own e2m1 codes
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    x[0, :4] = torch.tensor([0.5, 6.0, -1.0, 3.0])
    codes, mx = A5.npu_dynamic_mx_quant(x, dst_type=E2M1, block_size=32, scale_alg=2, dst_type_max=FP4_SIM_DST_MAX)
    assert codes.dtype == torch.uint8 and codes.shape == (1, 16) and mx.shape == (1, 1, 2)
    assert codes[0, :2].tolist() == [0x71, 0x5A] and mx.tolist() == [[[127, 0]]]  # 0.5 = 1, 6 = 7, -1 = 8 + 2, 3 = 5
    assert A5.npu_anti_mx_quant(codes, mx, dst_type=torch.float32, src_type=E2M1)[0, :4].tolist() == \
        [0.5, 6.0, -1.0, 3.0]


def test_scale_alg_2_first_case_is_not_v4s_scale():
    # dst_type_max 0.0 / 6.0: floor(log2 amax) - 2, plus 1 when the top mantissa bit is set (amax 6 = 1.5 * 4 ->
    # scale 2, where V4 takes 1); 7.0: plus 1 when the top two are set (6 stays at 1, 7 = 1.75 * 4 goes to 2)
    def byte(amax: float, dmax: float) -> int:
        x = torch.full((1, 32), amax, dtype=torch.bfloat16)
        return A5.npu_dynamic_mx_quant(x, dst_type=E2M1, scale_alg=2, dst_type_max=dmax)[1][0, 0, 0].item()

    assert [byte(6.0, d) for d in (0.0, 6.0, 7.0, FP4_SIM_DST_MAX)] == [128, 128, 127, 127]
    assert [byte(5.0, 6.0), byte(7.0, 7.0), byte(7.0, FP4_SIM_DST_MAX)] == [127, 128, 128]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dst_type_max_just_above_6_gives_v4s_scale_for_every_half_precision_value(dtype):
    # every positive finite bf16 / fp16 value as a block's amax: the kernel's byte (S = amax * fp32(1 / D), the
    # emulation) and the doc's (S = amax / D) both equal V4's 2^ceil(log2(max(amax, 6 * 2^-126) / 6)) above V4's floor
    v = torch.arange(1, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    v = v[torch.isfinite(v)]
    x = torch.zeros(v.numel(), 32, dtype=dtype)
    x[:, 5] = -v  # the sign and the position inside the block do not matter
    kernel = A5.npu_dynamic_mx_quant(x, dst_type=E2M1, scale_alg=2, dst_type_max=FP4_SIM_DST_MAX)[1][:, 0, 0].long()
    vf = v.float()
    v4 = torch.ceil(torch.log2(vf.clamp(min=TINY) / 6.0)).long() + 127
    s = vf / torch.tensor(FP4_SIM_DST_MAX)  # the doc's division, in fp32
    bits = s.view(torch.int32).long()
    e, m = bits >> 23, bits & 0x7FFFFF
    doc = torch.where((e > 0) & (e < 254) & (m > 0), e + 1, e)
    above = vf > TINY
    assert above.sum() > (0.99 * v.numel() if dtype == torch.float16 else 30000)
    assert torch.equal(kernel[above], v4[above]) and torch.equal(doc[above], v4[above])
    # at the floor itself the kernel's product rounds to 2^-126 exactly (V4's scale), the doc's quotient just below
    at = vf == TINY
    assert torch.all(kernel[at] == 1) and torch.all(doc[at] == 0) and at.sum() == (dtype == torch.bfloat16)
    # below it (bf16 only: fp16's smallest value is 2^-24) S is subnormal: byte 0, scale 2^-127 (V4: 2^-126)
    below = vf < TINY
    assert torch.all(kernel[below] == 0) and torch.all(v4[below] == 1)


def test_fp32_amax_one_ulp_above_6_is_why_fp32_keeps_torch():
    # (6 + 2^-21) * 2^k is an fp32 value: S is exactly 2^k (no round-up), V4 rounds amax / 6 > 2^k up to 2^(k+1)
    x = torch.zeros(1, 32)
    x[0, :2] = torch.tensor([FP4_SIM_DST_MAX * 2.0 ** 3, 12.0])
    codes, mx = A5.npu_dynamic_mx_quant(x, dst_type=E2M1, scale_alg=2, dst_type_max=FP4_SIM_DST_MAX)
    assert mx[0, 0, 0].item() == 127 + 3  # the pair's scale 2^3: 12 = 1.5 * 8 is on its grid
    assert A5.npu_anti_mx_quant(codes, mx, dst_type=torch.float32, src_type=E2M1)[0, 1].item() == 12.0
    assert REF.fp4_sim(x, 32)[0, 1].item() == 16.0  # V4's scale 2^4: 12 / 16 = 0.75, a tie, to the even code (1)
    ops = create_ops(emulate=True, chip="950dt")
    assert torch.equal(ops.fp4_sim(x, 32), REF.fp4_sim(x, 32)) and ops.last_path["fp4_sim"].startswith("torch")


# -- the FP4 simulation ----------------------------------------------------------------------------------------------
def test_fp4_pair_is_the_reference_fp4_simulation():
    x = rich_bf16(40, seed=1)
    same_values(fp4_pair(x.view(1, -1)), REF.fp4_sim(x.view(1, -1), 32))
    g = torch.Generator().manual_seed(3)
    y = (torch.randn(2, 3, 5, 256, generator=g) * 10.0 ** torch.randint(-20, 20, (2, 3, 5, 8, 1), generator=g)
         .repeat_interleave(32, -1).flatten(-2).float()).to(torch.bfloat16)
    same_values(fp4_pair(y), REF.fp4_sim(y, 32))
    assert torch.all(fp4_pair(torch.zeros(3, 64, dtype=torch.bfloat16)) == 0)  # all-zero blocks: zeros, no NaN


def test_blocks_at_or_below_v4s_floor_dequantise_differently():
    # S subnormal -> byte 0 (scale 2^-127) where V4 floors the scale at 2^-126: the documented difference
    x = torch.zeros(3, 32)
    x[0, :3] = torch.tensor([4.0, -1.0, 0.5]) * 2.0 ** -126  # amax 4 * 2^-126: V4 keeps 4 * 2^-126 ...
    x[1, :2] = torch.tensor([5.5 * 2.0 ** -126, 1.25 * 2.0 ** -126])  # amax just below the floor
    x = x.to(torch.bfloat16)  # row 2: all zero
    got, want = fp4_pair(x), REF.fp4_sim(x, 32)
    assert got[0, 0].item() == 3.0 * 2.0 ** -126 and want[0, 0].item() == 4.0 * 2.0 ** -126  # ... the pair saturates
    assert not torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2]) and torch.all(got[2] == 0)


def test_950_fp4_sim_takes_the_pair_for_bf16_only():
    ops = create_ops(emulate=True, chip="950dt")
    x = rich_bf16(15, seed=4).view(2, 1, -1)
    same_values(ops.fp4_sim(x, 32), REF.fp4_sim(x, 32))
    assert ops.last_path["fp4_sim"] == ("npu_dynamic_mx_quant (e2m1, scale_alg 2, dst_type_max 6 + 2^-21) + "
                                        "npu_anti_mx_quant")
    half = x.float().clamp(-6e4, 6e4).to(torch.float16)  # fp16: the kernel stages x through bf16, torch here
    assert torch.equal(ops.fp4_sim(half, 32), REF.fp4_sim(half, 32)) and ops.last_path["fp4_sim"].startswith("torch")
    a2 = create_ops(emulate=True, chip="910b")
    assert torch.equal(a2.fp4_sim(x, 32), REF.fp4_sim(x, 32)) and a2.last_path["fp4_sim"].startswith("torch")


# -- the FP8 simulation ----------------------------------------------------------------------------------------------
def spread(*shape, seed=0, dtype=torch.bfloat16):
    """Values over nine decades, an all-zero block and one below the 1e-4 amax floor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-7, 3, shape[-1])[torch.randperm(shape[-1], generator=g)]
    x.view(-1, shape[-1])[0, :64] = 0.0
    x.view(-1, shape[-1])[1, :64] *= 1e-7
    return x.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype.itemsize == 2 else t.view(torch.int32)


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("shape", [(2, 448), (3, 1, 2, 512), (2, 1, 1, 1, 1, 1, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_950_fp8_sim_through_the_pair_is_the_reference_bit_for_bit(block, shape, dtype):
    if shape[-1] % block:
        pytest.skip("whole blocks only")
    x = spread(*shape, seed=block, dtype=dtype)
    if dtype == torch.float16:
        x = x.float().clamp(-6e4, 6e4).to(dtype)
    ops = create_ops(emulate=True, chip="950dt")
    got = ops.fp8_sim(x, block)
    want = REF.fp8_sim(x, block)
    assert got.dtype == dtype and torch.equal(bits(got), bits(want))  # the sign of zero included
    seven_d_large = len(shape) == 7 and block > 64  # x would need an 8th dim for the blocked view
    assert ops.last_path["fp8_sim"].endswith("torch dequantise" if seven_d_large else "npu_anti_mx_quant")
    # the linear's fallback activation quantisation: the same codes, dequantised in fp32
    assert torch.equal(ops._mx_fp8(x, block), REF.fp8_sim(x.float(), block))


# -- documented constraints ------------------------------------------------------------------------------------------
def test_pair_documented_constraints():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    codes, mx = A5.npu_dynamic_mx_quant(x, dst_type=E2M1, scale_alg=2, dst_type_max=FP4_SIM_DST_MAX)
    with pytest.raises(NpuOpError, match="scale_alg 2 needs block_size 32"):
        A5.npu_dynamic_mx_quant(x, dst_type=E2M1, block_size=64, scale_alg=2)
    with pytest.raises(NpuOpError, match="scale_alg for FP8 outputs must be 0 or 1"):
        A5.npu_dynamic_mx_quant(x, dst_type=E4M3, scale_alg=2)
    with pytest.raises(NpuOpError, match=r"dst_type_max must be 0.0 or in \[6.0, 12.0\]"):
        A5.npu_dynamic_mx_quant(x, dst_type=E2M1, scale_alg=2, dst_type_max=5.0)
    with pytest.raises(NpuOpError, match="dst_type_max is for float4_e2m1fn_x2 with block_size 32 only"):
        A5.npu_dynamic_mx_quant(x, dst_type=E4M3, scale_alg=1, dst_type_max=7.0)
    with pytest.raises(NpuOpError, match="even last dim"):
        A5.npu_dynamic_mx_quant(torch.randn(2, 33, dtype=torch.bfloat16), dst_type=E2M1)
    with pytest.raises(NpuOpError, match="float4_e1m2fn_x2"):
        A5.npu_dynamic_mx_quant(x, dst_type=297)
    with pytest.raises(NpuOpError, match="mxscale must be"):
        A5.npu_anti_mx_quant(codes, mx[..., :1], src_type=E2M1)
    with pytest.raises(NpuOpError, match="src_type"):
        A5.npu_anti_mx_quant(codes, mx)  # uint8 x with the default src_type (e4m3)
    with pytest.raises(NpuOpError, match="dst_type only supports"):
        A5.npu_anti_mx_quant(codes, mx, dst_type=torch.int8, src_type=E2M1)
    with pytest.raises(NpuOpError, match="FP4 x must be contiguous"):
        A5.npu_anti_mx_quant(codes.t().contiguous().t(), mx, src_type=E2M1)
    with pytest.raises(RuntimeError, match="Unknown keyword"):  # the release schema binds the call
        A5.npu_anti_mx_quant(codes, mx, dtype=torch.bfloat16)
    assert not hasattr(make_torch_npu("910c"), "npu_anti_mx_quant")  # aclnnAntiMxQuant.md: 950PR/950DT only
