"""CUDA backend kernels vs ReferenceOps.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET=1 must be in the environment
before the first `@triton.jit` decorator runs, so it is set here before any kernel module is imported (imports stay
inside this module). With a GPU the same tests run compiled on "cuda", and `TestOnGPU` adds bf16 checks.

Tolerances. fp32 runs: kernels and reference do the same fp32 arithmetic in a different order (blocked dots, online
softmax), so they differ by reassociation only: at most ~K * 2^-24 relative for a K-term sum (K <= 512 here:
3e-5), observed <= 1e-6; we assert rtol = atol = 3e-5. The FP8/FP4 paths quantise with the same torch formula,
so the codes are identical and only the fp32 sums reassociate. bf16 runs (GPU): one bf16 rounding of the output
(2^-8 relative) plus bf16 P in attention: rtol = atol = 2e-2.
"""

from __future__ import annotations

import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit runs (kernel modules are imported below)

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it

from dsv4.common.model.ops import OP_NAMES, LinearWeight  # noqa: E402
from dsv4.common.model.quant import quantize_fp4, quantize_fp8  # noqa: E402
from dsv4.common.model.reference import ReferenceOps  # noqa: E402
from dsv4.cuda import create_ops, probe  # noqa: E402

DEV = "cuda" if GPU else "cpu"
RTOL = ATOL = 3e-5


@pytest.fixture(scope="module")
def ops():
    return create_ops(DEV, interpret=not GPU)


@pytest.fixture(scope="module")
def ref():
    return ReferenceOps(DEV)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rnd(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(DEV)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True)


# -- backend contract --------------------------------------------------------------------------------------------------
def test_probe_and_describe(ops):
    ok, reason = probe(DEV)
    assert reason
    if not GPU:
        assert not ok and reason.startswith("no CUDA GPU")
    desc = ops.describe()
    assert set(desc) == set(OP_NAMES)
    assert all(("Triton" in v) or ("fallback" in v) for v in desc.values())


# -- row-wise kernels --------------------------------------------------------------------------------------------------
def test_rms_norm_ragged(ops, ref):
    x = rnd(3, 5, 200)  # 15 rows, 200 columns: both edges masked
    w = rnd(200, seed=1).abs()
    close(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    q = rnd(2, 3, 5, 96, seed=2)
    close(ops.head_rms_norm(q, 1e-6), ref.head_rms_norm(q, 1e-6))


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_strided_tail(ops, ref, inverse):
    q = rnd(2, 3, 5, 128)
    tail = q[..., 64:]  # a non-contiguous view, as the model rotates the last 64 dims
    cos, sin = rnd(1, 3, 32, seed=1), rnd(1, 3, 32, seed=2)  # broadcast over the batch
    close(ops.rope(tail, cos.expand(2, 3, 32), sin.expand(2, 3, 32), inverse),
          ref.rope(tail, cos.expand(2, 3, 32), sin.expand(2, 3, 32), inverse))
    angle = rnd(2, 3, 32, seed=3)
    back = ops.rope(ops.rope(tail, angle.cos(), angle.sin()), angle.cos(), angle.sin(), inverse=True)
    close(back, tail.contiguous(), atol=1e-5)  # the inverse undoes the forward rotation


@pytest.mark.parametrize("limit", [0.0, 2.5])
def test_swiglu(ops, ref, limit):
    g, u = rnd(7, 33, scale=4.0), rnd(7, 33, seed=1, scale=4.0)
    close(ops.swiglu(g, u, limit), ref.swiglu(g, u, limit))


# -- compressor pooling ------------------------------------------------------------------------------------------------
def test_compress_pool_with_absent_tokens(ops, ref):
    kv, sc = rnd(2, 7, 8, 96), rnd(2, 7, 8, 96, seed=1)
    sc[:, 0, :4, :48] = float("-inf")  # the overlap layout's first block: no look-back tokens
    kv[:, 0, :4, :48] = 0.0
    close(ops.compress_pool(kv, sc), ref.compress_pool(kv, sc))
    kv3, sc3 = rnd(1, 3, 5, 20, seed=2), rnd(1, 3, 5, 20, seed=3)  # L and c not powers of two
    close(ops.compress_pool(kv3, sc3), ref.compress_pool(kv3, sc3))


# -- sparse attention --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S,H,D,K", [(3, 5, 96, 37), (1, 4, 128, 200)])  # prefill-like ragged / decode
def test_sparse_attention(ops, ref, S, H, D, K):
    B, N = 2, 150
    q, kv = rnd(B, S, H, D), rnd(B, N, D, seed=1)
    sink = rnd(H, seed=2) * 3
    idx = torch.randint(-1, N, (B, S, K), generator=_g(3)).to(DEV)
    idx[0, 0] = -1  # a query with no entry at all: zeros
    idx[1, -1, : K // 2] = 7  # duplicate indices count every time (as in the reference's gather)
    scale = D ** -0.5
    out = ops.sparse_attention(q, kv, sink, idx, scale)
    close(out, ref.sparse_attention(q, kv, sink, idx, scale))
    assert torch.all(out[0, 0] == 0)


def test_sparse_attention_dominant_sink(ops, ref):
    q, kv = rnd(1, 2, 4, 64), rnd(1, 10, 64, seed=1)
    sink = torch.tensor([50.0, -50.0, 0.0, 80.0], device=DEV)  # large sinks must not overflow (max starts there)
    idx = torch.arange(10, device=DEV).expand(1, 2, 10).contiguous()
    close(ops.sparse_attention(q, kv, sink, idx, 0.125), ref.sparse_attention(q, kv, sink, idx, 0.125))


# -- indexer -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [4, 16])  # 16 > T = 9: min(topk, T) columns
def test_indexer_topk(ops, ref, topk):
    B, S, H, Di, T = 2, 6, 4, 128, 9
    q, k, w = rnd(B, S, H, Di), rnd(B, T, Di, seed=1), rnd(B, S, H, seed=2)
    vis = torch.tensor([[0, 1, 2, 3, 9, 9], [2, 2, 5, 5, 8, 9]], device=DEV)
    got, want = ops.indexer_topk(q, k, w, vis, topk), ref.indexer_topk(q, k, w, vis, topk)
    assert got.shape == want.shape == (B, S, min(topk, T)) and got.dtype == torch.long
    assert torch.equal(got < 0, want < 0)  # the same number of visible picks per query
    assert bool((got < vis[..., None]).all() | (got < 0).all())
    # ties (relu zeros) may pick different keys: compare the multiset of picked scores
    dots = torch.einsum("bshd,btd->bsht", q, k).relu()
    score = torch.einsum("bsht,bsh->bst", dots, w)
    pick = lambda ix: torch.where(ix >= 0, score.gather(-1, ix.clamp(min=0)), 0.0).sort(-1).values  # noqa: E731
    close(pick(got), pick(want))


# -- GEMMs -------------------------------------------------------------------------------------------------------------
def _weights(w: torch.Tensor, fmt: str) -> LinearWeight:
    if fmt == "fp8":
        return LinearWeight(*quantize_fp8(w.cpu()), "fp8")
    if fmt == "fp4":
        return LinearWeight(*quantize_fp4(w.cpu()), "fp4")
    return LinearWeight(w.cpu(), None, "none")


def _to(w: LinearWeight) -> LinearWeight:
    return LinearWeight(w.weight.to(DEV), None if w.scale is None else w.scale.to(DEV), w.fmt)


@pytest.mark.parametrize("fmt", ["none", "fp8", "fp4"])
def test_linear(ops, ref, fmt):
    x = rnd(2, 5, 256)  # M = 10 rows of a 64-row block; K = 2 activation blocks
    w = _to(_weights(rnd(200, 256, seed=1, scale=0.05), fmt))  # N = 200: a partial 128 block (FP8 scale edge)
    close(ops.linear(x, w), ref.linear(x, w))


def test_linear_unaligned_k(ops, ref):
    x, w = rnd(3, 72), rnd(40, 72, seed=1)  # unquantised weights allow any K
    lw = LinearWeight(w, None, "none")
    close(ops.linear(x, lw), ref.linear(x, lw))


@pytest.mark.parametrize("fmt", ["none", "fp8", "fp4"])
def test_moe_experts(ops, ref, fmt):
    T, d, inter, E, k = 13, 256, 128, 6, 2
    x = rnd(T, d)
    ids = torch.randint(0, 8, (T, k), generator=_g(1))
    ids[:, 1] = (ids[:, 0] + 1) % 8
    ids[ids == 3] = 4  # global expert 3 (local 2) receives no token
    ids, wts = ids.to(DEV), torch.rand(T, k, generator=_g(2)).to(DEV)
    w1, w3, w2 = (_to(_weights(rnd(E, *s, seed=i, scale=0.05), fmt))
                  for i, s in enumerate([(inter, d), (inter, d), (d, inter)], start=3))
    # this "rank" holds experts 1..6: ids 0 and 7 contribute nothing; limit 0.3 makes the clamp bite
    got = ops.moe_experts(x, wts, ids, w1, w2, w3, 0.3, expert_offset=1)
    close(got, ref.moe_experts(x, wts, ids, w1, w2, w3, 0.3, expert_offset=1))
    assert got.dtype == torch.float32


def test_moe_all_tokens_elsewhere(ops, ref):
    x, ids, wts = rnd(4, 128), torch.full((4, 2), 9, device=DEV), torch.ones(4, 2, device=DEV)
    w = LinearWeight(rnd(2, 128, 128, scale=0.1), None, "none")
    assert torch.all(ops.moe_experts(x, wts, ids, w, w, w, 0.0) == 0)


# -- hyper-connections -------------------------------------------------------------------------------------------------
def test_hc_pre_post_head(ops, ref):
    B, S, n, d = 2, 5, 4, 96
    X = rnd(B, S, n, d)
    fn, scale, base = rnd(24, n * d, seed=1, scale=0.1), rnd(3, seed=2).abs(), rnd(24, seed=3)
    got, want = ops.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6), ref.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6)
    for a, b in zip(got, want, strict=True):
        close(a, b)
    fnh = rnd(n, n * d, seed=4, scale=0.1)
    close(ops.hc_head(X, fnh, scale[:1], base[:n], 1e-6, 1e-6), ref.hc_head(X, fnh, scale[:1], base[:n], 1e-6, 1e-6))
    x = rnd(B, S, d, seed=5)
    close(ops.hc_post(x, X, want[1], want[2]), ref.hc_post(x, X, want[1], want[2]))


# -- the whole tiny model ----------------------------------------------------------------------------------------------
def test_tiny_model_logits(ops, ref):
    """Full tiny-model logits (dequantised fp32 weights) through the Triton kernels vs the reference.
    Two discontinuities are kept out of the comparison, each checked on its own instead:
    - the indexer's top-k among exactly tied scores (relu zeros) is arbitrary, and the two torch.topk calls break
      ties differently: the CUDA run checks its picks score like the reference's, then continues with the
      reference's indices;
    - quantised weights: FP8 activation quantisation turns 1e-7 relative noise (even the reference vs itself with
      reordered sums) into O(1) logit changes, so that model is compared op by op (next test)."""
    model_mod = pytest.importorskip("dsv4.common.checkpoint.load")
    from dsv4.common.model.config import load_named_config

    args = load_named_config("tiny")
    # 80 tokens: 20 CSA entries > index_topk 16 (the top-k really selects); no HCA entry yet (ratio 128)
    tok = torch.randint(0, args.vocab_size, (1, 80), generator=_g(7)).to(DEV)
    model = model_mod.build_random_model(args, ref, torch.float32, seed=0)
    want = model(tok)

    class SameTies(type(ops)):
        def indexer_topk(self, q, k, weights, visible, topk):
            got = super().indexer_topk(q, k, weights, visible, topk)
            exp = ref.indexer_topk(q, k, weights, visible, topk)
            score = torch.einsum("bsht,bsh->bst", torch.einsum("bshd,btd->bsht", q, k).relu(), weights)
            pick = lambda ix: torch.where(ix >= 0, score.gather(-1, ix.clamp(min=0)), 0.0).sort(-1).values  # noqa: E731
            close(pick(got), pick(exp), rtol=1e-4, atol=1e-4)
            return exp

    model.ops = SameTies(ops.device)
    close(model(tok), want, rtol=1e-4, atol=1e-4)  # 4 layers of fp32 reassociation noise on O(1) logits


def test_tiny_model_quantized_op_by_op(ops, ref):
    """Quantised weights (FP8 linears, FP4 experts): every op call of a forward, fed the reference's inputs,
    returns the reference's result."""
    model_mod = pytest.importorskip("dsv4.common.checkpoint.load")
    from dsv4.common.model.config import load_named_config

    args = load_named_config("tiny")
    seen: dict[str, float] = {}

    class Both(ReferenceOps):
        pass

    def both(name):
        def call(*a, **kw):
            r, c = getattr(ref, name)(*a, **kw), getattr(ops, name)(*a, **kw)
            for x, y in zip(r if isinstance(r, tuple) else (r,), c if isinstance(c, tuple) else (c,), strict=True):
                if name == "indexer_topk":
                    assert torch.equal(x < 0, y < 0)
                    continue
                close(y, x, rtol=1e-4, atol=1e-4)
            seen[name] = seen.get(name, 0) + 1
            return r
        return call

    spy = Both(DEV)
    for name in OP_NAMES:
        setattr(spy, name, both(name))
    model = model_mod.build_random_model(args, spy, torch.float32, seed=0, weights="quantized")
    model(torch.randint(0, args.vocab_size, (1, 24), generator=_g(8)).to(DEV))
    assert {"linear", "moe_experts", "sparse_attention", "hc_pre", "compress_pool", "indexer_topk"} <= set(seen)


# -- real GPU: the same kernels compiled, bf16 included ----------------------------------------------------------------
@pytest.mark.cuda
class TestOnGPU:
    BF = dict(rtol=2e-2, atol=2e-2)

    @pytest.fixture(autouse=True)
    def _need_gpu(self):
        ok, reason = probe("cuda")
        if not ok:
            pytest.skip(reason if reason.startswith("no CUDA GPU") else f"no CUDA GPU: {reason}")

    def test_bf16_rows_and_attention(self, ops, ref):
        x = rnd(9, 300).bfloat16()
        w = rnd(300, seed=1).abs()
        close(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), **self.BF)
        q, kv = rnd(2, 3, 64, 512).bfloat16(), rnd(2, 700, 512, seed=1).bfloat16()
        idx = torch.randint(-1, 700, (2, 3, 640), generator=_g(2)).to(DEV)
        sink = rnd(64, seed=3)
        close(ops.sparse_attention(q, kv, sink, idx, 512 ** -0.5), ref.sparse_attention(q, kv, sink, idx, 512 ** -0.5),
              **self.BF)

    @pytest.mark.parametrize("fmt", ["none", "fp8", "fp4"])
    def test_bf16_linear_and_moe(self, ops, ref, fmt):
        x = rnd(70, 512).bfloat16()
        w = _to(_weights(rnd(384, 512, seed=1, scale=0.05), fmt))
        if fmt == "none":
            w = LinearWeight(w.weight.bfloat16(), None, "none")
        close(ops.linear(x, w), ref.linear(x, w), **self.BF)
        ids = torch.randint(0, 8, (70, 2), generator=_g(4)).to(DEV)
        ids[:, 1] = (ids[:, 0] + 3) % 8
        wts = torch.rand(70, 2, generator=_g(5)).to(DEV)
        w1, w3, w2 = (_to(_weights(rnd(8, *s, seed=i, scale=0.05), fmt))
                      for i, s in enumerate([(256, 512), (256, 512), (512, 256)], start=6))
        close(ops.moe_experts(x, wts, ids, w1, w2, w3, 10.0), ref.moe_experts(x, wts, ids, w1, w2, w3, 10.0),
              **self.BF)

    def test_bf16_hc_and_indexer(self, ops, ref):
        X = rnd(2, 7, 4, 256).bfloat16()
        fn, scale, base = rnd(24, 1024, seed=1, scale=0.1), rnd(3, seed=2).abs(), rnd(24, seed=3)
        got, want = ops.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6), ref.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6)
        for a, b in zip(got, want, strict=True):
            close(a, b, **self.BF)
        q, k, w = rnd(1, 4, 64, 128).bfloat16(), rnd(1, 300, 128, seed=1).bfloat16(), rnd(1, 4, 64, seed=2)
        vis = torch.tensor([[10, 100, 299, 300]], device=DEV)
        got, want = ops.indexer_topk(q, k, w, vis, 64), ref.indexer_topk(q, k, w, vis, 64)
        assert torch.equal(got < 0, want < 0)
