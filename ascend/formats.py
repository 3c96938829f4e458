"""Storage formats the Ascend quantised GEMMs consume (shared by convert.py, the backend and the emulation).

- int4 packing for npu_grouped_matmul / npu_weight_quant_batchmatmul weights: 8 signed int4 values per int32 along
  the LAST dim of the op-ready [K, N] weight, element 0 in the lowest nibble (the same packing the spec states for
  npu_dynamic_quant(dst_type=torch.quint4x2): "packs 8 int4 into int32", torch-npu-ops.md section 8).
- fp8 e4m3 rounding done with arithmetic instead of a dtype cast: 910B/910C have no FP8 dtype on device, so a
  quant-dequant simulation cannot rely on `.to(torch.float8_e4m3fn)` there.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT4_PER_INT32 = 8


def pack_int4(q: Tensor) -> Tensor:
    """int values in [-8, 7], [..., N] with N % 8 == 0 -> int32 [..., N/8] (element i of a group in nibble i)."""
    if q.shape[-1] % INT4_PER_INT32:
        raise ValueError(f"int4 packing needs the last dim to be a multiple of 8, got {q.shape[-1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    nib = (q.to(torch.int64) & 0xF).unflatten(-1, (-1, INT4_PER_INT32))
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    word = (nib << shifts).sum(-1)  # < 2^32, fits int64
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)  # reinterpret as signed int32
    return word.to(torch.int32)


def unpack_int4(packed: Tensor) -> Tensor:
    """int32 [..., N/8] -> int8 [..., N] signed int4 values (inverse of pack_int4)."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed int4 weights are int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    nib = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    nib = torch.where(nib >= 8, nib - 16, nib)
    return nib.flatten(-2).to(torch.int8)


def round_e4m3(v: Tensor) -> Tensor:
    """Round fp32 values (already clamped to +-448) to the nearest float8_e4m3fn value, ties to even, without an
    FP8 dtype: 3 mantissa bits for normals (exponent >= -6), fixed 2^-9 steps for subnormals."""
    a = v.abs()
    e = torch.floor(torch.log2(a.clamp(min=2.0 ** -30))).clamp(min=-6.0)
    ulp = torch.exp2(e - 3.0)
    return torch.round(v / ulp) * ulp  # torch.round is round-half-to-even
