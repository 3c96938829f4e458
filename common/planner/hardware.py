"""The hardware table of the capacity planner: devices from configs/hardware.yaml (HBM, bandwidth, peak FLOPs, native
formats), by name or alias. Importable from common/planner.py too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsv4.common.model.config import CONFIG_DIR
from dsv4.common.planner.sizes import GIB, PlanError

HARDWARE_FILE = CONFIG_DIR / "hardware.yaml"


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    hbm_gib: float
    hbm_tbps: float
    bf16_tflops: float | None
    fp8_tflops: float | None
    fp4_tflops: float | None
    native_fp8: bool
    native_fp4: bool
    interconnect_gbps: float | None
    # how dsv4's backend for this chip holds the release's (fp8) routed experts, when not as released
    release_experts_as: str | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * GIB


def _read_hardware_file(path: Path | None = None) -> dict[str, Any]:
    path = path or HARDWARE_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PlanError("hardware", f"{path} not found") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        raise PlanError("hardware", f"{path}: expected a mapping with a 'devices' section")
    return data


def hardware_names(path: Path | None = None) -> list[str]:
    return sorted(_read_hardware_file(path)["devices"])


def load_hardware(name: str, path: Path | None = None) -> Hardware:
    """One device from configs/hardware.yaml, by name or alias (ascend-950 means ascend-950dt)."""
    data = _read_hardware_file(path)
    devices: dict[str, Any] = data["devices"]
    aliases: dict[str, str] = {str(k): v for k, v in (data.get("aliases") or {}).items()}
    key = name.strip().lower()
    key = aliases.get(key, key)
    if key not in devices:
        raise PlanError("hardware", f"unknown hardware {name!r}; known: {', '.join(sorted(devices))} "
                        f"(aliases: {', '.join(f'{a}->{t}' for a, t in sorted(aliases.items()))})")
    entry = devices[key]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for k, v in entry.items():
        if isinstance(v, dict) and "value" in v:
            values[k] = v["value"]
            sources[k] = str(v.get("source", ""))
        else:
            values[k] = v
    for required in ("hbm_gb", "hbm_tbps"):
        if not isinstance(values.get(required), (int, float)) or values[required] <= 0:
            raise PlanError("hardware", f"{key}: field '{required}' must be a positive number, got "
                            f"{values.get(required)!r}")
    return Hardware(
        name=key,
        description=str(values.get("description", key)),
        hbm_gib=float(values["hbm_gb"]),
        hbm_tbps=float(values["hbm_tbps"]),
        bf16_tflops=_opt_float(values.get("bf16_tflops")),
        fp8_tflops=_opt_float(values.get("fp8_tflops")),
        fp4_tflops=_opt_float(values.get("fp4_tflops")),
        native_fp8=bool(values.get("native_fp8", False)),
        native_fp4=bool(values.get("native_fp4", False)),
        interconnect_gbps=_opt_float(values.get("interconnect_gbps")),
        release_experts_as=values.get("release_experts_as"),
        sources=sources,
    )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
