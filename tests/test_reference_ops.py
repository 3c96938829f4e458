"""Each reference op against an independent naive implementation written here (explicit loops, scalar math)."""

import math

import pytest
import torch

from dsv4.common.model.ops import LinearWeight
from dsv4.common.model.quant import quantize_fp8
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.model.rope import rope_frequencies

ops = ReferenceOps()
# fp32 vs fp32 loops: only summation order differs, so 1e-5 relative is ample
TOL = dict(rtol=1e-5, atol=1e-5)


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sparse_attention_with_sink_against_loops():
    B, S, H, D, N, K = 2, 3, 2, 8, 10, 5
    q = torch.randn(B, S, H, D, generator=g(1))
    kv = torch.randn(B, N, D, generator=g(2))
    sink = torch.tensor([0.5, -1.0])
    idx = torch.randint(0, N, (B, S, K), generator=g(3))
    idx[0, 0, 2:] = -1  # padded entries
    idx[1, 2, :] = torch.tensor([4, -1, 4, 9, -1])  # duplicates count twice, as in the kernel
    scale = D ** -0.5
    out = ops.sparse_attention(q, kv, sink, idx, scale)
    for b in range(B):
        for s in range(S):
            for h in range(H):
                js = [int(j) for j in idx[b, s] if j >= 0]
                logits = [scale * float(q[b, s, h] @ kv[b, j]) for j in js]
                m = max(logits)
                den = sum(math.exp(v - m) for v in logits) + math.exp(float(sink[h]) - m)
                want = sum(math.exp(v - m) * kv[b, j] for v, j in zip(logits, js, strict=True)) / den
                torch.testing.assert_close(out[b, s, h], want, **TOL)


def test_sparse_attention_all_invalid_gives_zero():
    q, kv = torch.randn(1, 1, 2, 4), torch.randn(1, 3, 4)
    out = ops.sparse_attention(q, kv, torch.zeros(2), torch.full((1, 1, 2), -1), 0.5)
    assert torch.equal(out, torch.zeros_like(out))


def test_compressor_pooling_with_overlap_against_loops():
    """The overlapping ratio-4 pooling over explicit token lists (spec 5.4): entry j pools tokens of block j-1
    through channels [0,c) and of block j through channels [c,2c), softmax per channel over the 8 tokens."""
    m, c, nb = 4, 3, 3
    K = torch.randn(nb * m, 2 * c, generator=g(4))
    Z = torch.randn(nb * m, 2 * c, generator=g(5))
    kb, zb = K.view(nb, m, 2 * c), Z.view(nb, m, 2 * c)
    prev_k = torch.cat([torch.zeros(1, m, 2 * c), kb[:-1]])
    prev_z = torch.cat([torch.full((1, m, 2 * c), float("-inf")), zb[:-1]])
    pooled = ops.compress_pool(torch.cat([prev_k[..., :c], kb[..., c:]], 1)[None],
                               torch.cat([prev_z[..., :c], zb[..., c:]], 1)[None])[0]
    for j in range(nb):
        for ch in range(c):
            toks = []  # (k, z) pairs this channel of entry j pools
            if j > 0:
                toks += [(K[t, ch], Z[t, ch]) for t in range((j - 1) * m, j * m)]
            toks += [(K[t, c + ch], Z[t, c + ch]) for t in range(j * m, (j + 1) * m)]
            zmax = max(float(z) for _, z in toks)
            w = [math.exp(float(z) - zmax) for _, z in toks]
            want = sum(wi * float(k) for wi, (k, _) in zip(w, toks, strict=True)) / sum(w)
            assert abs(float(pooled[j, ch]) - want) < 1e-5


def test_sinkhorn_rows_and_columns_normalised():
    from dsv4.common.model.reference import sinkhorn

    c = torch.randn(5, 4, 4, generator=g(6))
    out = sinkhorn(c, 20, 1e-6)
    for b in range(5):  # scalar loops: softmax over k, then column, then 19 x (row, column)
        m = [[0.0] * 4 for _ in range(4)]
        for j in range(4):
            row = [math.exp(float(c[b, j, k])) for k in range(4)]
            m[j] = [v / sum(row) + 1e-6 for v in row]
        def col(m):
            sums = [sum(m[j][k] for j in range(4)) for k in range(4)]
            return [[m[j][k] / (sums[k] + 1e-6) for k in range(4)] for j in range(4)]
        m = col(m)
        for _ in range(19):
            m = [[v / (sum(r) + 1e-6) for v in r] for r in m]
            m = col(m)
        torch.testing.assert_close(out[b], torch.tensor(m), **TOL)
    # the result is (approximately) doubly stochastic: columns exact after the last step, rows converged
    torch.testing.assert_close(out.sum(-2), torch.ones(5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum(-1), torch.ones(5, 4), atol=1e-2, rtol=0)
    assert (out > 0).all()


def test_hc_pre_post_against_loops():
    B, S, n, d = 1, 2, 4, 8
    x = torch.randn(B, S, n, d, generator=g(7))
    fn = torch.randn((2 + n) * n, n * d, generator=g(8)) * 0.1
    scale, base = torch.tensor([1.0, 0.5, 2.0]), torch.randn((2 + n) * n, generator=g(9))
    y, post, comb = ops.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for s in range(S):
        flat = x[0, s].flatten()
        rs = 1 / math.sqrt(float(flat.square().mean()) + 1e-6)
        mix = [float(fn[i] @ flat) * rs for i in range((2 + n) * n)]
        pre = [1 / (1 + math.exp(-(mix[j] * 1.0 + float(base[j])))) + 1e-6 for j in range(n)]
        want_y = sum(pre[j] * x[0, s, j] for j in range(n))
        torch.testing.assert_close(y[0, s], want_y, **TOL)
        want_post = [2 / (1 + math.exp(-(mix[n + j] * 0.5 + float(base[n + j])))) for j in range(n)]
        torch.testing.assert_close(post[0, s], torch.tensor(want_post), **TOL)
    r = torch.randn(B, S, n, d, generator=g(10))
    f = torch.randn(B, S, d, generator=g(11))
    out = ops.hc_post(f, r, post, comb)
    for k in range(n):  # X_new[k] = post[k] * f + sum_j comb[j, k] * R[j]
        want = post[0, 0, k] * f[0, 0] + sum(comb[0, 0, j, k] * r[0, 0, j] for j in range(n))
        torch.testing.assert_close(out[0, 0, k], want, **TOL)


def test_hash_routing_picks_tid2eid_experts():
    T, d, E, k, V = 6, 8, 5, 2, 10
    x = torch.randn(T, d, generator=g(12))
    w = torch.randn(E, d, generator=g(13))
    tid2eid = torch.randint(0, E, (V, k), generator=g(14), dtype=torch.int32)
    tokens = torch.tensor([3, 3, 7, 0, 9, 1])
    weights, ids = ops.moe_gate(x, w, None, tid2eid, tokens, k, "sqrtsoftplus", 1.5)
    assert torch.equal(ids, tid2eid[tokens].long())
    for t in range(T):
        s = [math.sqrt(math.log1p(math.exp(float(x[t] @ w[e])))) for e in range(E)]
        chosen = [s[int(e)] for e in ids[t]]
        want = [1.5 * v / sum(chosen) for v in chosen]
        torch.testing.assert_close(weights[t], torch.tensor(want), **TOL)


def test_bias_selects_but_does_not_weight():
    x = torch.zeros(1, 4)
    w = torch.zeros(3, 4)  # all scores equal: sqrt(softplus(0))
    bias = torch.tensor([0.0, 5.0, 1.0])
    weights, ids = ops.moe_gate(x, w, bias, None, None, 2, "sqrtsoftplus", 1.0)
    assert ids[0].tolist() == [1, 2]
    torch.testing.assert_close(weights, torch.full((1, 2), 0.5))


def test_swiglu_clamp():
    gate = torch.tensor([-20.0, 0.5, 12.0, 30.0])
    up = torch.tensor([15.0, -15.0, 2.0, -3.0])
    got = ops.swiglu(gate, up, 10.0)
    want = [(gv / (1 + math.exp(-gv))) * max(-10.0, min(10.0, uv))
            for gv, uv in zip([-20.0, 0.5, 10.0, 10.0], up.tolist(), strict=True)]  # gate clamped above only
    torch.testing.assert_close(got, torch.tensor(want), **TOL)
    unclamped = ops.swiglu(gate, up, 0.0)
    torch.testing.assert_close(unclamped, torch.nn.functional.silu(gate) * up, **TOL)


def test_indexer_topk_visibility_and_padding():
    B, S, H, D, T = 1, 3, 2, 4, 6
    q = torch.randn(B, S, H, D, generator=g(15))
    k = torch.randn(B, T, D, generator=g(16))
    w = torch.randn(B, S, H, generator=g(17))
    visible = torch.tensor([[0, 2, 6]])
    sel = ops.indexer_topk(q, k, w, visible, topk=4)
    assert sel.shape == (1, 3, 4)
    assert sel[0, 0].tolist() == [-1, -1, -1, -1]  # nothing visible
    assert sorted(sel[0, 1].tolist()) == [-1, -1, 0, 1]  # top-k larger than what is visible
    scores = [sum(float(w[0, 2, h]) * max(0.0, float(q[0, 2, h] @ k[0, t])) for h in range(H)) for t in range(T)]
    best = sorted(range(T), key=lambda t: (-scores[t], t))[:4]
    assert sorted(sel[0, 2].tolist()) == sorted(best)


def test_rope_interleaved_pairs_and_inverse():
    x = torch.randn(1, 2, 1, 8, generator=g(18))
    ang = torch.randn(1, 2, 4, generator=g(19))
    y = ops.rope(x, ang.cos(), ang.sin())
    xc = torch.view_as_complex(x.view(1, 2, 1, 4, 2))  # pairs (x[2i], x[2i+1]) as complex numbers
    want = torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[:, :, None]).flatten(-2)
    torch.testing.assert_close(y, want, **TOL)
    torch.testing.assert_close(ops.rope(y, ang.cos(), ang.sin(), inverse=True), x, **TOL)


def test_yarn_correction_range_matches_spec():
    # spec 2.2: for theta=160000, L0=65536, beta 32/1 the ramp runs over pair indices lo=15..hi=25
    base = rope_frequencies(64, 160000.0, 0, 16.0, 32, 1)
    yarn = rope_frequencies(64, 160000.0, 65536, 16.0, 32, 1)
    torch.testing.assert_close(yarn[:16], base[:16])  # i <= lo keeps f
    torch.testing.assert_close(yarn[25:], base[25:] / 16)  # i >= hi gets f / factor
    assert (yarn[16:25] < base[16:25]).all() and (yarn[16:25] > base[16:25] / 16).all()


def test_hadamard_is_orthonormal_sylvester():
    x = torch.eye(8)
    h = ops.hadamard(x)
    torch.testing.assert_close(h @ h.t(), torch.eye(8), **TOL)
    assert torch.allclose(h[1], torch.tensor([1, -1, 1, -1, 1, -1, 1, -1]) / math.sqrt(8))


def test_fp8_sim_power_of_two_scales():
    x = torch.tensor([[1000.0, 1.0, -3.3, 0.0] + [0.0] * 60])
    y = ops.fp8_sim(x, 64)
    s = 2.0 ** math.ceil(math.log2(1000.0 / 448))  # = 4
    assert s == 4.0
    assert float(y[0, 0]) == 1024.0  # 1000/4 = 250 -> nearest e4m3 (step 16 in [128, 256)) is 256
    assert float(y[0, 1]) == 1.0
    # -3.3 / 4 = -0.825 -> nearest e4m3 (step 1/16 in [0.5, 1)) is -0.8125 -> -3.25
    assert float(y[0, 2]) == -3.25
    assert ops.fp8_sim(x, 64, mode="clamp")[0, 2] == pytest.approx(-3.3, rel=1e-6)  # no e4m3 rounding


def test_fp4_sim_grid_and_ties():
    # block max 6 -> scale 1: values land on the e2m1 grid, ties go to the even code
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 2.5, 5.0, -1.75, 3.4] + [0.0] * 24])
    y = ops.fp4_sim(x, 32)
    assert y[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 4.0, -2.0, 3.0]


def test_quantized_linear_equals_dequantized_with_activation_rounding():
    w = torch.randn(256, 256, generator=g(20)) * 0.05
    q, s = quantize_fp8(w)
    x = torch.randn(3, 256, generator=g(21))
    y = ops.linear(x, LinearWeight(q, s, "fp8"))
    w_deq = q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)
    want = ops.fp8_sim(x, 128) @ w_deq.t()  # activations are FP8-quantised per 1x128 block
    torch.testing.assert_close(y, want, **TOL)


@pytest.mark.parametrize("backend", ["reference", "ascend", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_is_each_groups_linear_bit_for_bit(backend, dtype):
    """wo_a's block-diagonal GEMM: group g of x [G,M,K] times rows [g*N, (g+1)*N) of the stacked weight [G*N, K],
    equal to that group's own dense linear exactly (the batched GEMM runs the same products), on every backend
    that implements it; a transposed or shifted group would show."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    if backend == "ascend":
        from dsv4.ascend import create_ops

        be = create_ops(emulate=True, chip="950dt")
    elif backend == "cuda":
        pytest.importorskip("triton")
        from dsv4.cuda.backend import CudaOps

        be = CudaOps("cpu")
    else:
        be = ops
    G, M, K, N = 3, 5, 64, 16
    x = torch.randn(G, M, K, generator=g(4)).to(dtype)
    w = torch.randn(G * N, K, generator=g(5)).to(dtype)
    got = be.grouped_linear(x, w)
    assert got.shape == (G, M, N) and got.dtype == dtype
    for k in range(G):
        want = ops.linear(x[k], LinearWeight(w[k * N:(k + 1) * N], None, "none"))
        assert torch.equal(got[k], want), k
    assert torch.equal(be.grouped_linear(x, w), got)  # a backend's cached weight view gives the same again


@pytest.mark.parametrize("backend", ["reference", "ascend", "ascend910b", "cuda"])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_into_out_writes_the_values_of_the_plain_call(backend, inverse):
    """rope(..., out=pe) on the rope part pe of a tensor the graph owns (q, o, the kv row): the rotated values land
    in pe, bit for bit those of the call without `out`, and nothing else of the tensor changes."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    if backend.startswith("ascend"):
        from dsv4.ascend import create_ops

        be = create_ops(emulate=True, chip="910b" if backend.endswith("910b") else "950dt")
    elif backend == "cuda":
        pytest.importorskip("triton")
        from dsv4.cuda.backend import CudaOps

        be = CudaOps("cpu")
    else:
        be = ops
    B, S, H, D, r = 2, 3, 4, 32, 16
    freqs = rope_frequencies(r, 10000.0, 0, 1.0, 32, 1)
    ang = torch.arange(B * S, dtype=torch.float32).view(B, S, 1) * freqs
    cos, sin = ang.cos(), ang.sin()
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(B, S, H, D, generator=g(6)).to(dtype)
        want = be.rope(q[..., -r:], cos, sin, inverse)
        keep = q[..., :-r].clone()
        pe = q[..., -r:]
        assert be.rope(pe, cos, sin, inverse, out=pe) is pe
        assert torch.equal(q[..., -r:], want) and torch.equal(q[..., :-r], keep), dtype
