"""Structured random weights (checkpoint.layout.random_checkpoint(structured=True)): quantisation blocks of different
magnitude and token-dependent outlier channels, so that a number-format bug (a transposed block-scale grid, a
per-tensor instead of per-token scale) changes the numbers, where plain random weights hide it. The model built
from them stays finite and decodes."""

from __future__ import annotations

import torch

from dsv4.common.checkpoint.layout import args_for_quant, random_checkpoint
from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.checkpoint.reader import load_checkpoint
from dsv4.common.checkpoint.writer import make_checkpoint
from dsv4.common.model.config import load_named_config
from dsv4.common.model.quant import dequant_fp8, e8m0_to_float
from dsv4.common.model.reference import ReferenceOps

TINY = load_named_config("tiny")
FP8 = args_for_quant(TINY, "fp8")
SQUARE = "mtp.0.e_proj"  # a dim x dim linear: a 2x2 grid of 128x128 FP8 blocks at the tiny width


def _tensors(args, structured: bool) -> dict[str, torch.Tensor]:
    return dict(random_checkpoint(args, 0, structured))


def _transposed_grid_error(t: dict[str, torch.Tensor]) -> float:
    """Relative error of dequantising SQUARE with its block-scale grid transposed (a layout bug)."""
    q, s = t[f"{SQUARE}.weight"], e8m0_to_float(t[f"{SQUARE}.scale"])
    assert s.shape == (2, 2)
    right, wrong = dequant_fp8(q, s), dequant_fp8(q, s.T.contiguous())
    return float((wrong - right).norm() / right.norm())


def test_block_scales_vary_and_a_transposed_grid_shows():
    plain, structured = _tensors(FP8, False), _tensors(FP8, True)
    spread = {k: torch.log2(e8m0_to_float(v)).max() - torch.log2(e8m0_to_float(v)).min()
              for k, v in structured.items() if k.endswith(".scale") and v.numel() >= 4}
    # tile exponents span [-2, 2] over every grid of 2+ blocks: the block scales of each such weight span at least
    # 2**3 (rounding of the e8m0 exponents can eat one octave); plain weights' block scales are within 2x
    assert spread and min(spread.values()) >= 3
    plain_spread = [torch.log2(e8m0_to_float(v)).max() - torch.log2(e8m0_to_float(v)).min()
                    for k, v in plain.items() if k.endswith(".scale") and v.numel() >= 4]
    assert max(plain_spread) <= 1
    assert _transposed_grid_error(plain) < 0.05  # near-equal blocks: the bug is invisible with plain weights
    assert _transposed_grid_error(structured) > 0.3


def test_token_amax_differs_after_rms_norm():
    """Per-token activation scales must differ between tokens, or a per-tensor scale bug reads as correct: with one
    scale for all tokens (the max), the median token is quantised with a step max/median times too coarse."""
    ops = ReferenceOps()

    def amax_ratio(t: dict[str, torch.Tensor]) -> float:
        x = ops.rms_norm(t["embed.weight"].float(), t["layers.0.attn_norm.weight"].float(), TINY.norm_eps)
        amax = x.abs().amax(-1)
        return float(amax.max() / amax.median())

    assert amax_ratio(_tensors(TINY, False)) < 2  # measured 1.54
    assert amax_ratio(_tensors(TINY, True)) > 4  # measured 7.6


def test_plain_draw_is_unchanged_by_structure():
    """The structure is a reshaping of the plain draw: same signs, and tensors without a role are identical."""
    dense = args_for_quant(TINY, "none")  # bf16 weights: compare values, not FP8 payloads beside their scales
    plain, structured = _tensors(dense, False), _tensors(dense, True)
    assert plain.keys() == structured.keys()
    for name in ("layers.0.hc_attn_fn", "layers.0.attn.attn_sink", "layers.3.ffn.gate.bias"):
        assert torch.equal(plain[name], structured[name])
    w = "layers.0.attn.wq_a.weight"
    assert torch.equal(plain[w].float().sign(), structured[w].float().sign())
    assert not torch.equal(plain[w], structured[w])


def test_structured_model_is_finite_and_decodes(tmp_path):
    tokens = torch.randint(0, TINY.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    model = build_random_model(TINY, ReferenceOps(), structured=True)
    logits = model(tokens)
    assert torch.isfinite(logits).all()
    p = torch.softmax(logits[:, -1].float(), -1)
    assert float(p.max()) < 0.999  # not collapsed onto one token by saturated activations
    bf16 = build_random_model(TINY, ReferenceOps(), dtype=torch.bfloat16, structured=True)(tokens)
    assert torch.isfinite(bf16).all()
    cos = torch.nn.functional.cosine_similarity(bf16.float().flatten(1), logits.flatten(1), dim=-1)
    assert float(cos.min()) > 0.95
    # make-checkpoint --weight-init structured writes the same model (the release formats: FP8 linears, FP4 experts)
    make_checkpoint(TINY, tmp_path, quant="fp4", seed=0, structured=True, tokenizer=False)
    loaded = load_checkpoint(tmp_path, ReferenceOps(), dtype=torch.float32, progress=False)
    want = build_random_model(args_for_quant(TINY, "fp4"), ReferenceOps(), structured=True)(tokens)
    assert torch.equal(loaded(tokens), want)
