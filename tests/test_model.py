"""The model graph on the reference ops: causality per layer kind, determinism, dtypes, MTP, receptive fields."""

import pytest
import torch

from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps

OPS = ReferenceOps()
TINY = load_named_config("tiny")
SEQ = 320  # > 2 x 128 so ratio-128 entries complete and the window slides


def tokens(n=SEQ, seed=0, batch=1):
    return torch.randint(0, TINY.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    return build_random_model(TINY, OPS)


def one_kind(ratio: int, n_layers: int = 2):
    """A model whose main layers are all of one attention kind (MTP stays window-only)."""
    a = TINY.replace(n_layers=n_layers, n_hash_layers=1, compress_ratios=[ratio] * n_layers + [0])
    return build_random_model(a, OPS)


@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_causal_for_every_layer_kind(ratio):
    """Changing tokens after position t leaves logits at <= t unchanged. Cut points sit inside compression blocks
    (129: inside ratio-128 block 1; 257: one past block 1's end; 302: inside a ratio-4 block) so a block that became
    visible before completing would leak future tokens."""
    model = one_kind(ratio)
    x = tokens()
    ref = model(x)
    for t in (129, 200, 257, 302):
        y = x.clone()
        y[0, t + 1:] = (y[0, t + 1:] + 17) % TINY.vocab_size
        out = model(y)
        assert torch.equal(out[0, : t + 1], ref[0, : t + 1]), f"ratio {ratio}: future tokens leaked into <= {t}"
        assert (out[0, t + 1:] - ref[0, t + 1:]).abs().max() > 1e-3  # and the change does matter afterwards


def test_causal_full_tiny(tiny):
    x = tokens()
    ref = tiny(x)
    y = x.clone()
    y[0, 150:] = 3
    out = tiny(y)
    assert torch.equal(out[0, :150], ref[0, :150])


def test_window_bounds_receptive_field_and_compression_extends_it():
    """One layer: a window-only layer cannot see a token 140 positions back; an HCA layer can, through the
    compressed entry of its (completed) block."""
    x = tokens()
    for ratio, expect_change in ((0, False), (128, True)):
        model = one_kind(ratio, n_layers=1)
        y = x.clone()
        y[0, 130] = (y[0, 130] + 1) % TINY.vocab_size  # block 1 = tokens 128..255, complete at 255
        diff = (model(y) - model(x))[0].abs().amax(-1)
        assert diff[270:].max() > 0 if expect_change else diff[270:].max() == 0  # 270 - 130 > window
        assert diff[:130].max() == 0


def test_deterministic_across_builds():
    a = build_random_model(TINY, OPS)(tokens(64))
    b = build_random_model(TINY, OPS)(tokens(64))
    assert torch.equal(a, b)
    c = build_random_model(TINY, OPS, seed=1)(tokens(64))
    assert not torch.allclose(a, c)


def test_outputs_every_position_and_hidden_states(tiny):
    logits, hidden = tiny(tokens(40, batch=2), return_hidden=True)
    assert logits.shape == (2, 40, TINY.vocab_size) and logits.dtype == torch.float32
    assert len(hidden) == TINY.n_layers and hidden[-1].shape == (2, 40, TINY.hc_mult, TINY.dim)
    assert torch.isfinite(logits).all()
    # the streams stop being identical copies after the first hyper-connection
    assert (hidden[0][:, :, 0] - hidden[0][:, :, 1]).abs().max() > 0


def test_batch_rows_independent():
    # only GEMM blocking differs between a batch of 2 and a batch of 1; clamp mode keeps that 1e-6 noise from
    # flipping an FP8 rounding of the KV (which would move some logits by 1e-3 and hide a real cross-row leak)
    model = build_random_model(TINY.replace(kv_fp8_sim="clamp"), OPS)
    x = tokens(50, batch=2)
    both = model(x)
    torch.testing.assert_close(both[1:], model(x[1:]), rtol=0, atol=5e-5)


def test_bf16_close_to_fp32():
    x = tokens(200)
    f32 = build_random_model(TINY, OPS)(x)
    bf16 = build_random_model(TINY, OPS, dtype=torch.bfloat16)(x)
    cos = torch.nn.functional.cosine_similarity(f32.flatten(), bf16.flatten(), dim=0)
    # bf16 keeps 8 mantissa bits through 4 blocks; random weights give no structure to lean on, so cosine 0.97
    # is what a correct bf16 path achieves (a wrong op drops it far lower)
    assert cos > 0.97, cos
    assert (f32.argmax(-1) == bf16.argmax(-1)).float().mean() > 0.7


def test_quantized_weights_match_dequantized():
    x = tokens(150)
    deq = build_random_model(TINY, OPS)(x)
    q = build_random_model(TINY, OPS, weights="quantized")(x)
    # the only difference is the FP8 activation rounding of the official GEMMs (1x128 blocks, ~2^-4 relative)
    cos = torch.nn.functional.cosine_similarity(deq.flatten(), q.flatten(), dim=0)
    assert cos > 0.98, cos


def test_mtp_predicts_from_streams(tiny):
    x = tokens(30)
    cache = tiny.new_cache(1, 64)
    logits, hidden = tiny(x[:, :-1], cache, return_hidden=True)
    draft = tiny.mtp_forward(hidden[-1], x[:, 1:], cache)
    assert draft.shape == (1, 29, TINY.vocab_size) and torch.isfinite(draft).all()
    # position i uses token i+1: changing the last next-token changes only the last draft row
    y = x.clone()
    y[0, -1] = (y[0, -1] + 5) % TINY.vocab_size
    cache2 = tiny.new_cache(1, 64)
    _, hidden2 = tiny(y[:, :-1], cache2, return_hidden=True)
    draft2 = tiny.mtp_forward(hidden2[-1], y[:, 1:], cache2)
    # (earlier rows may differ by GEMM blocking only: the changed token can route to other experts)
    torch.testing.assert_close(draft[0, :-1], draft2[0, :-1], rtol=0, atol=1e-5)
    assert (draft[0, -1] - draft2[0, -1]).abs().max() > 1e-3


def test_context_longer_than_cache_errors(tiny):
    from dsv4.common.model.cache import ContextLengthError

    cache = tiny.new_cache(1, 32)
    with pytest.raises(ContextLengthError, match="max_seq_len=32"):
        tiny(tokens(33), cache)
