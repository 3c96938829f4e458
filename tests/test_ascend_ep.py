"""Expert parallelism over the MC2 ops (npu_moe_distribute_dispatch / _combine) on the emulated Ascend backend: the
ops' bookkeeping on a hand-made 2-rank example, and EP=2 logits against the single-process Ascend model."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from dsv4.ascend import create_ops
from dsv4.ascend.emulation import make_torch_npu
from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps

# clamp mode keeps the model continuous (see tests/test_distributed.py): EP changes fp32 summation orders by ~1e-7,
# which must not flip an e4m3 rounding of the KV
ARGS = load_named_config("tiny").replace(kv_fp8_sim="clamp", max_seq_len=256)
PROMPT, DECODE = 140, 2  # crosses the 128 window; then one-token steps (one rank dispatches only padding)
# the expert GEMMs run on other row subsets (another M per GEMM) and the k contributions are added in combine: fp32
# reordering (~1e-7 relative per op) carried through 4 blocks, as the TP/EP tests of test_distributed.py bound it
TOL = dict(rtol=0, atol=2e-4)
CHIP = "910b"  # A2: has MC2 dispatch/combine and carries expert_scales (the bookkeeping test checks them)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokens() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (1, PROMPT + DECODE), generator=torch.Generator().manual_seed(3))


def run_model(model, toks: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(1, ARGS.max_seq_len)
    outs = [model(toks[:, :PROMPT], cache)]
    for i in range(PROMPT, PROMPT + DECODE):
        outs.append(model(toks[:, i:i + 1], cache))
    return torch.cat(outs, dim=1)


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


# -- the ops' bookkeeping on a hand-made example ------------------------------------------------------------------
# 4 experts over 2 ranks (rank 0: experts 0, 1; rank 1: experts 2, 3); expert 1 receives nothing
IDS = {0: [[0, 2], [2, 3], [0, 3]], 1: [[3, 0], [2, 0], [3, 2]]}
SCALES = {0: [[0.5, 0.25], [1.0, 2.0], [0.75, 1.5]], 1: [[0.125, 1.0], [2.0, 0.5], [1.0, 0.25]]}
H = 4


def hand_x(rank: int) -> torch.Tensor:
    """Token t of rank r is the row (10 r + t + 1) * [1, 2, 3, 4]: every row tells where it came from."""
    return (10 * rank + torch.arange(3, dtype=torch.float32) + 1)[:, None] * torch.arange(1, H + 1.0)


def expert_fn(e: int, rows: torch.Tensor) -> torch.Tensor:
    return rows * (e + 1) + e  # a distinct affine map per expert stands in for its FFN


# (source rank, token) of every row each rank receives: by local expert, then source rank, then token order
EXPECTED_ROWS = {0: [(0, 0), (0, 2), (1, 0), (1, 1)],
                 1: [(0, 0), (0, 1), (1, 1), (1, 2), (0, 1), (0, 2), (1, 0), (1, 2)]}
EXPECTED_COUNTS = {0: [4, 0], 1: [4, 4]}


def bookkeeping_worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    _env(rank, world, port)
    import torch.distributed as dist

    from dsv4.ascend.emulation import mc2

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        npu = make_torch_npu(CHIP)
        name = mc2.register_group("unit_ep", dist.new_group([0, 1]))
        x = hand_x(rank)
        ids = torch.tensor(IDS[rank], dtype=torch.int32)
        scales = torch.tensor(SCALES[rank])
        expand_x, dyn, expand_idx, counts, recv_counts, tp_counts, expand_scales = npu.npu_moe_distribute_dispatch(
            x, ids, name, 2, rank, 4, expert_scales=scales)
        # the owner computes each row with its global expert id (local experts in order, counts from dispatch)
        local_ids = torch.arange(2).repeat_interleave(counts) + 2 * rank
        y = expand_x.clone()
        n = int(counts.sum())
        y[:n] = torch.stack([expert_fn(int(e), expand_x[i]) for i, e in enumerate(local_ids)]) if n else y[:0]
        out = npu.npu_moe_distribute_combine(y, ids, expand_idx, recv_counts, scales, name, 2, rank, 4,
                                             expand_scales=expand_scales)
        save_file({"expand_x": expand_x, "dynamic_scales": dyn, "expand_idx": expand_idx, "counts": counts,
                   "recv_counts": recv_counts, "tp_counts": tp_counts, "expand_scales": expand_scales, "out": out},
                  str(out_dir / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_dispatch_combine_bookkeeping(tmp_path):
    mp.spawn(bookkeeping_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    xs = {r: hand_x(r) for r in (0, 1)}
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        rows = EXPECTED_ROWS[rank]
        assert got["expand_x"].shape == (3 * 2 * 2, H)  # A = BS * ep_world_size * min(local experts, K)
        want = torch.stack([xs[s][t] for s, t in rows])
        torch.testing.assert_close(got["expand_x"][:len(rows)], want, rtol=0, atol=0)
        assert not got["expand_x"][len(rows):].any()
        assert got["counts"].tolist() == EXPECTED_COUNTS[rank] and got["counts"].dtype == torch.int64
        # expert-major [local expert, source rank] counts, prefix-summed
        c = EXPECTED_COUNTS[rank]
        per_src = [[sum(1 for i, (s, _) in enumerate(rows) if s == src and
                        sum(c[:e]) <= i < sum(c[:e + 1])) for src in (0, 1)] for e in (0, 1)]
        assert got["recv_counts"].tolist() == torch.tensor(per_src).flatten().cumsum(0).tolist()
        # the weights travelled with their rows (A2's expand_scales)
        want_s = [SCALES[s][t][IDS[s][t].index(2 * rank + e)]
                  for e in (0, 1) for s, t in rows[sum(c[:e]):sum(c[:e + 1])]]
        torch.testing.assert_close(got["expand_scales"][:len(rows)], torch.tensor(want_s), rtol=0, atol=0)
        # combine: out[t] = sum_j scale[t, j] * expert_{ids[t, j]}(x[t])
        direct = torch.stack([sum(SCALES[rank][t][j] * expert_fn(IDS[rank][t][j], xs[rank][t]) for j in range(2))
                              for t in range(3)])
        torch.testing.assert_close(got["out"], direct, rtol=1e-6, atol=1e-6)
    # the seven outputs are shaped as the wheel's meta function allocates them (dispatch has no doc in 2.14.0)
    from test_ascend_schemas import meta_function, shapes

    order = ("expand_x", "dynamic_scales", "expand_idx", "counts", "recv_counts", "tp_counts", "expand_scales")
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        meta = meta_function("npu_moe_distribute_dispatch")(
            torch.empty(3, H, device="meta"), torch.empty(3, 2, dtype=torch.int32, device="meta"), "unit_ep", 2,
            rank, 4, expert_scales=torch.empty(3, 2, device="meta"))
        assert shapes([got[k] for k in order]) == shapes(meta)
    # position of each pair within its expert's block on the source (our reading of expand_idx)
    assert load_file(str(tmp_path / "rank0.safetensors"))["expand_idx"].tolist() == [0, 0, 1, 0, 1, 1]


def test_mc2_ops_per_chip():
    for chip, has in (("910b", True), ("910c", True), ("950pr", False), ("950dt", False)):
        npu = make_torch_npu(chip)
        assert hasattr(npu, "npu_moe_distribute_dispatch") is has
        assert hasattr(npu, "npu_moe_distribute_combine") is has


def test_mc2_needs_the_ascend_backend():
    from dsv4.common.runtime.distributed import init_parallel

    with pytest.raises(ValueError, match="needs the ascend backend"):
        init_parallel(ReferenceOps(), 1, 2, ep_comm="mc2")


def test_envelope_documented_limits():
    from dsv4.ascend.emulation import mc2

    bf = torch.zeros(8, 7168, dtype=torch.bfloat16)
    assert mc2.envelope_violation("910c", bf, 8, 16, 256) is None
    assert "fp16" in mc2.envelope_violation("910c", bf.float(), 8, 16, 256)
    assert "7168" in mc2.envelope_violation("910c", bf[:, :4096], 8, 16, 256)
    assert "ep_world_size" in mc2.envelope_violation("910b", bf, 8, 8, 256)
    assert "A2/A3" in mc2.envelope_violation("950dt", bf, 8, 16, 256)


# -- the model: EP = 2 over MC2 vs one process -------------------------------------------------------------------
def model_worker(rank: int, world: int, port: int, out_dir: Path, chip: str) -> None:
    _env(rank, world, port)
    from dsv4.common.runtime.distributed import init_parallel, process_group_cleanup

    with process_group_cleanup():
        rt = init_parallel(create_ops("cpu", emulate=True, chip=chip), 1, 2, timeout_s=120, ep_comm="mc2")
        model = build_random_model(ARGS, rt.ops, parallel=rt.parallel)
        logits = run_model(model, tokens())
        if rank == 0:
            save_file({"logits": logits.contiguous()}, str(out_dir / "logits.safetensors"))
            (out_dir / "path.txt").write_text(rt.ops.inner.last_path["moe_experts"])


# 910b: weights before w2 (A2 carries expert_scales); 910c: weights applied by combine (A3 carries none)
@pytest.mark.parametrize("chip, order", [("910b", "before w2"), ("910c", "in combine")])
def test_ep2_mc2_logits_equal_single_process(tmp_path, chip, order):
    mp.spawn(model_worker, args=(2, free_port(), tmp_path, chip), nprocs=2, join=True)
    want = run_model(build_random_model(ARGS, create_ops("cpu", emulate=True, chip=chip)), tokens())
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    path = (tmp_path / "path.txt").read_text()
    assert path.startswith("npu_moe_distribute_dispatch") and order in path, path
    print(f"{chip}: max |diff| {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, **TOL)
