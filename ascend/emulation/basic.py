"""CPU emulation of the basic torch_npu ops: RMSNorm, rotary, SwiGLU, dynamic quant, quantised matmul.

Every function takes the chip it emulates as its first argument (bound by emulation.make_torch_npu); the rest is the
op's torch_npu 2.14.0 schema, argument for argument (ascend/schemas/torch_npu-2.14.0.yaml: the emulation registers
these functions under that schema, so the dispatcher binds every call exactly as torch_npu would). Checks cite the
op's doc in the same file ("doc:"); what the doc does not state is marked ASSUMED. npu_quant_matmul's FP8 form on
950 cites the wheel's meta function and TorchAir converter instead ("meta"): its docstring predates that form.
Written from the op contracts, independent of dsv4.common.model.reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_ACT = (torch.float16, torch.bfloat16, torch.float32)
HALF_ACT = (torch.float16, torch.bfloat16)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
INT63 = 2 ** 63 - 1


class NpuOpError(RuntimeError):
    """What the real op raises (an aclnn parameter check failure) when a documented constraint is violated."""


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise NpuOpError(f"{op}: {msg}")


def is_a5(chip: str) -> bool:
    return chip.startswith("950")


# ScalarType-typed arguments (`int? output_dtype`, `int? dst_type`) reach a kernel as c10::ScalarType codes; the
# table is filled by emulation.register() by sending each dtype through a registered identity op
DTYPE_OF_CODE: dict[int, torch.dtype] = {}


def as_dtype(v: int | torch.dtype | None) -> torch.dtype | None:
    if v is None or isinstance(v, torch.dtype):
        return v
    return DTYPE_OF_CODE.get(int(v))


# -- section 1 ------------------------------------------------------------------------------------------------------
def npu_rms_norm(chip: str, self: Tensor, gamma: Tensor, epsilon: float = 1e-06) -> tuple[Tensor, Tensor]:
    """y = x * rstd * gamma in fp32, rounded once to self's dtype; rstd = 1/sqrt(mean(x^2) + eps) over gamma's dims.
    doc: self fp16/bf16/fp32, 2-8 D; "gamma：Tensor类型，数据类型需要和self保持一致". The same wheel's meta function
    gives y self's dtype whatever gamma's and checks no gamma dtype, and the op it lowers to (TorchAir: ge.RmsNorm)
    takes fp16/bf16 x with an fp32 gamma on 950, A3 and A2 (hicann/ops-nn norm/rms_norm/docs/aclnnRmsNorm.md, its
    dtype table; golden.py there: x and gamma in fp32, one cast of x * rstd * gamma): that mixed form is accepted
    too (capability.UNVERIFIED). rstd: fp32, self's leading dims and 1s over gamma's (meta function)."""
    op = "npu_rms_norm"
    check(2 <= self.dim() <= 8, op, f"input must be 2-8 D, got {self.dim()}")
    check(self.dtype in FLOAT_ACT, op, f"unsupported dtype {self.dtype}")
    mixed = self.dtype in HALF_ACT and gamma.dtype == torch.float32
    check(gamma.dtype == self.dtype or mixed, op,
          f"gamma dtype {gamma.dtype} must equal the input's {self.dtype} (doc) or be float32 with a fp16/bf16 input")
    nd = gamma.dim()
    check(tuple(self.shape[-nd:]) == tuple(gamma.shape), op, "gamma must match the trailing dims of the input")
    dims = tuple(range(self.dim() - nd, self.dim()))
    xf = self.float()
    rstd = torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


# -- section 2 ------------------------------------------------------------------------------------------------------
# doc, jit_compile=False, interleave mode: "input为BNSD: 11SD; input为BSND: 1S1D; input为SBND: S11D."
_INTERLEAVE_LAYOUTS = {"BNSD": 2, "BSND": 1, "SBND": 0}  # layout -> the one non-1 dim of r1/r2 (the S axis)


def _interleave_layout(x: Tensor, r: Tensor) -> str | None:
    for layout, s_axis in _INTERLEAVE_LAYOUTS.items():
        want = [1, 1, 1, x.shape[-1]]
        want[s_axis] = x.shape[s_axis]
        if list(r.shape) == want:
            return layout
    return None


def npu_rotary_mul(chip: str, self: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str = "half",
                   rotate: Tensor | None = None) -> Tensor:
    """out = x*r1 + rot(x)*r2 (doc formulas): 'half' rot(x) = cat(-x2, x1) of the halves; 'interleave' pairs
    (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]). r1/r2 are full width D. doc: input, cos, sin 4-D fp16/bf16/fp32;
    interleave: "B * N < 1000; D < 896, 且D为2的倍数", r1/r2 1S1D for BSND (11SD BNSD, S11D SBND), A2/A3 only.
    ASSUMED: input/r1/r2 share one dtype (the doc lists the same three dtypes for each)."""
    op = "npu_rotary_mul"
    check(self.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, op, "input, r1, r2 must be 4-D (doc)")
    check(self.dtype in FLOAT_ACT and r1.dtype == self.dtype and r2.dtype == self.dtype, op,
          f"input/r1/r2 must share one of fp16/bf16/fp32, got {self.dtype}/{r1.dtype}/{r2.dtype}")
    check(rotate is None, op, "custom rotate matrices are not emulated")
    d = self.shape[-1]
    check(d % 2 == 0 and d < 896, op, f"D must be even and < 896, got {d}")
    check(tuple(r1.shape) == tuple(r2.shape), op, "r1 and r2 must have one shape")
    xf = self.float()
    if rotary_mode == "interleave":
        check(chip in ("910b", "910c"), op, f"interleave mode is documented for A2/A3 only, chip is {chip}")
        layout = _interleave_layout(self, r1)
        check(layout is not None, op, f"interleave mode wants r1/r2 as 1S1D (BSND), 11SD (BNSD) or S11D (SBND); "
              f"got {tuple(r1.shape)} for input {tuple(self.shape)}")
        b, n = (self.shape[1], self.shape[2]) if layout == "SBND" else (self.shape[0], self.shape[2] if
                                                                        layout == "BSND" else self.shape[1])
        check(b * n < 1000, op, f"interleave mode needs B * N < 1000, got {b} * {n}")
        pairs = xf.unflatten(-1, (d // 2, 2))
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    elif rotary_mode == "half":
        torch.broadcast_shapes(self.shape, r1.shape)
        rot = torch.cat([-xf[..., d // 2:], xf[..., :d // 2]], dim=-1)
    else:
        raise NpuOpError(f"{op}: rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    return (xf * r1.float() + rot * r2.float()).to(self.dtype)


# -- section 7 ------------------------------------------------------------------------------------------------------
def npu_swiglu(chip: str, self: Tensor, dim: int = -1) -> Tensor:
    """Split `dim` into halves (A, B): A * sigmoid(A) * B (doc formula), fp32 inside, returned in the input dtype.
    doc: 1-8 D, FP32/FP16/BF16; products: A2."""
    op = "npu_swiglu"
    check(1 <= self.dim() <= 8 and self.dtype in FLOAT_ACT, op, "input must be 1-8 D fp32/fp16/bf16")
    check(self.shape[dim] % 2 == 0, op, "the split dim must be even")
    a, b = self.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(self.dtype)


# -- section 8 ------------------------------------------------------------------------------------------------------
def npu_dynamic_quant(chip: str, input: Tensor, *, smooth_scales: Tensor | None = None,
                      group_index: Tensor | None = None, dst_type: int | None = None, quant_mode: str = "pertoken",
                      dst_type_max: float = 0.0) -> tuple[Tensor, Tensor]:
    """doc: scale = rowMax(abs(x)) / DTYPE_MAX, y = round(x / scale); x fp16/bf16 with more than 1 dim; scale fp32 of
    x's shape without the last dim. dst_type None = int8. A zero row gives scale 0 and y 0 (ASSUMED)."""
    op = "npu_dynamic_quant"
    check(input.dtype in HALF_ACT and input.dim() > 1, op, f"x must be fp16/bf16 with > 1 dims, got {input.dtype}")
    check(as_dtype(dst_type) in (None, torch.int8), op, "only the int8 output is emulated (quint4x2 packing is not)")
    check(quant_mode == "pertoken" and dst_type_max == 0.0, op, "only the documented per-token mode is emulated")
    check(group_index is None, op, "group_index (per-expert smooth scales) is not emulated")
    xf = input.float()
    if smooth_scales is not None:
        check(smooth_scales.dtype == input.dtype and tuple(smooth_scales.shape) == (input.shape[-1],), op,
              "smooth_scales: 1-D of x's last dim, x's dtype (doc)")
        xf = xf * smooth_scales.float()
    scale = xf.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(xf / safe.unsqueeze(-1)).clamp(-127, 127)
    return y.to(torch.int8), scale


def scaled_product(op: str, x1: Tensor, x2: Tensor, scale: Tensor, pertoken_scale: Tensor | None) -> Tensor:
    """Shared math of npu_quant_matmul and the per-token npu_grouped_matmul: int8 operands, exact products
    accumulated in fp64 (stands in for the int32 accumulator), then per-channel scale (n,) and per-token
    pertoken_scale (m,). Returns fp32 [m, n]."""
    check(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], op,
          f"x1 [m,k] and x2 [k,n] expected, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    check(x1.dtype == torch.int8 and x2.dtype == torch.int8, op, f"int8 x int8 expected, got {x1.dtype} x {x2.dtype}")
    m, n = x1.shape[0], x2.shape[1]
    check(scale.dim() == 1 and scale.shape[0] in (1, n), op, f"per-channel scale must be (1,) or (n,), got "
          f"{tuple(scale.shape)}")
    out = (x1.double() @ x2.double()) * scale.double()
    if pertoken_scale is not None:
        check(pertoken_scale.dtype == torch.float32 and tuple(pertoken_scale.shape) == (m,), op,
              "pertoken_scale must be fp32 (m,) (doc)")
        out = out * pertoken_scale.double().unsqueeze(-1)
    return out.float()


def npu_quant_matmul(chip: str, x1: Tensor, x2: Tensor, scale: Tensor, *, offset: Tensor | None = None,
                     pertoken_scale: Tensor | None = None, bias: Tensor | None = None,
                     output_dtype: int | None = None, x1_dtype: int | None = None, x2_dtype: int | None = None,
                     pertoken_scale_dtype: int | None = None, scale_dtype: int | None = None,
                     group_sizes: list[int] | None = None, y_scale: Tensor | None = None) -> Tensor:
    """A2/A3 (the doc's int8 table): (x1 @ x2) * scale[n] * pertoken_scale[m] (+ bias) -> output_dtype; int8 x1/x2,
    scale fp32/bf16 1-D (t,) t=1 or n, pertoken_scale fp32 (m,) with bf16/fp16 output; output_dtype None = int8
    (requantised, no pertoken_scale). FP8 operands are refused there, as the TorchAir converter refuses them
    (ge_converter/custom/quantmatmul.py, conveter_npu_npu_quant_matmul: "In soc versions prior to A5, x1 and x2
    only supports int8 or int32"). 950 (A5): the FP8 block-scaled "G-B" form (quant_matmul_fp8_blocks), which
    the wheel's meta function and converter accept although the docstring has no FP8 row."""
    op = "npu_quant_matmul"
    check(offset is None and y_scale is None, op, "offset / y_scale are not emulated")
    if is_a5(chip):
        return quant_matmul_fp8_blocks(x1, x2, scale, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                                       pertoken_scale_dtype, scale_dtype, group_sizes)
    check(x1.dtype in (torch.int8, torch.int32) or x2.dtype in (torch.int8, torch.int32), op,
          "In soc versions prior to A5, x1 and x2 only supports int8 or int32 (TorchAir converter), got "
          f"{x1.dtype} x {x2.dtype}")
    check(group_sizes is None, op, "group_sizes (block-wise scales) is in the schema but not in the 2.14.0 doc")
    check(all(v is None for v in (x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype)), op,
          "the *_dtype overrides are not in the 2.14.0 doc")
    check(x1.dtype == torch.int8 and x2.dtype == torch.int8, op,
          f"the doc's tables have int8 x int8 (and packed int4); got {x1.dtype} x {x2.dtype}")
    check(scale.dtype in (torch.float32, torch.bfloat16) and scale.dim() == 1, op, "scale must be fp32/bf16 1-D")
    check(x1.shape[-1] <= 65535 and x2.shape[-1] <= 65535, op,
          "x1's and x2's last dims must not exceed 65535 (doc: \"x1与x2最后一维的shape大小不能超过65535\")")
    out_dt = as_dtype(output_dtype)
    out = scaled_product(op, x1, x2, scale, pertoken_scale)
    if bias is not None:
        out = out + bias.float()
    if out_dt in (None, torch.int8):
        check(pertoken_scale is None, op, "int8 output cannot take a pertoken_scale (doc table)")
        return torch.round(out).clamp(-128, 127).to(torch.int8)
    check(out_dt in HALF_ACT, op, f"output_dtype must be fp16/bf16 (or int8), got {out_dt}")
    return out.to(out_dt)


# The FP8 "G-B" form of npu_quant_matmul on 950, from the 2.14.0 wheel's CODE (its docstring predates it):
# op_plugin/meta/_meta_registrations.py npu_quant_matmul_meta (line 4481) and the checks it calls,
# quant_matmul_group_sizes_check (4388), quant_matmul_shape_check (4085), quant_matmul_extra_dtype_check (4258);
# on A5 the TorchAir converter passes x1/x2/pertoken_scale/scale straight to QuantBatchMatmulV4 as x1, x2,
# x1_scale, x2_scale with group_size = (gm << 32) + (gn << 16) + gk (ge_converter/custom/quantmatmul.py, lines
# 173-187 and 251-267). Here: x1 [M, K] and x2 [K, N] FP8, pertoken_scale fp32 [M, ceil(K/128)] (one scale per
# token per 128 of K), scale fp32 [ceil(K/128), ceil(N/128)] (one per 128x128 block of x2), group_sizes
# [1, 128, 128]. Not emulated (rejected with a message): the B-B form (group_sizes[0] = 128), mx [1, 1, 32] with e8m0
# scales, hifloat8 / FP4 operands (x1_dtype / x2_dtype), A8W4, per-tensor / per-channel FP8 (no group_sizes).
FP8_GB_GROUPS = [1, 128, 128]


def quant_matmul_fp8_blocks(x1: Tensor, x2: Tensor, scale: Tensor, pertoken_scale: Tensor | None,
                            bias: Tensor | None, output_dtype: int | None, x1_dtype: int | None,
                            x2_dtype: int | None, pertoken_scale_dtype: int | None, scale_dtype: int | None,
                            group_sizes: list[int] | None) -> Tensor:
    """y[m, n] = sum over K-blocks kb of (x1[m, kb] . x2[kb, n]) * pertoken_scale[m, kb] * scale[kb, n // 128],
    in fp32, rounded once to output_dtype. The NPU accumulates in its own order (cube units, fp32), so a device
    result differs from this by fp32 summation noise: the bound a test can hold it to is the output's bf16 rounding.
    Checks in the meta's order, with its messages; what the meta leaves to the kernel is marked ASSUMED."""
    op = "npu_quant_matmul"
    check(x1.dtype in FP8 and x2.dtype in FP8, op, f"950: only FP8 x FP8 (the G-B form) is emulated, got {x1.dtype} "
          f"x {x2.dtype} (int8 x int8 is the A2/A3 doc table; A8W4 / hifloat8 / FP4 are not emulated)")
    check(all(v is None for v in (x1_dtype, x2_dtype, scale_dtype, pertoken_scale_dtype)), op,
          "x1_dtype / x2_dtype (hifloat8, FP4) and e8m0 scale dtypes (the mx form) are not emulated")
    check(2 <= x1.dim() <= 6, op, "x1 dim num should be 2 ~ 6 (meta: quant_matmul_shape_check)")
    check(2 <= x2.dim() <= 6, op, "x2 dim num should be 2 ~ 6 (meta: quant_matmul_shape_check)")
    check(x1.dim() == 2 and x2.dim() == 2, op, "batched FP8 operands are not emulated: x1 [M, K], x2 [K, N]")
    (M, K), N = x1.shape, x2.shape[1]
    # the meta takes x2 as [K, N] by shape alone (transpose_x2 = x1.size(-1) == x2.size(-2)): a transposed view
    # of the checkpoint's [N, K] weight is that shape
    check(K == x2.shape[0], op, "k dim of x1 and x2 need be same (meta: quant_matmul_shape_check), got "
          f"x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)}")
    check(group_sizes is not None, op, "FP8 without group_sizes (per-tensor / per-channel scales) is not emulated: "
          f"pass group_sizes={FP8_GB_GROUPS}")
    check(len(group_sizes) == 3, op, "group_sizes's length must be 3 (meta: quant_matmul_group_sizes_check)")
    check(pertoken_scale is not None, op, "when the pertoken_scale is None, group_sizes's value must be 0 (meta: "
          "quant_matmul_group_sizes_check); the G-B form needs pertoken_scale")
    gm, gn, gk = group_sizes
    check(scale.dtype == torch.float32 or pertoken_scale.dtype == torch.float32, op,
          "When group_sizes's value is not 0, scale_dtype and pertoken_scale_dtype are None, dtype of scale and "
          "pertoken_scale must be both float32 (meta: quant_matmul_group_sizes_check)")
    check(gk in (32, 128), op, f"When group_sizes[2] > 1, group_sizes[2] must be equal to 32 or 128, got {gk}")
    check(gn <= 1 or (scale.dim() >= 2 and scale.shape[-1] == -(-N // gn)), op,
          f"ceil(x2.size(-1) / group_sizes[1]) must be equal to scale's size(-1) (meta), got scale "
          f"{tuple(scale.shape)} for N = {N}")
    check(gn <= 1 or gn == gk == 128, op, "When group_sizes[1] > 1, group_sizes[1] must be equal to group_sizes[2] "
          "and must be equal to 128 (meta)")
    check(pertoken_scale.dim() < 2 or scale.dim() < 2 or pertoken_scale.shape[-1] == scale.shape[-2], op,
          "In mx, B-B, G-B quantification, k dimension of scale and pertoken_scale must be equal (meta), got "
          f"pertoken_scale {tuple(pertoken_scale.shape)}, scale {tuple(scale.shape)}")
    check(list(group_sizes) == FP8_GB_GROUPS, op, f"only the G-B form group_sizes={FP8_GB_GROUPS} is emulated, got "
          f"{list(group_sizes)} (B-B [128,128,128] and mx [1,1,32] are not)")
    kb, nb = -(-K // 128), -(-N // 128)
    # ASSUMED (the kernel's, not the meta's checks): both scales fp32, exactly [M, ceil(K/128)] and
    # [ceil(K/128), ceil(N/128)] (the meta checks only the N blocks and that the two K-block counts agree)
    check(scale.dtype == torch.float32 and pertoken_scale.dtype == torch.float32, op,
          f"G-B scales must be float32, got scale {scale.dtype}, pertoken_scale {pertoken_scale.dtype}")
    check(tuple(pertoken_scale.shape) == (M, kb) and tuple(scale.shape) == (kb, nb), op,
          f"G-B wants pertoken_scale [M, ceil(K/128)] = {(M, kb)} and scale [ceil(K/128), ceil(N/128)] = {(kb, nb)}, "
          f"got {tuple(pertoken_scale.shape)} and {tuple(scale.shape)}")
    check(bias is None, op, "bias with the FP8 G-B form is not emulated")
    out_dt = as_dtype(output_dtype)
    check(out_dt in (torch.bfloat16, torch.float16), op, f"output_dtype: bf16/fp16 emulated for the G-B form, got "
          f"{out_dt}")  # ASSUMED: the meta allocates any dtype of its map (int8 when None); FP8 GEMMs return half
    col_scale = scale.float().repeat_interleave(128, dim=1)[:, :N]  # [kb, N]: each weight block's scale per column
    out = torch.zeros(M, N, dtype=torch.float32, device=x1.device)
    for b in range(kb):  # one fp32 partial product per 128 of K, scaled by its token and block scales
        k0, k1 = b * 128, min(K, b * 128 + 128)
        part = x1[:, k0:k1].float() @ x2[k0:k1].float()  # [M, N]
        out += part * pertoken_scale[:, b:b + 1] * col_scale[b]
    return out.to(out_dt)


# -- MX quantisation (950) ------------------------------------------------------------------------------------------
# dst_type codes: torch_npu's own enum (doc: float8_e5m2 291, float8_e4m3fn 292, float4_e2m1fn_x2 296, float4_e1m2fn_x2
# 297) or torch's ScalarType code of a torch.dtype passed in (the wheel's meta map also takes 23 / 24)
MX_FP8_TYPES = {291: torch.float8_e5m2, 292: torch.float8_e4m3fn}
MX_E2M1, MX_E1M2 = 296, 297
MX_FP4_TYPES = (MX_E2M1, MX_E1M2)
MX_EMAX = {torch.float8_e4m3fn: 8, torch.float8_e5m2: 15, MX_E2M1: 2}  # aclnnDynamicMxQuantV3 doc: emax table
E2M1_MAX = 6.0
# the e2m1 magnitudes of codes 0..7 (sign in bit 3): OCP MX spec's FP4 E2M1, the values aclnnAntiMxQuant decodes
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# midpoints between neighbouring magnitudes; a tie goes to the even code: down at 0.25, 1.25, 2.5, 5, up at 0.75, 1.75,
# 3.5 (round_mode "rint" = round half to even)
_E2M1_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_E2M1_TIE_UP = (0.75, 1.75, 3.5)
# scale_alg 2 with dst_type_max 0.0 / 6.0 / 7.0 (scenario 3, first case) rounds the shared exponent up when the top
# one (0.0, 6.0) or two (7.0) mantissa bits of the block's amax are set: the kernel adds 0x40 / 0x20 to the bf16 amax
# bits (hicann/ops-nn quant/dynamic_mx_quant/op_kernel/arch35/dynamic_mx_quant_tail_axis.h, Init: addValueBit_ =
# BF16_ADD_VALUE_MAN1 / MAN2; ComputeScaleDynamicDtypeRange)
_FIRST_CASE_ROUND_UP = {0.0: 1.5, 6.0: 1.5, 7.0: 1.75}


def _mx_fp8_type(dst_type: int) -> torch.dtype | None:
    return MX_FP8_TYPES.get(int(dst_type)) or {torch.float8_e4m3fn: torch.float8_e4m3fn,
                                               torch.float8_e5m2: torch.float8_e5m2}.get(as_dtype(dst_type))


def e2m1_codes(v: Tensor) -> Tensor:
    """fp32 values (already multiplied by the block's reciprocal scale) -> e2m1 codes 0..15 (int64): round to
    nearest, ties to the even code, saturating at +-6; the sign bit is kept, so a negative value that rounds to zero
    gives -0 (code 8). ASSUMED: the kernel's cast keeps the sign of zero and saturates (an OCP MX conversion does)."""
    a = v.abs().unsqueeze(-1)
    down = torch.tensor(_E2M1_TIE_DOWN, device=v.device)
    up = torch.tensor(_E2M1_TIE_UP, device=v.device)
    mag = (a > down).sum(-1) + (a >= up).sum(-1)  # how many midpoints lie below (a tie counted to the even side)
    return mag + 8 * torch.signbit(v).long()


def e2m1_values(codes: Tensor) -> Tensor:
    """e2m1 codes 0..15 -> fp32 values (-0.0 for code 8)."""
    mags = torch.tensor(E2M1_MAGNITUDES, device=codes.device)[codes & 7]
    return torch.where(codes >= 8, -mags, mags)


# Packing of two e2m1 codes per byte: element 2i in the low nibble, 2i+1 in the high one. ASSUMED from torch's own
# float4_e2m1fn_x2 (c10/util/Float4_e2m1fn_x2.h: "val1 : val0" = bits 7654 : 3210), which the 2.14.0 wheel treats as
# the same storage as torch_npu.float4_e2m1fn_x2 (_meta_registrations.py: "PyTorch 2.8+ natively supports
# float4_e2m1fn_x2"); the TorchAir converter of npu_anti_mx_quant bitcasts the uint8 bytes to FLOAT4_E2M1 and doubles
# the last dim (ge_converter/custom/npu_anti_mx_quant.py). Not tried on a 950.
def pack_e2m1(codes: Tensor) -> Tensor:
    pairs = codes.unflatten(-1, (-1, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def unpack_e2m1(packed: Tensor) -> Tensor:
    b = packed.long()
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def _fp32_fields(s: Tensor) -> tuple[Tensor, Tensor]:
    """(biased exponent field, mantissa field) of fp32 values, as int64."""
    bits = s.view(torch.int32).long() & 0x7FFFFFFF
    return bits >> 23, bits & 0x7FFFFF


def _bf16_amax(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """The block amax as the scenario-3 first-case kernel reads it, in bf16 (ComputeMaxExpDynDtypeRange*): bf16 as is,
    fp16 cast with CAST_RINT, fp32 truncated to its top 16 bits (ShiftRights by 16)."""
    if dtype == torch.float32:
        return (amax.view(torch.int32) & -65536).view(torch.float32)
    return amax.to(torch.bfloat16).float()


def _mx_scale_bytes(amax: Tensor, in_dtype: torch.dtype, out_dt: torch.dtype | int, scale_alg: int,
                    dst_type_max: float, max_low_bound: float) -> Tensor:
    """The e8m0 scale byte per block (int64) for each documented scale_alg."""
    zero = torch.zeros_like(amax, dtype=torch.int64)
    if scale_alg == 1:  # scenario 2 (FP8): S = max(amax, max_low_bound) / Amax(DType), exponent rounded up
        s = torch.clamp(amax, min=max_low_bound) / torch.finfo(out_dt).max
        mant, exp = torch.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1): a power of two has mant 0.5
        e = torch.where(mant > 0.5, exp, exp - 1)  # the unbiased exponent, rounded up unless s is a power of two
        return torch.where(s > 0, (e + 127).clamp(0, 254), zero)
    if scale_alg == 2 and dst_type_max not in _FIRST_CASE_ROUND_UP:
        # scenario 3, second case: S = amax / dst_type_max, its exponent field E rounded up when S is normal with a
        # non-zero mantissa and E < 254, else kept (a subnormal S gives byte 0); byte 0 for an all-zero block. The
        # kernel multiplies by the fp32 reciprocal (tiling's invDstTypeMax_, ComputeScaleCublas: Mul(max32, invMax))
        # where the doc writes a division
        inv = torch.tensor(1.0 / dst_type_max, dtype=torch.float32, device=amax.device)
        e, m = _fp32_fields(amax * inv)
        byte = torch.where((e > 0) & (e < 254) & (m > 0), e + 1, e)
        return torch.where(amax > 0, byte, zero)
    emax = MX_EMAX[out_dt]
    if scale_alg == 2:  # scenario 3, first case: floor(log2 amax) - emax, + 1 when the top mantissa bit(s) are set
        ab = _bf16_amax(amax, in_dtype)
        mant, exp = torch.frexp(ab)  # ab = (2 * mant) * 2^(exp - 1), 2 * mant in [1, 2)
        e = exp - 1 + (2 * mant >= _FIRST_CASE_ROUND_UP[dst_type_max]).long() - emax
        return torch.where(ab > 0, (e + 127).clamp(0, 254), zero)
    # scenario 1 (OCP): 2^(floor(log2 amax) - emax)
    e = torch.floor(torch.log2(amax)) - emax
    return torch.where(amax > 0, (e + 127).clamp(0, 254), zero.float()).long()


def npu_dynamic_mx_quant(chip: str, input: Tensor, *, axis: int = -1, round_mode: str = "rint", dst_type: int = 296,
                         block_size: int = 32, scale_alg: int | None = 0, dst_type_max: float = 0.0,
                         max_low_bound: float = 0.0) -> tuple[Tensor, Tensor]:
    """MX quantisation along `axis` in blocks of block_size: per block a power-of-two mxscale (e8m0 bytes), y =
    cast(x / mxscale). doc (wheel): input fp16/bf16/fp32, 1-7 D; fp32 needs block_size 32; block_size a multiple of
    32 in (0, 1024]; FP4 needs an even last dim; FP8 round_mode "rint" only; scale_alg 0 (OCP), 1 (cuBLAS, FP8 only)
    or 2 (FP4 e2m1 only, block_size 32); dst_type_max 0.0 or 6.0-12.0, only for float4_e2m1fn_x2 with block_size 32;
    max_low_bound only with scale_alg 1 (Amax = max(Amax, max_low_bound)); products: 950PR/950DT. y: FP8 of x's
    shape, or FP4 as uint8 with the last dim halved (two codes a byte, pack_e2m1); mxscale (uint8) has input's shape
    with the axis replaced by ceil(n / block_size) padded to even, / 2, and a trailing 2 (meta function).
    Formulas from hicann/ops-nn aclnnDynamicMxQuantV3.md (the kernel torch_npu calls first), see _mx_scale_bytes; a
    partial last block counts missing values as 0; the even padding of mxscale is 0. Emulated: FP8 and FP4 e2m1
    outputs on the last axis, round_mode "rint". ASSUMED: y saturates at the type's max (scale_alg 0 can overflow),
    and an fp16 input's FP4 values are exactly rounded (the kernel stages them through bf16 with a correction,
    ComputeDataOptimizeHalf / ComputeFP4FromFp32, not reproduced bit for bit here)."""
    op = "npu_dynamic_mx_quant"
    check(is_a5(chip), op, f"only on 950PR/950DT (doc: supported products), chip is {chip}")
    check(1 <= input.dim() <= 7 and input.dtype in FLOAT_ACT, op, f"input must be 1-7 D fp16/bf16/fp32, got "
          f"{input.dim()}-D {input.dtype}")
    check(axis in (-1, input.dim() - 1), op, "only the last axis is emulated")
    check(block_size % 32 == 0 and 0 < block_size <= 1024, op, f"block_size must be a multiple of 32 in (0, 1024], "
          f"got {block_size}")
    check(input.dtype != torch.float32 or block_size == 32, op, "fp32 input needs block_size 32 (doc)")
    fp4 = int(dst_type) in MX_FP4_TYPES
    check(int(dst_type) != MX_E1M2, op, "float4_e1m2fn_x2 (297) outputs are not emulated")
    out_dt = MX_E2M1 if fp4 else _mx_fp8_type(dst_type)
    check(out_dt is not None, op, f"dst_type must be float8_e5m2 (291) / float8_e4m3fn (292) / float4_e2m1fn_x2 "
          f"(296), got {dst_type}")
    check(round_mode == "rint", op, f"only round_mode 'rint' is emulated (FP8 takes 'rint' only), got {round_mode!r}")
    check(scale_alg in ((0, 2) if fp4 else (0, 1)), op, f"scale_alg for {'float4_e2m1fn_x2' if fp4 else 'FP8'} "
          f"outputs must be {'0 or 2' if fp4 else '0 or 1'} (doc), got {scale_alg}")
    check(scale_alg != 2 or block_size == 32, op, f"scale_alg 2 needs block_size 32 (doc), got {block_size}")
    check(dst_type_max == 0.0 or (fp4 and block_size == 32), op,
          "dst_type_max is for float4_e2m1fn_x2 with block_size 32 only (doc)")
    check(dst_type_max == 0.0 or 6.0 <= dst_type_max <= 12.0, op,
          f"dst_type_max must be 0.0 or in [6.0, 12.0] (doc), got {dst_type_max}")
    check(max_low_bound >= 0.0 and (scale_alg == 1 or max_low_bound == 0.0), op,
          "max_low_bound must be >= 0 and is allowed only with scale_alg 1")
    n = input.shape[-1]
    check(not fp4 or n % 2 == 0, op, f"FP4 outputs need an even last dim (doc), got {n}")
    nb = -(-n // block_size)
    xf = torch.nn.functional.pad(input.float(), (0, nb * block_size - n))  # missing values count as 0
    blocks = xf.unflatten(-1, (nb, block_size))
    amax = blocks.abs().amax(-1)  # [..., nb]
    byte = _mx_scale_bytes(amax, input.dtype, out_dt, scale_alg, dst_type_max, max_low_bound)
    # the kernels multiply by the reciprocal 2^(127 - byte) (a byte of 0 gives 2^127); exact in fp32
    q = blocks * torch.exp2(127.0 - byte.float()).unsqueeze(-1)
    if fp4:
        y = pack_e2m1(e2m1_codes(q.flatten(-2)[..., :n]))
    else:
        fmax = torch.finfo(out_dt).max
        y = q.clamp(-fmax, fmax).flatten(-2)[..., :n].to(out_dt)
    mx = torch.nn.functional.pad(byte.to(torch.uint8), (0, nb % 2))  # even padding of the block axis, value 0
    return y, mx.unflatten(-1, (-1, 2))


def _mx_src_type(x: Tensor, src_type: int) -> torch.dtype | int | None:
    """What x holds per the TorchAir converter's check: uint8 x only with an FP4 src_type, otherwise x's FP8 dtype
    must be src_type's."""
    if x.dtype == torch.uint8:
        return int(src_type) if int(src_type) in MX_FP4_TYPES else None
    return x.dtype if _mx_fp8_type(src_type) == x.dtype else None


def npu_anti_mx_quant(chip: str, x: Tensor, mxscale: Tensor, *, axis: int | None = -1, dst_type: int | None = 15,
                      src_type: int | None = 292) -> Tensor:
    """MX dequantisation: y = x * 2^(sf - 127) per 32-element block of `axis`, sf the e8m0 byte (hicann/ops-nn
    quant/anti_mx_quant/docs/aclnnAntiMxQuant.md). The 2.14.0 wheel ships no docstring: schema, meta function (y of
    x's shape, last dim doubled for packed FP4) and TorchAir converter (dst_type fp16/bf16/fp32 as torch dtype codes,
    default 15 = bf16; x rank 1-7, mxscale rank 2-8; uint8 x needs src_type 296/297, else x's dtype must be
    src_type's). CANN doc: 950PR/950DT only; mxscale's shape is x's with the axis replaced by ceil(n / 32) padded to
    even / 2 and a trailing 2 (rank + 1); FP8 x and mxscale may be non-contiguous, FP4 x may not. Emulated: the last
    axis, FP8 and packed e2m1 x (pack_e2m1). ASSUMED: mxscale as uint8 bytes (what npu_dynamic_mx_quant returns) or
    float8_e8m0fnu; the product is rounded once to dst_type."""
    op = "npu_anti_mx_quant"
    check(is_a5(chip), op, f"only on 950PR/950DT (aclnnAntiMxQuant.md), chip is {chip}")
    check(1 <= x.dim() <= 7, op, f"Input x dimNum should be between 1 and 7, got {x.dim()} (converter)")
    check(2 <= mxscale.dim() <= 8, op, f"Input mxscale dimNum should be between 2 and 8, got {mxscale.dim()}")
    check(axis is not None and -x.dim() <= axis < x.dim(), op, f"Parameter axis is out of x dimension range, got "
          f"{axis}")
    check(axis in (-1, x.dim() - 1), op, "only the last axis is emulated")
    out_dt = as_dtype(dst_type)
    check(out_dt in FLOAT_ACT, op, f"Parameter dst_type only supports torch.float16, torch.float32, torch.bfloat16, "
          f"got {dst_type} (converter)")
    src = _mx_src_type(x, src_type)
    check(src is not None, op, f"src_type {src_type} does not match x ({x.dtype}): uint8 x takes src_type 296/297, "
          "FP8 x its own dtype (converter)")
    check(src != MX_E1M2, op, "float4_e1m2 x (src_type 297) is not emulated")
    check(src != MX_E2M1 or x.is_contiguous(), op, "FP4 x must be contiguous (aclnnAntiMxQuant.md)")
    check(mxscale.dtype in (torch.uint8, torch.float8_e8m0fnu), op, f"mxscale must hold e8m0 bytes, got "
          f"{mxscale.dtype}")
    vals = e2m1_values(unpack_e2m1(x)) if src == MX_E2M1 else x.float()
    n = vals.shape[-1]
    nb = -(-n // 32)
    want = (*x.shape[:-1], -(-nb // 2), 2)
    check(tuple(mxscale.shape) == want, op, f"mxscale must be {want} for x {tuple(x.shape)} (aclnnAntiMxQuant.md: "
          f"the axis as ceil(n / 32) padded to even / 2, a trailing 2), got {tuple(mxscale.shape)}")
    sf = mxscale.view(torch.uint8).flatten(-2)[..., :nb].float()  # [..., nb]: one byte per 32-block
    blocks = torch.nn.functional.pad(vals, (0, nb * 32 - n)).unflatten(-1, (nb, 32))
    y = (blocks * torch.exp2(sf - 127.0).unsqueeze(-1)).flatten(-2)[..., :n]
    return y.to(out_dt)
