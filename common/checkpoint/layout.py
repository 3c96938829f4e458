"""The official checkpoint layout: tensor names, shapes and dtypes (spec 7.1/7.2), which tensor is a routed expert's,
how tensor-parallel ranks split each tensor, and deterministic random checkpoints in that layout.

Pure description: filling a model is load.py, reading safetensors files reader.py, writing them writer.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from dsv4.common.model.config import FP4_BLOCK, FP8_BLOCK, ModelArgs
from dsv4.common.model.parallel import ParallelError
from dsv4.common.model.quant import float_to_e8m0, quantize_fp4, quantize_fp8

QUANT_MODES = ("none", "fp8", "fp4")


class CheckpointError(ValueError):
    """A checkpoint does not match what the model expects; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype names: BF16, F32, F8_E4M3, F8_E8M0, I8, I32 (I64 accepted for tid2eid)
    kind: str  # "dense" (bf16 in the release), "fp32", "fp8" weight, "fp4" weight, "scale", "index"
    init_std: float = 0.0  # random checkpoints: std of the dense value (0 = constant `init_const`)
    init_const: float = 0.0
    role: str = ""  # structured random checkpoints: "linear" (a GEMM weight), "norm" (an RMSNorm gain), "embed"


def args_for_quant(args: ModelArgs, quant: str) -> ModelArgs:
    """The weight formats a checkpoint of this quant mode declares: none = all bf16; fp8 = FP8 linears and FP8
    experts (convert.py --expert-dtype fp8); fp4 = the official release (FP8 linears, FP4 experts)."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    return args.replace(dtype="bf16" if quant == "none" else "fp8",
                        expert_dtype={"none": "bf16", "fp8": "fp8", "fp4": "fp4"}[quant])


def checkpoint_layout(args: ModelArgs) -> dict[str, TensorSpec]:
    """Every tensor of a checkpoint for `args` (its dtype / expert_dtype fields say which formats), in order."""
    a, out = args, {}
    n, d = a.hc_mult, a.dim
    mix = (2 + n) * n

    def dense(name: str, shape: tuple[int, ...], std: float) -> None:
        out[name] = TensorSpec(shape, "BF16", "dense", std)

    def fp32(name: str, shape: tuple[int, ...], std: float = 0.0, const: float = 0.0) -> None:
        out[name] = TensorSpec(shape, "F32", "fp32", std, const)

    def norm(name: str, dim: int) -> None:
        out[name] = TensorSpec((dim,), "BF16", "dense", 0.1, 1.0, role="norm")

    def linear(name: str, n_out: int, n_in: int, fmt: str) -> None:
        std = n_in ** -0.5
        if fmt == "fp8":
            out[f"{name}.weight"] = TensorSpec((n_out, n_in), "F8_E4M3", "fp8", std, role="linear")
            out[f"{name}.scale"] = TensorSpec((-(-n_out // FP8_BLOCK), -(-n_in // FP8_BLOCK)), "F8_E8M0", "scale")
        elif fmt == "fp4":
            out[f"{name}.weight"] = TensorSpec((n_out, n_in // 2), "I8", "fp4", std, role="linear")
            out[f"{name}.scale"] = TensorSpec((n_out, n_in // FP4_BLOCK), "F8_E8M0", "scale")
        else:
            out[f"{name}.weight"] = TensorSpec((n_out, n_in), "BF16", "dense", std, role="linear")

    fmt = "fp8" if a.dtype == "fp8" else "none"
    efmt = {"fp4": "fp4", "fp8": "fp8", "bf16": "none"}[a.expert_dtype]

    def block(p: str, layer_id: int) -> None:
        ratio = a.compress_ratios[layer_id]
        H, D, G = a.n_heads, a.head_dim, a.o_groups
        norm(f"{p}attn_norm.weight", d)
        norm(f"{p}ffn_norm.weight", d)
        for sub in ("attn", "ffn"):
            fp32(f"{p}hc_{sub}_fn", (mix, n * d), std=(n * d) ** -0.5)
            fp32(f"{p}hc_{sub}_base", (mix,), std=0.5)
            fp32(f"{p}hc_{sub}_scale", (3,), std=0.1, const=1.0)
        linear(f"{p}attn.wq_a", a.q_lora_rank, d, fmt)
        norm(f"{p}attn.q_norm.weight", a.q_lora_rank)
        linear(f"{p}attn.wq_b", H * D, a.q_lora_rank, fmt)
        linear(f"{p}attn.wkv", D, d, fmt)
        norm(f"{p}attn.kv_norm.weight", D)
        linear(f"{p}attn.wo_a", G * a.o_lora_rank, H * D // G, fmt)
        linear(f"{p}attn.wo_b", d, G * a.o_lora_rank, fmt)
        fp32(f"{p}attn.attn_sink", (H,), std=1.0)
        comps = []
        if ratio:
            comps.append((f"{p}attn.compressor.", ratio, D))
        if ratio == 4:
            linear(f"{p}attn.indexer.wq_b", a.index_n_heads * a.index_head_dim, a.q_lora_rank, fmt)
            dense(f"{p}attn.indexer.weights_proj.weight", (a.index_n_heads, d), d ** -0.5)
            comps.append((f"{p}attn.indexer.compressor.", 4, a.index_head_dim))
        for cp, m, c in comps:
            width = (2 if m == 4 else 1) * c
            fp32(f"{cp}ape", (m, width), std=0.5)
            dense(f"{cp}wkv.weight", (width, d), d ** -0.5)
            dense(f"{cp}wgate.weight", (width, d), d ** -0.5)
            norm(f"{cp}norm.weight", c)
        dense(f"{p}ffn.gate.weight", (a.n_routed_experts, d), d ** -0.5)
        if layer_id < a.n_hash_layers:
            out[f"{p}ffn.gate.tid2eid"] = TensorSpec((a.vocab_size, a.n_activated_experts), "I32", "index")
        else:
            fp32(f"{p}ffn.gate.bias", (a.n_routed_experts,), std=0.1)
        for e in range(a.n_routed_experts):
            linear(f"{p}ffn.experts.{e}.w1", a.moe_inter_dim, d, efmt)
            linear(f"{p}ffn.experts.{e}.w2", d, a.moe_inter_dim, efmt)
            linear(f"{p}ffn.experts.{e}.w3", a.moe_inter_dim, d, efmt)
        for w, (o, i) in (("w1", (a.moe_inter_dim, d)), ("w2", (d, a.moe_inter_dim)), ("w3", (a.moe_inter_dim, d))):
            linear(f"{p}ffn.shared_experts.{w}", o, i, fmt)

    out["embed.weight"] = TensorSpec((a.vocab_size, d), "BF16", "dense", 1.0, role="embed")
    for i in range(a.n_layers):
        block(f"layers.{i}.", i)
    norm("norm.weight", d)
    dense("head.weight", (a.vocab_size, d), d ** -0.5)
    fp32("hc_head_fn", (n, n * d), std=(n * d) ** -0.5)
    fp32("hc_head_base", (n,), std=0.5)
    fp32("hc_head_scale", (1,), std=0.1, const=1.0)
    for j in range(a.n_mtp_layers):
        p = f"mtp.{j}."
        linear(f"{p}e_proj", d, d, fmt)
        linear(f"{p}h_proj", d, d, fmt)
        for nm in ("enorm", "hnorm", "norm"):
            norm(f"{p}{nm}.weight", d)
        fp32(f"{p}hc_head_fn", (n, n * d), std=(n * d) ** -0.5)
        fp32(f"{p}hc_head_base", (n,), std=0.5)
        fp32(f"{p}hc_head_scale", (1,), std=0.1, const=1.0)
        block(p, a.n_layers + j)
    return out


# -- structured random weights ----------------------------------------------------------------------------------------
# Plain N(0, s) weights make number formats invisible: every FP8 block of such a matrix has nearly the same amax, so a
# transposed or misplaced block-scale grid dequantises to almost the same matrix, and RMS-normed activations have
# nearly equal per-token amax, so a per-tensor activation scale behaves like per-token scales. Structured weights
# (for parity runs and the mutation tests) give every quantisation block its own magnitude and the residual stream
# token-dependent outlier channels, so layout, granularity and scale bugs change the output:
# - each GEMM weight is scaled per 128x128 tile (the FP8 block) by 2**e, the exponents e evenly spaced over
#   [-STRUCT_LOG2_SPREAD, +STRUCT_LOG2_SPREAD] and shuffled over the grid, so any grid of two or more blocks spans
#   the whole range: FP8 block scales differ by up to 16x, FP4 1x32 scales differ between 128-column blocks, and
#   the same model is drawn whatever format the checkpoint stores;
# - 1 in STRUCT_OUTLIER_EVERY channels of every RMSNorm gain is multiplied by STRUCT_OUTLIER_GAIN (outlier
#   activation channels, as real LLMs have);
# - a STRUCT_SPIKE_FRACTION of the vocabulary has STRUCT_SPIKE_CHANNELS embedding channels multiplied by
#   STRUCT_SPIKE_GAIN, so per-token activation amax differs between tokens even after RMSNorm.
# The factors come from their own generator (seed + STRUCT_SEED_OFFSET) after the plain draw: a structured
# checkpoint is the plain one of the same seed, reshaped, and plain checkpoints are unchanged.
STRUCT_TILE = FP8_BLOCK
STRUCT_LOG2_SPREAD = 2.0
STRUCT_OUTLIER_EVERY, STRUCT_OUTLIER_GAIN = 32, 8.0
STRUCT_SPIKE_FRACTION, STRUCT_SPIKE_CHANNELS, STRUCT_SPIKE_GAIN = 0.25, 4, 16.0
STRUCT_SEED_OFFSET = 0x5EED


def _structure(value: Tensor, spec: TensorSpec, g: torch.Generator) -> Tensor:
    """The structured version of one plain random tensor (see above); tensors without a role are kept."""
    if spec.role == "linear":
        n_out, n_in = value.shape
        t = STRUCT_TILE
        grid = (-(-n_out // t), -(-n_in // t))
        exps = torch.linspace(-STRUCT_LOG2_SPREAD, STRUCT_LOG2_SPREAD, grid[0] * grid[1])
        exps = exps[torch.randperm(exps.numel(), generator=g)].view(grid) if exps.numel() > 1 else exps.zero_()
        tiles = torch.exp2(exps.view(grid)).repeat_interleave(t, 0)[:n_out].repeat_interleave(t, 1)[:, :n_in]
        return value * tiles
    if spec.role == "norm":
        gain = torch.ones(value.shape[0])
        gain[torch.randperm(value.shape[0], generator=g)[: max(1, value.shape[0] // STRUCT_OUTLIER_EVERY)]] = (
            STRUCT_OUTLIER_GAIN)
        return value * gain
    if spec.role == "embed":
        V, d = value.shape
        rows = torch.randperm(V, generator=g)[: int(V * STRUCT_SPIKE_FRACTION)]
        cols = torch.randint(0, d, (rows.numel(), STRUCT_SPIKE_CHANNELS), generator=g)
        value = value.clone()
        value[rows[:, None], cols] *= STRUCT_SPIKE_GAIN
        return value
    return value


def random_checkpoint(args: ModelArgs, seed: int = 0, structured: bool = False) -> Iterator[tuple[str, Tensor]]:
    """Deterministic random tensors in the official layout (the same on every machine: one CPU generator, consumed
    in layout order). Quantised weights are drawn dense, then quantised exactly as the release stores them.
    `structured` reshapes the same draw so that number-format bugs show (see above)."""
    g = torch.Generator().manual_seed(seed)
    gs = torch.Generator().manual_seed(seed + STRUCT_SEED_OFFSET) if structured else None
    layout = checkpoint_layout(args)
    pending_scale: dict[str, Tensor] = {}
    for name, spec in layout.items():
        if spec.kind == "scale":
            yield name, float_to_e8m0(pending_scale.pop(name))
            continue
        if spec.kind == "index":
            V, k = spec.shape
            ids = torch.rand(V, args.n_routed_experts, generator=g).argsort(-1)[:, :k]  # k distinct experts
            yield name, ids.to(torch.int32)
            continue
        shape = spec.shape if spec.kind != "fp4" else (spec.shape[0], spec.shape[1] * 2)
        value = spec.init_const + spec.init_std * torch.randn(shape, generator=g)
        if gs is not None:
            value = _structure(value, spec, gs)
        if spec.kind == "fp8":
            q, s = quantize_fp8(value)
        elif spec.kind == "fp4":
            q, s = quantize_fp4(value)
        else:
            yield name, value.to(torch.bfloat16 if spec.dtype == "BF16" else torch.float32)
            continue
        pending_scale[name[: -len("weight")] + "scale"] = s
        yield name, q


# -- tensor-parallel split rules -------------------------------------------------------------------------------------
# a routed expert's tensor: layers.3.ffn.experts.17.w1.weight (the one pattern the loader, validation and TP use)
EXPERT_NAME = re.compile(r"(?:^|\.)ffn\.experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """Routed expert id of a checkpoint name (`layers.3.ffn.experts.17.w1.weight` -> 17); None otherwise."""
    m = EXPERT_NAME.search(name)
    return int(m.group(1)) if m else None


# module name -> dim split across TP ranks, as the official convert.py cuts its model-parallel files: column-parallel
# (dim 0) query/indexer heads, output groups, attention sinks and vocabulary; row-parallel (dim 1) wo_b, whose partial
# sums are all-reduced. Everything else, the shared expert included, is replicated; routed experts go by index (EP).
TP_SPLIT_DIMS: dict[str, int] = {"embed": 0, "head": 0, "wq_b": 0, "wo_a": 0, "wo_b": 1, "attn_sink": 0,
                                 "weights_proj": 0}


def tp_split_dim(name: str) -> int | None:
    """The dim along which TP ranks split checkpoint tensor `name` (a scale follows its weight), or None when every
    rank holds all of it."""
    if expert_index(name) is not None:
        return None
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "scale") else parts[-1]
    return TP_SPLIT_DIMS.get(module)


def shard(t: Tensor, dim: int, rank: int, size: int, what: str = "tensor") -> Tensor:
    if t.shape[dim] % size:
        raise ParallelError(f"{what}: dim {dim} of shape {list(t.shape)} does not split into {size} parts")
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n)
