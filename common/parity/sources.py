"""Parity suite: what to run. Model sources (how to build the model on any backend, and the fingerprint that
identifies its weights in golden files) and the backends this machine can run (real hardware, or the CPU
stand-ins: Ascend emulation, Triton interpreter). The core is common/parity.py."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsv4.common.checkpoint.fingerprint import checkpoint_fingerprint, random_fingerprint  # noqa: F401  re-exported
from dsv4.common.model.config import ModelArgs, load_named_config
from dsv4.common.model.ops import Ops
from dsv4.common.parity.compare import ModelFactory
from dsv4.common.runtime.backend import BACKENDS, probe_backend, select_backend


@dataclass
class ModelSource:
    """How to build the model on any backend, and what identifies its weights (for golden files).
    factory(ops, dtype) -> Transformer; checkpoint_hash: checkpoint_fingerprint(path) of a real checkpoint or
    random_fingerprint(...) for the embedded random model; label: shown in reports."""

    factory: ModelFactory
    checkpoint_hash: str
    label: str
    vocab_size: int | None = None  # for the default prompts; None: read from a model built on the first backend
    config_hash: str | None = None  # ModelArgs.arch_hash() when known without building the model


_RANDOM_CHECKPOINTS: dict[tuple[str, int, bool], dict[str, Tensor]] = {}


def _random_tensors(args: ModelArgs, seed: int, structured: bool = False) -> dict[str, Tensor]:
    """The random checkpoint of (args, seed), generated once per process: drawing and FP8/FP4-quantising it costs
    seconds of CPU, and the weights do not depend on kv_fp8_sim, so clamp and e4m3 sources share one copy."""
    from dsv4.common.checkpoint.layout import random_checkpoint

    key = (args.replace(kv_fp8_sim="e4m3").arch_hash(), seed, structured)
    if key not in _RANDOM_CHECKPOINTS:
        _RANDOM_CHECKPOINTS[key] = dict(random_checkpoint(args, seed, structured))
    return _RANDOM_CHECKPOINTS[key]


def default_model_source(config: str = "tiny", seed: int = 0, kv_fp8_sim: str | None = None,
                         weights: str = "dequantized", structured: bool = False) -> ModelSource:
    """The embedded default: the model build_random_model(load_named_config(config), ops, dtype, seed) builds.
    kv_fp8_sim overrides the config ("clamp" makes the model continuous, for tight fp32 bounds). One CPU copy per
    dtype is built once and deep-copied onto each backend. weights="quantized" keeps the FP8/FP4 weights for the
    backends' quantised GEMMs (on 910B/910C the Ascend backend converts them to W8A8/W4A8). `structured` draws
    the structured random weights (checkpoint.layout), under which number-format bugs change the output."""
    from dsv4.common.checkpoint.load import load_state_dict_official
    from dsv4.common.model.transformer import Transformer

    args = load_named_config(config)
    if kv_fp8_sim:
        args = args.replace(kv_fp8_sim=kv_fp8_sim)
    built: dict[torch.dtype, nn.Module] = {}

    def factory(ops: Ops, dtype: torch.dtype) -> nn.Module:
        if dtype not in built:
            # the same steps as checkpoint.load.build_random_model, with the checkpoint tensors cached
            base = Transformer(args, ops, dtype=dtype, weights=weights)
            load_state_dict_official(base, _random_tensors(args, seed, structured), source=f"random checkpoint "
                                     f"(seed {seed}{', structured' if structured else ''})")
            base.ops = None  # the cached copy must not keep (or deep-copy) a backend
            built[dtype] = base
        model = copy.deepcopy(built[dtype])
        model.ops = ops
        return model.to(ops.device)

    init = "structured" if structured else "plain"
    return ModelSource(factory, random_fingerprint(args.arch_hash(), seed, structured),
                       f"random {config} (seed {seed}, {init} init, kv_fp8_sim {args.kv_fp8_sim}, weights {weights})",
                       args.vocab_size, args.arch_hash())


@dataclass
class BackendChoice:
    label: str  # "reference", "ascend", "ascend(emulated)", "cuda", "cuda(interpreted)"
    available: bool
    reason: str
    make: Callable[[], Ops] | None = None


def available_backends(device: str | None = None, include_interpreted: bool = False) -> list[BackendChoice]:
    """Every backend this machine can run, real hardware first; the Ascend CPU emulation stands in for a missing
    NPU ("ascend(emulated)"); the Triton interpreter (100-1000x slower) only when asked for."""
    out = [BackendChoice("reference", True, "pure torch", lambda: select_backend("reference", "cpu"))]
    for name in ("ascend", "cuda"):
        info = probe_backend(name, device)
        if info.available:
            out.append(BackendChoice(name, True, info.reason, lambda n=name: select_backend(n, device)))
            continue
        label = f"{name}(emulated)" if name == "ascend" else f"{name}(interpreted)"
        if name == "cuda" and not include_interpreted:
            out.append(BackendChoice(label, False, f"{info.reason}; the interpreter runs only with "
                                     "--include-interpreted"))
            continue
        ok, why = emulation_available(name)
        out.append(BackendChoice(label, ok, why if ok else f"{info.reason}; {why}",
                                 (lambda n=name: select_backend(n, "cpu", emulate=True)) if ok else None))
    return out


def emulation_available(name: str) -> tuple[bool, str]:
    """Can backend `name` run on this CPU (Ascend emulation / Triton interpreter)? (ok, reason)."""
    try:
        mod = __import__(f"dsv4.{name}", fromlist=["create_ops"])
    except Exception as e:
        return False, f"dsv4.{name} failed to import: {type(e).__name__}: {e}"
    if not hasattr(mod, "create_ops"):
        return False, f"dsv4.{name} is not implemented yet (no create_ops)"
    if name == "cuda":
        try:
            import triton  # noqa: F401
        except Exception as e:
            return False, f"triton not importable: {type(e).__name__}: {e}"
        return True, "Triton interpreter on CPU"
    return True, "CPU emulation of the torch_npu operators"


def parse_label(label: str) -> tuple[str, list[str]]:
    """'ascend(emulated,910b)' -> ('ascend', ['emulated', '910b']); 'ascend-emulated' -> ('ascend', ['emulated'])."""
    if "(" in label:
        base, _, rest = label.partition("(")
        return base.strip(), [o.strip() for o in rest.rstrip(")").split(",") if o.strip()]
    base, _, rest = label.partition("-")
    return base, [rest] if rest else []


def make_backend(label: str, device: str | None = None) -> Ops:
    """Ops for a CLI backend label: "reference", "ascend", "cuda", the CPU stand-ins "ascend(emulated)" /
    "cuda(interpreted)" (also accepted: "ascend-emulated", "cuda-interpreted"), one emulated Ascend chip
    "ascend(emulated,910b)" (910b | 910c | 950pr | 950dt), or the reference in W8A8 mode of a chip without FP8
    GEMMs, "reference(w8a8,910b)" / "reference(w8a8,910c)" (the oracle of those chips' integer weights)."""
    base, opts = parse_label(label)
    if base not in BACKENDS:
        raise ValueError(f"unknown backend {label!r}; choose from {', '.join(BACKENDS)} "
                         "(or ascend(emulated[,chip]), cuda(interpreted), reference(w8a8,910b|910c))")
    if base == "reference" and opts:
        if opts[0] != "w8a8" or len(opts) != 2:
            raise ValueError(f"backend {label!r}: the reference takes (w8a8,910b) or (w8a8,910c)")
        from dsv4.common.model.reference_w8a8 import ReferenceW8A8Ops

        return ReferenceW8A8Ops(device or "cpu", opts[1])
    if opts:
        if opts[0] not in ("emulated", "interpreted"):
            raise ValueError(f"backend {label!r}: expected {base}(emulated[,chip]) or {base}(interpreted)")
        chip = {"chip": opts[1]} if len(opts) > 1 else {}
        return select_backend(base, "cpu", emulate=True, **chip)
    return select_backend(base, device)
