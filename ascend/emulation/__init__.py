"""CPU emulation of the torch_npu operators the Ascend backend calls, shaped like the `torch_npu` namespace.

`torch_npu` below (and `make_torch_npu(chip, release)`) is a module object whose attributes have the documented
signatures of shared/spec/torch-npu-ops.md; AscendOps(emulate=True) calls it exactly where it would call the real
torch_npu. An emulated chip only exposes the ops the capability table gives it (so `hasattr` behaves like a real
install), and each op raises NpuOpError where the documented constraints (shapes, dtypes, chip) are violated.
This package is an independent small reference of the operator contracts: it never imports dsv4.common.model.reference.
"""

from __future__ import annotations

import functools
import types

from ..capability import DEFAULT_EMULATED_CHIP, LATEST_RELEASE, normalise_chip, op_in_table
from . import attention, basic, mc2, mhc, moe
from .basic import NpuOpError

_OPS = {
    "npu_rms_norm": basic.npu_rms_norm,
    "npu_rotary_mul": basic.npu_rotary_mul,
    "npu_swiglu": basic.npu_swiglu,
    "npu_dynamic_quant": basic.npu_dynamic_quant,
    "npu_quant_matmul": basic.npu_quant_matmul,
    "npu_lightning_indexer": attention.npu_lightning_indexer,
    "npu_sparse_flash_attention": attention.npu_sparse_flash_attention,
    "npu_mhc_pre": mhc.npu_mhc_pre,
    "npu_mhc_sinkhorn": mhc.npu_mhc_sinkhorn,
    "npu_mhc_post": mhc.npu_mhc_post,
    "npu_moe_gating_top_k": moe.npu_moe_gating_top_k,
    "npu_moe_init_routing_v2": moe.npu_moe_init_routing_v2,
    "npu_grouped_matmul": moe.npu_grouped_matmul,
    "npu_moe_finalize_routing": moe.npu_moe_finalize_routing,
    "npu_moe_distribute_dispatch": mc2.npu_moe_distribute_dispatch,
    "npu_moe_distribute_combine": mc2.npu_moe_distribute_combine,
}
EMULATED_OPS = tuple(_OPS)


@functools.cache
def make_torch_npu(chip: str = DEFAULT_EMULATED_CHIP, release: str = LATEST_RELEASE) -> types.ModuleType:
    """A torch_npu look-alike for one chip and op-plugin release: only the ops that chip/release has."""
    chip = normalise_chip(chip)
    mod = types.ModuleType(f"torch_npu_emulated_{chip}")
    mod.__doc__ = f"CPU emulation of torch_npu on Ascend {chip} (op-plugin {release})"
    mod.__version__ = f"emulated-{release}"
    mod.emulated_chip = chip
    for name, fn in _OPS.items():
        if op_in_table(name, chip, release):
            bound = functools.partial(fn, chip)
            bound.__name__, bound.__doc__ = name, fn.__doc__  # signature() of the partial drops `chip`
            setattr(mod, name, bound)
    return mod


torch_npu = make_torch_npu()

__all__ = ["EMULATED_OPS", "NpuOpError", "make_torch_npu", "torch_npu"]
