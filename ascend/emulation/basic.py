"""CPU emulation of the basic torch_npu ops: RMSNorm, rotary, SwiGLU, dynamic quant, quantised matmul.

Every function takes the chip it emulates as its first argument (bound by emulation.make_torch_npu); the rest is
the documented signature (torch-npu-ops.md sections 1, 2, 7, 8). Written from the op contracts, independent of
dsv4.common.model.reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_ACT = (torch.float16, torch.bfloat16, torch.float32)
HALF_ACT = (torch.float16, torch.bfloat16)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class NpuOpError(RuntimeError):
    """What the real op raises (an aclnn parameter check failure) when a documented constraint is violated."""


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise NpuOpError(f"{op}: {msg}")


def is_a5(chip: str) -> bool:
    return chip.startswith("950")


# -- section 1 ------------------------------------------------------------------------------------------------------
def npu_rms_norm(chip: str, self: Tensor, gamma: Tensor, epsilon: float = 1e-06) -> tuple[Tensor, Tensor]:
    """y = x * rstd * gamma with rstd = 1/sqrt(mean(x^2) + eps) over gamma's dims; rstd fp32, keepdim 1s."""
    op = "npu_rms_norm"
    check(2 <= self.dim() <= 8, op, f"input must be 2-8 D, got {self.dim()}")
    check(self.dtype in FLOAT_ACT, op, f"unsupported dtype {self.dtype}")
    check(gamma.dtype in (self.dtype, torch.float32), op, f"gamma dtype {gamma.dtype} vs input {self.dtype}")
    nd = gamma.dim()
    check(tuple(self.shape[-nd:]) == tuple(gamma.shape), op, "gamma must match the trailing dims of the input")
    dims = tuple(range(self.dim() - nd, self.dim()))
    xf = self.float()
    rstd = torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


# -- section 2 ------------------------------------------------------------------------------------------------------
def npu_rotary_mul(chip: str, input: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str = "half",
                   rotate: Tensor | None = None) -> Tensor:
    """out = x*r1 + rot(x)*r2. 'half': rot(x) = cat(-x2, x1) of the two halves (NeoX); 'interleave': rot pairs
    (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]) (GPT-J / DeepSeek). r1/r2 are full-width (D, not D/2): for interleave the
    cos/sin of pair i sit at both 2i and 2i+1 (repeat-interleaved), for half they are the halves repeated."""
    op = "npu_rotary_mul"
    check(input.dim() in (3, 4), op, f"input must be 3-D or 4-D, got {input.dim()}")
    check(r1.dim() == input.dim() and r2.dim() == input.dim(), op, "r1/r2 must have the input's rank")
    check(input.dtype in FLOAT_ACT and r1.dtype == input.dtype and r2.dtype == input.dtype, op,
          f"input/r1/r2 must share one of fp16/bf16/fp32, got {input.dtype}/{r1.dtype}/{r2.dtype}")
    check(r1.shape[-1] == input.shape[-1] and r2.shape[-1] == input.shape[-1], op, "r1/r2 last dim must equal D")
    check(rotate is None, op, "custom rotate matrices are not emulated")
    d = input.shape[-1]
    check(d % 2 == 0, op, "D must be even")
    xf = input.float()
    if rotary_mode == "interleave":
        pairs = xf.unflatten(-1, (d // 2, 2))
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    elif rotary_mode == "half":
        rot = torch.cat([-xf[..., d // 2:], xf[..., :d // 2]], dim=-1)
    else:
        raise NpuOpError(f"{op}: rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    torch.broadcast_shapes(input.shape, r1.shape, r2.shape)  # raises like the op on non-broadcastable cos/sin
    return (xf * r1.float() + rot * r2.float()).to(input.dtype)


# -- section 7 ------------------------------------------------------------------------------------------------------
def npu_swiglu(chip: str, input: Tensor, dim: int = -1) -> Tensor:
    """Split `dim` into halves (a, b): silu(a) * b, computed in fp32, returned in the input dtype."""
    check(input.shape[dim] % 2 == 0, "npu_swiglu", "the split dim must be even")
    a, b = input.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(input.dtype)


# -- section 8 ------------------------------------------------------------------------------------------------------
def npu_dynamic_quant(chip: str, x: Tensor, *, smooth_scales: Tensor | None = None, group_index: Tensor | None = None,
                      dst_type: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8: scale = amax(|x|)/127 over the last dim (fp32, shape x.shape[:-1]),
    y = round(x / scale) in int8. A zero row gives scale 0 and y 0."""
    op = "npu_dynamic_quant"
    check(x.dtype in HALF_ACT, op, f"input must be fp16/bf16, got {x.dtype}")
    check(dst_type in (None, torch.int8), op, "only the int8 output is emulated (quint4x2 packing is not)")
    check(group_index is None, op, "group_index (per-expert smooth scales) is not emulated")
    xf = x.float()
    if smooth_scales is not None:
        xf = xf * smooth_scales.float()
    scale = xf.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(xf / safe.unsqueeze(-1)).clamp(-127, 127)
    return y.to(torch.int8), scale


def _expand_blocks(scale: Tensor, rows: int, cols: int, br: int, bc: int) -> Tensor:
    return scale.float().repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)[..., :rows, :cols]


def scaled_product(op: str, chip: str, x1: Tensor, x2: Tensor, scale: Tensor, pertoken_scale: Tensor | None,
                   group_sizes: list[int] | None) -> Tensor:
    """Shared math of npu_quant_matmul and the quantised npu_grouped_matmul: integer/FP8 operands, exact products
    accumulated in fp64 (stands in for the int32 / fp32 accumulator), then the dequant scales. Returns fp32 [m, n].
    scale: per-channel (n,) or, with group_sizes [gm, gn, gk], block-wise [ceil(k/gk), ceil(n/gn)];
    pertoken_scale: (m,) or, block-wise, [m, ceil(k/gk)]."""
    check(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], op,
          f"x1 [m,k] and x2 [k,n] expected, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.dtype in FP8 or x2.dtype in FP8:
        check(is_a5(chip), op, f"FP8 operands need a 950 chip (A2/A3 list only int8/int4), chip is {chip}")
        check(x1.dtype in FP8 and x2.dtype in FP8, op, "FP8 x1 needs an FP8 x2")
    else:
        check(x1.dtype == torch.int8 and x2.dtype == torch.int8, op,
              f"int8 x int8 expected, got {x1.dtype} x {x2.dtype}")
    m, k = x1.shape
    n = x2.shape[1]
    a, b = x1.double(), x2.double()
    if group_sizes is None:
        check(scale.shape[-1] in (1, n) and scale.dim() == 1, op, f"per-channel scale must be (n,), got {scale.shape}")
        out = (a @ b) * scale.double()
        if pertoken_scale is not None:
            check(tuple(pertoken_scale.shape) == (m,), op, "pertoken_scale must be (m,)")
            out = out * pertoken_scale.double().unsqueeze(-1)
        return out.float()
    gm, gn, gk = group_sizes
    check(gm == 1, op, "only per-token activation groups (gm = 1) are emulated")
    nk, nn = -(-k // gk), -(-n // gn)
    check(tuple(scale.shape) == (nk, nn), op, f"block scale must be [{nk}, {nn}], got {tuple(scale.shape)}")
    check(pertoken_scale is not None and tuple(pertoken_scale.shape) == (m, nk), op,
          f"block pertoken_scale must be [{m}, {nk}]")
    a = a * pertoken_scale.double().repeat_interleave(gk, dim=-1)[:, :k]
    b = b * _expand_blocks(scale, k, n, gk, gn).double()
    return (a @ b).float()


def npu_quant_matmul(chip: str, x1: Tensor, x2: Tensor, scale: Tensor, *, offset: Tensor | None = None,
                     pertoken_scale: Tensor | None = None, bias: Tensor | None = None,
                     output_dtype: torch.dtype | None = None, group_sizes: list[int] | None = None) -> Tensor:
    """(x1 @ x2) * scale[n] * pertoken_scale[m] (+ bias) -> output_dtype. Without output_dtype the result is
    requantised to int8 (the op's default), which needs no pertoken_scale."""
    op = "npu_quant_matmul"
    check(offset is None, op, "offset (asymmetric requant) is not emulated")
    out = scaled_product(op, chip, x1, x2, scale, pertoken_scale, group_sizes)
    if bias is not None:
        out = out + bias.float()
    if output_dtype is None:
        check(pertoken_scale is None, op, "int8 output cannot take a pertoken_scale")
        return torch.round(out).clamp(-128, 127).to(torch.int8)
    check(output_dtype in HALF_ACT, op, f"output_dtype must be fp16/bf16, got {output_dtype}")
    return out.to(output_dtype)
