"""Parity suite: golden files. A run recorded to safetensors (metadata only in the string dict: no pickle) with
the config, checkpoint and content hashes that decide whether it may judge another run. The core is
common/parity.py."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dsv4.common.model.ops import Ops
from dsv4.common.parity.compare import (
    BackendRun,
    Comparison,
    Tolerances,
    compare_runs,
    dtype_name,
    parse_dtype,
    run_backend,
)

GOLDEN_FORMAT = "dsv4-parity-golden/1"


class GoldenError(ValueError):
    """A golden file cannot be used: wrong format, other checkpoint/config, or modified after recording."""


def _version(dist: str) -> str | None:
    # importlib.metadata reads the installed version without importing the package (torch_npu/triton are heavy)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cann_version() -> str | None:
    """The CANN toolkit version from its install tree (ASCEND_TOOLKIT_HOME / ASCEND_HOME_PATH), if present."""
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        root = os.environ.get(var)
        if not root:
            continue
        for rel in ("version.cfg", "compiler/version.info", "runtime/version.info"):
            f = Path(root) / rel
            if f.is_file():
                for line in f.read_text(errors="replace").splitlines():
                    if "version" in line.lower() and "=" in line:
                        return line.split("=", 1)[1].strip()
    return None


def device_name(ops: Ops) -> str:
    dev = torch.device(getattr(ops, "device", "cpu"))
    try:
        if dev.type == "cuda":
            return torch.cuda.get_device_name(dev)
        if dev.type == "npu":
            return torch.npu.get_device_name(dev)  # type: ignore[attr-defined]
    except Exception as e:  # a name is informative only; never fail a recording over it
        return f"{dev.type} (name unavailable: {type(e).__name__})"
    return f"cpu ({platform.machine()}, {platform.processor() or 'unknown processor'})"


def environment_metadata(ops: Ops) -> dict[str, str]:
    """Versions and device that produced a run; absent packages are omitted."""
    meta = {"device": device_name(ops), "torch": torch.__version__, "python": platform.python_version()}
    for key, dist in (("torch_npu", "torch-npu"), ("triton", "triton")):
        v = _version(dist)
        if v:
            meta[key] = v
    cann = cann_version()
    if cann:
        meta["cann"] = cann
    return meta


def content_hash(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and every metadata entry except the hash itself."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for k in sorted(metadata):
        if k != "content_sha256":
            h.update(f"{k}={metadata[k]}\n".encode())
    return h.hexdigest()


def record_golden(path: str | Path, run: BackendRun, ops: Ops, config_hash: str, checkpoint_hash: str,
                  extra: dict[str, str] | None = None) -> dict[str, str]:
    """Write a run to a golden safetensors file. Tensors: prompts, prefill.logits, decode.tokens, decode.logits,
    hidden.<i> (when kept). Metadata (strings only, no pickle): format, backend, dtype, kv_fp8_sim, config and
    checkpoint hashes, environment versions, content hash. Returns the metadata."""
    from safetensors.torch import save_file

    tensors = {"prompts": run.prompts.long(), "prefill.logits": run.prefill_logits.float(),
               "decode.tokens": run.decode_tokens.long(), "decode.logits": run.decode_logits.float()}
    for i, h in enumerate(run.hidden):
        tensors[f"hidden.{i}"] = h.float()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"format": GOLDEN_FORMAT, "backend": run.backend, "dtype": dtype_name(run.dtype),
            "kv_fp8_sim": run.kv_fp8_sim, "config_hash": config_hash, "checkpoint_hash": checkpoint_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "decode_steps": str(run.decode_tokens.shape[1])}
    meta.update(environment_metadata(ops))
    meta.update(extra or {})
    meta["content_sha256"] = content_hash(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return meta


@dataclass
class Golden:
    run: BackendRun
    metadata: dict[str, str]


def load_golden(path: str | Path, config_hash: str | None = None, checkpoint_hash: str | None = None) -> Golden:
    """Read and verify a golden file: format, content hash (tampering), and, when given, that it was recorded
    from the same config and checkpoint. Raises GoldenError with the reason."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise GoldenError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != GOLDEN_FORMAT:
        raise GoldenError(f"{path}: not a dsv4 parity golden file (format {meta.get('format')!r}, "
                          f"expected {GOLDEN_FORMAT!r})")
    stored = meta.get("content_sha256")
    if not stored or content_hash(tensors, meta) != stored:
        raise GoldenError(f"{path}: content hash mismatch: the file was modified after it was recorded "
                          "(tensors or metadata differ from what was hashed); re-record it")
    if config_hash and meta.get("config_hash") != config_hash:
        raise GoldenError(f"{path}: recorded with model config {meta.get('config_hash')} but this model's config is "
                          f"{config_hash} (ModelArgs.arch_hash()); compare against a golden file of the same config")
    if checkpoint_hash and meta.get("checkpoint_hash") != checkpoint_hash:
        raise GoldenError(f"{path}: recorded from checkpoint {meta.get('checkpoint_hash')} but this model's "
                          f"checkpoint is {checkpoint_hash}; a golden file only judges the weights it was made with")
    n_hidden = sum(1 for k in tensors if k.startswith("hidden."))
    run = BackendRun(f"golden:{meta.get('backend', '?')}", parse_dtype(meta["dtype"]), meta["kv_fp8_sim"],
                     tensors["prompts"], tensors["prefill.logits"], [tensors[f"hidden.{i}"] for i in range(n_hidden)],
                     tensors["decode.tokens"], tensors["decode.logits"])
    return Golden(run, meta)


def compare_golden(golden: Golden, model: nn.Module, tol: Tolerances, label: str,
                   keep_hidden: bool = True) -> Comparison:
    """Run `model` on the golden prompts, fed the golden decode tokens, and compare (pair 'golden')."""
    g = golden.run
    got = run_backend(model, g.prompts, g.decode_tokens.shape[1], teacher=g.decode_tokens,
                      keep_hidden=keep_hidden and bool(g.hidden), label=label)
    return compare_runs(g, got, tol, pair="golden")

