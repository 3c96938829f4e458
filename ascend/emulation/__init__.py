"""CPU emulation of the torch_npu operators the Ascend backend calls, bound to the released schemas.

Every emulated operator is registered as a real torch operator under a scratch namespace per chip
(`torch.ops.dsv4_npu_emul_<chip>.<op>`), defined with the schema string(s) of the pinned torch_npu release
(ascend/schemas/torch_npu-2.14.0.yaml, generated from the wheel) and implemented for CPU by the functions in this
package. `make_torch_npu(chip)` returns a module whose attributes ARE those operators, as `torch_npu.X` is
`torch.ops.npu.X` on hardware: torch's own schema binder parses every call the backend makes, so an unknown
keyword, a wrong positional count, a missing required argument or a different number of outputs fails here in CPU
CI exactly as it would on a device. An emulated chip exposes only the ops the capability table gives it (so
`hasattr` behaves like a real install), and each op raises NpuOpError where a documented constraint is violated.
Each op also has a fake (meta) implementation (fake.py), so a step calling them traces under torch.compile as the
real ops trace under TorchAir.
This package is an independent small reference of the operator contracts: it never imports dsv4.common.model.reference.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable

import torch

from .. import schemas
from ..capability import DEFAULT_EMULATED_CHIP, normalise_chip, op_in_table
from . import attention, basic, mc2, mhc, moe
from .basic import DTYPE_OF_CODE, NpuOpError
from .fake import FAKES

KERNELS: dict[str, Callable] = {
    "npu_rms_norm": basic.npu_rms_norm,
    "npu_rotary_mul": basic.npu_rotary_mul,
    "npu_swiglu": basic.npu_swiglu,
    "npu_dynamic_quant": basic.npu_dynamic_quant,
    "npu_dynamic_mx_quant": basic.npu_dynamic_mx_quant,
    "npu_anti_mx_quant": basic.npu_anti_mx_quant,
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
EMULATED_OPS = tuple(KERNELS)
# ops without a fake implementation (emulation/fake.py): a traced step that calls one breaks its graph there. The MC2
# ops exchange tokens between ranks, which the emulation does with host-side collectives
NO_FAKE = ("npu_moe_distribute_dispatch", "npu_moe_distribute_combine")
NAMESPACE = "dsv4_npu_emul_{chip}"
_LIBRARIES: dict[str, torch.library.Library] = {}  # kept alive: a dropped Library unregisters its ops
_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
           torch.float64, torch.bool, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.quint4x2)


def _fill_dtype_codes(lib: torch.library.Library, ns: str) -> None:
    """`int?` arguments that Python callers pass a torch.dtype (output_dtype, dst_type) arrive as ScalarType codes:
    learn the code of each dtype by sending it through an identity op of the same argument type."""
    if DTYPE_OF_CODE:
        return
    lib.define("dtype_code(Tensor anchor, int? d) -> int")  # a tensor argument picks the CPU kernel
    lib.impl("dtype_code", lambda anchor, d: -1 if d is None else int(d), "CPU")
    op = getattr(torch.ops, ns).dtype_code
    anchor = torch.empty(0)
    for dt in _DTYPES:
        DTYPE_OF_CODE[op(anchor, dt)] = dt


def _kernel(fn: Callable, chip: str) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return fn(chip, *args, **kwargs)

    run.__signature__ = inspect.signature(fn).replace(parameters=list(inspect.signature(fn).parameters.values())[1:])
    return run


def register(chip: str) -> str:
    """Define every emulated op with its release schema(s) under the chip's namespace (once); returns the name."""
    ns = NAMESPACE.format(chip=chip)
    if ns in _LIBRARIES:
        return ns
    lib = torch.library.Library(ns, "DEF")
    for name, fn in KERNELS.items():
        for i, schema in enumerate(schemas.schemas(name)):
            lib.define(schema)
            if i == 0:  # the default overload; others (npu_grouped_matmul.List) are defined, not implemented
                lib.impl(name, _kernel(fn, chip), "CPU")
                if name not in NO_FAKE:  # traceable by torch.compile, as the wheel's meta functions make the real ops
                    torch.library.register_fake(f"{ns}::{name}", _kernel(FAKES.get(name, fn), chip), lib=lib)
    _fill_dtype_codes(lib, ns)
    _LIBRARIES[ns] = lib
    return ns


@functools.cache
def make_torch_npu(chip: str = DEFAULT_EMULATED_CHIP) -> types.ModuleType:
    """A torch_npu look-alike for one chip: attributes are torch.ops.<ns>.<op> for the ops that chip has."""
    chip = normalise_chip(chip)
    ops = getattr(torch.ops, register(chip))
    mod = types.ModuleType(f"torch_npu_emulated_{chip}")
    mod.__doc__ = f"CPU emulation of torch_npu {schemas.PINNED_RELEASE} on Ascend {chip}"
    mod.__version__ = schemas.PINNED_RELEASE
    mod.emulated_chip = chip
    for name in KERNELS:
        if op_in_table(name, chip):
            setattr(mod, name, getattr(ops, name))
    return mod


__all__ = ["EMULATED_OPS", "KERNELS", "NpuOpError", "make_torch_npu", "register"]
