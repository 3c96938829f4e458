"""AscendOps: the ops interface on Ascend NPUs through torch_npu's fused operators.

`self.npu` is the real `torch_npu` module on hardware, or the CPU emulation (ascend/emulation) with emulate=True,
whose operators are registered under the torch_npu 2.14.0 schemas, so every call below is bound by the release's
own schema in CI. Per op, the fused torch_npu operator is used where the capability table (capability.py) gives
the chip that op AND the call's shapes / dtypes fit its documented constraints (the docs in
ascend/schemas/torch_npu-2.14.0.yaml); otherwise a torch composition runs (the reference ops, or compose.py where
Ascend differs). `last_path[op]` records the path of the latest call, `describe()` the policy. The MoE methods
live in backend_moe.py, the simulated quantisations (FP8/FP4 quantise-dequantise, the G-B GEMM's activation) in
backend_quant.py (mixins of this class).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4.common.model.ops import OP_NAMES, LinearWeight, Ops
from dsv4.common.model.reference import ReferenceOps

from . import compose
from .backend_moe import FP8_BLOCK, HALF, MoEOps
from .backend_quant import QuantSimOps
from .capability import A5, custom_op, op_available, release_supported
from .convert import dequant_any, fp4_to_fp8, to_mxfp8, to_w4a8, to_w8a8
from .emulation.attention import A5_INDEXER_HEADS, _valid_sparse_count
from .emulation.basic import FP8_GB_GROUPS
from .schemas import PINNED_RELEASE

FP8_CHIPS = A5  # chips whose checkpoints keep FP8 weights (their GEMM: npu_quant_matmul's FP8 G-B form)
WEIGHT_POLICIES = ("auto", "w8a8", "bf16")
FP8_GB_PATH = "npu_dynamic_mx_quant + npu_quant_matmul (FP8 G-B, group_sizes [1,128,128])"
W8A8_PATH = "npu_dynamic_quant + npu_quant_matmul (W8A8)"
# _zeros: a static step uses SFA's key rope part (one shape: the flat store's rows) and a query rope part per captured
# batch size; eager decode's growing key lengths churn through the rest
ZEROS_KEPT = 8
LI_BLOCK = 64  # paged-key block size for the lightning indexer (a multiple of 16, <= 1024: section 4)


class AscendOps(QuantSimOps, MoEOps, Ops):
    name = "ascend"

    def __init__(self, npu: object, chip: str, device: str | torch.device = "npu:0", release: str = PINNED_RELEASE,
                 weights: str = "auto", use_custom_ops: bool = False, emulated: bool = False) -> None:
        if weights not in WEIGHT_POLICIES:
            raise ValueError(f"weights must be one of {WEIGHT_POLICIES}, got {weights!r}")
        self.npu, self.chip, self.release, self.weights = npu, chip, release, weights
        self.device = torch.device(device)
        self.emulated = emulated
        self.use_custom_ops = use_custom_ops
        self.last_path: dict[str, str] = {}
        self._converted: dict[object, tuple[weakref.ref, object]] = {}  # _kept: (tag, id(weight)) -> (ref, value)
        self._tables: dict[tuple, Tensor] = {}  # small constant index tensors, per device
        self._zero_parts: dict[tuple, Tensor] = {}  # _zeros: the last few, oldest first
        # where no fused operator fits, the plain-torch reference runs (it uses only stock torch ops, so it runs on
        # the NPU too); Ascend-specific compositions (no FP8 dtype on A2/A3, int8 quantisation) live in compose.py
        self._torch = ReferenceOps(self.device)

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def has(self, op: str) -> bool:
        return op_available(self.npu, op, self.chip)

    def _took(self, op: str, path: str) -> None:
        self.last_path[op] = path

    @property
    def fp8_native(self) -> bool:
        return self.chip in FP8_CHIPS and self.weights == "auto"

    def native_weight(self, w: LinearWeight, expert: bool = False) -> LinearWeight:
        """The checkpoint weight in a format this chip's GEMMs take, converted once and cached per weight tensor:
        950 keeps FP8 (FP4 -> FP8 blocks); 910B/910C have no FP8 GEMM, so FP8 -> w8a8 and, on 910B (the one chip with
        the grouped GEMM's weight-only int4 form), FP4 experts -> w4a8 (convert ahead of time with
        ascend.convert.convert_for_chip to skip this). 950 experts become "mxfp8" (e4m3 codes with per-32 e8m0
        scales, exact) for npu_grouped_matmul's MX form."""
        if w.fmt in ("none", "w8a8", "w4a8", "mxfp8"):
            return w
        mx_expert = expert and self.fp8_native and self.has("npu_grouped_matmul")
        if self.fp8_native and w.fmt == "fp8" and not mx_expert:
            return w
        return self._kept("native", w.weight, lambda: self._convert(w, expert, mx_expert))

    def _convert(self, w: LinearWeight, expert: bool, mx_expert: bool) -> LinearWeight:
        if self.weights == "bf16":
            return LinearWeight(dequant_any(w).to(torch.bfloat16), None, "none")
        if mx_expert:
            return to_mxfp8(w)
        if self.fp8_native:
            return fp4_to_fp8(w)
        return to_w4a8(w) if expert and self.weights == "auto" and self.chip == "910b" else to_w8a8(w)

    def _kept(self, tag: object, weight: Tensor, make):
        """make() for this weight tensor, made at the first call and kept while the tensor lives: keyed by its id
        and checked through a weak reference (a freed tensor's id can be reused by another)."""
        key = (tag, id(weight))
        hit = self._converted.get(key)
        if hit is None or hit[0]() is not weight:
            hit = self._converted[key] = (weakref.ref(weight), make())
        return hit[1]

    def _table(self, key: tuple, make) -> Tensor:
        """A small constant index tensor, made once per key (its device in the key) from Python values only."""
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = make()
        return t

    # -- normalisation ----------------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if self.has("npu_rms_norm") and 2 <= x.dim() <= 8:
            # V4's weights are fp32: the op takes bf16/fp16 x with an fp32 gamma and computes in fp32 with one
            # rounding to x's dtype, the reference's math (the wheel's meta + aclnnRmsNorm's dtype table, not its
            # docstring: capability.UNVERIFIED); an fp32 x runs fp32/fp32
            self._took("rms_norm", "npu_rms_norm")
            xin = x if x.dtype in HALF else x.float()
            return self.npu.npu_rms_norm(xin, weight.float(), eps)[0].to(x.dtype)
        self._took("rms_norm", "torch")
        xf = x.float()
        return (weight.float() * xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)

    def head_rms_norm(self, q: Tensor, eps: float) -> Tensor:
        # the official code normalises q in bf16 arithmetic; npu_rms_norm (fp32 inside) differs by ~1 bf16 ulp, which
        # was enough to move tiny-model logits by 2e-2, so half precision stays in torch; fp32 uses the op
        if self.has("npu_rms_norm") and q.dtype == torch.float32 and 2 <= q.dim() <= 8:
            self._took("head_rms_norm", "npu_rms_norm")
            return self.npu.npu_rms_norm(q, torch.ones(q.shape[-1], dtype=q.dtype, device=q.device), eps)[0]
        self._took("head_rms_norm", "torch")
        return q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)

    # -- rotary -----------------------------------------------------------------------------------------------------
    def prepare_rope(self, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Full-width fp32 tables [B,S,1,r] built once per step: cos repeated per pair; sin per pair as (-sin, +sin)
        where rope runs in torch (the sign of the pair swap folded in), as (sin, sin) where npu_rotary_mul runs (its
        interleave mode applies the sign itself: doc formula x_new = stack(-x2, x1))."""
        cos, sin = cos.float(), sin.float()
        c = torch.stack([cos, cos], -1).flatten(-2).unsqueeze(2)  # [B,S,1,r]: each pair's value at 2i and 2i+1
        s = torch.stack([sin, sin] if self.has("npu_rotary_mul") else [-sin, sin], -1)
        return c, s.flatten(-2).unsqueeze(2)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, out: Tensor | None = None) -> Tensor:
        # x [B,S,H,r], cos/sin [B,S,r/2] raw, or [B,S,1,r] as prepare_rope made them (the static step prepares them
        # once per step). fp32 math: the V4 rope is fp32 and bf16 tables would add rounding
        if cos.dim() == x.dim():
            r1, r2 = cos, sin
        else:
            r1, r2 = self.prepare_rope(cos, sin)
        B, S, H, r = x.shape
        if self.has("npu_rotary_mul"):
            xf = x if x.dtype == torch.float32 else x.float()
            if inverse:
                r2 = -r2
            if H < 1000 and r % 2 == 0 and r < 896:
                # doc (interleave, BSND): r1/r2 must be 1S1D, but V4's positions differ per batch row: view the batch
                # as one sequence of B*S tokens, [1, B*S, H, r] with r1/r2 [1, B*S, 1, r] (then B * N = H < 1000)
                self._took("rope", "npu_rotary_mul(interleave)")
                xs, c, s = (t.reshape(1, B * S, t.shape[2], r) for t in (xf, r1, r2))
                y = self.npu.npu_rotary_mul(xs, c, s, rotary_mode="interleave").view(B, S, H, r).to(x.dtype)
                return y if out is None else out.copy_(y)
            self._took("rope", "torch")
            pairs = xf.unflatten(-1, (-1, 2))
            rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
            y = (xf * r1 + rot * r2).to(x.dtype)
            return y if out is None else out.copy_(y)
        # 950 (npu_rotary_mul's products are A2/A3): pair (a, b) -> (a c - b s, b c + a s) as x * cos + swap(x) * sin
        # with swap(a, b) = (b, a) and the sign in the table: the reference's products and sums, bit for bit. x stays
        # in its dtype: a product with the fp32 table promotes it to fp32 exactly (what x.float() did, one op less),
        # and the swap is one index_select by a stored permutation (not a view, flip and view). With `out` the fp32 sum
        # is cast by the copy into it (the rounding of .to(x.dtype)), not first by a cast of its own; `add(out=)` would
        # also drop the copy, but dynamo does not trace a non-contiguous out= tensor (the rope part of q is one)
        self._took("rope", "torch (prepared tables: npu_rotary_mul is A2/A3 only)")
        swapped = x.index_select(-1, self._pair_swap(r, x.device))
        y = x * r1 - swapped * r2 if inverse else x * r1 + swapped * r2
        return y.to(x.dtype) if out is None else out.copy_(y)

    def _pair_swap(self, r: int, device: torch.device) -> Tensor:
        """[r] int64 permutation (1, 0, 3, 2, ...): swaps each pair; made once per (r, device) and kept."""
        return self._table(("pair_swap", r, str(device)),
                           lambda: torch.arange(r, device=device).view(-1, 2).flip(-1).flatten())

    def hadamard(self, x: Tensor) -> Tensor:
        self._took("hadamard", "torch (matmul with H_n)")
        return self._torch.hadamard(x)

    # -- linear -----------------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, w: LinearWeight) -> Tensor:
        w = self.native_weight(w)
        if w.fmt == "none":
            # x @ W^T through the weight's transposed view kept per weight (F.linear makes it at every call): the
            # same mm on the same operands, one view fewer a call
            self._took("linear", "torch matmul")
            return torch.matmul(x, self._transposed(w.weight).to(x.dtype))
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, K)  # the quantised GEMMs take 2-D activations
        if w.fmt == "fp8":
            y = self._linear_fp8(x2, w)
        elif w.fmt == "w8a8":
            y = self._linear_w8a8(x2, w)
        elif w.fmt == "w4a8":
            ends = torch.tensor([x2.shape[0]], dtype=torch.int64, device=x.device)
            stacked = LinearWeight(w.weight.unsqueeze(0), w.scale.unsqueeze(0), "w4a8")
            y = self._grouped(x2, stacked, ends)
            self._took("linear", self.last_path["grouped_gemm"])
        else:
            raise ValueError(f"unsupported weight format {w.fmt!r}")
        return y if x.dim() == 2 else y.reshape(*lead, -1)

    def linears(self, x: Tensor, ws: tuple[LinearWeight, ...]) -> tuple[Tensor, ...]:
        """Weights sharing the input x (wq_a and wkv; the shared expert's w1 and w3): where every weight takes the
        same quantised GEMM (950: the FP8 G-B form; 910B/910C: W8A8), x is quantised ONCE for all of them, giving
        the codes and scales each linear would make, so every output equals its linear bit for bit. Otherwise one
        linear per weight."""
        natives = [self.native_weight(w) for w in ws]
        if len(natives) > 1 and all(w.fmt == "fp8" and self._fp8_gemm_misfit(x, w) is None for w in natives):
            self._took("linear", f"{FP8_GB_PATH}; one activation quantisation for {len(natives)} weights")
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            xq, x_scale = self._mx_fp8_codes(x2, FP8_BLOCK)
            ys = [self._gb_gemm(xq, x_scale, w, x2.dtype) for w in natives]
        elif len(natives) > 1 and all(w.fmt == "w8a8" and self._w8a8_fused(x, w) for w in natives):
            self._took("linear", f"{W8A8_PATH}; one activation quantisation for {len(natives)} weights")
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            xq, xs = self.npu.npu_dynamic_quant(x2)
            ys = [self.npu.npu_quant_matmul(xq, w.weight.t(), w.scale.float(), pertoken_scale=xs,
                                            output_dtype=x2.dtype) for w in natives]
        else:
            return tuple(self.linear(x, w) for w in ws)
        return tuple(ys) if x.dim() == 2 else tuple(y.reshape(*x.shape[:-1], -1) for y in ys)

    def _gb_gemm(self, xq: Tensor, x_scale: Tensor, w: LinearWeight, dtype: torch.dtype) -> Tensor:
        """npu_quant_matmul's FP8 G-B GEMM of the activation's e4m3 codes and fp32 scales [M, K/128] with an FP8
        weight (its cached [K, N] view and [K/128, N/128] block scales)."""
        kn = self._gb_weight(w)
        return self.npu.npu_quant_matmul(xq, kn.weight, kn.scale, pertoken_scale=x_scale, output_dtype=dtype,
                                         group_sizes=FP8_GB_GROUPS)

    def _linear_fp8(self, x2: Tensor, w: LinearWeight) -> Tensor:
        # 950: npu_quant_matmul's FP8 G-B form (the 2.14.0 wheel's meta function + TorchAir converter; its docstring
        # predates it: capability.UNVERIFIED). The activation is quantised per token per 128 of K by the fused MX op,
        # exactly V4's ue8m0 FP8 simulation; elsewhere the same math runs in torch
        why = self._fp8_gemm_misfit(x2, w)
        if why is None:
            self._took("linear", FP8_GB_PATH)
            xq, x_scale = self._mx_fp8_codes(x2, FP8_BLOCK)
            return self._gb_gemm(xq, x_scale, w, x2.dtype)
        if self._mx_fp8_fits(x2, FP8_BLOCK):
            self._took("linear", f"npu_dynamic_mx_quant activation + torch GEMM ({why})")
            xq = self._mx_fp8(x2, FP8_BLOCK)
        else:
            self._took("linear", f"torch FP8-simulated ({why})")
            xq = compose.fp8_sim(x2.float(), FP8_BLOCK)
        return F.linear(xq, self._dequant_fp8(w)).to(x2.dtype)

    def _fp8_gemm_misfit(self, x2: Tensor, w: LinearWeight) -> str | None:
        """Why npu_quant_matmul's FP8 G-B form cannot take this call (None: it can)."""
        if not self.has("npu_quant_matmul") or not self.has("npu_dynamic_mx_quant"):
            return f"no FP8 npu_quant_matmul on {self.chip}"
        if x2.dtype not in HALF:
            return "fp32 activations: the FP8 GEMM's activation quantisation takes bf16/fp16 with 128-blocks"
        N, K = w.weight.shape[-2:]
        if w.weight.dim() != 2 or K % FP8_BLOCK or N % FP8_BLOCK:
            return f"weight {tuple(w.weight.shape)}: the G-B form is run on 2-D weights with 128-multiple K and N"
        if w.scale is None or tuple(w.scale.shape) != (N // FP8_BLOCK, K // FP8_BLOCK):
            return "the weight scale is not one per 128x128 block"
        return None

    def grouped_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        # one bmm over the groups through the weight's [G, K, N] view kept per parameter (the Ops default makes the
        # view at every call): the same kernel on the same operands
        self._took("grouped_linear", "torch bmm")
        G, _, K = x.shape
        kn = self._kept(("grouped_t", G), weight, lambda: weight.view(G, -1, K).transpose(1, 2))
        return torch.bmm(x, kn.to(x.dtype))

    def _transposed(self, weight: Tensor) -> Tensor:
        """weight.t() [in, out], a view made once per parameter and kept (a weight made per call, e.g. a view of
        one group of wo_a, is transposed each time: caching it would keep one entry per call)."""
        if not isinstance(weight, torch.nn.Parameter):
            return weight.t()
        return self._kept("t", weight, weight.t)

    def _gb_weight(self, w: LinearWeight) -> LinearWeight:
        """The weight as npu_quant_matmul's G-B form takes it for x2 = weight.t() [K, N]: the transposed view and the
        128x128 block scales as fp32 [K/128, N/128] (quant_matmul_group_sizes_check: scale.size(-1) = ceil(N / 128),
        scale.size(-2) the K blocks of pertoken_scale). Made once per weight tensor (the scale transposed and made
        contiguous, the weight a view), then cached."""
        return self._kept("gb_kn", w.weight,
                          lambda: LinearWeight(w.weight.t(), w.scale.float().t().contiguous(), "fp8"))

    def _dequant_fp8(self, w: LinearWeight) -> Tensor:
        """fp32 [out, in] of an FP8 weight (the reference's dequant_weight products). Whole 128x128 blocks: the
        weight and scale viewed per block once and kept (views: no memory), so a call costs one upcast and one
        multiply instead of expanding the scale to full size."""
        rows, cols = w.weight.shape[-2:]
        if w.weight.dim() != 2 or rows % FP8_BLOCK or cols % FP8_BLOCK:
            return dequant_any(w)
        R, C = rows // FP8_BLOCK, cols // FP8_BLOCK
        q, s = self._kept("blocks", w.weight, lambda: (w.weight.view(R, FP8_BLOCK, C, FP8_BLOCK),
                                                       w.scale.float().view(R, 1, C, 1)))
        return (q.float() * s).view(rows, cols)

    def _w8a8_fused(self, x: Tensor, w: LinearWeight) -> bool:
        # doc: x1's and x2's last dims (K and N) at most 65535 (a 129280-row vocab head in W8A8 exceeds it)
        fits = x.shape[-1] <= 65535 and w.weight.shape[0] <= 65535
        return x.dtype in HALF and fits and self.has("npu_dynamic_quant") and self.has("npu_quant_matmul")

    def _linear_w8a8(self, x2: Tensor, w: LinearWeight) -> Tensor:
        fits = x2.shape[-1] <= 65535 and w.weight.shape[0] <= 65535
        if self._w8a8_fused(x2, w):
            self._took("linear", W8A8_PATH)
            xq, xs = self.npu.npu_dynamic_quant(x2)
            return self.npu.npu_quant_matmul(xq, w.weight.t(), w.scale.float(), pertoken_scale=xs,
                                             output_dtype=x2.dtype)
        self._took("linear", "torch W8A8 (" + ("fp32 activations: npu_dynamic_quant takes fp16/bf16" if fits else
                                           "K or N above npu_quant_matmul's 65535") + ")")
        xq, xs = compose.quant_int8_per_token(x2)
        y = (xq @ w.weight.float().t()) * xs.unsqueeze(-1) * w.scale.float()
        return y.to(x2.dtype)

    # -- attention --------------------------------------------------------------------------------------------------
    def _sfa_fits(self, q: Tensor, kv: Tensor) -> str | None:
        H, D = q.shape[2], q.shape[3]
        if not self.has("npu_sparse_flash_attention"):
            return "npu_sparse_flash_attention not on this chip/release"
        if self.chip not in FP8_CHIPS:
            return "attention sinks need the 950 SFA (A2/A3 SFA has no `sinks`)"
        if D != 512:
            return f"SFA is hard-wired to 512 (+64 rope) dims, head_dim is {D}"
        if q.dtype not in HALF or kv.dtype != q.dtype:
            return "SFA takes bf16/fp16 only"
        if not 1 <= H <= 128:
            return "SFA takes 1..128 query heads"
        return None

    def sparse_attention(self, q: Tensor, kv: Tensor, sink: Tensor, indices: Tensor, softmax_scale: float) -> Tensor:
        why = self._sfa_fits(q, kv)
        if why is not None:
            self._took("sparse_attention", f"torch ({why})")
            return self._torch.sparse_attention(q, kv, sink, indices, softmax_scale)
        self._took("sparse_attention", "npu_sparse_flash_attention (950, sinks)")
        B, S, H, _ = q.shape
        # SFA wants valid indices packed first, -1 padding last; ours may come in any order
        order = torch.sort((indices < 0).to(torch.int8), dim=-1, stable=True).indices
        packed = torch.gather(indices, -1, order).to(torch.int32).unsqueeze(2)  # [B,S,1,K]
        # V4 keeps its rope dims inside the 512 (last 64), so the op's separate 64-d rope part gets zeros: the
        # logits gain nothing and the value (= the 512-d key) is exactly V4's
        q_rope = self._zeros((B, S, H, 64), q)
        kv4 = kv.unsqueeze(2).contiguous()  # doc: query / key / value / indices must be contiguous
        k_rope = self._zeros((B, kv.shape[1], 1, 64), kv)
        # sparse_mode 0: the indices already encode causality; mode 3 would also mask the appended compressed rows
        out = self.npu.npu_sparse_flash_attention(q.contiguous(), kv4, kv4, packed, softmax_scale, query_rope=q_rope,
                                                  key_rope=k_rope, layout_query="BSND", layout_kv="BSND",
                                                  sparse_mode=0, attention_mode=2, sinks=sink.float())
        return out[0]

    def _zeros(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Zeros of `shape` (like's dtype and device) for an operand the op requires but V4 leaves empty. The last
        few shapes are kept (ZEROS_KEPT): a static decode step reuses the same two every layer and step, where a fresh
        [rows, 64] key part would be filled per layer (1/8 of the KV store's bytes); prefill and eager decode shapes
        churn through the few entries, never holding more than those."""
        key = (shape, like.dtype, str(like.device))
        z = self._zero_parts.pop(key, None)
        if z is None:
            z = like.new_zeros(shape)
            while len(self._zero_parts) >= ZEROS_KEPT:
                self._zero_parts.pop(next(iter(self._zero_parts)))  # the least recently used
        self._zero_parts[key] = z  # (re)inserted last: most recently used
        return z

    def compress_pool(self, kv: Tensor, score: Tensor) -> Tensor:
        # overlap compression (and the pooling itself) has no torch_npu op (V4's compressor is a custom op)
        self._took("compress_pool", "torch")
        return (score.float().softmax(dim=2) * kv.float()).sum(dim=2)

    def _li_fits(self, q: Tensor, k: Tensor, kk: int) -> str | None:
        H, D = q.shape[2], q.shape[3]
        if not self.has("npu_lightning_indexer"):
            return "npu_lightning_indexer not on this chip/release"
        if D != 128:
            return f"lightning indexer needs D = 128, got {D}"
        if q.dtype not in HALF or k.dtype != q.dtype:
            return "lightning indexer takes bf16/fp16 q/k"
        if (H not in A5_INDEXER_HEADS) if self.chip in FP8_CHIPS else not 1 <= H <= 64:
            return f"{H} indexer heads unsupported on {self.chip}"
        if not _valid_sparse_count(kk):
            return f"top-k {kk} outside the op's sparse_count range"
        return None

    def indexer_topk(self, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int) -> Tensor:
        B, S, H, D = q.shape
        T = k.shape[1]
        kk = min(topk, T)
        if kk == 0:
            self._took("indexer_topk", "empty")
            return torch.full((B, S, 0), -1, dtype=torch.long, device=q.device)
        why = self._li_fits(q, k, kk)
        if why is not None:
            self._took("indexer_topk", f"torch ({why})")
            return self._torch.indexer_topk(q, k, weights, visible, kk)
        self._took("indexer_topk", "npu_lightning_indexer (TND query, paged key)")
        # the op's causal modes do not express "query (b,s) sees keys t < visible[b,s]"; a paged key with one
        # "batch" per query does: every query's block_table row points at its batch's key blocks and its kv length
        # is visible[b,s] (the decode-style call vllm-ascend makes)
        nblk = -(-T // LI_BLOCK)
        dev = q.device
        # no pad where the key length is whole blocks already (a decode bucket's capacity)
        padded = k if T == nblk * LI_BLOCK else F.pad(k, (0, 0, 0, nblk * LI_BLOCK - T))
        cache = padded.reshape(B * nblk, LI_BLOCK, 1, D)
        lens = visible.reshape(-1).clamp(0, T).to(torch.int32)
        if S == 1:  # decode: the block table and query ends hang on (B, nblk) only, bounded by the buckets: kept
            table = self._table(("li_table", B, nblk, str(dev)), lambda: self._li_table(B, 1, nblk, dev))
            cu_q = self._table(("li_cu_q", B, str(dev)),
                               lambda: torch.arange(1, B + 1, dtype=torch.int32, device=dev))
        else:  # prefill: S varies, and a [B*S, nblk] table is not worth keeping
            table = self._li_table(B, S, nblk, dev)
            cu_q = torch.arange(1, B * S + 1, dtype=torch.int32, device=dev)
        # doc: weights "数据类型支持bfloat16和float16" on every chip: V4's fp32 head weights go in as q's dtype
        # (scores then differ from fp32 ones by ~1e-3 relative; only near-ties of the top-k can move)
        # doc: query / key / weights must be contiguous
        w = weights.reshape(B * S, H).to(q.dtype).contiguous()
        idx, _ = self.npu.npu_lightning_indexer(q.reshape(B * S, H, D).contiguous(), cache.contiguous(), w,
                                                actual_seq_lengths_query=cu_q,
                                                actual_seq_lengths_key=lens, block_table=table, layout_query="TND",
                                                layout_key="PA_BSND", sparse_count=kk, sparse_mode=0)
        return idx[:, 0, :kk].long().view(B, S, kk)

    @staticmethod
    def _li_table(B: int, S: int, nblk: int, device: torch.device) -> Tensor:
        """[B*S, nblk] int32 block table: query (b, s) reads key blocks b*nblk .. b*nblk + nblk - 1 (its batch's)."""
        table = (torch.arange(B, device=device) * nblk).unsqueeze(1) + torch.arange(nblk, device=device)
        return table.repeat_interleave(S, dim=0).to(torch.int32)

    # -- hyper-connections ------------------------------------------------------------------------------------------
    def _mhc_fits(self, x: Tensor) -> str | None:
        if not (self.has("npu_mhc_pre") and self.has("npu_mhc_sinkhorn") and self.has("npu_mhc_post")):
            return "npu_mhc_* are 950-only"
        n, D = x.shape[-2], x.shape[-1]
        if x.dtype not in HALF:
            return "npu_mhc_* take bf16/fp16"
        if n not in (4, 6, 8) or D % 16 or D > 16384:
            return f"n={n}, D={D} outside the op's n in {{4,6,8}}, 16-aligned D <= 16384"
        return None

    def hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float,
               norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        why = self._mhc_fits(x)
        if why is None:
            self._took("hc_pre", "npu_mhc_pre + npu_mhc_sinkhorn")
            h_in, post, res = self.npu.npu_mhc_pre(x, fn.float(), scale.float(), base.float(), norm_eps=norm_eps,
                                                   hc_eps=hc_eps)[:3]
            # schema: three outputs (the doc says one); with out_flag 0 the first is the doubly stochastic matrix
            return h_in, post, self.npu.npu_mhc_sinkhorn(res, eps=hc_eps, num_iters=iters)[0]
        custom = custom_op("_C_ascend", "npu_hc_pre_v2") if self.use_custom_ops else None
        if custom is not None:  # vllm-ascend's A2/A3 kernel; output order assumed (y, post, comb): unverified
            self._took("hc_pre", "torch.ops._C_ascend.npu_hc_pre_v2")
            out = custom(x, fn, scale, base, x.shape[-2], iters, norm_eps, hc_eps)
            return out[0], out[1], out[2]
        # A2/A3 have no mHC op and no Sinkhorn op: composed in torch
        self._took("hc_pre", f"torch ({why})")
        return self._torch.hc_pre(x, fn, scale, base, iters, hc_eps, norm_eps)

    def hc_post(self, x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        why = self._mhc_fits(residual)
        if why is None and x.dtype == residual.dtype:
            self._took("hc_post", "npu_mhc_post")
            return self.npu.npu_mhc_post(residual, comb.float(), x, post.float())
        self._took("hc_post", f"torch ({why or 'mixed dtypes'})")
        return self._torch.hc_post(x, residual, post, comb)

    def hc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_eps: float, norm_eps: float) -> Tensor:
        why = self._mhc_fits(x)
        if why is None:
            # the head collapse is mhc_pre's h_in alone: pad phi/bias with zero post/res rows, alpha = [s0, 0, 0]
            n = x.shape[-2]
            phi = torch.cat([fn.float(), fn.new_zeros(n * n + n, fn.shape[1], dtype=torch.float32)])
            bias = torch.cat([base.float(), base.new_zeros(n * n + n, dtype=torch.float32)])
            alpha = torch.cat([scale.float().reshape(1), scale.new_zeros(2, dtype=torch.float32)])
            self._took("hc_head", "npu_mhc_pre (zero-padded post/res rows)")
            return self.npu.npu_mhc_pre(x, phi, alpha, bias, norm_eps=norm_eps, hc_eps=hc_eps)[0]
        self._took("hc_head", f"torch ({why})")
        return self._torch.hc_head(x, fn, scale, base, hc_eps, norm_eps)

    # ------------------------------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        c = self.chip
        a5 = c in FP8_CHIPS

        def fused(op: str, text: str, fallback: str) -> str:
            return text if self.has(op) else f"torch ({fallback}: {op} not on {c} per its 2.14.0 doc)"

        if self.weights == "bf16":
            lin = "bf16 dequantised weights, torch matmul"
        elif self.fp8_native and self.has("npu_dynamic_mx_quant") and self.has("npu_quant_matmul"):
            lin = ("npu_dynamic_mx_quant FP8 activation (scale_alg 1, ue8m0 scale as fp32 per token per 128) + "
                   "npu_quant_matmul FP8 G-B (group_sizes [1,128,128], the weight's 128x128 block scale) for 2-D "
                   "weights with 128-multiple K and N; else the fused activation quantisation + torch GEMM")
        elif self.fp8_native:
            lin = "torch FP8-simulated GEMM (npu_dynamic_mx_quant / npu_quant_matmul not present)"
        else:
            lin = fused("npu_dynamic_quant", "W8A8: npu_dynamic_quant + npu_quant_matmul (FP8/FP4 weights converted "
                        "to int8)", "W8A8 composed")
        if not self.has("npu_moe_init_routing_v2"):
            moe = "torch reference experts (npu_moe_init_routing_v2 not present on " + c + ")"
        else:
            if not self.has("npu_grouped_matmul"):
                gemm = "one npu_quant_matmul per expert (grouped GEMM: A2 by its doc, 950 by the wheel's code)"
            elif a5 and self.weights == "auto":
                gemm = ("npu_dynamic_mx_quant + npu_grouped_matmul MX FP8 (experts as e4m3 with per-32 e8m0 "
                        "scales, exact from FP4; the wheel's meta, not its docstring)")
            else:
                gemm = "npu_grouped_matmul (" + ("weight-only int4" if self.weights == "auto" and c == "910b" else
                                                 "per-token W8A8" if self.weights != "bf16" else "bf16") + ")"
            moe = (f"npu_moe_init_routing_v2 (local ids + one spare id, static T*k rows) -> {gemm} -> swiglu -> " +
                   ("spare rows masked, no host read -> " if self.has("npu_grouped_matmul") else
                    "one host read of the counts -> ") +
                   ("npu_moe_finalize_routing (k given, slot-major index)" if self.has("npu_moe_finalize_routing")
                    else "torch un-permute (finalize_routing: A2 by its doc, 950 by the wheel's code)") +
                   ("; fp32 activations: torch, one gathered expert per pair" if a5 else ""))
        plan = {
            "rms_norm": fused("npu_rms_norm", "npu_rms_norm on x in its dtype with the fp32 gamma (mixed form)",
                              "composed"),
            "head_rms_norm": "torch in the activation dtype (as the official bf16 code); npu_rms_norm for fp32",
            "rope": fused("npu_rotary_mul", "npu_rotary_mul(interleave), fp32, batch viewed as [1, B*S, H, r] with "
                          "1S1D cos/sin", "full-width tables prepared once per step (prepare_rope)"),
            "fp8_sim": ("npu_dynamic_mx_quant (e4m3, scale_alg 1) + " +
                        ("npu_anti_mx_quant (per-32 scales expanded by views)" if self.has("npu_anti_mx_quant") else
                         "torch dequantise") + " for bf16/fp16 in e4m3 mode; torch otherwise"
                        if self.has("npu_dynamic_mx_quant") else
                        "torch: QAT simulation, arithmetic e4m3 rounding (no FP8 dtype on A2/A3)"),
            "fp4_sim": ("npu_dynamic_mx_quant (e2m1, scale_alg 2, dst_type_max 6 + 2^-21) + npu_anti_mx_quant for "
                        "bf16 in 32-blocks (blocks of amax < 6 * 2^-126 differ); torch otherwise"
                        if self.has("npu_dynamic_mx_quant") and self.has("npu_anti_mx_quant") else
                        "torch: QAT simulation (no torch_npu op)"),
            "hadamard": "torch matmul with H_n (no torch_npu op)",
            "linear": lin + "; fp32 activations: torch with the same math",
            "grouped_linear": "torch bmm over the groups (wo_a; a dense weight)",
            "linears": ("weights sharing one input: the activation quantised once for all of them when each takes "
                        "the same quantised GEMM (FP8 G-B or W8A8), else one linear per weight"),
            "sparse_attention": ("npu_sparse_flash_attention with sinks when head_dim = 512 (zero 64-d rope part) "
                                 "and bf16/fp16, else torch" if a5 and self.has("npu_sparse_flash_attention") else
                                 "torch: sinks only on the 950 SFA (op-plugin docs)"),
            "compress_pool": "torch: no compressor op in torch_npu (custom op in vllm-ascend)",
            "indexer_topk": fused("npu_lightning_indexer", "npu_lightning_indexer (TND, paged key per query, bf16 "
                                  f"weights) when D = 128, bf16/fp16, heads {'in {8,16,24,32,64}' if a5 else '<= 64'}"
                                  "; else torch", "composed"),
            "moe_gate": fused("npu_moe_gating_top_k", "torch for sqrtsoftplus (the op scores softmax/sigmoid only); "
                              "npu_moe_gating_top_k for softmax/sigmoid", "composed"),
            "swiglu": fused("npu_swiglu", "torch clamp (V4's clamp is not npu_clipped_swiglu's) + npu_swiglu",
                            "composed"),
            "moe_experts": moe,
            "hc_pre": ("npu_mhc_pre + npu_mhc_sinkhorn (bf16/fp16)" if self.has("npu_mhc_pre") else
                       "torch: no mHC/Sinkhorn op on A2/A3" +
                       (" (custom npu_hc_pre_v2 enabled)" if self.use_custom_ops else "")),
            "hc_post": "npu_mhc_post (bf16/fp16)" if self.has("npu_mhc_post") else "torch: no mHC op on A2/A3",
            "hc_head": ("npu_mhc_pre with zero-padded post/res rows" if self.has("npu_mhc_pre") else
                        "torch: no mHC op on A2/A3"),
        }
        plan["indexer_scores"] = "torch (inherited composition: the lightning indexer returns indices, not scores)"
        known = "" if release_supported(self.release) else f", torch_npu {self.release} unsupported: 2.14.0 table"
        tag = f" [chip {c}{', emulated' if self.emulated else ''}{known}]"
        return {op: plan[op] + tag for op in OP_NAMES + ["indexer_scores"]}
