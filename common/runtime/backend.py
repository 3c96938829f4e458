"""Device abstraction: a backend registry and `select_backend`.

A backend is a package exposing two functions:
    probe(device: str | None) -> tuple[bool, str]     # available here?, and the reason (always filled)
    create_ops(device: str | None, **options) -> Ops  # the ops object the model runs on
Importing dsv4 imports neither torch_npu nor triton: backend modules are imported only when probed or selected.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from dsv4.common.model.ops import Ops
from dsv4.common.model.reference import ReferenceOps

BACKENDS = ("reference", "ascend", "cuda")
CHOICES = ("auto",) + BACKENDS


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message carries the underlying reason."""


@dataclass
class BackendInfo:
    name: str
    available: bool
    reason: str


def _module(name: str):
    return importlib.import_module(f"dsv4.{name}")


def probe_backend(name: str, device: str | None = None) -> BackendInfo:
    if name == "reference":
        return BackendInfo(name, True, "pure torch, always available")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    try:
        ok, reason = _module(name).probe(device)
    except Exception as e:  # a broken backend install must not break `auto`
        ok, reason = False, f"probe failed: {type(e).__name__}: {e}"
    return BackendInfo(name, ok, reason)


def select_backend(name: str = "auto", device: str | None = None, **options) -> Ops:
    """'auto': an Ascend NPU if torch_npu imports and torch.npu.is_available(), else CUDA, else the reference.
    A named backend that cannot run raises BackendUnavailable with the reason."""
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    if name == "auto":
        for cand in ("ascend", "cuda"):
            if probe_backend(cand, device).available:
                return _module(cand).create_ops(device, **options)
        return ReferenceOps(device or "cpu")
    if name == "reference":
        return ReferenceOps(device or "cpu")
    info = probe_backend(name, device)
    if not info.available and not options.get("emulate"):
        raise BackendUnavailable(f"backend {name!r} is not available: {info.reason}")
    return _module(name).create_ops(device, **options)
