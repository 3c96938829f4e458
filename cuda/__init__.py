"""CUDA backend: Triton kernels for NVIDIA GPUs (H100/H200-class), also runnable on CPU in Triton's interpreter.

Nothing here imports triton at `import dsv4` time: `probe` looks triton up lazily and `create_ops` imports the
kernels only when the backend is selected.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from dsv4.common.model.ops import Ops


def _interpreter_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def probe(device: str | None = None) -> tuple[bool, str]:
    """(available, reason). A GPU is required for `auto`: the interpreter is a test vehicle (100-1000x slower than
    torch), so it is never reported as available; create_ops(device="cpu", interpret=True) (or emulate=True through
    select_backend) runs it explicitly."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'dsv4[cuda]')"
    if not torch.cuda.is_available():
        build = "CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        hint = "; TRITON_INTERPRET=1 is set: use create_ops(device='cpu', interpret=True) to run the kernels in the " \
               "Triton interpreter" if _interpreter_env() else ""
        return False, f"no CUDA GPU: torch.cuda.is_available() is False ({build}){hint}"
    if device is not None and torch.device(device).type not in ("cuda",):
        return False, f"device {device!r} is not a CUDA device"
    try:
        import triton
    except Exception as e:  # a broken triton install
        return False, f"triton failed to import: {type(e).__name__}: {e}"
    name = torch.cuda.get_device_name(torch.device(device) if device else None)
    return True, f"Triton {triton.__version__} on {name}"


def create_ops(device: str | None = None, **options) -> Ops:
    """The CUDA ops. interpret=True (or emulate=True, or TRITON_INTERPRET=1 with a CPU device) runs the same
    kernels on CPU tensors in the Triton interpreter; TRITON_INTERPRET must then be set before the kernels are
    first imported, which this function does when it is the first to import them."""
    interpret = bool(options.pop("interpret", False) or options.pop("emulate", False))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and not interpret else "cpu"))
    if dev.type == "cpu":
        interpret = True
    if interpret:
        if not _interpreter_env():
            import sys

            if any(m.startswith("dsv4.cuda.kernels") for m in sys.modules):
                raise RuntimeError("the Triton kernels were imported without TRITON_INTERPRET=1; set it in the "
                                   "environment before the first import to use the interpreter")
            os.environ["TRITON_INTERPRET"] = "1"
    from .backend import CudaOps

    return CudaOps(dev)  # other options (dtype policy etc.) belong to the caller
