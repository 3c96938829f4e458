"""The simulated quantisations of AscendOps (backend.py): V4's FP8 and FP4 quantise-dequantise (QAT-matching
simulations of the KV cache, the compressor entries and the indexer) and the FP8 activation quantisation of the G-B
GEMM. On 950 they run as torch_npu's MX pair, npu_dynamic_mx_quant -> npu_anti_mx_quant (an A5 form the 2.14.0
wheel's code gives: capability.UNVERIFIED); elsewhere, and for inputs the pair does not take, in torch (compose).

A mixin: it uses AscendOps' plumbing (`npu`, `has`, `_took`) and is only ever a base of AscendOps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import compose
from .backend_moe import HALF
from .convert import MX_BLOCK

MX_E4M3 = 292  # npu_dynamic_mx_quant's dst_type code of torch_npu.float8_e4m3fn (its doc)
MX_E2M1 = 296  # ... of torch_npu.float4_e2m1fn_x2 (its doc); npu_anti_mx_quant's src_type for packed e2m1 (converter)
# npu_dynamic_mx_quant scale_alg 2, second case of aclnnDynamicMxQuantV3.md's scenario 3 (any dst_type_max in
# [6, 12] but 0/6/7): S = amax / dst_type_max with its exponent rounded up unless S is a power of two. With the fp32
# value just above 6 (6 + 2^-21) that is V4's FP4 scale 2^ceil(log2(amax / 6)) for every bf16/fp16 amax from
# 6 * 2^-126 up: no half-precision value lies in (6 * 2^k, (6 + 2^-21) * 2^k], and amax = 6 * 2^k gives an S just
# below 2^k, rounded up to it. tests/test_ascend_mx_pair.py checks every bf16 and fp16 value, multiplied by the fp32
# reciprocal as the kernel does (dynamic_mx_quant_tail_axis.h, ComputeScaleCublas) and divided as the doc writes.
# fp32 x keeps the torch path: (6 + 2^-21) * 2^k is an fp32 value per binade whose S is exactly 2^k, where V4 rounds
# up to 2^(k+1). 6.0 itself selects the first case (floor-based + mantissa bit).
FP4_SIM_DST_MAX = 6.0 + 2.0 ** -21
FP8_AMAX_FLOOR = 1e-4  # V4's floor of a block's amax before the FP8 scale (Ops.fp8_sim)


class QuantSimOps:
    # -- simulated quantisation (950: the MX quantise/dequantise pair; elsewhere composed in torch) ------------------
    def fp8_sim(self, x: Tensor, block: int, mode: str = "e4m3") -> Tensor:
        if mode == "e4m3" and self._mx_fp8_fits(x, block):
            self._took("fp8_sim", "npu_dynamic_mx_quant (e4m3, scale_alg 1) + " +
                       ("npu_anti_mx_quant" if self._mx_pair_fits(x, block) else "torch dequantise"))
            return self._mx_fp8(x, block, x.dtype)
        self._took("fp8_sim", "torch (arithmetic e4m3 rounding: A2/A3 have no FP8 dtype)")
        return compose.fp8_sim(x, block, mode)

    def _mx_fp8_fits(self, x: Tensor, block: int) -> bool:
        # doc: fp16/bf16 input for any block size (fp32 only with 32, V4's blocks are 64 and 128), 1-7 D, block a
        # multiple of 32 up to 1024; whole blocks only (the reference's simulation needs them too)
        return (self.has("npu_dynamic_mx_quant") and x.dtype in HALF and 1 <= x.dim() <= 7 and block % 32 == 0
                and block <= 1024 and x.shape[-1] % block == 0)

    def _mx_pair_fits(self, x: Tensor, block: int) -> bool:
        """npu_anti_mx_quant can dequantise the codes: blocks of 32 or 64 keep x's rank; larger ones view x as
        [..., nb, block], one more dim (x 1-7 D: converter)."""
        return self.has("npu_anti_mx_quant") and (block <= 2 * MX_BLOCK or x.dim() <= 6)

    def _v4_fp8_quant(self, x: Tensor, block: int) -> tuple[Tensor, Tensor]:
        """V4's FP8 quantisation in blocks along the last dim through the 950's fused MX quantisation: scale_alg 1
        computes S = max(amax, max_low_bound) / 448 with the exponent rounded up to a power of two (hicann/ops-nn
        aclnnDynamicMxQuantV3.md, scenario 2), which is V4's 2^ceil(log2(max(amax, 1e-4) / 448)); y = e4m3(x / S)
        round-to-nearest-even. Returns (e4m3 codes of x's shape, e8m0 scale bytes [..., ceil(nb / 2), 2]: the block
        axis padded to even, meta function)."""
        return self.npu.npu_dynamic_mx_quant(x, dst_type=MX_E4M3, block_size=block, scale_alg=1,
                                             max_low_bound=FP8_AMAX_FLOOR)

    def _mx_fp8(self, x: Tensor, block: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """e4m3-rounded x (FP8 quantise-dequantise in blocks along the last dim), through _v4_fp8_quant and
        npu_anti_mx_quant, whose scales are per 32 elements: the per-`block` scale bytes are repeated by views
        (expand, no copy: the op takes a non-contiguous mxscale, aclnnAntiMxQuant.md). y = e4m3 * 2^(byte - 127),
        exact, rounded once to dtype: the torch dequantise's numbers."""
        y, mx = self._v4_fp8_quant(x, block)
        lead, K = x.shape[:-1], x.shape[-1]
        nb = K // block
        if not self._mx_pair_fits(x, block):
            return self._mx_fp8_torch(y, mx, block, dtype)
        if block == MX_BLOCK:  # the quantisation's scale bytes are already per 32
            return self.npu.npu_anti_mx_quant(y, mx, dst_type=dtype, src_type=MX_E4M3)
        if block == 2 * MX_BLOCK:  # 64-blocks: the per-32 scale pairs [..., nb, 2] are each block's byte twice
            return self.npu.npu_anti_mx_quant(y, self._repeated_scales(mx, nb, ()), dst_type=dtype,
                                              src_type=MX_E4M3)
        # larger blocks: x as [..., nb, block], whose per-32 scale pairs [..., nb, ceil(block / 64), 2] all hold the
        # block's byte (a pair past an odd block's end scales nothing)
        pairs = -(-block // (2 * MX_BLOCK))
        out = self.npu.npu_anti_mx_quant(y.view(*lead, nb, block), self._repeated_scales(mx, nb, (pairs,)),
                                         dst_type=dtype, src_type=MX_E4M3)
        return out.view(*lead, K)

    @staticmethod
    def _repeated_scales(mx: Tensor, nb: int, inner: tuple[int, ...]) -> Tensor:
        """mx [..., ceil(nb / 2), 2] (one byte per block, the block axis padded to even: the quantisation's output,
        contiguous in its last two dims) -> [..., nb, *inner, 2] with every entry of block j its byte: one
        as_strided view (stride 1 along the blocks, 0 along the copies; the even padding is simply not reached),
        where flatten / cut / unsqueeze / expand would be three or four views."""
        if mx.stride(-2) != 2 * mx.stride(-1):  # the byte of block j must sit at j * stride(-1)
            mx = mx.contiguous()
        lead = mx.shape[:-2]
        stride = (*mx.stride()[:-2], mx.stride(-1), *(0 for _ in inner), 0)
        return mx.as_strided((*lead, nb, *inner, 2), stride)  # storage offset: mx's own

    @staticmethod
    def _mx_fp8_torch(y: Tensor, mx: Tensor, block: int, dtype: torch.dtype) -> Tensor:
        """The dequantise in torch where npu_anti_mx_quant cannot run: codes times 2^(byte - 127) per block."""
        lead, K = y.shape[:-1], y.shape[-1]
        nb = K // block
        cols = mx.view(*lead, -1, 1)  # [..., 2 * ceil(nb / 2), 1]: one scale byte per block, as a column
        if nb % 2:
            cols = cols[..., :nb, :]  # drop the even padding
        # ASSUMED on the device: torch_npu takes torch.float8_e8m0fnu views (exact: a byte b is 2^(b - 127))
        scale = cols.view(torch.float8_e8m0fnu).to(dtype)  # [..., nb, 1]
        return (y.to(dtype).view(*lead, nb, block) * scale).view(*lead, K)

    def fp4_sim(self, x: Tensor, block: int) -> Tensor:
        # 950, bf16 x in 32-blocks: npu_dynamic_mx_quant's FP4 e2m1 with scale_alg 2 and dst_type_max just above 6
        # gives V4's scale (FP4_SIM_DST_MAX) and e2m1 rint codes, npu_anti_mx_quant multiplies them back (exact in
        # bf16). fp16 keeps torch: the kernel stages fp16 x through bf16 (dynamic_mx_quant_tail_axis.h,
        # ComputeDataOptimizeHalf), not shown to round as V4 does. Known difference: a block whose amax is below
        # 6 * 2^-126 (~7e-38) gets scale 2^-127 there (S subnormal: byte 0) where V4 floors at 2^-126; all-zero
        # blocks still give zeros, other such tiny blocks dequantise differently (tested). The values carry the
        # sign of zero of the e2m1 cast (-0 where the reference gives +0: equal values)
        if (x.dtype == torch.bfloat16 and block == MX_BLOCK and 1 <= x.dim() <= 7 and x.shape[-1] % block == 0
                and self.has("npu_dynamic_mx_quant") and self.has("npu_anti_mx_quant")):
            self._took("fp4_sim", "npu_dynamic_mx_quant (e2m1, scale_alg 2, dst_type_max 6 + 2^-21) + "
                                  "npu_anti_mx_quant")
            codes, mx = self.npu.npu_dynamic_mx_quant(x, dst_type=MX_E2M1, block_size=block, scale_alg=2,
                                                      dst_type_max=FP4_SIM_DST_MAX)
            return self.npu.npu_anti_mx_quant(codes, mx, dst_type=x.dtype, src_type=MX_E2M1)
        self._took("fp4_sim", "torch (arithmetic e2m1 rounding)")
        return compose.fp4_sim(x, block)

    def _mx_fp8_codes(self, x2: Tensor, block: int) -> tuple[Tensor, Tensor]:
        """x2 [M, K] -> (e4m3 codes [M, K], fp32 scales [M, K/block]) through _v4_fp8_quant: its even-padded scale
        bytes flattened and cut to nb, read as 2^(byte - 127) exactly in fp32."""
        y, mx = self._v4_fp8_quant(x2, block)
        nb = x2.shape[-1] // block
        # ASSUMED on the device: torch_npu takes torch.float8_e8m0fnu views (exact: a byte b is 2^(b - 127))
        scale = mx.view(torch.float8_e8m0fnu).float().flatten(-2)  # [M, 2 * ceil(nb / 2)]
        return y, scale if nb % 2 == 0 else scale[..., :nb]
