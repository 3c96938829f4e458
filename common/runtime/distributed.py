"""Process groups for multi-rank inference, launched with torchrun:

    torchrun --nproc-per-node 8 -m dsv4 generate --model DIR --tp 8 --ep 8 --prompt "..."

The collective backend follows the device: hccl on Ascend NPUs, nccl on CUDA GPUs, gloo on CPU. A rank that fails
(loading, or any step wrapped in `all_ranks_ok`) makes every rank exit with the failing rank's error instead of
leaving the others blocked in a collective; collectives themselves time out after `timeout_s`.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv4.common.model.ops import Ops
from dsv4.common.model.parallel import DistributedOps, ParallelConfig

DEFAULT_TIMEOUT_S = 300
_PEERS: list[tuple[str, int]] = []  # (host, pid) of every rank, gathered at init: who is gone when a collective fails


class RankFailure(RuntimeError):
    """Another rank (or this one) failed; the message names the rank and its error."""


def collective_backend(device: torch.device) -> str:
    return {"npu": "hccl", "cuda": "nccl"}.get(device.type, "gloo")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


@dataclass
class Runtime:
    rank: int
    world: int
    parallel: ParallelConfig
    ops: Ops

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_parallel(ops: Ops, tp: int, ep: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                  ep_comm: str = "alltoall") -> Runtime:
    """Join the process group torchrun set up (or run alone when tp = ep = 1) and wrap `ops` with collectives.
    The device's index is taken from LOCAL_RANK, so each rank drives its own card. ep_comm: how routed experts
    exchange tokens (see DistributedOps.moe_experts); "mc2" (ascend backend only) uses torch_npu's MC2
    dispatch/combine ops (dsv4.ascend.ep)."""
    if ep_comm == "mc2" and getattr(ops, "name", None) != "ascend":
        raise ValueError(f"ep_comm='mc2' uses torch_npu's MC2 dispatch/combine ops: it needs the ascend backend, "
                         f"not {getattr(ops, 'name', type(ops).__name__)!r} (use 'alltoall')")
    rank, world, local = world_from_env()
    if world == 1 and tp == ep == 1:
        return Runtime(0, 1, ParallelConfig(), ops)
    par = ParallelConfig.for_rank(rank, world, tp, ep)
    if ops.device.type in ("cuda", "npu"):
        getattr(torch, ops.device.type).set_device(local)
        ops.device = torch.device(ops.device.type, local)
    if not dist.is_initialized():
        dist.init_process_group(collective_backend(ops.device), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    peers: list[tuple[str, int] | None] = [None] * world
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    _PEERS[:] = [p for p in peers if p is not None]
    _stop_on_sigterm()
    groups = {"tp": _block_group(rank, world, tp), "ep": _block_group(rank, world, ep)}
    if ep_comm == "mc2":  # the MC2 ops want a communicator of their own (no other op may use it)
        from dsv4.ascend.ep import Mc2DistributedOps  # lazily: torch_npu machinery only on this path

        groups["ep_mc2"] = _block_group(rank, world, ep)
        return Runtime(rank, world, par, Mc2DistributedOps(ops, groups))
    return Runtime(rank, world, par, DistributedOps(ops, groups, ep_comm))


def _block_group(rank: int, world: int, size: int):
    """The group of `size` consecutive ranks holding `rank`. Every rank creates every group, in the same order,
    as torch.distributed.new_group requires."""
    mine = None
    for start in range(0, world, size):
        g = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = g
    return mine


def all_ranks_ok(step: str, fn: Callable[[], object]) -> object:
    """Run `fn` on every rank; if any rank raised, every rank raises RankFailure naming the failing rank(s) and
    their errors (gathered), so nobody waits forever for a peer that is gone."""
    if not dist.is_initialized():
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # reported to every rank below
        error = f"{type(e).__name__}: {e}"
        if os.environ.get("DSV4_DEBUG"):
            traceback.print_exc()
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise RankFailure(f"{step} failed on {len(failed)} rank(s): {detail}")
    return result


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has ended
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that pid: alive
        pass
    return True


def lost_peers() -> str:
    """Which ranks have ended, as far as this host can tell (ranks on other hosts cannot be checked from here)."""
    here, gone, remote = socket.gethostname(), [], 0
    for _ in range(10):  # the launcher may not have reaped the dead rank yet: look again for up to a second
        gone, remote = [], 0
        for r, (host, pid) in enumerate(_PEERS):
            if host != here:
                remote += 1
            elif not _alive(pid):
                gone.append(f"rank {r} (pid {pid})")
        if gone:
            break
        time.sleep(0.1)
    if gone:
        return (f"{', '.join(gone)} ended: a rank that raised an error printed its own 'dsv4: rank N: error' line; "
                "one that printed nothing was killed by a signal (kill -9, the OOM killer) or crashed hard; the "
                "launcher's summary gives its exit code or signal")
    return "another rank ended or stopped answering" + (f" ({remote} rank(s) on other hosts)" if remote else "")


def _stop_on_sigterm() -> None:
    """torchrun answers a rank's death by sending SIGTERM to the others, often before their pending collective has
    failed: turn that signal into a RankFailure naming the lost rank, so rank 0 still ends with its one line.
    (dsv4 serve installs its own SIGTERM handler, a drain, once the server starts.)"""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the error this raises is on its way out
        raise RankFailure(f"rank {dist.get_rank() if dist.is_initialized() else '?'}: stopped by the launcher "
                          f"(SIGTERM): {lost_peers()}")

    signal.signal(signal.SIGTERM, stop)


def describe_collective_failure(e: BaseException) -> str | None:
    """One line for a collective that failed because a peer died (gloo/nccl/hccl raise RuntimeError subclasses with
    multi-line messages), or None when no process group is running (then the error is not about peers)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return f"rank {dist.get_rank()}: a collective failed: {lost_peers()} [{type(e).__name__}: {first}]"


@contextmanager
def process_group_cleanup():
    """Destroy the process group on exit, including after an error, so the launcher sees every rank end."""
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            _ignore_sigterm()


def _ignore_sigterm() -> None:
    """After the process group is gone the rank only reports and exits: a launcher's SIGTERM arriving now must not
    interrupt the error line being printed (_stop_on_sigterm would raise a second error in the middle of it)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
