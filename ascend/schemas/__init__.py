"""The released torch_npu operator contracts, as data: ascend/schemas/torch_npu-<version>.yaml, generated from the
wheel by scripts/extract_torch_npu_schemas.py (never hand-edited). Per operator dsv4.ascend calls: the ATen schema
string(s) that bind a call (`torch_npu.X` is `torch.ops.npu.X`), the wheel's own (Chinese) doc text, the products
its doc lists, and whether a meta (shape) function is registered. The emulation (ascend/emulation) registers its CPU
kernels under these exact schemas, and capability.py cites doc lines from here.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
# the torch_npu release whose schemas bind the emulation, and so the one CI checks every call against
PINNED_RELEASE = "2.14.0"


def available() -> tuple[str, ...]:
    """Releases with a generated schema file, oldest first."""
    vers = [p.name[len("torch_npu-"):-len(".yaml")] for p in HERE.glob("torch_npu-*.yaml")]
    return tuple(sorted(vers, key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v))))


@functools.cache
def load(version: str = PINNED_RELEASE) -> dict[str, Any]:
    path = HERE / f"torch_npu-{version}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no schema file for torch_npu {version} in {HERE} (have: {', '.join(available())}); "
                                "generate it with scripts/extract_torch_npu_schemas.py --version " + version)
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def op(name: str, version: str = PINNED_RELEASE) -> dict[str, Any]:
    ops = load(version)["ops"]
    if name not in ops:
        raise KeyError(f"{name} is not in the torch_npu {version} schema file")
    return ops[name]


def schemas(name: str, version: str = PINNED_RELEASE) -> list[str]:
    """The op's schema strings, default overload first."""
    return [row["schema"] for row in op(name, version)["schemas"]]


def doc(name: str, version: str = PINNED_RELEASE) -> str:
    return op(name, version)["doc"] or ""


def documented_products(name: str, version: str = PINNED_RELEASE) -> tuple[str, ...] | None:
    """Chip keys named by the op's 支持的型号 (supported products) section; None when its doc has no such section."""
    p = op(name, version)["products"]
    return None if p is None else tuple(p)


def requires_torch(version: str = PINNED_RELEASE) -> str | None:
    """The wheel's `Requires-Dist: torch==X.*` pin (e.g. 'torch==2.14.0.*'), or None."""
    for req in load(version)["requires_dist"]:
        if re.match(r"torch\s*[=<>!~]", req):
            return req
    return None


__all__ = ["PINNED_RELEASE", "available", "doc", "documented_products", "load", "op", "requires_torch", "schemas"]
