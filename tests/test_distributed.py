"""Tensor and expert parallelism on CPU with gloo: every layout's logits equal the single-process model's."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.config import load_named_config
from dsv4.common.model.parallel import ParallelConfig, ParallelError
from dsv4.common.model.reference import ReferenceOps

# clamp mode keeps the model continuous: TP sums partial products in another order (~1e-6 apart), which in e4m3
# mode could flip an FP8 rounding of the KV and hide a real error behind noise
ARGS = load_named_config("tiny").replace(kv_fp8_sim="clamp", max_seq_len=256)
PROMPT, DECODE = 140, 3  # crosses the 128 window and completes a ratio-128 block; then one-token steps
TOL = dict(rtol=0, atol=2e-4)  # partial sums in another order, through 4 blocks of fp32 arithmetic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_model(model, tokens):
    cache = model.new_cache(1, ARGS.max_seq_len)
    outs = [model(tokens[:, :PROMPT], cache)]
    for i in range(PROMPT, PROMPT + DECODE):
        outs.append(model(tokens[:, i:i + 1], cache))
    return torch.cat(outs, dim=1)


def tokens():
    return torch.randint(0, ARGS.vocab_size, (1, PROMPT + DECODE), generator=torch.Generator().manual_seed(3))


def worker(rank, world, port, tp, ep, out_dir, fail_rank, checkpoint, ep_comm):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dsv4.common.runtime.distributed import RankFailure, all_ranks_ok, init_parallel, process_group_cleanup

    with process_group_cleanup():
        rt = init_parallel(ReferenceOps(), tp, ep, timeout_s=60, ep_comm=ep_comm)

        def load():
            if rank == fail_rank:
                raise OSError("shard model-00002-of-00004.safetensors is truncated")
            if checkpoint:  # each rank reads only its slices and experts from the sharded files
                from dsv4.common.checkpoint.reader import load_checkpoint

                return load_checkpoint(checkpoint, rt.ops, dtype=torch.float32, parallel=rt.parallel,
                                       max_seq_len=ARGS.max_seq_len, progress=False)
            return build_random_model(ARGS, rt.ops, parallel=rt.parallel)

        try:
            model = all_ranks_ok("loading", load)
        except RankFailure as e:
            if rank == 0:
                (out_dir / "error.txt").write_text(str(e))
            return
        logits = run_model(model, tokens())
        if rank == 0:
            save_file({"logits": logits.contiguous()}, str(out_dir / "logits.safetensors"))


def launch(tmp_path, world, tp, ep, fail_rank=-1, checkpoint=None, ep_comm="alltoall"):
    mp.spawn(worker, args=(world, free_port(), tp, ep, tmp_path, fail_rank, checkpoint, ep_comm), nprocs=world,
             join=True)


@pytest.fixture(scope="module")
def single():
    return run_model(build_random_model(ARGS, ReferenceOps()), tokens())


@pytest.mark.parametrize("world, tp, ep, ep_comm", [
    (2, 2, 1, "alltoall"), (2, 1, 2, "alltoall"), (4, 2, 4, "alltoall"), (4, 1, 4, "allreduce")])
def test_parallel_logits_equal_single_process(tmp_path, single, world, tp, ep, ep_comm):
    launch(tmp_path, world, tp, ep, ep_comm=ep_comm)
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    torch.testing.assert_close(got, single, **TOL)


def test_tp_ep_ranks_load_their_slices_from_a_checkpoint(tmp_path, single):
    from dsv4.common.checkpoint.writer import make_checkpoint

    ckpt = tmp_path / "ckpt"
    make_checkpoint(ARGS, ckpt, quant="fp4", seed=0)  # the release format; the same tensors as build_random_model
    launch(tmp_path, 2, 2, 2, checkpoint=str(ckpt))
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    torch.testing.assert_close(got, single, **TOL)


def test_rank_failing_to_load_ends_the_job_with_its_error(tmp_path):
    launch(tmp_path, 2, 2, 1, fail_rank=1)
    msg = (tmp_path / "error.txt").read_text()
    assert "loading failed" in msg and "rank 1: OSError" in msg and "truncated" in msg


def crash_worker(rank, world, port, out_dir):
    """Rank 1 dies abruptly after loading; rank 0 must get an error from its next collective, not hang."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dsv4.common.runtime.distributed import all_ranks_ok, init_parallel

    rt = init_parallel(ReferenceOps(), 2, 1, timeout_s=30)
    model = all_ranks_ok("loading", lambda: build_random_model(ARGS, rt.ops, parallel=rt.parallel))
    if rank == 1:
        os._exit(3)  # a crash: no cleanup, no message
    try:
        run_model(model, tokens())
    except Exception as e:  # the collective fails once the peer is gone
        (out_dir / "error.txt").write_text(f"{type(e).__name__}: {e}")


def test_rank_crash_mid_run_ends_rank0_with_an_error(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=crash_worker, args=(r, 2, port, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(timeout=120)  # the collective timeout is 30 s; a hang would outlive this
    alive = procs[0].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, "rank 0 hung after rank 1 crashed"
    assert procs[1].exitcode == 3
    assert (tmp_path / "error.txt").exists(), "rank 0 ended without reporting the failed collective"


def test_layout_errors():
    with pytest.raises(ParallelError, match="world size 4"):
        ParallelConfig.for_rank(0, 4, 2, 1)
    with pytest.raises(ParallelError, match="o_groups"):
        ParallelConfig(tp_size=4).validate(ARGS)  # tiny has 2 output groups
    with pytest.raises(ParallelError, match="n_routed_experts"):
        ParallelConfig(ep_size=3).validate(ARGS)
