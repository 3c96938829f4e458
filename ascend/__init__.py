"""Ascend NPU backend (torch_npu), with a CPU emulation of its operators for CI.

Importing this package imports neither torch_npu nor the backend module: detection happens in `probe()` and the
NPU import in `create_ops()` (shared/notes/toolchain.md: once torch_npu is installed without CANN, importing it
raises, so it must never happen at package import).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import AscendOps

HCCL = "hccl"  # torch.distributed backend name on Ascend (torch-npu-ops.md section 0)
GRAPH_MODE_VERIFIED = False  # compile_graph() below has not been run on hardware


def _import_torch_npu() -> tuple[Any, str]:
    """(module or None, reason)."""
    if importlib.util.find_spec("torch_npu") is None:
        return None, "torch_npu is not installed (pip install torch-npu==<your torch version>; needs CANN)"
    try:
        mod = importlib.import_module("torch_npu")
    except (ImportError, RuntimeError, OSError) as e:
        return None, f"import torch_npu failed: {type(e).__name__}: {e}"
    return mod, "torch_npu imported"


def probe(device: str | None = None) -> tuple[bool, str]:
    """Is an Ascend NPU usable here? Always returns a reason."""
    if device is not None and not str(device).startswith("npu"):
        return False, f"device {device!r} is not an NPU device"
    mod, reason = _import_torch_npu()
    if mod is None:
        return False, reason
    import torch

    try:
        if not torch.npu.is_available():
            return False, "torch_npu imported but torch.npu.is_available() is False (driver/CANN or no device)"
        name = torch.npu.get_device_name(0)
    except (AttributeError, RuntimeError) as e:
        return False, f"torch_npu imported but the NPU query failed: {type(e).__name__}: {e}"
    return True, f"Ascend NPU found: {name} ({torch.npu.device_count()} device(s))"


def create_ops(device: str | None = None, emulate: bool = False, chip: str | None = None, weights: str = "auto",
               release: str | None = None, use_custom_ops: bool = False, **_: Any) -> AscendOps:
    """AscendOps on a real NPU (torch_npu), or with emulate=True on the CPU through the emulated operators.
    chip: 910b | 910c | 950pr | 950dt (default: the hardware's, or $DSV4_ASCEND_CHIP, or 950dt when emulating).
    weights: "auto" (FP8 on 950, W8A8 dense + W4A8 experts on 910B/910C), "w8a8" (int8 everywhere) or "bf16".
    release: op-plugin release to emulate (e.g. "7.3.0"); on hardware, read from torch_npu.
    use_custom_ops: also call vllm-ascend's torch.ops._C_ascend kernels where registered (contracts unverified)."""
    from .backend import AscendOps
    from .capability import LATEST_RELEASE, detect_chip, release_of

    if emulate:
        from .emulation import make_torch_npu

        c = detect_chip(chip, emulate=True)
        rel = release or LATEST_RELEASE
        return AscendOps(make_torch_npu(c, rel), c, device="cpu", release=rel, weights=weights,
                         use_custom_ops=use_custom_ops, emulated=True)
    mod, reason = _import_torch_npu()
    if mod is None:
        raise RuntimeError(f"no Ascend NPU: {reason}")
    c = detect_chip(chip)
    return AscendOps(mod, c, device=device or "npu:0", release=release or release_of(mod), weights=weights,
                     use_custom_ops=use_custom_ops)


def compile_graph(fn: Any, dynamic: bool = False, fullgraph: bool = True, mode: str = "reduce-overhead") -> Any:
    """TorchAir graph mode for a callable: torch.compile(fn, backend=torchair.get_npu_backend(...)).

    What it is meant to capture is the static decode step (common/model/static.py via
    common/runtime/static_decode.py, capture "npu-graph"): one graph per (batch, context bucket), no host syncs, so
    fullgraph=True and dynamic=False. mode "reduce-overhead" is TorchAir's aclgraph (capture once, replay: the
    CUDA-graph analogue, which removes the per-operator launch cost of decode); "max-autotune" is its Ascend IR graph
    mode (torchair user guide, "reduce-overhead模式配置": CompilerConfig().mode; aclgraph requires dynamic=False).
    UNVERIFIED without hardware (GRAPH_MODE_VERIFIED is False); on CPU the same step captures with zero graph breaks
    under torch.compile (tests/test_static_decode.py)."""
    if importlib.util.find_spec("torchair") is None:
        raise RuntimeError("graph mode needs torchair (ships with torch_npu on NPU hosts); it is not importable here")
    import torch
    import torchair
    from torchair.configs.compiler_config import CompilerConfig

    config = CompilerConfig()
    config.mode = mode
    backend = torchair.get_npu_backend(compiler_config=config)
    return torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)


__all__ = ["GRAPH_MODE_VERIFIED", "HCCL", "compile_graph", "create_ops", "probe"]
