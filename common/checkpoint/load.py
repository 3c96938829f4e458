"""Filling a model from checkpoint tensors: official names to the model's (stacked) parameters, format conversion
(FP8/FP4 to dense, or kept quantised), this rank's tensor-parallel slice, and the embedded random model.

Works on a name -> tensor mapping; reading safetensors files lives in reader.py, the names and shapes in layout.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dsv4.common.checkpoint.layout import EXPERT_NAME, CheckpointError, random_checkpoint, shard, tp_split_dim
from dsv4.common.model.config import ModelArgs
from dsv4.common.model.parallel import SINGLE
from dsv4.common.model.quant import dequant_weight, e8m0_to_float
from dsv4.common.model.transformer import Transformer


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
        check_finite(source, scale_name, scale)  # E8M0 byte 0xFF is NaN (read as 2^128 = inf here)
    if dst.dtype in (torch.float8_e4m3fn, torch.int8):  # the model keeps this weight quantised
        if value.dtype != dst.dtype:
            raise CheckpointError(f"{source}: tensor '{name}': model expects {dst.dtype} storage, got {value.dtype}")
        if not sliced:
            value, scale = _tp_slice(model, name, value), _tp_slice(model, scale_name, scale)
        _check_shape(source, name, value.shape, dst.shape)
        check_finite(source, name, value)
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
    check_finite(source, name, dense)
    dst.copy_(dense.to(dst.dtype))
    return target_name


def check_finite(source: str, name: str, t: Tensor) -> None:
    """Refuse a tensor holding NaN/Inf (a corrupt shard, a bad conversion): it would only show up as empty or garbage
    text much later. One pass per tensor as it is read: aminmax propagates NaN and shows +-Inf, without a
    tensor-sized temporary. FP8 e4m3fn has no Inf; its NaN is the byte pattern S.1111.111."""
    if t.dtype == torch.float8_e4m3fn:
        bad = int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
    elif t.is_floating_point() and t.numel():
        lo, hi = t.aminmax()
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return
        bad = int((~torch.isfinite(t)).sum())  # the error path counts them exactly
    else:
        return  # integer storage (packed FP4, expert ids) cannot hold NaN
    if bad:
        raise CheckpointError(f"{source}: tensor '{name}' holds {bad} NaN/Inf value(s) of {t.numel()} (a corrupt "
                              "shard or a bad conversion); the model would produce NaN logits")


def _tp_slice(model: torch.nn.Module, name: str, t: Tensor) -> Tensor:
    par = getattr(model, "parallel", None)
    if par is None or par.tp_size == 1:
        return t
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
                       weights: str = "dequantized", parallel=None, structured: bool = False):
    """The embedded default: the model of `args` with the deterministic random checkpoint of `seed`
    (this rank's shard of it under tensor/expert parallelism); `structured` weights make number formats matter
    (layout.random_checkpoint)."""
    model = Transformer(args, ops, dtype=dtype, weights=weights, parallel=parallel or SINGLE)
    what = f"{'structured ' if structured else ''}random checkpoint (seed {seed})"
    load_state_dict_official(model, dict(random_checkpoint(args, seed, structured)), source=what)
    return model.to(ops.device)
