"""Capacity planner: parameters, weight bytes per card, KV cache, and roofline throughput for DeepSeek-V4.

Everything here is closed-form arithmetic over `ModelArgs` and `configs/hardware.yaml`. No torch is needed, so the
planner runs on any machine, including one that has no accelerator.

Where the numbers come from:
- tensor shapes, dtypes and cache layout: shared/spec/dsv4-architecture.md (sections 5.1, 5.4, 5.5, 5.7, 6, 7);
- how tensors are sharded over tensor parallelism: the official reference model (wq_a and wkv are plain `Linear`, so
  replicated; wq_b and wo_a are `ColumnParallelLinear`; wo_b is `RowParallelLinear`; attn_sink holds the local heads;
  the indexer's wq_b and weights_proj are column-parallel over indexer heads; the embedding is vocab-parallel). This
  is the sharding that vLLM and SGLang also use;
- hardware figures: configs/hardware.yaml (secondary sources, see that file).

The roofline figures are upper bounds. They ignore communication (all-reduce, MoE dispatch and combine), kernel
efficiency, and scheduling, so real deployments land below them.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import CONFIG_DIR, FP4_BLOCK, FP8_BLOCK, ConfigError, ModelArgs, load_named_config

GIB = 1024**3
HARDWARE_FILE = CONFIG_DIR / "hardware.yaml"

# Share of HBM the runtime can use for weights plus KV. The rest goes to the framework, the allocator's fragmentation
# and the communication library. 0.9 is the usual default of vLLM's gpu_memory_utilization.
USABLE_FRACTION = 0.9
# Working memory kept free for activations, MoE dispatch buffers and graph capture. This is a rough default; pass your
# runtime's measured figure when you have one.
ACTIVATION_RESERVE_GIB = 4.0

# Weight formats the planner knows; see `_format_bytes` for the byte layout of each.
WEIGHT_FORMATS = ("fp8", "fp4", "bf16", "w8a8", "w4a8")
KV_DTYPES = ("bf16", "fp8")

# V3-style MLA baseline (DeepSeek-V3 config.json: kv_lora_rank 512, qk_rope_head_dim 64). One cached latent plus one
# rotary key per token per layer.
MLA_KV_LORA_RANK = 512
MLA_ROPE_DIM = 64
# DeepSeek-V3.2's FP8 MLA cache row: 512 e4m3 + 4 fp32 scales + 64 bf16 rope = 656 bytes (FlashMLA FP8 KV layout).
MLA_FP8_ROW_BYTES = 656
# V3.2's DSA picks 2048 tokens per query (DeepSeek-V3.2 config.json index_topk = 2048).
DSA_TOPK = 2048
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


# ---------------------------------------------------------------------------------------------------------------------
# hardware


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    hbm_gib: float
    hbm_tbps: float
    bf16_tflops: float | None
    fp8_tflops: float | None
    fp4_tflops: float | None
    native_fp8: bool
    native_fp4: bool
    interconnect_gbps: float | None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * GIB


def _read_hardware_file(path: Path | None = None) -> dict[str, Any]:
    path = path or HARDWARE_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PlanError("hardware", f"{path} not found") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        raise PlanError("hardware", f"{path}: expected a mapping with a 'devices' section")
    return data


def hardware_names(path: Path | None = None) -> list[str]:
    return sorted(_read_hardware_file(path)["devices"])


def load_hardware(name: str, path: Path | None = None) -> Hardware:
    """One device from configs/hardware.yaml, by name or alias (ascend-950 means ascend-950dt)."""
    data = _read_hardware_file(path)
    devices: dict[str, Any] = data["devices"]
    aliases: dict[str, str] = {str(k): v for k, v in (data.get("aliases") or {}).items()}
    key = name.strip().lower()
    key = aliases.get(key, key)
    if key not in devices:
        raise PlanError("hardware", f"unknown hardware {name!r}; known: {', '.join(sorted(devices))} "
                        f"(aliases: {', '.join(f'{a}->{t}' for a, t in sorted(aliases.items()))})")
    entry = devices[key]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for k, v in entry.items():
        if isinstance(v, dict) and "value" in v:
            values[k] = v["value"]
            sources[k] = str(v.get("source", ""))
        else:
            values[k] = v
    for required in ("hbm_gb", "hbm_tbps"):
        if not isinstance(values.get(required), (int, float)) or values[required] <= 0:
            raise PlanError("hardware", f"{key}: field '{required}' must be a positive number, got "
                            f"{values.get(required)!r}")
    return Hardware(
        name=key,
        description=str(values.get("description", key)),
        hbm_gib=float(values["hbm_gb"]),
        hbm_tbps=float(values["hbm_tbps"]),
        bf16_tflops=_opt_float(values.get("bf16_tflops")),
        fp8_tflops=_opt_float(values.get("fp8_tflops")),
        fp4_tflops=_opt_float(values.get("fp4_tflops")),
        native_fp8=bool(values.get("native_fp8", False)),
        native_fp4=bool(values.get("native_fp4", False)),
        interconnect_gbps=_opt_float(values.get("interconnect_gbps")),
        sources=sources,
    )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


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
BF16 = "bf16"  # kept in bf16 by the model whatever the checkpoint format (embed, head, gate, compressor, wo_a...)
FP32 = "fp32"  # kept in fp32 (hc_*, attn_sink, ape, gate bias, RMSNorm weights: spec 2.1, 7.2)
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
            # compressor (spec 5.4): kappa = 2 with overlap (ratio 4); stored bf16, replicated (it makes the shared KV)
            kc = (2 if ratio == 4 else 1) * D
            add("attn.compressor.ape", "compressor", (ratio, kc), FP32, REPLICATED)
            add("attn.compressor.wkv", "compressor", (kc, d), BF16, REPLICATED)
            add("attn.compressor.wgate", "compressor", (kc, d), BF16, REPLICATED)
            add("attn.compressor.norm", "compressor", (D,), FP32, REPLICATED)
        if ratio == 4:
            # lightning indexer (spec 5.5): heads split over TP, its compressor replicated
            add("attn.indexer.wq_b", "indexer", (HI * DI, args.q_lora_rank), LINEAR, TP_OUT)
            add("attn.indexer.weights_proj", "indexer", (HI, d), BF16, TP_OUT)
            add("attn.indexer.compressor.ape", "indexer", (4, 2 * DI), FP32, REPLICATED)
            add("attn.indexer.compressor.wkv", "indexer", (2 * DI, d), BF16, REPLICATED)
            add("attn.indexer.compressor.wgate", "indexer", (2 * DI, d), BF16, REPLICATED)
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
    if weights == "w8a8":
        return numel + W8_SCALE_BYTES_PER_ROW * rows
    if weights == "w4a8":
        if role == EXPERT:
            return numel / 2 + 4 * rows * math.ceil(cols / W4_GROUP)
        return numel + W8_SCALE_BYTES_PER_ROW * rows
    raise PlanError("weights", f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")


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
    if weights not in WEIGHT_FORMATS:
        raise PlanError("weights", f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
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
    if kv_dtype == "bf16":
        return 2.0 * args.head_dim
    if kv_dtype == "fp8":
        # non-rotary dims in e4m3 with one ue8m0 scale per 64-block (the QAT simulation of spec 2.3), rotary dims bf16,
        # padded to an even byte count (FlashMLA's V4 FP8 row: 448 + 128 + 7 + 1 = 584 bytes)
        raw = args.nope_head_dim + 2 * args.rope_head_dim + math.ceil(args.nope_head_dim / 64)
        return float(raw + raw % 2)
    raise PlanError("kv_dtype", f"unknown KV dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")


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


def mla_kv_bytes_per_token(args: ModelArgs, kv_dtype: str = "bf16", indexer: bool = False) -> float:
    """V3-style MLA baseline of the same depth: every layer caches a 512 latent + 64 rope key per token, uncompressed.
    indexer=True adds V3.2's DSA indexer key (D_I per token per layer)."""
    row = 2.0 * (MLA_KV_LORA_RANK + MLA_ROPE_DIM) if kv_dtype == "bf16" else float(MLA_FP8_ROW_BYTES)
    if indexer:
        row += indexer_row_bytes(args, kv_dtype)
    return args.n_layers * row


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


def mla_attention_flops_per_token(args: ModelArgs, context: int, dsa_topk: int | None = None) -> float:
    """V3-style absorbed MLA with the same heads and depth: q.k over 512 + 64 dims, p.v over 512, for every one of
    `context` keys (dense). dsa_topk=2048 gives V3.2's DSA instead: top-k keys plus an indexer over all tokens."""
    H = args.n_heads
    per_key = 2 * H * (MLA_KV_LORA_RANK + MLA_ROPE_DIM) + 2 * H * MLA_KV_LORA_RANK
    if dsa_topk is None:
        return args.n_layers * per_key * context
    idx = context * (2 * args.index_n_heads * args.index_head_dim + 2 * args.index_n_heads)
    return args.n_layers * (per_key * min(dsa_topk, context) + idx)


def matmul_flops_per_token(args: ModelArgs) -> float:
    """2 x active parameters, without the embedding (a gather, not a matmul) and without MTP."""
    pc = count_params(args)
    return 2.0 * (pc.active - pc.active_by_kind.get("embed", 0))


@dataclass
class Claims:
    context: int
    kv_v4: float  # bytes per token, averaged over the context (fixed parts amortised), MTP excluded
    kv_mla: float
    kv_dsa: float
    attn_flops_v4: float
    attn_flops_mla: float
    attn_flops_dsa: float
    matmul_flops: float

    @property
    def kv_vs_mla(self) -> float:
        return self.kv_v4 / self.kv_mla

    @property
    def kv_vs_dsa(self) -> float:
        return self.kv_v4 / self.kv_dsa

    @property
    def attn_vs_mla(self) -> float:
        return self.attn_flops_v4 / self.attn_flops_mla

    @property
    def total_vs_mla(self) -> float:
        return (self.attn_flops_v4 + self.matmul_flops) / (self.attn_flops_mla + self.matmul_flops)

    @property
    def total_vs_dsa(self) -> float:
        return (self.attn_flops_v4 + self.matmul_flops) / (self.attn_flops_dsa + self.matmul_flops)


def claims(args: ModelArgs, context: int = 1 << 20, kv_dtype: str = "bf16") -> Claims:
    """V4 against same-shape baselines at `context`: dense MLA (V3-style) and MLA + DSA indexer (V3.2-style).

    The baselines keep V4's depth and heads, so the ratios isolate the attention design. MTP is left out everywhere.
    """
    kv = kv_cache_bytes(args, context, kv_dtype, mtp=False)
    return Claims(
        context=context,
        kv_v4=kv.per_token_avg,
        kv_mla=mla_kv_bytes_per_token(args, kv_dtype),
        kv_dsa=mla_kv_bytes_per_token(args, kv_dtype, indexer=True),
        attn_flops_v4=attention_flops_per_token(args, context),
        attn_flops_mla=mla_attention_flops_per_token(args, context),
        attn_flops_dsa=mla_attention_flops_per_token(args, context, dsa_topk=DSA_TOPK),
        matmul_flops=matmul_flops_per_token(args),
    )


def format_claims(name: str, c: Claims) -> str:
    return "\n".join([
        f"{name} at {c.context:,} tokens (KV per token averaged over the context, MTP excluded):",
        f"  KV cache   V4 {c.kv_v4:,.0f} B/token | MLA {c.kv_mla:,.0f} B ({c.kv_vs_mla:.1%}) | "
        f"MLA+DSA indexer {c.kv_dsa:,.0f} B ({c.kv_vs_dsa:.1%})",
        f"  attention  V4 {c.attn_flops_v4 / 1e9:,.1f} GFLOP/token | dense MLA {c.attn_flops_mla / 1e9:,.1f} "
        f"({c.attn_vs_mla:.1%}) | DSA top-{DSA_TOPK} {c.attn_flops_dsa / 1e9:,.1f} "
        f"({c.attn_flops_v4 / c.attn_flops_dsa:.1%})",
        f"  + matmuls ({c.matmul_flops / 1e9:,.1f} GFLOP): vs dense MLA {c.total_vs_mla:.1%} | "
        f"vs DSA {c.total_vs_dsa:.1%}",
    ])


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
    notes: list[str] = field(default_factory=list)


def _expected_touched(experts: int, picks_per_token: int, tokens: float) -> float:
    """Expected share of `experts` that at least one of `tokens` tokens picks (uniform routing assumed)."""
    if tokens <= 0:
        return 0.0
    return 1.0 - (1.0 - picks_per_token / experts) ** tokens


def plan(model: str | Path | ModelArgs, hardware: str | Hardware, tp: int = 8, ep: int = 8,
         context: int = 131072, batch: int = 1, weights: str = "fp8", kv_dtype: str = "bf16",
         mtp: bool = True, shared_expert: str = TP_OUT, usable_fraction: float = USABLE_FRACTION,
         reserve_gib: float = ACTIVATION_RESERVE_GIB) -> Plan:
    """Capacity and roofline for one deployment.

    Layout: cards = max(tp, ep). Attention and the other dense parts are split over `tp` cards and replicated over
    dp = cards / tp data-parallel groups, each group serving its own sequences. Routed experts are split over `ep` cards
    (whole experts); the shared expert is TP-split by default. `batch` counts sequences over the whole deployment.

    Raises PlanError naming the field: model, hardware, tp, ep, weights, kv_dtype, context, batch; DoesNotFitError
    (field "memory") when the weights alone do not fit.
    """
    name, args = load_model(model)
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    if weights not in WEIGHT_FORMATS:
        raise PlanError("weights", f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if kv_dtype not in KV_DTYPES:
        raise PlanError("kv_dtype", f"unknown KV dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    if shared_expert not in (TP_OUT, REPLICATED):
        raise PlanError("shared_expert", f"expected {TP_OUT!r} or {REPLICATED!r}, got {shared_expert!r}")
    if not isinstance(batch, int) or batch < 1:
        raise PlanError("batch", f"must be a positive integer, got {batch!r}")
    if context < 1 or context > args.max_position_embeddings:
        raise PlanError("context", f"must be in [1, max_position_embeddings={args.max_position_embeddings}], "
                        f"got {context}")
    if not 0 < usable_fraction <= 1:
        raise PlanError("usable_fraction", f"must be in (0, 1], got {usable_fraction}")
    check_layout(args, tp, ep)
    cards = max(tp, ep)
    dp = cards // tp
    notes: list[str] = []

    pc = count_params(args)
    wb = weight_bytes(args, weights, tp, ep, mtp=mtp, shared_expert=shared_expert)
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

    peak, label = _peak_tflops(hw, weights, notes)
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
        notes=notes,
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
    ]
    out = [head, _table(rows)]
    out += [f"  note: {n}" for n in p.notes]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# CLI wiring (the lead hooks these into `dsv4 plan`)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="flash", help="flash | pro | tiny | path to a YAML/config.json")
    parser.add_argument("--hardware", default="ascend-950dt",
                        help="device in configs/hardware.yaml (ascend-950pr, ascend-950dt (alias ascend-950), "
                             "ascend-910b, ascend-910c, h200, b200, b300) or 'list'")
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel size of attention and dense parts")
    parser.add_argument("--ep", type=int, default=8, help="expert-parallel size; cards = max(tp, ep)")
    parser.add_argument("--context", type=int, default=131072, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="concurrent sequences over the deployment")
    parser.add_argument("--weights", default="fp8", choices=WEIGHT_FORMATS,
                        help="fp8 = the release (FP8 linears, FP4 experts); fp4; bf16; w8a8; w4a8")
    parser.add_argument("--kv-dtype", default="bf16", choices=KV_DTYPES)
    parser.add_argument("--no-mtp", action="store_true", help="leave out the MTP block's weights and cache")
    parser.add_argument("--shared-expert", default=TP_OUT, choices=(TP_OUT, REPLICATED))
    parser.add_argument("--usable-fraction", type=float, default=USABLE_FRACTION)
    parser.add_argument("--reserve-gib", type=float, default=ACTIVATION_RESERVE_GIB)
    parser.add_argument("--claims", action="store_true",
                        help="also print KV and attention FLOPs against MLA / DSA baselines at --context")


def run_plan(args: argparse.Namespace) -> int:
    """0: printed a plan that fits; 1: printed a plan whose batch does not fit; 2: no plan (error on stderr)."""
    try:
        if args.hardware == "list":
            for n in hardware_names():
                hw = load_hardware(n)
                print(f"{n:14s} {hw.hbm_gib:6g} GiB {hw.hbm_tbps:4g} TB/s  {hw.description}")
            return 0
        p = plan(args.model, args.hardware, tp=args.tp, ep=args.ep, context=args.context, batch=args.batch,
                 weights=args.weights, kv_dtype=args.kv_dtype, mtp=not args.no_mtp,
                 shared_expert=args.shared_expert, usable_fraction=args.usable_fraction,
                 reserve_gib=args.reserve_gib)
        print(format_plan(p))
        if args.claims:
            print(format_claims(p.model, claims(load_model(args.model)[1], args.context, args.kv_dtype)))
        return 0 if p.fits else 1
    except PlanError as e:
        print(f"dsv4 plan: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4 plan", description="DeepSeek-V4 capacity planner")
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
