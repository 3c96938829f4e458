"""Which fused torch_npu operators exist per Ascend chip and torch_npu (op-plugin) release, and which path each
AscendOps method takes.

THE one capability table of the Ascend backend. Source: shared/spec/torch-npu-ops.md, section 10 (quick reference
per chip) plus the "Products" / "First in" lines of sections 1-9 for ops that table names only per component.
Releases are op-plugin branches ("7.1.0" means "7.1.0 or earlier"); see the spec header for the mapping to
torch_npu releases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CHIPS = ("910b", "910c", "950pr", "950dt")
DEFAULT_EMULATED_CHIP = "950dt"
LATEST_RELEASE = "26.1.0"
A2A3 = ("910b", "910c")
A5 = ("950pr", "950dt")


@dataclass(frozen=True)
class OpCap:
    chips: tuple[str, ...]
    first_in: str  # op-plugin release branch whose docs first contain the op page
    note: str = ""


# op -> where it runs. "first_in" 7.1.0 = "7.1.0 or earlier" (per-op docs start there).
CAPABILITIES: dict[str, OpCap] = {
    "npu_rms_norm": OpCap(CHIPS, "7.1.0", "section 10 lists it for every chip"),
    "npu_rotary_mul": OpCap(CHIPS, "7.1.0", "rotary_mode='interleave' (section 2)"),
    "npu_swiglu": OpCap(CHIPS, "7.1.0", "old op; the clamp is composed in torch"),
    "npu_dynamic_quant": OpCap(CHIPS, "7.1.0", "per-token int8, fp16/bf16 input (section 8)"),
    "npu_quant_matmul": OpCap(CHIPS, "7.1.0", "int8 on all chips; FP8 operands only on 950 (section 8)"),
    "npu_lightning_indexer": OpCap(CHIPS, "7.3.0", "D=128, N1<=64 (950: N1 in {8,16,24,32,64})"),
    "npu_sparse_flash_attention": OpCap(CHIPS, "7.3.0", "D=512+64 rope, sinks only on 950"),
    "npu_mhc_pre": OpCap(A5, "26.1.0", "950PR/950DT only (section 5)"),
    "npu_mhc_sinkhorn": OpCap(A5, "26.1.0", "950PR/950DT only (section 5)"),
    "npu_mhc_post": OpCap(A5, "26.1.0", "950PR/950DT only (section 5)"),
    "npu_moe_gating_top_k": OpCap(CHIPS, "7.1.0", "softmax/sigmoid only; hash via tid2eid"),
    "npu_moe_init_routing_v2": OpCap(CHIPS, "7.1.0", "section 10 'Expert FFN' row"),
    "npu_grouped_matmul": OpCap(CHIPS, "7.1.0", "int8/int4 on all chips; FP8 operands only on 950"),
    "npu_moe_finalize_routing": OpCap(("910b",), "7.1.0", "its page lists A2 only (section 6)"),
    # MC2 expert-parallel communication: the op pages list A2/A3 only and define their limits (ep_world_size, H, BS)
    # only for those products; section 10's "same" for 950 is a summary line, not a contract, so 950 is left out
    "npu_moe_distribute_dispatch": OpCap(A2A3, "7.1.0", "MC2 EP dispatch over an HCCL group name (section 6)"),
    "npu_moe_distribute_combine": OpCap(A2A3, "7.1.0", "MC2 EP combine over an HCCL group name (section 6)"),
}

# dtypes the quantised GEMMs accept per chip (section 8: A2/A3 pages list only int8/int4 paths; 950 adds FP8/MXFP4)
FP8_CHIPS = A5


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split(".")[:3] if p.isdigit())


def normalise_chip(chip: str) -> str:
    c = chip.lower().replace("ascend", "").replace("_", "").replace("-", "").strip()
    if c in CHIPS:
        return c
    raise ValueError(f"unknown Ascend chip {chip!r}; choose one of {', '.join(CHIPS)}")


def chip_from_device_name(name: str) -> str:
    """torch.npu.get_device_name() -> our chip key. Names seen: 'Ascend910B1'..'Ascend910B4' (A2),
    'Ascend910_9391'.. (A3 = 910C; the '93' series), 'Ascend950PR' / 'Ascend950DT'. Unknown names map to 910b,
    the most restrictive table row, so an unknown chip never picks an op it may lack."""
    n = name.upper().replace(" ", "")
    if "950" in n:
        return "950dt" if "DT" in n else "950pr"
    if "910_93" in n or "910C" in n or "91093" in n:
        return "910c"
    return "910b"


def detect_chip(chip: str | None = None, emulate: bool = False) -> str:
    """Explicit option > DSV4_ASCEND_CHIP env var > the hardware name (real NPU) > 950dt (emulation default)."""
    if chip:
        return normalise_chip(chip)
    env = os.environ.get("DSV4_ASCEND_CHIP")
    if env:
        return normalise_chip(env)
    if emulate:
        return DEFAULT_EMULATED_CHIP
    import torch  # torch.npu exists only once torch_npu has been imported by probe()/create_ops()

    return chip_from_device_name(torch.npu.get_device_name(0))


def release_of(module: object) -> str:
    """op-plugin release of a torch_npu module: its __version__ suffix 'X.Y.Z' after '-' or '.post' when present
    (e.g. '2.7.1-7.3.0'), else LATEST_RELEASE and the table + hasattr() decide (see op_available)."""
    ver = str(getattr(module, "__version__", "") or "")
    if "-" in ver:
        tail = ver.split("-", 1)[1]
        if _release_key(tail):
            return tail
    return LATEST_RELEASE


def op_in_table(op: str, chip: str, release: str = LATEST_RELEASE) -> bool:
    cap = CAPABILITIES.get(op)
    return cap is not None and chip in cap.chips and _release_key(release) >= _release_key(cap.first_in)


def op_available(npu: object, op: str, chip: str, release: str = LATEST_RELEASE) -> bool:
    """The table says the chip/release has it AND the module really exposes it (a trimmed build may not)."""
    return op_in_table(op, chip, release) and hasattr(npu, op)


def custom_op(namespace: str, name: str):
    """torch.ops.<namespace>.<name> (vllm-ascend's _C_ascend, cann-recipes' custom) if registered, else None."""
    import torch

    try:
        ns = getattr(torch.ops, namespace)
        return getattr(ns, name)
    except (AttributeError, RuntimeError):
        return None
