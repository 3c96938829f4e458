"""Tests of the capacity planner (common/planner/): parameter counts, KV bytes, baselines, layout errors."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import yaml

from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.planner import cli as plan_cli
from dsv4.common.planner import plan as pl
from dsv4.common.planner.sizes import BF16, FP32, weight_inventory


@pytest.fixture(scope="module")
def flash():
    return load_named_config("flash")


@pytest.fixture(scope="module")
def pro():
    return load_named_config("pro")


@pytest.fixture(scope="module")
def tiny():
    return load_named_config("tiny")


# --------------------------------------------------------------------------------------------------------------------
# parameter counts against the published sizes (spec sanity check: embed+head included, MTP excluded)


@pytest.mark.parametrize("name,total,active", [("flash", 284.3e9, 13.8e9), ("pro", 1.573e12, 49.8e9)])
def test_param_counts_match_published(name, total, active):
    pc = pl.count_params(load_named_config(name))
    assert pc.total == pytest.approx(total, rel=0.005)
    assert pc.active == pytest.approx(active, rel=0.005)
    assert sum(pc.by_kind.values()) == pc.total
    assert sum(pc.by_layer_kind.values()) == pc.total
    assert pc.mtp > 0


def test_param_breakdown_flash(flash):
    pc = pl.count_params(flash)
    d, V = flash.dim, flash.vocab_size
    assert pc.by_kind["embed"] == V * d and pc.by_kind["head"] == V * d
    # routed experts: 43 layers x 256 experts x 3 x inter x dim
    assert pc.by_kind["routed_experts"] == 43 * 256 * 3 * 2048 * 4096
    assert pc.active_by_kind["routed_experts"] == 43 * 6 * 3 * 2048 * 4096
    assert pc.by_kind["shared_experts"] == 43 * 3 * 2048 * 4096
    # the indexer exists only in the 21 CSA layers, the attention compressor in CSA and HCA layers
    idx_per_layer = 64 * 128 * 1024 + 64 * 4096 + 4 * 256 + 2 * 256 * 4096 + 128
    assert pc.by_kind["indexer"] == 21 * idx_per_layer


# --------------------------------------------------------------------------------------------------------------------
# KV cache


def test_kv_bytes_tiny_hand_formula(tiny):
    # tiny: ratios [0, 4, 128, 4] + MTP [0]; D = 128, W = 128, D_I = 128, bf16 rows
    L, D, W, DI = 1000, 128, 128, 128
    row, irow = 2 * D, 2 * DI
    window = 5 * W * row  # 4 main layers + MTP, every layer keeps its ring
    compressed = 2 * (L // 4) * row + (L // 128) * row
    indexer = 2 * (L // 4) * irow
    state = (2 * (2 * (2 * 4) * (2 * D) * 4)  # two CSA attention compressors, kv + score, fp32 [8, 2D]
             + 2 * (128 * D) * 4  # one HCA compressor [128, D]
             + 2 * (2 * (2 * 4) * (2 * DI) * 4))  # two indexer compressors [8, 2 D_I]
    kv = pl.kv_cache_bytes(tiny, L, "bf16", mtp=True)
    assert kv.window == window
    assert kv.compressed == compressed
    assert kv.indexer == indexer
    assert kv.state == state
    assert kv.per_sequence == window + compressed + indexer + state == 618240
    assert kv.per_token_marginal == pytest.approx(2 * (row / 4 + irow / 4) + row / 128)
    # without MTP one window ring fewer
    assert pl.kv_cache_bytes(tiny, L, "bf16", mtp=False).per_sequence == kv.per_sequence - W * row


def test_kv_fp8_row_matches_flashmla_layout(flash):
    # 448 e4m3 + 64 bf16 rope + 7 ue8m0 scales + 1 pad
    assert pl.kv_row_bytes(flash, "fp8") == pl.V4_FP8_ROW_BYTES_FLASHMLA == 584
    assert pl.kv_row_bytes(flash, "bf16") == 1024
    with pytest.raises(pl.PlanError) as e:
        pl.kv_row_bytes(flash, "int4")
    assert e.value.field == "kv_dtype"


def test_kv_grows_linearly_with_context(flash):
    a = pl.kv_cache_bytes(flash, 1 << 16)
    b = pl.kv_cache_bytes(flash, 1 << 17)
    assert b.per_sequence - a.per_sequence == pytest.approx((1 << 16) * a.per_token_marginal)
    assert a.window == b.window and a.state == b.state


def test_mla_baseline_ratio_at_1m(flash, pro):
    # Flash: 21 CSA layers x (D/4 + D_I/4) + 20 HCA layers x D/128 elements per token, bf16; MLA: 43 x 576 elements
    c = pl.claims(flash, 1 << 20)
    v4_marginal = 2 * (21 * (512 / 4 + 128 / 4) + 20 * 512 / 128)
    assert v4_marginal == 6880
    assert c.kv_mla == 43 * 576 * 2
    assert c.kv_vs_mla == pytest.approx(v4_marginal / c.kv_mla, rel=0.01)  # fixed parts are < 1% at 1M
    assert 0.13 < c.kv_vs_mla < 0.15
    cp = pl.claims(pro, 1 << 20)
    assert cp.kv_vs_mla == pytest.approx(2 * (30 * 160 + 31 * 4) / (61 * 1152), rel=0.01)
    # against the V3.2-style baseline (MLA + indexer key), in FP8: our formulas give ~11.5% (the seed says ~10%)
    assert 0.10 < pl.claims(pro, 1 << 20, "fp8").kv_vs_dsa < 0.13


def test_attention_flops_hand_formula(flash):
    L = 1 << 20
    H, D, W = 64, 512, 128
    csa = 4 * H * D * (W + 512) + (L // 4) * (2 * 64 * 128 + 2 * 64)
    hca = 4 * H * D * (W + L // 128)
    win = 4 * H * D * W
    assert pl.attention_flops_per_token(flash, L) == 21 * csa + 20 * hca + 2 * win
    dense = 43 * (2 * H * 576 + 2 * H * 512) * L
    assert pl.mla_attention_flops_per_token(flash, L) == dense
    c = pl.claims(flash, L)
    assert c.attn_vs_mla == pytest.approx((21 * csa + 20 * hca + 2 * win) / dense)
    assert c.attn_vs_mla < 0.05  # sparse + compressed attention is a small fraction of dense attention at 1M


# --------------------------------------------------------------------------------------------------------------------
# weights and layout


def test_weight_bytes_split_over_ep_and_tp(flash):
    one = pl.weight_bytes(flash, "fp8", tp=1, ep=1)
    eight = pl.weight_bytes(flash, "fp8", tp=8, ep=8)
    assert eight.by_kind["routed_experts"] * 8 == pytest.approx(one.by_kind["routed_experts"])
    # one shared KV head: wkv and the compressors are replicated, so attention does not shrink by the full 8x
    assert one.by_kind["attn"] / 8 < eight.by_kind["attn"] < one.by_kind["attn"]
    assert eight.by_kind["compressor"] == one.by_kind["compressor"]
    # the release format: FP4 experts at 0.5 + 1/32 bytes per weight
    experts = 44 * 256 * 3 * 2048 * 4096  # MTP included
    assert one.by_kind["routed_experts"] == pytest.approx(experts * (0.5 + 1 / 32))
    bf16 = pl.weight_bytes(flash, "bf16", tp=1, ep=1)
    assert bf16.per_card > 3 * one.per_card
    w4 = pl.weight_bytes(flash, "w4a8", tp=8, ep=8)
    w8 = pl.weight_bytes(flash, "w8a8", tp=8, ep=8)
    assert w4.per_card < w8.per_card


def test_plan_flash_950dt(flash):
    p = pl.plan("flash", "ascend-950", tp=8, ep=16, context=131072, batch=32, weights="fp8")
    assert p.hardware == "ascend-950dt" and p.cards == 16 and p.dp == 2
    assert p.fits and p.max_batch >= 32
    assert 5 < p.weights_gib < 20
    # MQA: a sequence's KV is whole on every TP rank, so per-card KV = sequences per DP group x KV per sequence
    assert p.kv_gib_per_card == pytest.approx(16 * p.kv_per_seq_gib)
    assert p.decode_tok_s_per_card > 0 and p.prefill_tok_s_per_card > 0
    assert p.prefill_peak_label == "FP8"
    text = pl.format_plan(p)
    for word in ("weights per card", "KV per sequence", "max concurrent seqs", "decode tokens/s", "MQA"):
        assert word in text


def test_plan_without_native_fp8_uses_bf16_peak():
    p = pl.plan("flash", "ascend-910c", tp=8, ep=8, context=8192, batch=4, weights="w8a8")
    assert p.prefill_peak_label == "BF16"


def test_layout_that_does_not_fit_raises():
    with pytest.raises(pl.DoesNotFitError) as e:
        pl.plan("pro", "ascend-910b", tp=8, ep=8, context=4096, batch=1, weights="bf16")
    assert e.value.field == "memory"
    assert isinstance(e.value, ValueError)


def test_batch_over_capacity_is_reported_not_raised():
    p = pl.plan("pro", "ascend-950dt", tp=8, ep=16, context=1 << 20, batch=64, weights="fp8")
    assert not p.fits and p.max_batch < 64
    assert "does not fit" in pl.format_plan(p)


def test_release_experts_are_sized_as_the_950_backend_holds_them():
    # 950: the Ascend backend converts the release's FP4 experts to MXFP8 (e4m3 + one e8m0 byte per 1x32); the dense
    # linears stay FP8 blocks
    args = load_named_config("flash")
    fp8 = pl.plan("flash", "ascend-950dt", tp=8, ep=16, context=4096, batch=1, weights="fp8")
    mx = pl.plan("flash", "ascend-950dt", tp=8, ep=16, context=4096, batch=1, weights="mxfp8")
    assert fp8.weights_gib == mx.weights_gib and any("routed experts as mxfp8" in n for n in fp8.notes)
    h200 = pl.plan("flash", "h200", tp=8, ep=16, context=4096, batch=1, weights="fp8")
    assert not any("routed experts as" in n for n in h200.notes)
    # per card: 16 of 256 experts x (n_layers + MTP) x 3 matrices of inter x dim; e4m3 + scale vs e2m1 + scale
    one = 3 * args.moe_inter_dim * args.dim
    per_card = 256 // 16 * (args.n_layers + args.n_mtp_layers)
    extra = per_card * one / 2  # one byte per weight instead of half a byte; the per-1x32 scale bytes are the same
    assert fp8.weights_by_kind_gib["routed_experts"] - h200.weights_by_kind_gib["routed_experts"] == \
        pytest.approx(extra / 2 ** 30, rel=1e-9)


@pytest.mark.parametrize("tp,ep,field", [(3, 8, "tp"), (16, 16, "tp"), (8, 7, "ep"), (8, 12, "ep"), (0, 8, "tp")])
def test_bad_tp_ep(tp, ep, field):
    # flash: 64 heads, 8 output groups (tp=16 does not divide them), 256 experts
    with pytest.raises(pl.PlanError) as e:
        pl.plan("flash", "h200", tp=tp, ep=ep)
    assert e.value.field == field


def test_unknown_hardware_and_model():
    with pytest.raises(pl.PlanError) as e:
        pl.plan("flash", "tpu-v9")
    assert e.value.field == "hardware" and "ascend-950dt" in str(e.value)
    with pytest.raises(pl.PlanError) as e:
        pl.plan("no-such-model", "h200")
    assert e.value.field == "model"
    with pytest.raises(pl.PlanError) as e:
        pl.plan("flash", "h200", weights="int2")
    assert e.value.field == "weights"


@pytest.mark.parametrize("kwargs,field", [(dict(reserve_gib=-3.0), "reserve_gib"),
                                          (dict(usable_fraction=1.5), "usable_fraction"),
                                          (dict(batch=0), "batch"), (dict(context=0), "context")])
def test_out_of_range_settings_name_their_field(kwargs, field):
    with pytest.raises(pl.PlanError) as e:
        pl.plan("flash", "h200", **kwargs)
    assert e.value.field == field


def test_hardware_file_every_number_has_a_source():
    data = yaml.safe_load(pl.HARDWARE_FILE.read_text())
    assert data["aliases"]["ascend-950"] == "ascend-950dt"
    need = {"ascend-950pr", "ascend-950dt", "ascend-910b", "ascend-910c", "h200", "b200", "b300"}
    assert need <= set(data["devices"])
    for name, entry in data["devices"].items():
        for key in ("hbm_gb", "hbm_tbps", "bf16_tflops", "fp8_tflops", "fp4_tflops", "native_fp8", "native_fp4",
                    "interconnect_gbps"):
            assert isinstance(entry[key], dict) and entry[key].get("source"), f"{name}.{key} lacks a source"
        hw = pl.load_hardware(name)
        assert hw.hbm_gib > 0 and hw.hbm_tbps > 0
        assert hw.native_fp8 == (hw.fp8_tflops is not None)


def test_run_plan_cli(capsys):
    parser = argparse.ArgumentParser()
    plan_cli.add_plan_arguments(parser)
    rc = plan_cli.run_plan(parser.parse_args("--model flash --hardware ascend-950dt --tp 8 --ep 16 --context 131072 "
                                       "--batch 32 --weights fp8 --claims".split()))
    out = capsys.readouterr().out
    assert rc == 0 and "flash on 16 x ascend-950dt" in out and "KV cache" in out
    rc = plan_cli.run_plan(parser.parse_args("--model flash --hardware h200 --tp 3".split()))
    assert rc == 2 and "tp" in capsys.readouterr().err
    assert math.isfinite(pl.claims(load_named_config("tiny"), 4096).kv_vs_mla)


# -- KV block pool and prefix-cache rows (common/planner/pool.py) ---------------------------------------------------
def test_pool_block_and_fixed_bytes_match_the_runtime_cache(tiny):
    """The planner's per-block and per-sequence figures equal what the runtime's block pool occupies (bf16): one more
    block, or one more slot (its window rings and compressor states), adds exactly that many bytes."""
    from dsv4.common.model.cache import KVCache
    from dsv4.common.planner import pool

    def nbytes(slots: int, blocks: int) -> int:
        return KVCache(tiny, slots, 128, torch.bfloat16, block_tokens=128, n_blocks=blocks).nbytes()

    assert pool.block_bytes(tiny, 128, "bf16") == nbytes(1, 2) - nbytes(1, 1)
    assert pool.fixed_bytes_per_sequence(tiny, "bf16") == nbytes(2, 1) - nbytes(1, 1)


def test_pool_holds_more_of_a_mixed_workload_than_slots(flash):
    p = pl.plan("flash", "ascend-950dt", tp=8, ep=16, context=131072, batch=32,
                workload=[(4096, 0.9), (131072, 0.1)])
    pp = p.pool
    # one max-length slot per sequence is exactly the plan's own capacity at the longest length
    assert pp.slot_seqs == p.max_batch
    per_seq = {n: pp.fixed_bytes + math.ceil(n / 128) * pp.block_bytes for n in (4096, 131072)}
    group = pp.pool_seqs // p.dp
    free = (p.free_gib_per_card + p.kv_gib_per_card) * pl.GIB
    assert 0.9 * group * per_seq[4096] + 0.1 * group * per_seq[131072] <= free * (1 + 1e-9)
    assert pp.pool_seqs > 5 * pp.slot_seqs  # 90 % short sequences: the pool holds several times more
    assert "seqs by the pool" in pl.format_plan(p)


def test_prefix_hit_rate_for_ttft_is_the_smallest_block_prefix(flash):
    from dsv4.common.planner import pool

    peak = 16 * 1000e12
    h = pool.needed_hit_rate(flash, 131072, 100.0, 128, peak)
    assert h.cached_tokens is not None and h.cached_tokens % 128 == 0 and h.cold_ms > 100.0
    assert pool.prefill_seconds(flash, h.cached_tokens, 131072, peak) * 1e3 <= 100.0
    assert pool.prefill_seconds(flash, h.cached_tokens - 128, 131072, peak) * 1e3 > 100.0
    assert pool.needed_hit_rate(flash, 131072, 1e6, 128, peak).cached_tokens == 0  # cold already meets it
    assert pool.needed_hit_rate(flash, 131072, 1e-3, 128, peak).cached_tokens is None  # the last block alone is slower


@pytest.mark.parametrize("argv,field", [("--block-tokens 100", "block_tokens"), ("--workload 12x", "workload"),
                                        ("--workload 0:1", "workload"), ("--ttft-ms -1", "ttft_ms")])
def test_pool_arguments_rejected(argv, field, capsys):
    parser = argparse.ArgumentParser()
    plan_cli.add_plan_arguments(parser)
    assert plan_cli.run_plan(parser.parse_args(argv.split())) == 2
    assert capsys.readouterr().err.startswith(f"dsv4 plan: error: {field}")


def test_inventory_dtypes_are_the_models():
    """The planner's bf16 / fp32 tensors are held in those dtypes by the model itself (a bf16 model of the tiny
    config), so its weight bytes follow what the model keeps in memory (e.g. the compressors' fp32 wkv / wgate)."""
    args = load_named_config("tiny")
    params = dict(build_random_model(args, ReferenceOps(), torch.bfloat16, weights="quantized").named_parameters())
    checked = 0
    for t in weight_inventory(args):
        if t.role not in (BF16, FP32) or not t.is_param:
            continue
        name = t.name if t.name in params else t.name + ".weight"
        assert name in params, f"planner tensor {t.name} is not a model parameter"
        want = torch.bfloat16 if t.role == BF16 else torch.float32
        assert params[name].dtype == want, f"{t.name}: the model keeps {params[name].dtype}, the planner says {t.role}"
        checked += 1
    assert checked > 50  # every layer's norms, hc weights, compressors, gate, embed, head
