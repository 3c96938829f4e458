"""Ascend NPU backend (torch_npu), with a CPU emulation of its operators for CI.

Importing this package imports neither torch_npu nor the backend module: detection happens in `probe()` and the
NPU import in `create_ops()` (shared/notes/toolchain.md: once torch_npu is installed without CANN, importing it
raises, so it must never happen at package import).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import AscendOps

HCCL = "hccl"  # torch.distributed backend name on Ascend (torch-npu-ops.md section 0)
GRAPH_MODE_VERIFIED = False  # compile_graph() below has not been run on hardware


def _import_torch_npu() -> tuple[Any, str]:
    """(module or None, reason). The one place dsv4 imports torch_npu (torch's auto-loading is off: dsv4/__init__)."""
    if importlib.util.find_spec("torch_npu") is None:
        return None, "torch_npu is not installed (pip install torch-npu==<your torch version>; needs CANN)"
    try:
        mod = importlib.import_module("torch_npu")
    except (ImportError, RuntimeError, OSError) as e:
        missing = re.search(r"(lib[\w.+-]*\.so[\w.]*)", str(e))
        hint = (f"the CANN library {missing.group(1)} is missing: install CANN and source its set_env.sh "
                "(e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh)" if missing else "check the CANN install")
        return None, f"torch_npu is installed but does not import ({type(e).__name__}: {e}); {hint}"
    return mod, "torch_npu imported"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_report() -> list[str]:
    """torch / torch_npu versions and whether dsv4 knows the pair, read from package metadata (never imports
    torch_npu, so it works without CANN). A torch_npu release is supported when dsv4 ships its schema file
    (ascend/schemas/); the torch it needs is the wheel's Requires-Dist pin (2.14.0: torch==2.14.0.*)."""
    from .schemas import PINNED_RELEASE, available, requires_torch

    torch_v, torch_npu_v = _dist_version("torch"), _dist_version("torch-npu")
    lines = [f"torch {torch_v or 'not installed'}", f"torch_npu {torch_npu_v or 'not installed'}"]
    if torch_npu_v is None:
        return lines
    release = torch_npu_v.split("+", 1)[0]
    if release not in available():
        lines.append(f"  torch_npu {release}: UNSUPPORTED by dsv4 (operator schemas known for "
                     f"{', '.join(available())}); the {PINNED_RELEASE} capability table is used, unverified")
        return lines
    pin = requires_torch(release) or ""
    prefix = pin.split("==", 1)[-1].rstrip("*").rstrip(".")
    base = (torch_v or "").split("+", 1)[0]
    ok = bool(prefix) and (base == prefix or base.startswith(prefix + "."))
    verdict = "supported pair" if ok else f"UNSUPPORTED pair: install {pin}"
    lines.append(f"  torch_npu {release} requires {pin}: {verdict}")
    return lines


def doctor_lines(chip: str | None = None) -> list[str]:
    """What `dsv4 doctor` prints for Ascend: versions, and per V4 op where the 2.14.0 docs forbid what V4 needs,
    the legal path taken and the doc line it rests on."""
    from .capability import LEGAL_PATHS

    lines = version_report()
    lines.append("  Ascend legal paths (torch_npu docs in dsv4/ascend/schemas):")
    for op, (doc_op, fragment, what) in LEGAL_PATHS.items():
        lines.append(f"    {op}: {what} [{doc_op} doc: {fragment}]")
    return lines


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
               use_custom_ops: bool = False, **_: Any) -> AscendOps:
    """AscendOps on a real NPU (torch_npu), or with emulate=True on the CPU through the emulated operators (bound to
    the torch_npu 2.14.0 schemas). chip: 910b | 910c | 950pr | 950dt (default: the hardware's, or
    $DSV4_ASCEND_CHIP, or 950dt when emulating). weights: "auto" (FP8 on 950, W8A8 dense + W4 experts on 910B,
    W8A8 on 910C), "w8a8" (int8 everywhere) or "bf16". use_custom_ops: also call vllm-ascend's
    torch.ops._C_ascend kernels where registered (contracts unverified)."""
    from .backend import AscendOps
    from .capability import detect_chip, release_of
    from .schemas import PINNED_RELEASE

    if emulate:
        from .emulation import make_torch_npu

        c = detect_chip(chip, emulate=True)
        return AscendOps(make_torch_npu(c), c, device="cpu", release=PINNED_RELEASE, weights=weights,
                         use_custom_ops=use_custom_ops, emulated=True)
    mod, reason = _import_torch_npu()
    if mod is None:
        raise RuntimeError(f"no Ascend NPU: {reason}")
    c = detect_chip(chip)
    return AscendOps(mod, c, device=device or "npu:0", release=release_of(mod), weights=weights,
                     use_custom_ops=use_custom_ops)


def compile_graph(fn: Any, dynamic: bool = False, fullgraph: bool = True, mode: str = "reduce-overhead") -> Any:
    """TorchAir graph mode for a callable: torch.compile(fn, backend=torchair.get_npu_backend(...)).

    What it is meant to capture is the static decode step (common/model/static.py via
    common/runtime/static_decode.py, capture "npu-graph"): one graph per (batch, context bucket), no host syncs, so
    fullgraph=True and dynamic=False. mode "reduce-overhead" is TorchAir's aclgraph (capture once, replay: the
    CUDA-graph analogue, which removes the per-operator launch cost of decode); "max-autotune" is its Ascend IR graph
    mode (torchair user guide, "reduce-overhead模式配置": CompilerConfig().mode; aclgraph requires dynamic=False).
    UNVERIFIED without hardware (GRAPH_MODE_VERIFIED is False); on CPU the same step captures with zero graph breaks
    under torch.compile, on the reference ops (tests/test_static_decode.py) and on the emulated 950DT torch_npu ops,
    which trace through their fake implementations as the real ones trace through the wheel's meta functions
    (tests/test_ascend_fake.py)."""
    if importlib.util.find_spec("torchair") is None:
        raise RuntimeError("graph mode needs torchair (ships with torch_npu on NPU hosts); it is not importable here")
    import torch
    import torchair
    from torchair.configs.compiler_config import CompilerConfig

    config = CompilerConfig()
    config.mode = mode
    backend = torchair.get_npu_backend(compiler_config=config)
    return torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)


__all__ = ["GRAPH_MODE_VERIFIED", "HCCL", "compile_graph", "create_ops", "doctor_lines", "probe", "version_report"]
