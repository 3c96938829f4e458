"""Every AscendOps op (emulate=True, i.e. through the emulated torch_npu operators) against ReferenceOps.

fp32: tight (atol ~1e-5) wherever the two compute the same formula. bf16: each looser tolerance is justified where
it is set. `last_path` is asserted so each test knows whether the fused op or the composition ran.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4.ascend import create_ops
from dsv4.ascend.convert import dequant_any, to_w4a8
from dsv4.common.model.ops import LinearWeight
from dsv4.common.model.quant import quantize_fp4, quantize_fp8
from dsv4.common.model.reference import ReferenceOps

REF = ReferenceOps()
BF16_ULP = 2.0 ** -8  # relative spacing of bf16 (8 significant bits)


def ops_for(chip: str = "950dt", **kw):
    return create_ops(emulate=True, chip=chip, **kw)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


# -- normalisation and rope ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("chip", ["950dt", "910b"])
def test_rms_norm(chip):
    ops = ops_for(chip)
    x, w = randn(3, 5, 256), randn(256, seed=1)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    assert ops.last_path["rms_norm"] == "npu_rms_norm"
    # bf16 x with the fp32 gamma (the op's mixed form): both normalise in fp32 with the same products and round once
    # -> equal bit for bit (a gamma rounded to bf16 first would not be)
    xb = x.bfloat16()
    assert torch.equal(ops.rms_norm(xb, w, 1e-6), REF.rms_norm(xb, w, 1e-6))
    assert ops.last_path["rms_norm"] == "npu_rms_norm"


def test_head_rms_norm():
    ops = ops_for()
    q = randn(2, 3, 4, 128)
    torch.testing.assert_close(ops.head_rms_norm(q, 1e-6), REF.head_rms_norm(q, 1e-6), atol=1e-5, rtol=1e-5)
    assert ops.last_path["head_rms_norm"] == "npu_rms_norm"
    # bf16: computed in bf16 arithmetic like the official code (npu_rms_norm's fp32 math would differ by 1 ulp)
    qb = q.bfloat16()
    assert torch.equal(ops.head_rms_norm(qb, 1e-6), REF.head_rms_norm(qb, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope(dtype, inverse):
    ops = ops_for("910c")
    x = randn(2, 5, 3, 64, dtype=dtype)
    ang = torch.rand(2, 5, 32, generator=gen(2)) * 6
    got = ops.rope(x, ang.cos(), ang.sin(), inverse=inverse)
    assert ops.last_path["rope"] == "npu_rotary_mul(interleave)"
    # the same fp32 products in both, one final rounding: equal up to fp32 rounding of the sum
    torch.testing.assert_close(got.float(), REF.rope(x, ang.cos(), ang.sin(), inverse).float(), atol=1e-6, rtol=1e-6)
    back = ops.rope(ops.rope(x.float(), ang.cos(), ang.sin()), ang.cos(), ang.sin(), inverse=True)
    torch.testing.assert_close(back, x.float(), atol=1e-5, rtol=1e-5)


# -- quantisation simulations --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["e4m3", "clamp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_sim_bit_exact(mode, dtype):
    ops = ops_for("910b")
    # magnitudes from 1e-6 to 1e3 so blocks hit subnormal codes, the 1e-4 amax floor and saturation
    x = randn(4, 256) * torch.exp(torch.rand(4, 256, generator=gen(3)) * 20 - 14)
    x = x.to(dtype)
    assert torch.equal(ops.fp8_sim(x, 64, mode), REF.fp8_sim(x, 64, mode))


def test_fp4_sim_bit_exact_including_ties():
    ops = ops_for()
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.9, 6.0, -0.25, -2.5, -5.0, 0.0, 1e-3, 3.0, 4.0])
    x = torch.cat([ties, -ties]).repeat(4)  # each 32-block has amax 6 -> scale 1, values stay exact ties
    assert torch.equal(ops.fp4_sim(x.view(4, 32), 32), REF.fp4_sim(x.view(4, 32), 32))
    y = randn(3, 128, seed=4) * 7
    assert torch.equal(ops.fp4_sim(y, 32), REF.fp4_sim(y, 32))
    assert torch.equal(ops.fp4_sim(y.bfloat16(), 32), REF.fp4_sim(y.bfloat16(), 32))


def test_hadamard():
    ops = ops_for()
    x = randn(3, 128)
    torch.testing.assert_close(ops.hadamard(x), REF.hadamard(x), atol=1e-5, rtol=1e-5)


# -- linear ------------------------------------------------------------------------------------------------------------
def fp8_weight(out=256, inp=256, seed=5):
    q, s = quantize_fp8(randn(out, inp, seed=seed) * 0.05)
    return LinearWeight(q, s, "fp8")


def fp4_weight(*lead, out=256, inp=256, seed=6):
    q, s = quantize_fp4(randn(*lead, out, inp, seed=seed) * 0.05)
    return LinearWeight(q, s, "fp4")


def test_linear_dense_exact():
    ops = ops_for()
    x, w = randn(7, 3, 256), LinearWeight(randn(128, 256, seed=1), None, "none")
    assert torch.equal(ops.linear(x, w), REF.linear(x, w))


@pytest.mark.parametrize("make", [fp8_weight, fp4_weight])
def test_linear_fp8_path_on_950(make):
    ops = ops_for("950dt")
    w = make()
    x = randn(5, 3, 256, seed=7)  # 15 tokens: not a multiple of any block
    torch.testing.assert_close(ops.linear(x, w), REF.linear(x, w), atol=1e-5, rtol=1e-5)
    assert ops.last_path["linear"].startswith("torch FP8-simulated")  # fp32 activations: the op wants bf16/fp16
    yb = ops.linear(x.bfloat16(), w)
    # 950: npu_quant_matmul's FP8 G-B form (the 2.14.0 wheel's meta + TorchAir converter), the activation quantised
    # per token per 128 of K by the fused MX op: the reference's FP8 codes and scales, the same products summed in
    # another order, rounded once to bf16 -> at most 1 ulp of the output magnitude
    assert ops.last_path["linear"].startswith("npu_dynamic_mx_quant + npu_quant_matmul (FP8 G-B")
    ref = REF.linear(x.bfloat16(), w).float()
    torch.testing.assert_close(yb.float(), ref, rtol=BF16_ULP, atol=BF16_ULP * ref.abs().max().item())


def block_varying_fp8_weight(out: int, inp: int, seed: int = 11) -> LinearWeight:
    """An FP8 weight whose 128x128 blocks all have different scales (a magnitude per block spread over 2^-6..2^6),
    so a block scale read in the wrong layout changes the output (N(0, 1) weights give most blocks one scale)."""
    g = torch.Generator().manual_seed(seed)
    R, C = -(-out // 128), -(-inp // 128)
    mag = torch.exp2(torch.linspace(-6, 6, R * C)[torch.randperm(R * C, generator=g)]).view(R, C)
    full = mag.repeat_interleave(128, 0).repeat_interleave(128, 1)[:out, :inp]
    q, s = quantize_fp8(randn(out, inp, seed=seed) * full)
    return LinearWeight(q, s, "fp8")


def test_linear_fp8_gemm_odd_k_blocks_and_fallback_on_950():
    """K = 384 (three 128-blocks: the MX scale's even padding is dropped) takes the G-B form, for square and
    non-square block grids; N = 200 (a partial weight block) is not run on it and takes the fused activation
    quantisation + torch GEMM. All within 1 bf16 ulp of the output magnitude (same FP8 codes and scales as the
    reference, one bf16 rounding)."""
    ops = ops_for("950dt")
    x = randn(4, 384, seed=9).bfloat16()
    for w, path in ((block_varying_fp8_weight(256, 384), "npu_dynamic_mx_quant + npu_quant_matmul (FP8 G-B"),
                    (block_varying_fp8_weight(384, 384), "npu_dynamic_mx_quant + npu_quant_matmul (FP8 G-B"),
                    (block_varying_fp8_weight(200, 384), "npu_dynamic_mx_quant activation + torch GEMM (weight")):
        y = ops.linear(x, w).float()
        assert ops.last_path["linear"].startswith(path), ops.last_path["linear"]
        ref = REF.linear(x, w).float()
        torch.testing.assert_close(y, ref, rtol=BF16_ULP, atol=BF16_ULP * ref.abs().max().item())


def test_linear_w8a8_on_910b():
    ops = ops_for("910b")
    w = fp8_weight()
    x = randn(9, 256, seed=8).bfloat16()
    y = ops.linear(x, w).float()
    assert ops.last_path["linear"] == "npu_dynamic_quant + npu_quant_matmul (W8A8)"
    conv = ops.native_weight(w)
    assert conv.fmt == "w8a8" and conv.weight.dtype == torch.int8 and conv.scale.shape == (256,)
    # by hand: per-token int8 activations (amax/127), per-channel int8 weights
    xs = x.float().abs().amax(-1, keepdim=True) / 127
    want = (torch.round(x.float() / xs) * xs) @ (conv.weight.float() * conv.scale[:, None]).t()
    torch.testing.assert_close(y, want, rtol=BF16_ULP, atol=BF16_ULP * want.abs().max().item())
    # vs the FP8 reference: dominated by the reference's own e4m3 activation rounding (3 mantissa bits, ~2.5% RMS
    # relative); int8 activations / weights add < 1%
    ref = REF.linear(x, w).float()
    assert ((y - ref).square().mean().sqrt() / ref.square().mean().sqrt()) < 4e-2
    # fp32 activations take the torch composition of the same math
    y32 = ops.linear(x.float(), w)
    assert "torch W8A8" in ops.last_path["linear"]
    torch.testing.assert_close(y32, want, atol=1e-4, rtol=1e-4)


# -- attention ---------------------------------------------------------------------------------------------------------
def attn_inputs(D, dtype, seed=9, B=2, S=5, H=4, N=11, K=6):
    q = randn(B, S, H, D, seed=seed, dtype=dtype)
    kv = randn(B, N, D, seed=seed + 1, dtype=dtype)
    sink = randn(H, seed=seed + 2)
    idx = torch.randint(0, N, (B, S, K), generator=gen(seed + 3))
    idx[torch.rand(B, S, K, generator=gen(seed + 4)) < 0.3] = -1  # -1 anywhere, not only at the end
    idx[0, 0] = -1  # a query with nothing to attend to -> zeros
    return q, kv, sink, idx


def test_sparse_attention_fp32_composition():
    ops = ops_for()
    q, kv, sink, idx = attn_inputs(128, torch.float32)
    got = ops.sparse_attention(q, kv, sink, idx, 128 ** -0.5)
    assert "512" in ops.last_path["sparse_attention"]  # head_dim 128 does not fit the 512+64 SFA
    torch.testing.assert_close(got, REF.sparse_attention(q, kv, sink, idx, 128 ** -0.5), atol=1e-5, rtol=1e-5)
    assert got[0, 0].abs().sum() == 0


@pytest.mark.parametrize("chip", ["950dt", "910b"])
def test_sparse_attention_bf16_512(chip):
    ops = ops_for(chip)
    q, kv, sink, idx = attn_inputs(512, torch.bfloat16, H=2)
    got = ops.sparse_attention(q, kv, sink, idx, 512 ** -0.5).float()
    if chip == "950dt":
        assert ops.last_path["sparse_attention"].startswith("npu_sparse_flash_attention")
    else:
        assert "sinks" in ops.last_path["sparse_attention"]  # A2/A3 SFA has no sinks -> composition
    # both round P to bf16 before PV; a 1e-7 fp32 difference in P can flip that rounding (one bf16 ulp of P, then
    # summed over <= 6 keys of |kv| <~ 4) plus the output's own bf16 rounding
    ref = REF.sparse_attention(q, kv, sink, idx, 512 ** -0.5).float()
    torch.testing.assert_close(got, ref, atol=6 * 4 * BF16_ULP * 0.5, rtol=BF16_ULP)
    assert got[0, 0].abs().sum() == 0


def test_sparse_attention_keeps_only_a_few_zero_rope_parts():
    # the SFA's zero rope operands are kept per shape (a static step reuses two) but only the last few: eager decode
    # grows the key length every step, and a prefill's shapes vary
    from dsv4.ascend.backend import ZEROS_KEPT
    ops = ops_for("950dt")
    for N in [*range(11, 14 + ZEROS_KEPT), 11]:  # more key lengths than are kept, then the first again
        q, kv, sink, idx = attn_inputs(512, torch.bfloat16, H=2, S=1, N=N)
        got = ops.sparse_attention(q, kv, sink, idx, 512 ** -0.5).float()
        assert ops.last_path["sparse_attention"].startswith("npu_sparse_flash_attention")
        ref = REF.sparse_attention(q, kv, sink, idx, 512 ** -0.5).float()
        torch.testing.assert_close(got, ref, atol=6 * 4 * BF16_ULP * 0.5, rtol=BF16_ULP)
        assert len(ops._zero_parts) <= ZEROS_KEPT
        assert all(z.abs().sum() == 0 for z in ops._zero_parts.values())  # nothing wrote into a kept operand
    kept = dict(ops._zero_parts)
    ops.sparse_attention(q, kv, sink, idx, 512 ** -0.5)  # the same shapes again: the kept operands, no new ones
    assert all(ops._zero_parts[key] is z for key, z in kept.items()) and len(ops._zero_parts) == len(kept)


def test_compress_pool():
    ops = ops_for()
    kv, score = randn(2, 3, 8, 16), randn(2, 3, 8, 16, seed=1)
    score[:, 0, :4] = float("-inf")  # absent tokens
    torch.testing.assert_close(ops.compress_pool(kv, score), REF.compress_pool(kv, score), atol=1e-6, rtol=1e-6)


def sorted_rows(t):
    return t.sort(-1).values


def indexer_inputs(H, dtype, T=12, S=7, B=2, seed=11):
    q = randn(B, S, H, 128, seed=seed, dtype=dtype)
    k = randn(B, T, 128, seed=seed + 1, dtype=dtype)
    w = randn(B, S, H, seed=seed + 2)
    visible = torch.randint(0, T + 1, (B, S), generator=gen(seed + 3))
    visible[0, 0], visible[1, 0] = 0, T  # nothing visible / everything visible
    return q, k, w, visible


@pytest.mark.parametrize("topk", [5, 20])  # 20 > T = 12: top-k larger than the compressed entries
def test_indexer_topk_fp32_composition(topk):
    ops = ops_for("910b")
    q, k, w, vis = indexer_inputs(4, torch.float32)
    got = ops.indexer_topk(q, k, w, vis, topk)
    assert ops.last_path["indexer_topk"].startswith("torch")
    want = REF.indexer_topk(q, k, w, vis, topk)
    assert got.shape == want.shape == (2, 7, min(topk, 12)) and got.dtype == torch.int64
    assert torch.equal(sorted_rows(got), sorted_rows(want))
    assert (got[0, 0] == -1).all()


@pytest.mark.parametrize("chip,heads", [("910b", 4), ("950dt", 8), ("950dt", 4)])
@pytest.mark.parametrize("topk", [5, 20])
def test_indexer_topk_bf16(chip, heads, topk):
    ops = ops_for(chip)
    q, k, w, vis = indexer_inputs(heads, torch.bfloat16)
    got = ops.indexer_topk(q, k, w, vis, topk)
    fused = not (chip == "950dt" and heads == 4)  # 950 indexer takes N1 in {8,16,24,32,64}
    assert ops.last_path["indexer_topk"].startswith("npu_lightning_indexer" if fused else "torch")
    # 950 takes bf16 weights only: the reference gets the same bf16-rounded weights so the selection is exact
    w_ref = w.bfloat16().float() if chip == "950dt" and fused else w
    want = REF.indexer_topk(q, k, w_ref, vis, topk)
    assert torch.equal(sorted_rows(got), sorted_rows(want))


@pytest.mark.parametrize("T", [128, 100])  # whole LI blocks (no pad) and a partial last block
def test_indexer_topk_decode_reuses_its_tables(T):
    # decode (S = 1): the block table and query ends are kept per (B, nblk) and reused by the next call; the result
    # is the reference's selection every time
    ops = ops_for("950dt")
    for seed in (11, 21):
        q, k, w, vis = indexer_inputs(8, torch.bfloat16, T=T, S=1, seed=seed)
        got = ops.indexer_topk(q, k, w, vis, 16)
        assert ops.last_path["indexer_topk"].startswith("npu_lightning_indexer")
        want = REF.indexer_topk(q, k, w.bfloat16().float(), vis, 16)
        assert torch.equal(sorted_rows(got), sorted_rows(want))
    assert [key[0] for key in ops._tables if key[0].startswith("li_")] == ["li_table", "li_cu_q"]


# -- MoE ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "softmax", "sigmoid"])
@pytest.mark.parametrize("hashed", [False, True])
def test_moe_gate(score_func, hashed):
    ops = ops_for("910b")
    x, W, bias = randn(9, 64), randn(8, 64, seed=1) * 0.2, randn(8, seed=2) * 0.1
    tid2eid = torch.stack([torch.randperm(8, generator=gen(i))[:2] for i in range(16)]).int() if hashed else None
    # the model passes token ids to every layer: the op must get input_ids only together with tid2eid (meta check)
    tok = torch.randint(0, 16, (9,), generator=gen(3))
    b = None if hashed else bias
    gw, gi = ops.moe_gate(x, W, b, tid2eid, tok, 2, score_func, 1.5)
    rw, ri = REF.moe_gate(x, W, b, tid2eid, tok, 2, score_func, 1.5)
    fused = score_func != "sqrtsoftplus"
    assert ops.last_path["moe_gate"].startswith("npu_moe_gating_top_k" if fused else "torch")
    assert torch.equal(gi, ri) and gi.dtype == torch.int64
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_swiglu(limit):
    ops = ops_for()
    g, u = randn(6, 32) * 3, randn(6, 32, seed=1) * 3
    torch.testing.assert_close(ops.swiglu(g, u, limit), REF.swiglu(g, u, limit), atol=1e-6, rtol=1e-6)


def moe_case(T=7, k=2, E=4, d=128, inter=128, seed=12):
    x = randn(T, d, seed=seed)
    ids = torch.tensor([[0, 2], [2, 0], [1, 0], [0, 2], [2, 1], [1, 2], [0, 1]])[:T]  # expert 3: no tokens
    w = torch.rand(T, k, generator=gen(seed + 1)) + 0.1
    mk = [LinearWeight(randn(E, inter, d, seed=seed + 2) * 0.1, None, "none"),
          LinearWeight(randn(E, d, inter, seed=seed + 3) * 0.1, None, "none"),
          LinearWeight(randn(E, inter, d, seed=seed + 4) * 0.1, None, "none")]
    return x, w, ids, mk


class HostReads(TorchDispatchMode):
    """Counts host reads the backend itself issues between operators: aten._local_scalar_dense (int(), .item())
    dispatched outside an emulated torch_npu op (an emulated op is one launch: its kernel's own reads stay inside
    it, as they would on the device), and Tensor.tolist(), which reads without dispatching."""

    def __init__(self) -> None:
        super().__init__()
        self.reads, self.inside = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.inside:
            self.reads.append("int()/item()")
        emulated = func.namespace.startswith("dsv4_npu_emul")
        self.inside += emulated
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.inside -= emulated


def count_host_reads(monkeypatch, fn):
    mode = HostReads()
    tolist = torch.Tensor.tolist

    def watched(t):
        if not mode.inside:
            mode.reads.append("tolist()")
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", watched)
    with mode:
        out = fn()
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return out, mode.reads


@pytest.mark.parametrize("chip", ["910b", "910c", "950dt"])
def test_moe_experts_dense(chip, monkeypatch):
    """init_routing_v2 on every chip (950 by the wheel's code); the grouped GEMM and finalize_routing on 910B (doc)
    and 950 (code), 910C loops over experts and un-permutes in torch. Dense weights, bf16 on 950 (its float grouped
    GEMM takes bf16/fp16 only), fp32 elsewhere."""
    ops = ops_for(chip)
    x, w, ids, (w1, w2, w3) = moe_case()
    if chip == "950dt":
        x, w1, w2, w3 = x.bfloat16(), *(LinearWeight(t.weight.bfloat16(), None, "none") for t in (w1, w2, w3))
    got, reads = count_host_reads(monkeypatch, lambda: ops.moe_experts(x, w, ids, w1, w2, w3, 0.5))  # clamp bites
    path = ops.last_path["moe_experts"]
    assert path.startswith("npu_moe_init_routing_v2")
    assert ("finalize" in path) == (chip != "910c") and ("-> per-expert" in path) == (chip == "910c")
    # the fused chips keep the group sizes on the device (the static decode step captures them); 910C's loop reads
    # its counts once
    assert reads == ([] if chip != "910c" else ["tolist()"]), reads
    ref = REF.moe_experts(x, w, ids, w1, w2, w3, 0.5)
    # fp32: the reference's products summed per token in another order -> fp32 noise; bf16: the same products with
    # the same bf16 roundings (GEMM outputs, h) -> one bf16 ulp of the output where a rounding tie breaks otherwise
    tol = 1e-5 if x.dtype == torch.float32 else BF16_ULP
    torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("chip", ["910b", "910c", "950dt"])
def test_moe_experts_all_local_skips_the_spare_expert(chip):
    """n_experts = the experts held (offset 0, no expert parallelism): no spare id, no masking, the same numbers as
    the spare path bit for bit (the same rows in the same groups)."""
    ops = ops_for(chip)
    x, w, ids, (w1, w2, w3) = moe_case()
    if chip == "950dt":
        x, w1, w2, w3 = x.bfloat16(), *(LinearWeight(t.weight.bfloat16(), None, "none") for t in (w1, w2, w3))
    spare = ops.moe_experts(x, w, ids, w1, w2, w3, 0.5)
    got = ops.moe_experts(x, w, ids, w1, w2, w3, 0.5, n_experts=w1.weight.shape[0])
    assert ops.last_path["moe_experts"].startswith("npu_moe_init_routing_v2")
    assert torch.equal(got, spare)
    # and with fewer experts held than routed (expert parallelism) the spare path runs: still the reference's numbers
    held = ops.moe_experts(x, w, ids, w1, w2, w3, 0.5, n_experts=2 * w1.weight.shape[0])
    assert torch.equal(held, spare)


def test_moe_experts_fp32_on_950_takes_the_gathered_form():
    """950's grouped GEMM takes bf16/fp16 rows only: fp32 runs the static gathered torch form (the reference's
    arithmetic, summed in the reference's order)."""
    ops = ops_for("950dt")
    x, w, ids, (w1, w2, w3) = moe_case()
    got = ops.moe_experts(x, w, ids, w1, w2, w3, 0.5)
    assert ops.last_path["moe_experts"].startswith("torch, static shapes")
    torch.testing.assert_close(got, REF.moe_experts(x, w, ids, w1, w2, w3, 0.5), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chip", ["910b", "950dt"])
def test_moe_experts_expert_offset_drops_other_ranks(chip):
    ops = ops_for(chip)
    x, w, ids, (w1, w2, w3) = moe_case(E=4)
    ids = ids + 1  # global ids 1..4; this rank holds experts [2, 4)
    ids[6] = torch.tensor([0, 1])  # a token routed to other ranks' experts only
    dt = torch.bfloat16 if chip == "950dt" else torch.float32  # 950's float grouped GEMM: bf16/fp16
    x, local = x.to(dt), [LinearWeight(t.weight[1:3].to(dt), None, "none") for t in (w1, w2, w3)]
    got = ops.moe_experts(x, w, ids, *local, 10.0, expert_offset=2)
    assert ops.last_path["moe_experts"].startswith("npu_moe_init_routing_v2")
    # the other ranks' pairs sort last: folded into the last group and masked (910B), or outside every group, whose
    # rows the 950 GEMM leaves undefined (NaN in the emulation) and the mask drops: a NaN here is a masking bug
    ref = REF.moe_experts(x, w, ids, *local, 10.0, expert_offset=2)
    tol = 1e-5 if dt == torch.float32 else BF16_ULP  # as in test_moe_experts_dense
    torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=tol)
    assert got[2].abs().sum() > 0 and torch.equal(got[6], torch.zeros(128))
    assert ops.last_path["moe_experts"].startswith("npu_moe_init_routing_v2")


def test_moe_experts_fp4_on_950(monkeypatch):
    ops = ops_for("950dt")
    x, w, ids, _ = moe_case()
    w1, w3 = fp4_weight(4, out=128, inp=128, seed=20), fp4_weight(4, out=128, inp=128, seed=21)
    w2 = fp4_weight(4, out=128, inp=128, seed=22)
    ref = REF.moe_experts(x, w, ids, w1, w2, w3, 10.0)
    # fp32: the static gathered torch form (the grouped GEMM takes bf16/fp16), the reference's arithmetic
    torch.testing.assert_close(ops.moe_experts(x, w, ids, w1, w2, w3, 10.0), ref, atol=1e-6, rtol=1e-6)
    assert ops.last_path["moe_experts"].startswith("torch, static shapes")
    got, reads = count_host_reads(monkeypatch, lambda: ops.moe_experts(x.bfloat16(), w, ids, w1, w2, w3, 10.0))
    assert reads == []
    assert "npu_grouped_matmul (MX FP8" in ops.last_path["moe_experts"]
    refb = REF.moe_experts(x.bfloat16(), w, ids, w1, w2, w3, 10.0)
    # bf16: the reference's FP8 codes and scales for x and h (its per-128 ue8m0 scale handed over as four equal
    # per-32 MX scales), the FP4 weights' own values; the products are exact in fp32, only their summation order
    # differs, and a w1/w3 output or h that then rounds to the other bf16 neighbour moves that h element by one
    # e4m3 step (2^-3 relative) -> bound at 1% of the output scale (measured: bit-equal here)
    assert (got - refb).abs().max() < 1e-2 * refb.abs().max()
    xl, wl, idl = x.repeat(5, 1).bfloat16(), w.repeat(5, 1), ids.repeat(5, 1)  # 70 pairs: the same fused path
    gl, refl = ops.moe_experts(xl, wl, idl, w1, w2, w3, 10.0), REF.moe_experts(xl, wl, idl, w1, w2, w3, 10.0)
    assert "npu_grouped_matmul (MX FP8" in ops.last_path["moe_experts"]
    assert (gl - refl).abs().max() < 1e-2 * refl.abs().max()


def test_moe_experts_on_950_capture_as_one_graph():
    """What the static decode step needs from the fused MoE: torch.compile traces it whole (the emulated ops as one
    operator each, through their meta-derived shape functions) with no graph break, i.e. no host read and no
    data-dependent shape, and the compiled call returns the eager bits."""
    ops = ops_for("950dt")
    x, w, ids, _ = moe_case()
    ws = [fp4_weight(4, out=128, inp=128, seed=s) for s in (20, 22, 21)]  # w1, w2, w3
    xb = x.bfloat16()
    want = ops.moe_experts(xb, w, ids, *ws, 10.0, expert_offset=1)  # converts the weights (eager, once)
    ex = torch._dynamo.explain(ops.moe_experts)(xb, w, ids, *ws, 10.0, expert_offset=1)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [b.reason for b in ex.break_reasons]
    got = torch.compile(ops.moe_experts, backend="aot_eager", fullgraph=True)(xb, w, ids, *ws, 10.0, expert_offset=1)
    assert torch.equal(got, want)


def test_moe_experts_mx_odd_k_blocks_on_950():
    """d = 384 (three 128-blocks: the MX scale's even padding dropped, the weight scale padded) and inter = 256."""
    ops = ops_for("950dt")
    x, w, ids, _ = moe_case(d=384)
    w1, w3 = fp4_weight(4, out=256, inp=384, seed=40), fp4_weight(4, out=256, inp=384, seed=41)
    w2 = fp4_weight(4, out=384, inp=256, seed=42)
    got = ops.moe_experts(x.bfloat16(), w, ids, w1, w2, w3, 10.0)
    assert "npu_grouped_matmul (MX FP8" in ops.last_path["moe_experts"]
    refb = REF.moe_experts(x.bfloat16(), w, ids, w1, w2, w3, 10.0)
    assert (got - refb).abs().max() < 1e-2 * refb.abs().max()  # bf16 bound as in test_moe_experts_fp4_on_950


def test_moe_experts_w4a8_on_910b():
    ops = ops_for("910b")
    x, w, ids, _ = moe_case()
    ws = [fp4_weight(4, out=128, inp=128, seed=s) for s in (30, 31, 32)]
    got = ops.moe_experts(x.bfloat16(), w, ids, *ws, 10.0)
    assert "weight-only int4" in ops.last_path["moe_experts"]
    # exact bookkeeping: the same computation with the converted weights dequantised (the documented W4 form of
    # npu_grouped_matmul keeps the activations in bf16)
    conv = [to_w4a8(t) for t in ws]
    dense = [LinearWeight(dequant_any(c).bfloat16(), None, "none") for c in conv]

    want = REF.moe_experts(x.bfloat16(), w, ids, *dense, 10.0)
    # fp32 scales in `dense` vs the op's bf16 antiquant scales (2^-9 relative per weight), accumulated over K = 128
    # random terms -> 2% of the output scale
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    ref = REF.moe_experts(x.bfloat16(), w, ids, *ws, 10.0)
    # FP4 -> int4 re-quantisation costs ~9% relative RMS per GEMM on random weights (convert.conversion_error);
    # three GEMMs in a chain compound to ~17% here
    assert ((got - ref).square().mean().sqrt() / ref.square().mean().sqrt()) < 0.25


# -- hyper-connections ------------------------------------------------------------------------------------------------
def hc_inputs(dtype, n=4, d=64, seed=13):
    x = randn(2, 3, n, d, seed=seed, dtype=dtype)
    fn = randn((2 + n) * n, n * d, seed=seed + 1) * 0.05
    scale, base = torch.rand(3, generator=gen(seed + 2)) + 0.5, randn((2 + n) * n, seed=seed + 3) * 0.1
    return x, fn, scale, base


@pytest.mark.parametrize("chip", ["950dt", "910b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_pre_post_head(chip, dtype):
    ops = ops_for(chip)
    x, fn, scale, base = hc_inputs(dtype)
    y, post, comb = ops.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    ry, rpost, rcomb = REF.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    fused = chip == "950dt" and dtype == torch.bfloat16  # the mHC ops are 950-only and take bf16/fp16
    assert ops.last_path["hc_pre"].startswith("npu_mhc_pre" if fused else "torch")
    torch.testing.assert_close(post, rpost, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb, rcomb, atol=1e-5, rtol=1e-5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=BF16_ULP)  # one rounding
    torch.testing.assert_close(y.float(), ry.float(), **tol)
    sub = randn(2, 3, 64, seed=3, dtype=dtype)
    got = ops.hc_post(sub, x, post, comb)
    assert ops.last_path["hc_post"].startswith("npu_mhc_post" if fused else "torch")
    torch.testing.assert_close(got.float(), REF.hc_post(sub, x, rpost, rcomb).float(), **tol)
    hfn, hscale, hbase = fn[:4], scale[:1], base[:4]
    got = ops.hc_head(x, hfn, hscale, hbase, 1e-6, 1e-6)
    assert ops.last_path["hc_head"].startswith("npu_mhc_pre" if fused else "torch")
    torch.testing.assert_close(got.float(), REF.hc_head(x, hfn, hscale, hbase, 1e-6, 1e-6).float(), **tol)


def test_every_op_is_overridden_and_described():
    from dsv4.ascend.backend import AscendOps
    from dsv4.common.model.ops import OP_NAMES, Ops

    for name in OP_NAMES:
        assert getattr(AscendOps, name) is not getattr(Ops, name), name
    assert set(ops_for().describe()) >= set(OP_NAMES) | {"indexer_scores"}


def test_indexer_ties_resolve_to_lower_index():
    # all-zero ReLU rows: every score ties at 0; the interface picks the lowest indices, in every path
    q = -torch.ones(1, 2, 8, 128)
    k = torch.ones(1, 10, 128)
    w, vis = torch.ones(1, 2, 8), torch.tensor([[10, 6]])
    want = REF.indexer_topk(q, k, w, vis, 4)
    for chip, dtype in (("910b", torch.float32), ("910b", torch.bfloat16), ("950dt", torch.bfloat16)):
        ops = ops_for(chip)
        got = ops.indexer_topk(q.to(dtype), k.to(dtype), w, vis, 4)
        assert torch.equal(sorted_rows(got), sorted_rows(want)), (chip, dtype, ops.last_path["indexer_topk"])
