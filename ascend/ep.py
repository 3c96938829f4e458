"""Expert parallelism through the MC2 ops (torch_npu.npu_moe_distribute_dispatch / _combine, section 6): the
ep_comm="mc2" path of init_parallel for the Ascend backend.

Per MoE layer every EP rank takes its shard of the (replicated) tokens, as DistributedOps' "alltoall" path does:
dispatch sends each (token, expert) pair to the rank owning the expert; the owner runs AscendOps' grouped expert
FFN on the rows it received (already grouped by local expert, counts from dispatch); combine returns the rows and
sums them per token; the shards are all-gathered over the ordinary EP group.

Choices and why:
- The MC2 ops get their OWN communicator (a second process group over the same ranks): the op pages forbid any other
  operator in the communicator dispatch/combine use, and our EP group also carries the all-gather.
- Every rank dispatches the same number of rows, ceil(T / ep) (the last shards padded with zero rows routed to
  experts 0..k-1 with weight 0, dropped after combine): the ops need 0 < BS on every rank (one decode token over 2
  ranks would leave a rank empty), equal BS keeps global_bs = 0 valid, and the all-gather wants equal shards.
  Batches above the documented BS limit (256 on A2, 512 on A3) go in several dispatch/combine rounds.
- Routing weights: V4 (and common/model/reference.py) weight each expert's activation BEFORE w2. On A2 dispatch carries
  expert_scales along (expand_scales), so the owner weights the rows before w2 and combine gets unit scales - the
  reference order. A3's dispatch takes no expert_scales (documented), so there combine applies them after w2: equal
  by linearity of w2 (fp32: rounding only; per-token dynamic int8 quantisation is scale-invariant up to rounding).
- Calls outside the documented envelope (fp32 activations, H, BS, ep_world_size per product) fall back to the torch
  all-to-all path of DistributedOps on hardware, recorded in inner.last_path["moe_experts"]. The CPU emulation runs
  the MC2 path anyway (mc2.STRICT off) so the tests exercise its bookkeeping at tiny sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dsv4.common.model.ops import LinearWeight
from dsv4.common.model.parallel import DistributedOps

from .backend import AscendOps
from .emulation import mc2

MC2_OPS = ("npu_moe_distribute_dispatch", "npu_moe_distribute_combine")


def hccl_group_name(inner: AscendOps, pg: object) -> str:
    """The communicator name the MC2 ops take for process group `pg`: on hardware HCCL's own name for it, in
    emulation a name registered with the emulated ops' group table."""
    rank = dist.get_rank(pg)
    if inner.emulated:
        ranks = dist.get_process_group_ranks(pg)
        return mc2.register_group(f"emulated_mc2_ep_{ranks[0]}_{len(ranks)}", pg)
    # section 0: how vllm-ascend gets the name (torch >= 2.1); unverified here without hardware
    return pg._get_backend(torch.device("npu")).get_hccl_comm_name(rank)  # type: ignore[attr-defined]


class Mc2DistributedOps(DistributedOps):
    """DistributedOps whose moe_experts runs MC2 dispatch -> AscendOps' grouped experts -> MC2 combine.
    groups: "tp", "ep" as DistributedOps, plus "ep_mc2" (same ranks as "ep", used by the MC2 ops only)."""

    def __init__(self, inner: AscendOps, groups: dict[str, object]) -> None:
        if not isinstance(inner, AscendOps):
            raise ValueError("ep_comm='mc2' needs the ascend backend (torch_npu's MC2 dispatch/combine ops)")
        missing = [op for op in MC2_OPS if not inner.has(op)]
        if missing:
            raise ValueError(f"ep_comm='mc2': {', '.join(missing)} not available on Ascend {inner.chip} "
                             f"(torch_npu {inner.release}); use ep_comm='alltoall'")
        super().__init__(inner, groups, "alltoall")  # the torch path is the fallback for off-envelope calls
        self.ep_comm = "mc2"
        self.group_ep = hccl_group_name(inner, groups["ep_mc2"])

    def moe_experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: LinearWeight, w2: LinearWeight,
                    w3: LinearWeight, swiglu_limit: float, expert_offset: int = 0,
                    n_experts: int | None = None) -> Tensor:
        inner: AscendOps = self.inner  # type: ignore[assignment]
        g = self.groups["ep_mc2"]
        n_ranks, me = dist.get_world_size(g), dist.get_rank(g)
        if n_ranks == 1:
            return inner.moe_experts(x, weights, ids, w1, w2, w3, swiglu_limit, expert_offset, n_experts)
        T, d = x.shape
        k, n_local = ids.shape[1], w1.weight.shape[0]
        n_experts = n_local * n_ranks
        per = -(-T // n_ranks)
        rounds = -(-per // mc2.max_batch(inner.chip))
        bs = -(-per // rounds)
        probe = x.new_empty((bs, d))
        why = None if inner.emulated and not mc2.STRICT else mc2.envelope_violation(inner.chip, probe, k, n_ranks,
                                                                                     n_experts)
        if why is not None:
            out = super().moe_experts(x, weights, ids, w1, w2, w3, swiglu_limit, expert_offset, n_experts)
            inner.last_path["moe_experts"] = f"torch all-to-all (MC2 off-envelope: {why})"
            return out
        # this rank's shard, padded to rounds * bs rows (see the module docstring)
        lo, hi = min(me * per, T), min((me + 1) * per, T)
        n_pad = rounds * bs - (hi - lo)
        xs = torch.cat([x[lo:hi], x.new_zeros(n_pad, d)])
        pad_ids = torch.arange(k, dtype=ids.dtype, device=ids.device).expand(n_pad, k)
        ids_s = torch.cat([ids[lo:hi], pad_ids]).to(torch.int32)
        w_s = torch.cat([weights[lo:hi].float(), weights.new_zeros(n_pad, k, dtype=torch.float32)])
        shard = torch.cat([self._mc2_round(xs[i:i + bs], ids_s[i:i + bs], w_s[i:i + bs], w1, w2, w3,
                                           swiglu_limit, n_experts) for i in range(0, rounds * bs, bs)])
        shard = shard[:per].float()
        parts = [torch.empty_like(shard) for _ in range(n_ranks)]
        dist.all_gather(parts, shard, group=self.groups["ep"])
        return torch.cat(parts)[:T]

    def _mc2_round(self, x: Tensor, ids: Tensor, weights: Tensor, w1: LinearWeight, w2: LinearWeight,
                   w3: LinearWeight, swiglu_limit: float, n_experts: int) -> Tensor:
        """One dispatch -> grouped expert FFN -> combine over `x` [BS, d] (BS equal on every rank)."""
        inner: AscendOps = self.inner  # type: ignore[assignment]
        g = self.groups["ep_mc2"]
        n_ranks, me = dist.get_world_size(g), dist.get_rank(g)
        carry = inner.chip == "910b"  # only A2's dispatch takes expert_scales (and returns expand_scales)
        expand_x, _, expand_idx, counts, ep_recv_counts, tp_recv_counts, expand_scales = \
            inner.npu.npu_moe_distribute_dispatch(x, ids, self.group_ep, n_ranks, me, n_experts,
                                                  expert_scales=weights if carry else None,
                                                  expert_token_nums_type=1)
        w1n, w2n, w3n = (inner.native_weight(w, expert=True) for w in (w1, w2, w3))
        # expand_x has the documented capacity A rows; the GEMMs take the rows really received (their group sizes
        # must add up to the GEMM's rows: npu_grouped_matmul doc), one host read of the count
        n_recv = int(counts.sum())
        # expand_scales is always a tensor ([0] when no expert_scales went in: the 2.14.0 meta function), so what
        # decides the order is whether this chip carried the scales, never `is not None`
        if carry:  # the reference order: weight before w2, unit scales in combine
            row_w = expand_scales[:n_recv]
            combine_scales = torch.ones_like(weights)
            order = "weights before w2"
        else:
            row_w = None
            combine_scales = weights
            order = "weights in combine (after w2: A3 dispatch carries no expert_scales)"
        y, gemm = inner.expert_ffn(expand_x[:n_recv], counts, w1n, w2n, w3n, swiglu_limit, row_w)
        y = torch.cat([y, y.new_zeros(expand_x.shape[0] - n_recv, y.shape[1])])
        out = inner.npu.npu_moe_distribute_combine(y, ids, expand_idx, ep_recv_counts, combine_scales, self.group_ep,
                                                   n_ranks, me, n_experts, tp_send_counts=tp_recv_counts,
                                                   expand_scales=expand_scales if carry else None)
        inner.last_path["moe_experts"] = (f"npu_moe_distribute_dispatch -> {gemm} -> swiglu -> "
                                          f"npu_moe_distribute_combine ({order})")
        return out

    def describe(self) -> dict[str, str]:
        plan = dict(self.inner.describe())
        plan["moe_experts"] = ("EP over MC2: npu_moe_distribute_dispatch -> grouped expert FFN -> "
                               "npu_moe_distribute_combine (torch all-to-all outside the documented envelope); "
                               "per rank: " + plan["moe_experts"])
        return plan
