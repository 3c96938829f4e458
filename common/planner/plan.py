"""Capacity planner: parameters, weight bytes per card, KV cache, and roofline throughput for DeepSeek-V4.

Everything here is closed-form arithmetic over `ModelArgs` and `configs/hardware.yaml`. No torch is needed, so the
planner runs on any machine, including one that has no accelerator.

This module makes the plan (`plan`, `format_plan`); cli.py wires `dsv4 plan`. Below it, each importing none of the
others above it:
- sizes.py: the weight inventory, parameter counts, weight bytes per card, TP/EP layout checks, KV cache
  bytes and FLOPs per token (tensor shapes from shared/spec/dsv4-architecture.md, sharding from the official model);
- hardware.py: devices from configs/hardware.yaml (secondary sources, see that file);
- claims.py: V4 against same-shape MLA / MLA + DSA baselines (`--claims`).
Their public names stay importable from here (`from dsv4.common.planner.plan import kv_cache_bytes`).

The roofline figures are upper bounds. They ignore communication (all-reduce, MoE dispatch and combine), kernel
efficiency, and scheduling, so real deployments land below them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dsv4.common.model.config import ModelArgs
from dsv4.common.planner.claims import (
    DSA_TOPK,
    MLA_FP8_ROW_BYTES,
    MLA_KV_LORA_RANK,
    MLA_ROPE_DIM,
    Claims,
    claims,
    format_claims,
    mla_attention_flops_per_token,
    mla_kv_bytes_per_token,
)
from dsv4.common.planner.hardware import HARDWARE_FILE, Hardware, hardware_names, load_hardware
from dsv4.common.planner.pool import DEFAULT_BLOCK_TOKENS, PoolPlan, format_pool_plan, pool_plan
from dsv4.common.planner.sizes import (
    BF16,
    EP,
    EXPERT,
    FP32,
    GIB,
    INDEXER_FP8_SCALE_BYTES,
    INT32,
    KV_DTYPES,
    LINEAR,
    REPLICATED,
    TP_IN,
    TP_OUT,
    V4_FP8_ROW_BYTES_FLASHMLA,
    VOCAB,
    W4_GROUP,
    W8_SCALE_BYTES_PER_ROW,
    WEIGHT_FORMATS,
    DoesNotFitError,
    KVBytes,
    ParamCounts,
    PlanError,
    Tensor,
    WeightBytes,
    attention_flops_per_token,
    check_kv_dtype,
    check_layout,
    check_weight_format,
    compressor_state_bytes,
    count_params,
    indexer_row_bytes,
    kv_cache_bytes,
    kv_read_per_token,
    kv_row_bytes,
    load_model,
    matmul_flops_per_token,
    weight_bytes,
    weight_inventory,
)

# Share of HBM the runtime can use for weights plus KV. The rest goes to the framework, the allocator's fragmentation
# and the communication library. 0.9 is the usual default of vLLM's gpu_memory_utilization.
USABLE_FRACTION = 0.9
# Working memory kept free for activations, MoE dispatch buffers and graph capture. This is a rough default; pass your
# runtime's measured figure when you have one.
ACTIVATION_RESERVE_GIB = 4.0

# ---------------------------------------------------------------------------------------------------------------------
# plan


@dataclass
class Plan:
    model: str
    hardware: str
    weights: str
    kv_dtype: str
    tp: int
    ep: int
    cards: int  # max(tp, ep)
    dp: int  # attention data-parallel groups = cards / tp
    context: int
    batch: int  # concurrent sequences over the whole deployment
    mtp: bool
    shared_expert: str
    params_total: int
    params_active: int
    hbm_gib: float
    usable_gib: float  # hbm * usable_fraction
    reserve_gib: float
    weights_gib: float  # per card
    weights_by_kind_gib: dict[str, float]
    kv_per_seq_gib: float  # one sequence, on every card of its TP group
    kv_per_token_bytes: float  # marginal (compressed + indexer rows)
    kv_fixed_per_seq_mib: float  # window ring + compressor state
    seqs_per_card: int  # sequences whose KV one card holds for `batch`
    max_seqs_per_card: int
    max_batch: int  # sequences the deployment holds at `context`
    kv_gib_per_card: float  # for `batch`
    free_gib_per_card: float  # after weights, reserve and the batch's KV
    fits: bool
    decode_bytes_per_step: float  # per card
    decode_step_ms: float
    decode_bound: str  # "memory" | "compute"
    decode_tok_s_per_card: float
    decode_tok_s_per_seq: float
    prefill_peak_tflops: float
    prefill_peak_label: str
    prefill_tok_s_per_card: float
    prefill_s_per_prompt: float  # one prompt of `context` tokens over the whole deployment, compute bound
    pool: PoolPlan  # the same KV memory as a block pool (pool.py), and the prefix hit rate a TTFT target needs
    notes: list[str] = field(default_factory=list)


def _expected_touched(experts: int, picks_per_token: int, tokens: float) -> float:
    """Expected share of `experts` that at least one of `tokens` tokens picks (uniform routing assumed)."""
    if tokens <= 0:
        return 0.0
    return 1.0 - (1.0 - picks_per_token / experts) ** tokens


def plan(model: str | Path | ModelArgs, hardware: str | Hardware, tp: int = 8, ep: int = 8,
         context: int = 131072, batch: int = 1, weights: str = "fp8", kv_dtype: str = "bf16",
         mtp: bool = True, shared_expert: str = TP_OUT, usable_fraction: float = USABLE_FRACTION,
         reserve_gib: float = ACTIVATION_RESERVE_GIB, block_tokens: int = DEFAULT_BLOCK_TOKENS,
         workload: list[tuple[int, float]] | None = None, ttft_ms: float | None = None) -> Plan:
    """Capacity and roofline for one deployment.

    Layout: cards = max(tp, ep). Attention and the other dense parts are split over `tp` cards and replicated over
    dp = cards / tp data-parallel groups, each group serving its own sequences. Routed experts are split over `ep` cards
    (whole experts); the shared expert is TP-split by default. `batch` counts sequences over the whole deployment.
    The KV memory is also counted as a block pool of `block_tokens`-token blocks for `workload` ((tokens, share)
    pairs; default: all sequences of `context` tokens), and with `ttft_ms` the prefix-cache hit rate that a
    `context`-token prompt needs to reach that TTFT.

    Raises PlanError naming the field: model, hardware, tp, ep, weights, kv_dtype, context, batch; DoesNotFitError
    (field "memory") when the weights alone do not fit.
    """
    name, args = load_model(model)
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    check_weight_format(weights)
    check_kv_dtype(kv_dtype)
    if shared_expert not in (TP_OUT, REPLICATED):
        raise PlanError("shared_expert", f"expected {TP_OUT!r} or {REPLICATED!r}, got {shared_expert!r}")
    if not isinstance(batch, int) or batch < 1:
        raise PlanError("batch", f"must be a positive integer, got {batch!r}")
    if context < 1 or context > args.max_position_embeddings:
        raise PlanError("context", f"must be in [1, max_position_embeddings={args.max_position_embeddings}], "
                        f"got {context}")
    if not 0 < usable_fraction <= 1:
        raise PlanError("usable_fraction", f"must be in (0, 1], got {usable_fraction}")
    if reserve_gib < 0:  # a negative reserve would count memory the card does not have
        raise PlanError("reserve_gib", f"must be >= 0, got {reserve_gib}")
    check_layout(args, tp, ep)
    cards = max(tp, ep)
    dp = cards // tp
    notes: list[str] = []

    pc = count_params(args)
    held = weights
    if weights == "fp8" and hw.release_experts_as:
        check_weight_format(hw.release_experts_as)
        held = hw.release_experts_as
        notes.append(f"weights fp8 on {hw.name}: dsv4 holds the routed experts as {held} there (configs/hardware.yaml "
                     "release_experts_as) and sizes them so; as released (FP4) they would take about half")
    wb = weight_bytes(args, held, tp, ep, mtp=mtp, shared_expert=shared_expert)
    usable = hw.hbm_bytes * usable_fraction
    reserve = reserve_gib * GIB
    free_for_kv = usable - wb.per_card - reserve
    if free_for_kv <= 0:
        raise DoesNotFitError(f"{name} weights ({weights}) need {wb.per_card / GIB:.1f} GiB per card with tp={tp}, "
                        f"ep={ep}, but {hw.name} has {hw.hbm_gib:g} GiB x {usable_fraction:g} usable - "
                        f"{reserve_gib:g} GiB reserve = {(usable - reserve) / GIB:.1f} GiB; use more cards (larger "
                        "ep/tp) or smaller weights (fp8/w4a8)")

    kv = kv_cache_bytes(args, context, kv_dtype, mtp=mtp)
    max_seqs_per_card = int(free_for_kv // kv.per_sequence)
    seqs_per_card = math.ceil(batch / dp)  # every card of a DP group holds the KV of all the group's sequences
    kv_card = seqs_per_card * kv.per_sequence
    fits = seqs_per_card <= max_seqs_per_card
    if not fits:
        notes.append(f"batch {batch} does not fit: at most {max_seqs_per_card * dp} sequences of {context:,} tokens "
                     f"({max_seqs_per_card} per DP group of {tp} cards)")
    notes.append("KV is not split by TP: V4 has one shared KV head (MQA), so each TP rank holds the whole latent of "
                 "its sequences; only context/sequence parallelism would split it")

    # decode: one step makes one token for every sequence. Per card it streams the dense weights once, the routed
    # experts that this step's tokens touch, and the KV its sequences read.
    tokens_per_ep_group = batch * ep / cards
    touched = _expected_touched(args.n_routed_experts, args.n_activated_experts, tokens_per_ep_group)
    expert_read = wb.experts_per_card_layers * touched * wb.expert_bytes_one
    kv_read = seqs_per_card * kv_read_per_token(args, context, kv_dtype, mtp=mtp)
    step_bytes = wb.dense_read_per_step + expert_read + kv_read
    mem_s = step_bytes / (hw.hbm_tbps * 1e12)

    peak, label = _peak_tflops(hw, held, notes)
    per_token_flops = matmul_flops_per_token(args) + attention_flops_per_token(args, context, mtp=False)
    comp_s = batch * per_token_flops / cards / (peak * 1e12)
    step_s = max(mem_s, comp_s)
    bound = "memory" if mem_s >= comp_s else "compute"

    # prefill: compute bound; the attention cost grows along the prompt, so average it over positions
    samples = 64
    avg_attn = sum(attention_flops_per_token(args, max(1, int(context * (i + 0.5) / samples)))
                   for i in range(samples)) / samples
    prefill_flops_tok = matmul_flops_per_token(args) + avg_attn
    prefill_tok_s = peak * 1e12 / prefill_flops_tok
    notes.append("roofline: no communication, no kernel inefficiency; MTP/speculative tokens not counted")
    for n, _ in workload or []:
        if n > args.max_position_embeddings:
            raise PlanError("workload", f"length {n} exceeds max_position_embeddings={args.max_position_embeddings}")
    pool = pool_plan(args, free_for_kv, dp, kv_dtype, mtp, workload or [(context, 1.0)], block_tokens,
                     ttft_ms, context, cards * peak * 1e12)

    return Plan(
        model=name, hardware=hw.name, weights=weights, kv_dtype=kv_dtype, tp=tp, ep=ep, cards=cards, dp=dp,
        context=context, batch=batch, mtp=mtp, shared_expert=shared_expert,
        params_total=pc.total, params_active=pc.active,
        hbm_gib=hw.hbm_gib, usable_gib=usable / GIB, reserve_gib=reserve_gib,
        weights_gib=wb.per_card / GIB, weights_by_kind_gib={k: v / GIB for k, v in wb.by_kind.items()},
        kv_per_seq_gib=kv.per_sequence / GIB, kv_per_token_bytes=kv.per_token_marginal,
        kv_fixed_per_seq_mib=(kv.window + kv.state) / 2**20,
        seqs_per_card=seqs_per_card, max_seqs_per_card=max_seqs_per_card, max_batch=max_seqs_per_card * dp,
        kv_gib_per_card=kv_card / GIB, free_gib_per_card=(free_for_kv - kv_card) / GIB, fits=fits,
        decode_bytes_per_step=step_bytes, decode_step_ms=step_s * 1e3, decode_bound=bound,
        decode_tok_s_per_card=batch / cards / step_s, decode_tok_s_per_seq=1.0 / step_s,
        prefill_peak_tflops=peak, prefill_peak_label=label, prefill_tok_s_per_card=prefill_tok_s,
        prefill_s_per_prompt=context * prefill_flops_tok / (cards * peak * 1e12),
        pool=pool, notes=notes,
    )


def _peak_tflops(hw: Hardware, weights: str, notes: list[str]) -> tuple[float, str]:
    """FP8 peak when the weights are 8-bit-or-less and the chip runs FP8 natively, else BF16. (The release also
    quantises activations to FP8 per 1x128 block, spec 7.2, so its GEMMs are FP8 GEMMs.)"""
    if weights != "bf16" and hw.native_fp8 and hw.fp8_tflops:
        return hw.fp8_tflops, "FP8"
    if hw.bf16_tflops:
        if weights in ("w8a8", "w4a8"):
            notes.append(f"{weights}: no INT8 peak in hardware.yaml, so the compute bound uses BF16 (conservative)")
        return hw.bf16_tflops, "BF16"
    if hw.fp8_tflops:
        notes.append(f"{hw.name} has no BF16 figure in hardware.yaml; assumed FP8/2")
        return hw.fp8_tflops / 2, "BF16~FP8/2"
    raise PlanError("hardware", f"{hw.name} has no BF16 or FP8 peak in hardware.yaml")


# ---------------------------------------------------------------------------------------------------------------------
# text output


def _table(rows: Iterable[tuple[str, str]]) -> str:
    rows = list(rows)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def format_plan(p: Plan) -> str:
    kinds = sorted(p.weights_by_kind_gib.items(), key=lambda kv: -kv[1])
    split = ", ".join(f"{k} {v:.2f}" for k, v in kinds if v >= 0.005)
    head = (f"dsv4 plan: {p.model} on {p.cards} x {p.hardware} (tp={p.tp}, ep={p.ep}, attention dp={p.dp}), "
            f"weights {p.weights}, KV {p.kv_dtype}, context {p.context:,}, batch {p.batch}"
            f"{', MTP' if p.mtp else ''}")
    rows = [
        ("parameters", f"{p.params_total / 1e9:,.1f}B total, {p.params_active / 1e9:,.2f}B active per token "
                       "(embed+head incl., MTP excl.)"),
        ("HBM per card", f"{p.hbm_gib:g} GiB, usable {p.usable_gib:.1f} GiB (minus {p.reserve_gib:g} GiB reserve)"),
        ("weights per card", f"{p.weights_gib:.2f} GiB  [{split}]"),
        ("KV per sequence", f"{p.kv_per_seq_gib:.3f} GiB at {p.context:,} tokens "
                            f"({p.kv_per_token_bytes:,.0f} B/token + {p.kv_fixed_per_seq_mib:.1f} MiB fixed); "
                            "whole on every TP rank"),
        ("KV per card", f"{p.kv_gib_per_card:.2f} GiB for {p.seqs_per_card} sequence(s); free after: "
                        f"{p.free_gib_per_card:.2f} GiB"),
        ("max concurrent seqs", f"{p.max_batch} over the deployment ({p.max_seqs_per_card} per DP group)"),
        ("fits", "yes" if p.fits else "NO (batch too large)"),
        ("decode step", f"{p.decode_step_ms:.2f} ms ({p.decode_bound} bound; "
                        f"{p.decode_bytes_per_step / GIB:.2f} GiB read per card)"),
        ("decode tokens/s", f"{p.decode_tok_s_per_card:,.0f} per card, {p.decode_tok_s_per_seq:,.1f} per sequence"),
        ("prefill (compute)", f"{p.prefill_tok_s_per_card:,.0f} tokens/s per card at {p.prefill_peak_tflops:,.0f} "
                              f"TFLOPS {p.prefill_peak_label}; {p.prefill_s_per_prompt:.2f} s per {p.context:,}-token "
                              "prompt on all cards"),
        *format_pool_plan(p.pool),
    ]
    out = [head, _table(rows)]
    out += [f"  note: {n}" for n in p.notes]
    return "\n".join(out)


__all__ = [
    "ACTIVATION_RESERVE_GIB", "BF16", "Claims", "DSA_TOPK", "DoesNotFitError", "EP", "EXPERT", "FP32", "GIB",
    "HARDWARE_FILE", "Hardware", "INDEXER_FP8_SCALE_BYTES", "INT32", "KVBytes", "KV_DTYPES", "LINEAR",
    "MLA_FP8_ROW_BYTES", "MLA_KV_LORA_RANK", "MLA_ROPE_DIM", "ParamCounts", "Plan", "PlanError", "REPLICATED", "TP_IN",
    "TP_OUT", "Tensor", "USABLE_FRACTION", "V4_FP8_ROW_BYTES_FLASHMLA", "VOCAB", "W4_GROUP", "W8_SCALE_BYTES_PER_ROW",
    "WEIGHT_FORMATS", "WeightBytes", "attention_flops_per_token", "check_kv_dtype",
    "check_layout", "check_weight_format", "claims", "compressor_state_bytes", "count_params", "format_claims",
    "format_plan", "hardware_names", "indexer_row_bytes", "kv_cache_bytes", "kv_read_per_token", "kv_row_bytes",
    "load_hardware", "load_model", "matmul_flops_per_token", "mla_attention_flops_per_token",
    "mla_kv_bytes_per_token", "plan", "weight_bytes", "weight_inventory",
]

