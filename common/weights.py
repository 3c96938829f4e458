"""The official checkpoint layout (tensor names, shapes, dtypes; spec 7.1/7.2), deterministic random checkpoints in
that layout, and filling a model from checkpoint tensors.

Everything here works on a name -> tensor mapping; reading and writing safetensors files lives in checkpoint.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import FP4_BLOCK, FP8_BLOCK, ModelArgs
from .quant import dequant_weight, e8m0_to_float, float_to_e8m0, quantize_fp4, quantize_fp8

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
        out[name] = TensorSpec((dim,), "BF16", "dense", 0.1, 1.0)

    def linear(name: str, n_out: int, n_in: int, fmt: str) -> None:
        std = n_in ** -0.5
        if fmt == "fp8":
            out[f"{name}.weight"] = TensorSpec((n_out, n_in), "F8_E4M3", "fp8", std)
            out[f"{name}.scale"] = TensorSpec((-(-n_out // FP8_BLOCK), -(-n_in // FP8_BLOCK)), "F8_E8M0", "scale")
        elif fmt == "fp4":
            out[f"{name}.weight"] = TensorSpec((n_out, n_in // 2), "I8", "fp4", std)
            out[f"{name}.scale"] = TensorSpec((n_out, n_in // FP4_BLOCK), "F8_E8M0", "scale")
        else:
            dense(f"{name}.weight", (n_out, n_in), std)

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

    dense("embed.weight", (a.vocab_size, d), 1.0)
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


def random_checkpoint(args: ModelArgs, seed: int = 0) -> Iterator[tuple[str, Tensor]]:
    """Deterministic random tensors in the official layout (the same on every machine: one CPU generator, consumed
    in layout order). Quantised weights are drawn dense, then quantised exactly as the release stores them."""
    g = torch.Generator().manual_seed(seed)
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
        if spec.kind == "fp8":
            q, s = quantize_fp8(value)
        elif spec.kind == "fp4":
            q, s = quantize_fp4(value)
        else:
            yield name, value.to(torch.bfloat16 if spec.dtype == "BF16" else torch.float32)
            continue
        pending_scale[name[: -len("weight")] + "scale"] = s
        yield name, q


# -- filling a model ---------------------------------------------------------------------------------------------------
# a routed expert's tensor: layers.3.ffn.experts.17.w1.weight (the one pattern the loader, validation and TP use)
EXPERT_NAME = re.compile(r"(?:^|\.)ffn\.experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """Routed expert id of a checkpoint name (`layers.3.ffn.experts.17.w1.weight` -> 17); None otherwise."""
    m = EXPERT_NAME.search(name)
    return int(m.group(1)) if m else None


def model_target(model: torch.nn.Module, name: str) -> tuple[str, int | None]:
    """Checkpoint name -> (model parameter/buffer name, expert slot or None). Experts are stacked in the model."""
    m = EXPERT_NAME.search(name)
    if m is None:
        return name, None
    return name[: m.start(1)] + name[m.end(1) + 1:], int(m.group(1))  # drop the "17." segment


def load_tensor_into(model: torch.nn.Module, targets: dict[str, Tensor], name: str, value: Tensor,
                     get_scale: Callable[[str], Tensor | None], source: str = "checkpoint",
                     sliced: bool = False) -> str | None:
    """Copy one checkpoint tensor into the model, converting formats. Returns the model name filled, or None when
    the tensor is a scale consumed together with its weight. `targets` = dict(model.named_parameters + buffers).
    With tensor parallelism (model.parallel) the rank's slice of a split tensor is taken (parallel.tp_split_dim),
    unless the caller already read only that slice (`sliced`, with `get_scale` returning sliced scales too)."""
    if name.endswith(".scale"):
        return None
    target_name, expert = model_target(model, name)
    if target_name.endswith(".tid2eid"):
        if value.dtype not in (torch.int32, torch.int64):
            raise CheckpointError(f"{source}: tensor '{name}': expected I32 or I64 expert ids, got {value.dtype}")
    if target_name not in targets:
        raise CheckpointError(f"{source}: unexpected tensor '{name}' (no such parameter in the model)")
    dst = targets[target_name]
    if expert is not None:
        offset = _experts_offset(model, target_name)
        local = expert - offset
        if not 0 <= local < dst.shape[0]:
            return target_name  # another rank's expert
        dst = dst[local]
    stored_fmt = {torch.float8_e4m3fn: "fp8", torch.int8: "fp4"}.get(value.dtype, "none")
    scale_name = name[: -len("weight")] + "scale" if name.endswith(".weight") else None
    scale = get_scale(scale_name) if (scale_name and stored_fmt != "none") else None
    if stored_fmt != "none" and scale is None:
        raise CheckpointError(f"{source}: tensor '{name}' is {stored_fmt.upper()} but '{scale_name}' is missing")
    if scale is not None:
        scale = e8m0_to_float(scale) if scale.dtype in (torch.float8_e8m0fnu, torch.uint8) else scale.float()
    if dst.dtype in (torch.float8_e4m3fn, torch.int8):  # the model keeps this weight quantised
        if value.dtype != dst.dtype:
            raise CheckpointError(f"{source}: tensor '{name}': model expects {dst.dtype} storage, got {value.dtype}")
        if not sliced:
            value, scale = _tp_slice(model, name, value), _tp_slice(model, scale_name, scale)
        _check_shape(source, name, value.shape, dst.shape)
        dst.copy_(value)
        dst_scale = targets[target_name[: -len("weight")] + "scale"]
        if expert is not None:
            dst_scale = dst_scale[expert - _experts_offset(model, target_name)]
        _check_shape(source, scale_name, scale.shape, dst_scale.shape)
        dst_scale.copy_(scale)
        return target_name
    try:
        dense = dequant_weight(value, scale, stored_fmt) if stored_fmt != "none" else value
    except ValueError as e:
        raise CheckpointError(f"{source}: tensor '{name}': {e}") from None
    if not sliced:
        dense = _tp_slice(model, name, dense)
    _check_shape(source, name, dense.shape, dst.shape)
    dst.copy_(dense.to(dst.dtype))
    return target_name


def _tp_slice(model: torch.nn.Module, name: str, t: Tensor) -> Tensor:
    par = getattr(model, "parallel", None)
    if par is None or par.tp_size == 1:
        return t
    from .parallel import shard, tp_split_dim

    dim = tp_split_dim(name)
    return t if dim is None else shard(t, dim, par.tp_rank, par.tp_size, f"tensor '{name}'")


def _check_shape(source: str, name: str, got: torch.Size, want: torch.Size) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"{source}: tensor '{name}' has shape {list(got)}, expected {list(want)}")


def _experts_offset(model: torch.nn.Module, stacked_name: str) -> int:
    module = model.get_submodule(stacked_name.rsplit(".", 2)[0])
    return getattr(module, "offset", 0)


def model_targets(model: torch.nn.Module) -> dict[str, Tensor]:
    t = {n: p.data for n, p in model.named_parameters()}
    t.update(dict(model.named_buffers()))
    return t


def load_state_dict_official(model: torch.nn.Module, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Fill `model` from an in-memory {official name: tensor} mapping; strict: every model tensor must be filled."""
    targets = model_targets(model)
    filled = set()
    for name, value in tensors.items():
        got = load_tensor_into(model, targets, name, value, tensors.get, source)
        if got:
            filled.add(got)
    scale_params = {n for n in targets if n.endswith(".scale")}
    missing = sorted(set(targets) - filled - scale_params)
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def build_random_model(args: ModelArgs, ops, dtype: torch.dtype = torch.float32, seed: int = 0,
                       weights: str = "dequantized", parallel=None):
    """The embedded default: the model of `args` with the deterministic random checkpoint of `seed`
    (this rank's shard of it under tensor/expert parallelism)."""
    from .model import Transformer
    from .parallel import SINGLE

    model = Transformer(args, ops, dtype=dtype, weights=weights, parallel=parallel or SINGLE)
    load_state_dict_official(model, dict(random_checkpoint(args, seed)), source=f"random checkpoint (seed {seed})")
    return model.to(ops.device)
