"""Closed-form sizes for the capacity planner (common/planner.py): the weight inventory, parameter counts, weight
bytes per card for a TP x EP layout, KV cache bytes, and attention / matmul FLOPs per token, all from `ModelArgs`.

Where the numbers come from:
- tensor shapes, dtypes and cache layout: shared/spec/dsv4-architecture.md (sections 5.1, 5.4, 5.5, 5.7, 6, 7);
- how tensors are sharded over tensor parallelism: the official reference model (wq_a and wkv are plain `Linear`, so
  replicated; wq_b and wo_a are `ColumnParallelLinear`; wo_b is `RowParallelLinear`; attn_sink holds the local heads;
  the indexer's wq_b and weights_proj are column-parallel over indexer heads; the embedding is vocab-parallel). This
  is the sharding that vLLM and SGLang also use.

No torch is needed. Everything here is importable from common/planner.py too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv4.common.model.config import FP4_BLOCK, FP8_BLOCK, ConfigError, ModelArgs, load_named_config

GIB = 1024**3

# Weight formats the planner knows; see `_format_bytes` for the byte layout of each.
WEIGHT_FORMATS = ("fp8", "fp4", "mxfp8", "bf16", "w8a8", "w4a8")
KV_DTYPES = ("bf16", "fp8")

# The V4 FP8 KV row in FlashMLA's sparse V4 ("MODEL1") layout: 448 e4m3 non-rotary dims, 64 bf16 rotary dims,
# 7 ue8m0 scales (one per 64-block, spec 2.3) and 1 padding byte = 584 bytes. We derive it from the config below and
# check it against this figure in the tests.
V4_FP8_ROW_BYTES_FLASHMLA = 584
# Indexer key in FP8: D_I e4m3 values plus one fp32 scale per row (the V3.2 indexer K cache: 128 + 4 = 132 bytes).
INDEXER_FP8_SCALE_BYTES = 4

# msmodelslim layouts were not read: we assume per-output-channel fp32 scales for INT8 and one fp32 scale per
# 256-element group for INT4. The scales are under 2% of the bytes either way.
W8_SCALE_BYTES_PER_ROW = 4
W4_GROUP = 256


class PlanError(ValueError):
    """A plan cannot be made. `field` names the argument at fault (model, hardware, tp, ep, weights, ...)."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


class DoesNotFitError(PlanError):
    """The weights alone (plus the reserve) exceed the usable HBM of one card; field is "memory"."""

    def __init__(self, message: str) -> None:
        super().__init__("memory", message)


def check_weight_format(weights: str) -> None:
    """PlanError("weights") unless `weights` is one of WEIGHT_FORMATS."""
    if weights not in WEIGHT_FORMATS:
        raise PlanError("weights", f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")


def check_kv_dtype(kv_dtype: str) -> None:
    """PlanError("kv_dtype") unless `kv_dtype` is one of KV_DTYPES."""
    if kv_dtype not in KV_DTYPES:
        raise PlanError("kv_dtype", f"unknown KV dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")


def load_model(model: str | Path | ModelArgs) -> tuple[str, ModelArgs]:
    """('flash', args) from 'flash' | 'pro' | 'tiny' | a path | ModelArgs; PlanError('model') when unknown."""
    if isinstance(model, ModelArgs):
        return "custom", model
    try:
        return Path(str(model)).stem, load_named_config(model)
    except ConfigError as e:
        raise PlanError("model", f"cannot load {str(model)!r} (expected flash, pro, tiny or a config path): {e}") \
            from None


# ---------------------------------------------------------------------------------------------------------------------
# weight inventory
#
# One row per tensor (per layer), with what the planner needs: its shape, how many copies (routed experts), its storage
# role, how it is sharded, and which share of it one token uses. Parameter counts and bytes both come from this list,
# so they cannot disagree.

# storage roles
LINEAR = "linear"  # quantised linear in the release (FP8 128x128 blocks); follows --weights
EXPERT = "expert"  # routed-expert linear (FP4 1x32 in the release); follows --weights
BF16 = "bf16"  # kept in bf16 by the model whatever the checkpoint format (embed, head, gate, wo_a...)
FP32 = "fp32"  # kept in fp32 (hc_*, attn_sink, ape, gate bias, RMSNorm weights: spec 2.1, 7.2; compressor wkv/wgate)
INT32 = "int32"  # a buffer, not a parameter (tid2eid of the hash layers, spec 6.1)

# sharding rules
REPLICATED = "replicated"
TP_OUT = "tp_out"  # column-parallel: rows (output features) split over TP
TP_IN = "tp_in"  # row-parallel: columns (input features) split over TP
VOCAB = "vocab"  # vocab-parallel embedding / head: rows split over TP
EP = "ep"  # whole routed experts split over EP


@dataclass(frozen=True)
class Tensor:
    name: str  # e.g. "layers.3.attn.wq_b"
    kind: str  # breakdown bucket: embed, head, attn, compressor, indexer, routed_experts, shared_experts, gate, hc, ...
    layer_kind: str  # window | csa | hca | mtp | "" (global)
    shape: tuple[int, ...]  # (out, in) for linears, (n,) for vectors
    role: str
    shard: str
    copies: int = 1  # routed experts: E copies of the same shape
    active: float = 1.0  # share of the copies one token uses (k/E for routed experts)
    is_param: bool = True
    mtp: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.copies


def _layer_kind(ratio: int) -> str:
    return {0: "window", 4: "csa", 128: "hca"}[ratio]


def weight_inventory(args: ModelArgs, shared_expert: str = TP_OUT) -> list[Tensor]:
    """Every tensor of the model (spec 7.1) with its storage role and sharding.

    shared_expert: "tp_out" splits the shared expert like a dense MLP (w1/w3 column-, w2 row-parallel, as the official
    `MLP`); "replicated" keeps a whole copy on every card.
    """
    d, n = args.dim, args.hc_mult
    H, D, V = args.n_heads, args.head_dim, args.vocab_size
    HI, DI = args.index_n_heads, args.index_head_dim
    E, k, inter = args.n_routed_experts, args.n_activated_experts, args.moe_inter_dim
    mix = (2 + n) * n  # hc_pre's pre + post + comb logits (spec 4)
    se_col = TP_OUT if shared_expert == TP_OUT else REPLICATED
    se_row = TP_IN if shared_expert == TP_OUT else REPLICATED

    out: list[Tensor] = [
        Tensor("embed.weight", "embed", "", (V, d), BF16, VOCAB),
        Tensor("head.weight", "head", "", (V, d), BF16, VOCAB),
        Tensor("norm.weight", "norm", "", (d,), FP32, REPLICATED),
        Tensor("hc_head_fn", "hc", "", (n, n * d), FP32, REPLICATED),
        Tensor("hc_head_base", "hc", "", (n,), FP32, REPLICATED),
        Tensor("hc_head_scale", "hc", "", (1,), FP32, REPLICATED),
    ]

    def block(prefix: str, layer_id: int, ratio: int, mtp: bool) -> list[Tensor]:
        lk = "mtp" if mtp else _layer_kind(ratio)
        t: list[Tensor] = []

        def add(name: str, kind: str, shape: tuple[int, ...], role: str, shard: str, **kw: Any) -> None:
            t.append(Tensor(f"{prefix}.{name}", kind, lk, shape, role, shard, mtp=mtp, **kw))

        for site in ("attn", "ffn"):
            add(f"{site}_norm.weight", "norm", (d,), FP32, REPLICATED)
            add(f"hc_{site}_fn", "hc", (mix, n * d), FP32, REPLICATED)
            add(f"hc_{site}_base", "hc", (mix,), FP32, REPLICATED)
            add(f"hc_{site}_scale", "hc", (3,), FP32, REPLICATED)
        # attention (spec 5.1)
        add("attn.wq_a", "attn", (args.q_lora_rank, d), LINEAR, REPLICATED)
        add("attn.q_norm", "norm", (args.q_lora_rank,), FP32, REPLICATED)
        add("attn.wq_b", "attn", (H * D, args.q_lora_rank), LINEAR, TP_OUT)
        add("attn.wkv", "attn", (D, d), LINEAR, REPLICATED)  # ONE shared KV head: no TP split possible
        add("attn.kv_norm", "norm", (D,), FP32, REPLICATED)
        # convert.py dequantises wo_a to bf16 for the model (spec 5.1), so it is bf16 in memory for every format
        add("attn.wo_a", "attn", (args.o_groups * args.o_lora_rank, H * D // args.o_groups), BF16, TP_OUT)
        add("attn.wo_b", "attn", (d, args.o_groups * args.o_lora_rank), LINEAR, TP_IN)
        add("attn.attn_sink", "attn", (H,), FP32, TP_OUT)
        if ratio:
            # compressor (spec 5.4): kappa = 2 with overlap (ratio 4); replicated (it makes the shared KV); wkv / wgate
            # stored bf16, kept fp32 in memory as the official model keeps them (they are computed in fp32)
            kc = (2 if ratio == 4 else 1) * D
            add("attn.compressor.ape", "compressor", (ratio, kc), FP32, REPLICATED)
            add("attn.compressor.wkv", "compressor", (kc, d), FP32, REPLICATED)
            add("attn.compressor.wgate", "compressor", (kc, d), FP32, REPLICATED)
            add("attn.compressor.norm", "compressor", (D,), FP32, REPLICATED)
        if ratio == 4:
            # lightning indexer (spec 5.5): heads split over TP, its compressor replicated
            add("attn.indexer.wq_b", "indexer", (HI * DI, args.q_lora_rank), LINEAR, TP_OUT)
            add("attn.indexer.weights_proj", "indexer", (HI, d), BF16, TP_OUT)
            add("attn.indexer.compressor.ape", "indexer", (4, 2 * DI), FP32, REPLICATED)
            add("attn.indexer.compressor.wkv", "indexer", (2 * DI, d), FP32, REPLICATED)
            add("attn.indexer.compressor.wgate", "indexer", (2 * DI, d), FP32, REPLICATED)
            add("attn.indexer.compressor.norm", "indexer", (DI,), FP32, REPLICATED)
        # MoE (spec 6): gate replicated (every card routes its own tokens)
        add("ffn.gate.weight", "gate", (E, d), BF16, REPLICATED)
        if not mtp and layer_id < args.n_hash_layers:
            add("ffn.gate.tid2eid", "gate", (V, k), INT32, REPLICATED, is_param=False)
        else:
            add("ffn.gate.bias", "gate", (E,), FP32, REPLICATED)
        for w, shape in (("w1", (inter, d)), ("w3", (inter, d)), ("w2", (d, inter))):
            add(f"ffn.experts.{w}", "routed_experts", shape, EXPERT, EP, copies=E, active=k / E)
        for w, shape, sh in (("w1", (inter, d), se_col), ("w3", (inter, d), se_col), ("w2", (d, inter), se_row)):
            add(f"ffn.shared_experts.{w}", "shared_experts", shape, LINEAR, sh)
        return t

    for i in range(args.n_layers):
        out += block(f"layers.{i}", i, args.compress_ratios[i], mtp=False)
    for j in range(args.n_mtp_layers):
        prefix = f"mtp.{j}"
        out += block(prefix, args.n_layers + j, args.compress_ratios[args.n_layers + j], mtp=True)
        # MTP extras (spec 8); e_proj/h_proj are FP8 like the other dense linears, replicated (small, d x d)
        for name in ("e_proj", "h_proj"):
            out.append(Tensor(f"{prefix}.{name}", "mtp", "mtp", (d, d), LINEAR, REPLICATED, mtp=True))
        for name in ("enorm", "hnorm", "norm"):
            out.append(Tensor(f"{prefix}.{name}", "norm", "mtp", (d,), FP32, REPLICATED, mtp=True))
        out.append(Tensor(f"{prefix}.hc_head_fn", "hc", "mtp", (n, n * d), FP32, REPLICATED, mtp=True))
        out.append(Tensor(f"{prefix}.hc_head_base", "hc", "mtp", (n,), FP32, REPLICATED, mtp=True))
        out.append(Tensor(f"{prefix}.hc_head_scale", "hc", "mtp", (1,), FP32, REPLICATED, mtp=True))
    return out


@dataclass
class ParamCounts:
    total: int  # embed + head included, MTP excluded (the convention of the published 284B / 1.6T)
    active: int  # per token: everything but the unused routed experts (embed + head included), MTP excluded
    mtp: int  # the MTP block's own parameters (it shares embed and head)
    by_kind: dict[str, int]  # main model, by bucket
    by_layer_kind: dict[str, int]  # main model, by attention kind (window / csa / hca / "" = global)
    active_by_kind: dict[str, int]


def count_params(args: ModelArgs) -> ParamCounts:
    """Parameter counts from the config. Buffers (tid2eid) are not parameters."""
    inv = [t for t in weight_inventory(args) if t.is_param]
    by_kind: dict[str, int] = {}
    by_lk: dict[str, int] = {}
    act_kind: dict[str, int] = {}
    total = active = mtp = 0
    for t in inv:
        if t.mtp:
            mtp += t.numel
            continue
        total += t.numel
        a = round(t.numel * t.active)
        active += a
        by_kind[t.kind] = by_kind.get(t.kind, 0) + t.numel
        act_kind[t.kind] = act_kind.get(t.kind, 0) + a
        by_lk[t.layer_kind] = by_lk.get(t.layer_kind, 0) + t.numel
    return ParamCounts(total, active, mtp, by_kind, by_lk, act_kind)


# ---------------------------------------------------------------------------------------------------------------------
# weight bytes


def _format_bytes(shape: tuple[int, ...], role: str, weights: str) -> float:
    """Bytes of one (already sharded) tensor of `shape` in the in-memory layout of the given weight format.

    fp8  : the release. Dense linears FP8 e4m3 + one ue8m0 byte per 128x128 block; routed experts FP4 e2m1 (half a byte)
           + one ue8m0 byte per 1x32 block (spec 7.2).
    fp4  : every quantised linear as MXFP4 (e2m1 + one ue8m0 byte per 1x32), like the routed experts. No checkpoint
           ships this way; it bounds what a 950-class FP4 conversion could save.
    mxfp8: the release's dense linears; routed experts FP8 e4m3 + one e8m0 byte per 1x32 (MXFP8): how the Ascend
           backend holds them on 950 for npu_grouped_matmul's MX form (ascend/convert.py to_mxfp8, an exact
           conversion of the FP4 experts at twice their bytes).
    bf16 : every linear in bf16 (a dequantised checkpoint).
    w8a8 : INT8 linears and experts, per-output-channel fp32 scales (msmodelslim W8A8 as used by vllm-ascend; layout
           assumed, not read).
    w4a8 : INT8 dense linears, INT4 routed experts with one fp32 scale per 256-element group (msmodelslim W4A8;
           layout assumed, not read).
    bf16 / fp32 / int32 roles are independent of the format.
    """
    numel = math.prod(shape)
    if role == BF16:
        return 2.0 * numel
    if role in (FP32, INT32):
        return 4.0 * numel
    check_weight_format(weights)
    rows = shape[0]
    cols = shape[1] if len(shape) > 1 else 1

    def fp8_blocks() -> float:
        return numel + math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK)

    def fp4_mx() -> float:
        return numel / 2 + rows * math.ceil(cols / FP4_BLOCK)

    if weights == "bf16":
        return 2.0 * numel
    if weights == "fp8":
        return fp4_mx() if role == EXPERT else fp8_blocks()
    if weights == "fp4":
        return fp4_mx()
    if weights == "mxfp8":
        return numel + rows * math.ceil(cols / FP4_BLOCK) if role == EXPERT else fp8_blocks()
    if weights == "w8a8":
        return numel + W8_SCALE_BYTES_PER_ROW * rows
    # w4a8 (the last of WEIGHT_FORMATS)
    if role == EXPERT:
        return numel / 2 + 4 * rows * math.ceil(cols / W4_GROUP)
    return numel + W8_SCALE_BYTES_PER_ROW * rows


def _shard_shape(t: Tensor, tp: int) -> tuple[int, ...]:
    if t.shard in (TP_OUT, VOCAB):
        return (t.shape[0] // tp, *t.shape[1:])
    if t.shard == TP_IN:
        return (t.shape[0], t.shape[1] // tp)
    return t.shape


@dataclass
class WeightBytes:
    per_card: float  # bytes on the fullest card
    by_kind: dict[str, float]  # per card, by bucket
    dense_read_per_step: float  # bytes of non-routed weights one decode step streams (embedding excluded: a gather)
    expert_bytes_one: float  # bytes of one routed expert in one layer (w1 + w2 + w3)
    experts_per_card_layers: int  # routed-expert instances (expert x MoE layer) on one card
    routed_layers: int


def weight_bytes(args: ModelArgs, weights: str, tp: int, ep: int, mtp: bool = True,
                 shared_expert: str = TP_OUT) -> WeightBytes:
    """Bytes of weights on one card for a TP x EP layout (see `plan` for how TP and EP map to cards)."""
    check_weight_format(weights)
    check_layout(args, tp, ep)
    by_kind: dict[str, float] = {}
    per_card = dense_read = 0.0
    for t in weight_inventory(args, shared_expert):
        if t.mtp and not mtp:
            continue
        if t.shard == EP:
            b = _format_bytes(t.shape, t.role, weights) * (t.copies // ep)
        else:
            b = _format_bytes(_shard_shape(t, tp), t.role, weights)
            if t.kind != "embed":  # the embedding is a gather: a decode step reads only a few rows
                dense_read += b
        per_card += b
        by_kind[t.kind] = by_kind.get(t.kind, 0.0) + b
    inter, d = args.moe_inter_dim, args.dim
    expert_one = sum(_format_bytes(s, EXPERT, weights) for s in ((inter, d), (inter, d), (d, inter)))
    n_moe = args.n_layers + (args.n_mtp_layers if mtp else 0)
    return WeightBytes(per_card, by_kind, dense_read, expert_one, (args.n_routed_experts // ep) * n_moe, n_moe)


def check_layout(args: ModelArgs, tp: int, ep: int) -> None:
    """TP must split heads, output groups, indexer heads, vocab and the shared expert evenly; EP must split experts."""
    if not isinstance(tp, int) or tp < 1:
        raise PlanError("tp", f"must be a positive integer, got {tp!r}")
    if not isinstance(ep, int) or ep < 1:
        raise PlanError("ep", f"must be a positive integer, got {ep!r}")
    for what, value in (("n_heads", args.n_heads), ("o_groups", args.o_groups),
                        ("index_n_heads", args.index_n_heads), ("vocab_size", args.vocab_size),
                        ("moe_inter_dim", args.moe_inter_dim)):
        if value % tp:
            raise PlanError("tp", f"tp={tp} does not divide {what}={value} (wq_b/wo_a/attn_sink split heads and "
                            "output groups, the indexer splits its heads, embed/head split the vocab)")
    if args.n_routed_experts % ep:
        raise PlanError("ep", f"ep={ep} does not divide n_routed_experts={args.n_routed_experts}")
    world = max(tp, ep)
    if world % tp or world % ep:
        raise PlanError("ep", f"tp={tp} and ep={ep}: the larger must be a multiple of the smaller (cards = "
                        f"max(tp, ep); attention runs data-parallel over cards/tp groups)")


# ---------------------------------------------------------------------------------------------------------------------
# KV cache (spec 5.7)


def kv_row_bytes(args: ModelArgs, kv_dtype: str) -> float:
    """Bytes of one cached KV row (window slot or compressed entry), width D = head_dim."""
    check_kv_dtype(kv_dtype)
    if kv_dtype == "bf16":
        return 2.0 * args.head_dim
    # fp8: non-rotary dims in e4m3 with one ue8m0 scale per 64-block (the QAT simulation of spec 2.3), rotary dims
    # bf16, padded to an even byte count (FlashMLA's V4 FP8 row: 448 + 128 + 7 + 1 = 584 bytes)
    raw = args.nope_head_dim + 2 * args.rope_head_dim + math.ceil(args.nope_head_dim / 64)
    return float(raw + raw % 2)


def indexer_row_bytes(args: ModelArgs, kv_dtype: str) -> float:
    if kv_dtype == "bf16":
        return 2.0 * args.index_head_dim  # spec 5.7: the indexer cache is bf16
    return float(args.index_head_dim + INDEXER_FP8_SCALE_BYTES)


def compressor_state_bytes(ratio: int, width: int) -> int:
    """kv_state + score_state, fp32, [kappa*m, kappa*c] each (spec 5.7); per sequence."""
    kappa = 2 if ratio == 4 else 1
    return 2 * (kappa * ratio) * (kappa * width) * 4


@dataclass
class KVBytes:
    context: int
    per_sequence: float  # all of it, for one sequence of `context` tokens
    window: float  # W ring rows, all layers (fixed)
    compressed: float  # compressed entries
    indexer: float  # indexer keys
    state: float  # compressor states (fixed)
    per_token_marginal: float  # bytes added per extra token (compressed + indexer rows, amortised)

    @property
    def per_token_avg(self) -> float:
        return self.per_sequence / max(1, self.context)


def _layers(args: ModelArgs, mtp: bool) -> list[int]:
    n = args.n_layers + (args.n_mtp_layers if mtp else 0)
    return args.compress_ratios[:n]


def kv_cache_bytes(args: ModelArgs, context: int, kv_dtype: str = "bf16", mtp: bool = True) -> KVBytes:
    """KV cache of one sequence at `context` tokens, per the reference layout (spec 5.7).

    Per attention layer: W ring rows [W, D]; context//ratio compressed rows [., D]; for ratio 4 an indexer cache
    [context//4, D_I]; plus fp32 compressor states. V4 has ONE KV head (MQA), so TP does not split any of this: every TP
    rank of a sequence holds all of it (only context/sequence parallelism would split it).
    """
    if context < 1:
        raise PlanError("context", f"must be >= 1, got {context}")
    row = kv_row_bytes(args, kv_dtype)
    irow = indexer_row_bytes(args, kv_dtype)
    window = compressed = indexer = state = marginal = 0.0
    for r in _layers(args, mtp):
        window += args.window_size * row
        if r:
            compressed += (context // r) * row
            state += compressor_state_bytes(r, args.head_dim)
            marginal += row / r
        if r == 4:
            indexer += (context // 4) * irow
            state += compressor_state_bytes(4, args.index_head_dim)
            marginal += irow / 4
    total = window + compressed + indexer + state
    return KVBytes(context, total, window, compressed, indexer, state, marginal)


def kv_read_per_token(args: ModelArgs, context: int, kv_dtype: str = "bf16", mtp: bool = True) -> float:
    """Cache bytes one decode step reads for one sequence at `context`: the window, the top-k CSA entries, all HCA
    entries, and ALL indexer keys (the indexer scores every compressed entry before choosing the top-k)."""
    row = kv_row_bytes(args, kv_dtype)
    irow = indexer_row_bytes(args, kv_dtype)
    total = 0.0
    for r in _layers(args, mtp):
        total += min(args.window_size, context) * row
        if r == 4:
            total += min(args.index_topk, context // 4) * row + (context // 4) * irow
        elif r:
            total += (context // r) * row
    return total


# ---------------------------------------------------------------------------------------------------------------------
# attention FLOPs per token


def attention_flops_per_token(args: ModelArgs, context: int, mtp: bool = False) -> float:
    """FLOPs of the attention core for one query token that sees `context` tokens (projections excluded: they are in
    2 x active params).

    Per key and head, q.k and p.v cost 2*D each (K = V, width D). CSA attends W + top-k entries and its indexer scores
    every one of the context/4 entries with H_I heads of width D_I (plus the relu-weighted head sum); HCA attends
    W + context/128 entries; window-only layers attend W.
    """
    H, D = args.n_heads, args.head_dim
    total = 0.0
    for r in _layers(args, mtp):
        keys = min(args.window_size, context)
        if r == 4:
            entries = context // 4
            keys += min(args.index_topk, entries)
            total += entries * (2 * args.index_n_heads * args.index_head_dim + 2 * args.index_n_heads)
        elif r:
            keys += context // r
        total += 4 * H * D * keys
    return total

def matmul_flops_per_token(args: ModelArgs) -> float:
    """2 x active parameters, without the embedding (a gather, not a matmul) and without MTP."""
    pc = count_params(args)
    return 2.0 * (pc.active - pc.active_by_kind.get("embed", 0))
