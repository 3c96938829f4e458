"""The static-shape decode step (common/model/static.py) and its captured runner (common/runtime/static_decode.py).

Numerics: the static step runs the same modules' arithmetic as the eager forward, but its batch shapes differ (eager
feeds each group of equal positions to the compressor separately, the static step all rows at once; the top-k and
HCA index lists are padded to the bucket's capacity), so fp32 GEMMs may round differently in the last bits: measured
max 2e-6 on logits of magnitude ~4 with kv_fp8_sim "clamp". The captured graph (torch.compile, aot_eager) runs the
very same aten ops as the uncaptured static step: measured bit-identical, asserted within the issue's 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.config import load_named_config
from dsv4.common.model.ops import LinearWeight
from dsv4.common.model.quant import quantize_fp4, quantize_fp8
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.model.static import decode_step, routed_experts
from dsv4.common.runtime.generate import GenerationConfig, generate, stream
from dsv4.common.runtime.static_decode import StaticDecoder, context_buckets

STATIC_VS_EAGER = 1e-5  # different GEMM batch shapes only (measured 2e-6), see the module docstring
COMPILED_VS_EAGER = 1e-6  # the bound; measured 0 (the same aten ops run)


def tiny(**changes):
    return load_named_config("tiny").replace(kv_fp8_sim="clamp", **changes)


def tokens(shape, seed=1):
    return torch.randint(2, 512, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return build_random_model(tiny(), ReferenceOps(), torch.float32, seed=0)


def prefilled(model, lengths, max_seq_len=1024, seed=1):
    """A cache with slot b prefilled to lengths[b] tokens of its own sequence; returns (cache, sequences)."""
    seqs = tokens((len(lengths), max(lengths) + 40), seed)
    cache = model.new_cache(len(lengths), max_seq_len)
    for b, n in enumerate(lengths):
        model(seqs[b:b + 1, :n], cache, slots=slice(b, b + 1))
    return cache, seqs


# ---------------------------------------------------------------------------------------------------------------------
def test_static_step_matches_eager_forward(model):
    # three rows at different positions; over 12 steps they cross a CSA block end every 4 tokens, the HCA block end
    # at 127/255, the window ring's wrap (128) and the 256-context bucket boundary (positions 255 -> 256)
    lengths = [250, 122, 126]
    cache, seqs = prefilled(model, lengths)
    static_cache = copy.deepcopy(cache)
    dec = StaticDecoder(model, static_cache, batch_sizes=(4,), capture="eager")  # 3 rows padded to 4
    for _ in range(12):
        pos = cache.lengths.clone()
        nxt = seqs[torch.arange(3), pos]
        want = model(nxt[:, None], cache)[:, 0]
        got = dec.step(nxt, [0, 1, 2])
        torch.testing.assert_close(got, want, atol=STATIC_VS_EAGER, rtol=0)
    assert dec.steps == {"static": 12, "eager": 0}
    assert torch.equal(static_cache.lengths, cache.lengths)
    # the cache the static step wrote serves the eager path: the KV rows (ring + compressed) and indexer keys agree
    for lc_s, lc_e in zip(static_cache.layers[:4], cache.layers[:4], strict=True):
        torch.testing.assert_close(lc_s.flat_kv[:-1], lc_e.flat_kv[:-1], atol=STATIC_VS_EAGER, rtol=0)
        if lc_e.flat_index_kv is not None:
            torch.testing.assert_close(lc_s.flat_index_kv[:-1], lc_e.flat_index_kv[:-1], atol=1e-4,
                                       rtol=0)  # FP4 grid steps: 2e-6 in


def test_rows_from_any_slots_in_any_order(model):
    cache, seqs = prefilled(model, [40, 200, 131])
    ref = copy.deepcopy(cache)
    dec = StaticDecoder(model, cache, batch_sizes=(2,), capture="eager")
    slots = [2, 0]  # not contiguous, not sorted
    nxt = seqs[slots, cache.lengths[slots]]
    got = dec.step(nxt, slots)
    want = torch.cat([model(nxt[i:i + 1, None], ref, slots=slice(s, s + 1))[:, 0] for i, s in enumerate(slots)])
    torch.testing.assert_close(got, want, atol=STATIC_VS_EAGER, rtol=0)
    assert cache.lengths.tolist() == [41, 200, 132]


def test_up_to_the_end_of_a_cache_that_ratios_do_not_divide(model):
    # max_seq_len 300: HCA has 2 entry rows, so positions 256..299 sit in a block with no row (it can never complete)
    # and the indexer's last block is 296..299; the step must neither write out of the slot nor disturb its entries
    cache, seqs = prefilled(model, [289], max_seq_len=300)
    static_cache = copy.deepcopy(cache)
    dec = StaticDecoder(model, static_cache, batch_sizes=(1,), capture="eager")
    while int(cache.lengths[0]) < 300:
        nxt = seqs[0, cache.lengths]
        torch.testing.assert_close(dec.step(nxt, [0]), model(nxt[:, None], cache)[:, 0], atol=STATIC_VS_EAGER, rtol=0)
    for lc_s, lc_e in zip(static_cache.layers[:4], cache.layers[:4], strict=True):
        torch.testing.assert_close(lc_s.flat_kv[:-1], lc_e.flat_kv[:-1], atol=STATIC_VS_EAGER, rtol=0)


def test_falls_back_to_eager_when_the_batch_does_not_fit(model):
    cache, seqs = prefilled(model, [30, 31, 32])
    ref = copy.deepcopy(cache)
    dec = StaticDecoder(model, cache, batch_sizes=(1, 2), capture="eager")
    nxt = seqs[torch.arange(3), cache.lengths]
    assert dec.shape_for(3, 32) is None and dec.shape_for(2, 32) == (2, 256)
    got = dec.step(nxt, [0, 1, 2])
    assert dec.steps == {"static": 0, "eager": 1}
    assert torch.equal(got, model(nxt[:, None], ref)[:, 0])  # it IS the eager forward


def test_context_buckets():
    assert context_buckets(1024) == [256, 512, 1024]
    assert context_buckets(33 * 1024)[-2:] == [32768, 33792]
    assert context_buckets(200, 200) == [200]


def test_bf16_within_op_bounds():
    m = build_random_model(tiny(), ReferenceOps(), torch.bfloat16, seed=0)
    cache, seqs = prefilled(m, [100, 140])
    static_cache = copy.deepcopy(cache)
    dec = StaticDecoder(m, static_cache, batch_sizes=(2,), capture="eager")
    for _ in range(4):
        nxt = seqs[torch.arange(2), cache.lengths]
        want = m(nxt[:, None], cache)[:, 0]
        got = dec.step(nxt, [0, 1])
        # as tests/test_ascend_model.py: one bf16 ulp of the logit scale for GEMM shape differences; the argmax holds
        torch.testing.assert_close(got, want, atol=4 * 2 ** -8, rtol=2 ** -8)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_ascend_emulated_step_matches_its_eager_path():
    """The step --npu-graph captures, on the emulated 950DT operators (its own fused MoE routing, whose group sizes
    stay on the device), against the same backend's eager forward."""
    from dsv4.ascend import create_ops

    m = build_random_model(tiny(), ReferenceOps(), torch.bfloat16, seed=0, weights="quantized")
    cache, seqs = prefilled(m, [70, 95])  # the prompts through the reference: only the decode steps are emulated
    m.ops = create_ops(emulate=True, chip="950dt")
    static_cache = copy.deepcopy(cache)
    dec = StaticDecoder(m, static_cache, batch_sizes=(2,), capture="eager")
    assert dec.routed is None  # the backend's moe_experts runs in the step
    for _ in range(2):
        nxt = seqs[torch.arange(2), cache.lengths]
        want = m(nxt[:, None], cache)[:, 0]
        got = dec.step(nxt, [0, 1])
        torch.testing.assert_close(got, want, atol=4 * 2 ** -8, rtol=2 ** -8)  # bf16 bounds, as above
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("fmt", ["none", "fp8", "fp4"])
def test_routed_experts_equals_the_reference_moe(fmt):
    g = torch.Generator().manual_seed(0)
    E, inter, d, T = 8, 128, 256, 5

    def w(out, inp):
        dense = torch.randn(E, out, inp, generator=g) * 0.05
        if fmt == "none":
            return LinearWeight(dense, None, "none")
        q, s = (quantize_fp8 if fmt == "fp8" else quantize_fp4)(dense)
        return LinearWeight(q, s, fmt)

    w1, w3, w2 = w(inter, d), w(inter, d), w(d, inter)
    x = torch.randn(T, d, generator=g)
    weights = torch.rand(T, 3, generator=g)
    ids = torch.tensor([[3, 1, 7], [5, 6, 0], [2, 2, 4], [9, 1, 3], [0, 7, 6]])  # a repeated id; id 9 on another rank
    ops = ReferenceOps()
    for offset in (0, 2):
        want = ops.moe_experts(x, weights, ids, w1, w2, w3, 10.0, offset)
        got = routed_experts(ops)(x, weights, ids, w1, w2, w3, 10.0, offset)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # measured bit-identical for fmt none


# -- capture ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """Two layers (CSA and HCA, each with its window), 2 Sinkhorn iterations, no MTP: the capture tests trace the
    whole step, and tracing time grows with the op count."""
    m = build_random_model(tiny(n_layers=2, n_hash_layers=1, compress_ratios=[4, 128], n_mtp_layers=0,
                                hc_sinkhorn_iters=2), ReferenceOps(), torch.float32, seed=0)
    cache, seqs = prefilled(m, [245, 250], max_seq_len=256)
    return m, cache, seqs


def test_decode_step_captures_as_one_graph(small):
    m, cache, seqs = small
    cache = copy.deepcopy(cache)
    routed = routed_experts(m.ops)

    def step(cache, tok, slots, pos):
        return decode_step(m, cache, tok, slots, pos, 256, routed)

    pos = cache.lengths.clone()
    ex = torch._dynamo.explain(step)(cache, seqs[torch.arange(2), pos], torch.arange(2), pos)
    assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
    assert ex.graph_count == 1


def test_compiled_step_equals_eager(small):
    m, cache, seqs = small
    eager_cache, compiled_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    eager = StaticDecoder(m, eager_cache, batch_sizes=(2,), capture="eager")
    compiled = StaticDecoder(m, compiled_cache, batch_sizes=(2,), capture="aot_eager")
    for _ in range(3):  # positions 245..247 / 250..252: CSA block ends at 247 and 251
        nxt = seqs[torch.arange(2), eager_cache.lengths]
        a, b = eager.step(nxt, [0, 1]), compiled.step(nxt, [0, 1])
        assert (a - b).abs().max().item() <= COMPILED_VS_EAGER
    for lc_a, lc_b in zip(eager_cache.layers, compiled_cache.layers, strict=True):
        assert (lc_a.flat_kv[:-1] - lc_b.flat_kv[:-1]).abs().max().item() <= COMPILED_VS_EAGER


# -- the engine -------------------------------------------------------------------------------------------------------
def test_generate_uses_the_static_step(model):
    prompts = [tokens((1, n), seed=n)[0].tolist() for n in (9, 30, 17)]
    want = generate(model, prompts, GenerationConfig(max_new_tokens=6, ignore_eos=True, max_seq_len=512))
    s = stream(model, prompts, GenerationConfig(max_new_tokens=6, ignore_eos=True, max_seq_len=512,
                                                compile_decode="eager", compile_batch_sizes=(1, 2, 4)))
    for _ in s:
        pass
    assert [r.tokens for r in s.results] == [r.tokens for r in want]
    assert s.engine.runner.static.steps == {"static": 5, "eager": 0}  # 6 tokens: the first comes from the prefill
    with pytest.raises(ValueError, match="compile_decode"):
        GenerationConfig(compile_decode="fast").validate()
