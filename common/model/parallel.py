"""Tensor and expert parallelism as the model sees it: the rank layout (which heads and experts a rank holds) and the
collective ops seam. The model's arithmetic never sees torch.distributed: it calls ops.all_reduce / ops.all_gather,
which are identities in one process and real collectives inside `DistributedOps` (an Ops wrapper, so it lives here,
below the backends that extend it; process groups and torchrun are dsv4.common.runtime.distributed). How checkpoint
tensors are split across ranks is dsv4.common.checkpoint.layout.

Layout: world = max(tp, ep) ranks, the larger a multiple of the smaller. TP groups are blocks of `tp` consecutive
ranks, EP groups blocks of `ep` consecutive ranks. Every rank sees the same tokens; a TP group splits attention
heads, the indexer heads, the output groups and the vocabulary (as the official model-parallel files do; the shared
expert is replicated); an EP group splits the routed experts. V4 attention has a single shared KV head (MQA), so
each TP rank keeps the whole (small) KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsv4.common.model.config import ModelArgs
from dsv4.common.model.ops import OP_NAMES, Ops


class ParallelError(ValueError):
    """A TP/EP layout that does not fit the model or the world size."""


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0

    @classmethod
    def for_rank(cls, rank: int, world: int, tp: int, ep: int) -> ParallelConfig:
        if max(tp, ep) != world or world % min(tp, ep):
            raise ParallelError(f"world size {world} must equal max(tp={tp}, ep={ep}), the larger a multiple of "
                                "the smaller")
        return cls(tp, rank % tp, ep, rank % ep)

    def validate(self, args: ModelArgs) -> None:
        tp, ep = self.tp_size, self.ep_size
        for name in ("n_heads", "o_groups", "index_n_heads", "vocab_size"):
            if getattr(args, name) % tp:
                raise ParallelError(f"tp={tp} must divide {name}={getattr(args, name)}")
        if args.n_routed_experts % ep:
            raise ParallelError(f"ep={ep} must divide n_routed_experts={args.n_routed_experts}")

    def experts(self, args: ModelArgs) -> tuple[int, int]:
        """(first expert, number of experts) held by this rank."""
        n = args.n_routed_experts // self.ep_size
        return self.ep_rank * n, n


SINGLE = ParallelConfig()

# -- collectives -----------------------------------------------------------------------------------------------------
class DistributedOps(Ops):
    """Wraps a backend's ops: every op is the backend's; all_reduce / all_gather become torch.distributed calls on
    the TP or EP process group."""

    def __init__(self, inner: Ops, groups: dict[str, object], ep_comm: str = "alltoall") -> None:
        if ep_comm not in ("alltoall", "allreduce"):
            raise ValueError(f"ep_comm must be 'alltoall' or 'allreduce', got {ep_comm!r}")
        self.inner, self.groups, self.ep_comm = inner, groups, ep_comm
        self.name, self.device = f"{inner.name}+dist", inner.device
        for op in OP_NAMES + ["indexer_scores", "prepare_rope"]:
            if op != "moe_experts":
                setattr(self, op, getattr(inner, op))

    def moe_experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1, w2, w3, swiglu_limit: float,
                    expert_offset: int = 0, n_experts: int | None = None) -> Tensor:
        """Expert parallelism. "allreduce": every rank runs its experts on all tokens, then the outputs are summed.
        "alltoall" (the DeepEP / MC2 pattern): each rank takes a shard of the tokens, dispatches every (token,
        expert) pair to the rank owning the expert, gets the weighted results back, combines its shard, and the
        shards are gathered."""
        import torch.distributed as dist

        g = self.groups["ep"]
        n_ranks = dist.get_world_size(g)
        if n_ranks == 1:
            return self.inner.moe_experts(x, weights, ids, w1, w2, w3, swiglu_limit, expert_offset, n_experts)
        if self.ep_comm == "allreduce":
            y = self.inner.moe_experts(x, weights, ids, w1, w2, w3, swiglu_limit, expert_offset, n_experts)
            return self.all_reduce(y, "ep")
        T, d = x.shape
        k, n_local, me = ids.shape[1], w1.weight.shape[0], dist.get_rank(g)
        per = -(-T // n_ranks)
        lo, hi = min(me * per, T), min((me + 1) * per, T)
        # dispatch: this shard's (token, slot) pairs, grouped by the rank that owns the expert
        tok = torch.arange(lo, hi, device=x.device).repeat_interleave(k)
        eid = ids[lo:hi].flatten()
        wgt = weights[lo:hi].flatten().float()
        order = torch.argsort(eid // n_local, stable=True)
        tok, eid, wgt = tok[order], eid[order], wgt[order]
        send = torch.bincount(eid // n_local, minlength=n_ranks)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=g)
        send_l, recv_l = send.tolist(), recv.tolist()

        def exchange(t: Tensor, out_rows: list[int], in_rows: list[int]) -> Tensor:
            out = t.new_empty((sum(out_rows), *t.shape[1:]))
            dist.all_to_all_single(out, t.contiguous(), out_rows, in_rows, group=g)
            return out

        x_in = exchange(x[tok], recv_l, send_l)
        id_in = exchange(eid, recv_l, send_l)
        w_in = exchange(wgt, recv_l, send_l)
        # the owner runs its experts on the pairs it received, one pair per row
        y_in = self.inner.moe_experts(x_in, w_in[:, None], id_in[:, None], w1, w2, w3, swiglu_limit, expert_offset,
                                     n_experts)
        y_back = exchange(y_in, send_l, recv_l)  # combine: results return in dispatch order
        shard = torch.zeros(per, d, dtype=torch.float32, device=x.device)
        shard.index_add_(0, tok - lo, y_back)
        parts = [torch.empty_like(shard) for _ in range(n_ranks)]
        dist.all_gather(parts, shard, group=g)
        return torch.cat(parts)[:T]

    def all_reduce(self, x: Tensor, group: str = "tp") -> Tensor:
        import torch.distributed as dist

        g = self.groups[group]
        if dist.get_world_size(g) == 1:
            return x
        x = x.contiguous()
        dist.all_reduce(x, group=g)
        return x

    def all_gather(self, x: Tensor, dim: int, group: str = "tp") -> Tensor:
        import torch.distributed as dist

        g = self.groups[group]
        n = dist.get_world_size(g)
        if n == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=g)
        return torch.cat(parts, dim=dim)

    def describe(self) -> dict[str, str]:
        return self.inner.describe()
