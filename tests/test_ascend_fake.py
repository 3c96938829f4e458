"""The fake (meta) implementations of the emulated torch_npu ops (ascend/emulation/fake.py), and what they make
possible: the Ascend backend's static decode step traces as one graph, as TorchAir would capture it on a device.

1. Every emulated call a decode step makes (950DT, 910B, 910C; and 950DT with V4's attention dims, where the sparse
   flash attention and the lightning indexer take the call) is replayed on fake tensors: the fake's output shapes and
   dtypes must equal what the CPU kernel returned.
2. The 950DT and 910B static steps (bf16, FP8/FP4 weights in their native formats) compile with fullgraph=True (no graph
   break: nothing in the backend's step reads a device value on the host or makes a data-dependent shape) and the
   graph gives the uncaptured step's logits and cache rows bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from dsv4.ascend import create_ops
from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.model.static import decode_step

EMULATED = "dsv4_npu_emul_"
# the fused MoE ops each chip's step calls (910C has no grouped GEMM or finalize op in 2.14.0)
FUSED_MOE = {"npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_moe_finalize_routing"}
MOE_OPS = {"950dt": FUSED_MOE, "910b": FUSED_MOE, "910c": {"npu_moe_init_routing_v2"}}


class RecordEmulatedCalls(TorchDispatchMode):
    """Every call of an emulated torch_npu op: (op, args, kwargs, outputs), inputs cloned before the call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.namespace.startswith(EMULATED):
            return func(*args, **kwargs)
        saved = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))
        out = func(*args, **kwargs)
        self.calls.append((func, *saved, out))
        return out


def step_model(chip: str, **changes):
    """A 2-layer bf16 model (CSA and HCA layers) prefilled on the reference, then switched to the chip's emulated ops;
    returns (model, cache, the next step's arguments). The first step on the backend converts weights: done here."""
    args = load_named_config("tiny").replace(n_layers=2, n_hash_layers=1, compress_ratios=[4, 128], n_mtp_layers=0,
                                             hc_sinkhorn_iters=2, **changes)
    m = build_random_model(args, ReferenceOps(), torch.bfloat16, seed=0, weights="quantized")
    seqs = torch.randint(2, 500, (2, 260), generator=torch.Generator().manual_seed(0))
    cache = m.new_cache(2, 256)
    for b, n in enumerate([245, 250]):
        m(seqs[b:b + 1, :n], cache, slots=slice(b, b + 1))
    m.ops = create_ops(emulate=True, chip=chip)
    pos = cache.lengths.clone()
    step_args = (seqs[torch.arange(2), pos], torch.arange(2), pos)
    decode_step(m, copy.deepcopy(cache), *step_args, 256)
    return m, cache, step_args


def meta_of(tree):
    return [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in tree_flatten(tree)[0]]


@pytest.mark.parametrize("chip, changes", [("950dt", {}), ("910b", {}), ("910c", {}),
                                           ("950dt", dict(head_dim=512, index_n_heads=64))],
                         ids=["950dt", "910b", "910c", "950dt-v4-attention"])
def test_fakes_give_the_kernels_shapes(chip, changes):
    m, cache, step_args = step_model(chip, **changes)
    rec = RecordEmulatedCalls()
    with rec:
        m(step_args[0][:, None], copy.deepcopy(cache))  # the eager forward: the MoE's fused routing on 910B/910C
        decode_step(m, copy.deepcopy(cache), *step_args, 256)
    ops = {f.name().split("::")[1].split(".")[0] for f, *_ in rec.calls}
    assert "npu_rms_norm" in ops and len(rec.calls) > 10, ops
    if changes:  # V4's attention dims: the fused DSA ops take the attention
        assert {"npu_sparse_flash_attention", "npu_lightning_indexer"} <= ops, ops
    assert MOE_OPS.get(chip, set()) <= ops, ops
    for func, args, kwargs, out in rec.calls:
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            fargs, fkwargs = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                                      (args, kwargs))
            fake_out = func(*fargs, **fkwargs)
        assert meta_of(fake_out) == meta_of(out), func.name()


@pytest.mark.parametrize("chip", ["950dt", "910b"])
def test_the_static_step_captures_as_one_graph(chip):
    """910C is left out: without a grouped GEMM its experts run one GEMM each, over group sizes read on the host."""
    m, cache, step_args = step_model(chip)

    def step(cache, tok, slots, pos):
        return decode_step(m, cache, tok, slots, pos, 256)

    eager_cache, compiled_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    want = step(eager_cache, *step_args)
    # fullgraph: any graph break (a host read, a data-dependent shape, an op without a fake) raises here
    got = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)(compiled_cache, *step_args)
    assert torch.equal(got, want)  # the graph runs the same kernels
    for a, b in zip(eager_cache.layers, compiled_cache.layers, strict=True):
        assert torch.equal(a.flat_kv[:-1], b.flat_kv[:-1])  # every row the step wrote but the scratch row
