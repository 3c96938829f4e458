"""CPU emulation of the MC2 expert-parallel communication ops (torch-npu-ops.md section 6), registered under their
torch_npu 2.14.0 schemas; the 2.14.0 wheel ships no docstring for them, only schema and meta function:
npu_moe_distribute_dispatch and npu_moe_distribute_combine, carried out with torch.distributed collectives (gloo).

The real ops take an HCCL communicator NAME (`group_ep`), not a ProcessGroup; on hardware it comes from
`pg._get_backend(torch.device("npu")).get_hccl_comm_name(rank)`. Here `register_group(name, pg)` maps a name to a
ProcessGroup so the emulated ops keep the documented string-typed signature.

What is DOCUMENTED (OPDOC:npu_moe_distribute_dispatch / _combine, op-plugin docs/context, read for this module):
- products A2 and A3 only; x bf16/fp16 [BS, H]; expert_ids int32 [BS, K], values in [0, moe_expert_num), no repeats
  within a row; moe_expert_num % (ep_world_size - shared_expert_rank_num) == 0; local_expert_num = moe_expert_num /
  ep_world_size (no shared-expert ranks);
- expand_x: the tokens this rank received, [max(tp_world_size, 1) * A, H], A >= BS * ep_world_size *
  min(local_expert_num, K) when global_bs == 0 (global_bs * min(local_expert_num, K) otherwise);
- expand_idx: int32 [BS * K], "the number of tokens sent to the same expert", only meant to be passed to combine;
- expert_token_nums: int64 [local_expert_num], tokens each local expert received (type 1: counts, 0: prefix sum);
- ep_recv_counts: int32, prefix sums of "tokens each expert on this rank received from each rank"; A3 shape
  [ep_world_size * max(tp_world_size, 1) * local_expert_num]; A2 [moe_expert_num + 2 * global_bs * K * server_num];
  combine takes it as ep_send_counts;
- expand_scales: A2: expert_scales carried along with x through the all-to-all, float [A]; otherwise an empty
  tensor (the 2.14.0 meta function allocates [0]; a Python caller never sees None); A3's dispatch does not accept
  expert_scales;
- combine: "returns along the path dispatch collected the data, then multiplies by the weights and adds":
  out [BS, H] = sum_k expert_scales[t, k] * expert_output(t, k), in expand_x's dtype;
- the values of expand_idx / ep_recv_counts / tp_recv_counts / expand_scales may differ between products, algorithms
  and versions: callers must pass them to combine untouched and never depend on them (we do not);
- shared_expert_x, x_active_mask, activation_scale, weight_scale, group_list, out_dtype, group_list_type are
  "reserved, unused" in v1: the emulation rejects non-default values rather than guess what a later version does.
- hardware envelope: A2 ep_world_size in {16, 32, 64}, H in (0, 7168] and % 32 == 0, 0 < BS <= 256, K <= 16,
  local_expert_num <= 24; A3 ep_world_size in {8, 16, 32, 64, 128, 144, 256, 288}, H == 7168, 0 < BS <= 512, K <= 8.

What is ASSUMED (our reading, unverified without hardware):
- row order inside expand_x: grouped by local expert; inside an expert by source rank; inside a source by the source's
  (token, slot) order, token-major (src = t * K + j) - the order in which a stable sort by expert id leaves the pairs;
- expand_idx[t * K + j] = how many of this rank's earlier pairs (smaller t) went to the same expert, i.e. the pair's
  position inside its (expert, source) block; combine uses it with expert_ids to put returning rows back in place;
- ep_recv_counts' first local_expert_num * ep_world_size entries are the expert-major [local_expert, source_rank]
  counts, prefix-summed; A2's extra 2 * global_bs * K * server_num tail (reduce bookkeeping of the inter-node
  algorithm) is not emulated;
- rows of expand_x past sum(expert_token_nums) are zero here (undefined on the device);
- tp_world_size <= 1 only (the TP allgather stage and tp_recv_counts are not emulated: tp_recv_counts is returned as
  an empty int32 tensor), no shared-expert ranks, quant_mode 0 only.

The hardware envelope (dtype, H, BS, ep_world_size) is enforced only when STRICT is True: the CPU tests run the
bookkeeping on fp32, tiny hidden sizes and 2 ranks, which no real chip accepts. Callers that run on hardware check
the envelope themselves with `envelope_violation` (ascend/ep.py falls back to the torch all-to-all path).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .basic import check

# enforce the documented per-product shape/dtype envelope inside the emulated ops (see module docstring)
STRICT = False

_GROUPS: dict[str, object] = {}

_A2_EP_SIZES = (16, 32, 64)
_A3_EP_SIZES = (8, 16, 32, 64, 128, 144, 256, 288)


def register_group(name: str, pg: object) -> str:
    """Make ProcessGroup `pg` reachable as group_ep=`name` in the emulated ops (what an HCCL comm name is on the
    device). Re-registering a name with another group replaces it."""
    check(1 <= len(name) < 128, "register_group", "group names are 1..127 characters (the ops' documented range)")
    _GROUPS[name] = pg
    return name


def lookup_group(name: str, op: str) -> object:
    check(name in _GROUPS, op, f"unknown communicator name {name!r} (register it with mc2.register_group)")
    return _GROUPS[name]


def envelope_violation(chip: str, x: Tensor, k: int, ep_world_size: int, moe_expert_num: int) -> str | None:
    """The first documented per-product limit that a dispatch of x [BS, H] with top-k, ep_world_size ranks and
    moe_expert_num experts breaks, or None when the call fits."""
    bs, h = x.shape
    local = moe_expert_num // max(ep_world_size, 1)
    if chip not in ("910b", "910c"):
        return f"MC2 dispatch/combine are documented for A2/A3 only, not {chip}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"x must be bf16/fp16, got {x.dtype}"
    if chip == "910b":
        if ep_world_size not in _A2_EP_SIZES:
            return f"A2 ep_world_size must be one of {_A2_EP_SIZES}, got {ep_world_size}"
        if not (0 < h <= 7168 and h % 32 == 0):
            return f"A2 needs 0 < H <= 7168, H % 32 == 0; H = {h}"
        if not 0 < bs <= 256:
            return f"A2 needs 0 < BS <= 256, BS = {bs}"
        if not 0 < k <= 16:
            return f"A2 needs 0 < K <= 16, K = {k}"
        if local > 24:
            return f"A2 needs <= 24 experts per rank, got {local}"
    else:
        if ep_world_size not in _A3_EP_SIZES:
            return f"A3 ep_world_size must be one of {_A3_EP_SIZES}, got {ep_world_size}"
        if h != 7168:
            return f"A3 needs H = 7168, H = {h}"
        if not 0 < bs <= 512:
            return f"A3 needs 0 < BS <= 512, BS = {bs}"
        if not 0 < k <= 8:
            return f"A3 needs 0 < K <= 8, K = {k}"
    return None


def max_batch(chip: str) -> int:
    """Documented BS limit per product: callers split larger batches into several dispatch/combine rounds."""
    return 256 if chip == "910b" else 512


def _check_common(op: str, chip: str, x: Tensor, expert_ids: Tensor, pg: object, ep_world_size: int, ep_rank_id: int,
                  moe_expert_num: int, tp_world_size: int, shared_expert_rank_num: int, global_bs: int) -> int:
    """Constraints every call must meet (also off-envelope); returns local_expert_num."""
    check(x.dim() == 2 and expert_ids.dim() == 2 and expert_ids.shape[0] == x.shape[0], op,
          "x [BS, H] and expert_ids [BS, K] expected")
    check(expert_ids.dtype == torch.int32, op, f"expert_ids must be int32, got {expert_ids.dtype}")
    check(dist.get_world_size(pg) == ep_world_size and dist.get_rank(pg) == ep_rank_id, op,
          f"ep_world_size/ep_rank_id {ep_world_size}/{ep_rank_id} do not match the group "
          f"({dist.get_world_size(pg)}/{dist.get_rank(pg)})")
    check(shared_expert_rank_num == 0, op, "shared-expert ranks are not emulated")
    check(tp_world_size <= 1, op, "the TP-domain allgather stage is not emulated")
    check(1 <= moe_expert_num <= 512 and moe_expert_num % ep_world_size == 0, op,
          "moe_expert_num must be in [1, 512] and divisible by ep_world_size")
    k = expert_ids.shape[1]
    check(0 < k <= moe_expert_num, op, "K must be in (0, moe_expert_num]")
    check(global_bs == 0 or global_bs >= x.shape[0] * ep_world_size, op,
          "global_bs must be 0 or max_bs * ep_world_size")
    if expert_ids.numel():
        check(int(expert_ids.min()) >= 0 and int(expert_ids.max()) < moe_expert_num, op,
              "expert_ids out of [0, moe_expert_num)")
        srt = expert_ids.sort(dim=1).values
        check(bool((srt[:, 1:] != srt[:, :-1]).all()), op, "the K expert ids of a row must be distinct")
    if STRICT:
        why = envelope_violation(chip, x, k, ep_world_size, moe_expert_num)
        check(why is None, op, why or "")
    return moe_expert_num // ep_world_size


def _rows_capacity(bs: int, k: int, ep_world_size: int, local: int, global_bs: int) -> int:
    """A, the documented receive capacity: BS * ep * min(local, K), or global_bs * min(local, K)."""
    return (global_bs if global_bs else bs * ep_world_size) * min(local, k)


def _pair_layout(expert_ids: Tensor, moe_expert_num: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, expand_idx, per_expert): the token-major pairs sorted stably by expert, each pair's position inside
    its expert's block, and the pair count per global expert."""
    flat = expert_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    per_expert = torch.bincount(flat, minlength=moe_expert_num)
    starts = torch.cumsum(per_expert, 0) - per_expert
    pos = torch.empty_like(flat)
    pos[order] = torch.arange(flat.numel())
    return order, (pos - starts[flat]).to(torch.int32), per_expert


def _exchange(t: Tensor, send_rows: list[int], recv_rows: list[int], pg: object) -> Tensor:
    out = t.new_empty((sum(recv_rows), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv_rows, send_rows, group=pg)
    return out


def _regroup(counts: Tensor, major: str) -> Tensor:
    """counts [src, expert] sizes of row blocks. major="expert": the rows are laid out source-major (src, expert)
    and the result is the gather index that makes them expert-major; major="source": the reverse (the rows are
    expert-major, the index makes them source-major)."""
    n_src, n_exp = counts.shape
    src = torch.arange(n_src).repeat_interleave(n_exp)
    exp = torch.arange(n_exp).repeat(n_src)
    if major == "expert":  # rows come in (src, expert) blocks
        key = (exp * n_src + src).repeat_interleave(counts.reshape(-1))
    else:  # rows come in (expert, src) blocks
        key = (src * n_exp + exp).view(n_src, n_exp).t().reshape(-1).repeat_interleave(counts.t().reshape(-1))
    return torch.sort(key, stable=True).indices


def npu_moe_distribute_dispatch(chip: str, x: Tensor, expert_ids: Tensor, group_ep: str, ep_world_size: int,
                                ep_rank_id: int, moe_expert_num: int, *, scales: Tensor | None = None,
                                x_active_mask: Tensor | None = None, expert_scales: Tensor | None = None,
                                group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0,
                                expert_shard_type: int = 0, shared_expert_num: int = 1,
                                shared_expert_rank_num: int = 0, quant_mode: int = 0, global_bs: int = 0,
                                expert_token_nums_type: int = 1
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Send every (token, slot) pair of x to the rank owning expert_ids[t, j] (owner = id // local_expert_num).
    Returns seven tensors, shaped as the wheel's meta function: (expand_x [A, H] grouped by local expert,
    dynamic_scales fp32 [A] (unused with quant_mode 0), expand_idx int32 [BS*K], expert_token_nums int64 [local],
    ep_recv_counts int32 (the first local * ep entries prefix sums), tp_recv_counts int32 [tp_world_size],
    expand_scales fp32 [A] when expert_scales is given, else [0] - never None). See the module docstring for which
    parts are documented and which are our reading."""
    op = "npu_moe_distribute_dispatch"
    pg = lookup_group(group_ep, op)
    local = _check_common(op, chip, x, expert_ids, pg, ep_world_size, ep_rank_id, moe_expert_num, tp_world_size,
                          shared_expert_rank_num, global_bs)
    check(quant_mode == 0 and scales is None, op, "only quant_mode 0 (no dispatch quantisation) is emulated")
    check(x_active_mask is None, op, "x_active_mask is reserved (unused) in v1")
    check(expert_token_nums_type in (0, 1), op, "expert_token_nums_type must be 0 (prefix sum) or 1 (counts)")
    if expert_scales is not None:
        check(chip == "910b", op, "expert_scales is A2-only (A3: 'not supported yet, use the default')")
        check(expert_scales.shape == expert_ids.shape and expert_scales.dtype == torch.float32, op,
              "expert_scales must be float32 [BS, K]")
    bs, k = expert_ids.shape
    order, expand_idx, per_expert = _pair_layout(expert_ids, moe_expert_num)
    # counts: rank r gets the counts of its own experts from every source -> recv_counts[src, local_expert]
    recv_counts = torch.empty(ep_world_size * local, dtype=torch.int64)
    dist.all_to_all_single(recv_counts, per_expert.contiguous(), group=pg)
    recv_counts = recv_counts.view(ep_world_size, local)
    send_rows = per_expert.view(ep_world_size, local).sum(1).tolist()
    recv_rows = recv_counts.sum(1).tolist()
    rows_in = _exchange(x[order // k], send_rows, recv_rows, pg)  # source-major: (src, expert, position)
    # reorder to expert-major (expert, src, position): the grouping the grouped GEMM wants
    block = recv_counts.t().reshape(-1)  # [expert, src] block sizes
    perm = _regroup(recv_counts, major="expert")
    cap = _rows_capacity(bs, k, ep_world_size, local, global_bs)
    check(rows_in.shape[0] <= cap, op, f"received {rows_in.shape[0]} rows, more than A = {cap} (set global_bs "
          "to max_bs * ep_world_size when BS differs between ranks)")
    expand_x = x.new_zeros((cap, x.shape[1]))
    expand_x[:rows_in.shape[0]] = rows_in[perm]
    # output shapes as the wheel's meta function allocates them: expand_scales is [0] without expert_scales (never
    # None), ep_recv_counts grows by A2's reduce bookkeeping (global_bs * 2 * K * (ep // 8), zeros here) with it
    expand_scales = torch.zeros(0, dtype=torch.float32)
    counts_len = ep_world_size * local
    if expert_scales is not None:
        s_in = _exchange(expert_scales.reshape(-1)[order].float(), send_rows, recv_rows, pg)
        expand_scales = torch.zeros(cap, dtype=torch.float32)
        expand_scales[:s_in.shape[0]] = s_in[perm]
        counts_len += (global_bs or bs * ep_world_size) * 2 * k * (ep_world_size // 8)
    counts = recv_counts.sum(0)
    expert_token_nums = counts if expert_token_nums_type == 1 else counts.cumsum(0)
    ep_recv_counts = torch.zeros(counts_len, dtype=torch.int32)
    ep_recv_counts[:block.numel()] = block.cumsum(0).to(torch.int32)
    tp_recv_counts = torch.zeros(tp_world_size, dtype=torch.int32)
    dynamic_scales = torch.zeros(cap, dtype=torch.float32)  # quant_mode 0: allocated, unused
    return expand_x, dynamic_scales, expand_idx, expert_token_nums.to(torch.int64), ep_recv_counts, tp_recv_counts, \
        expand_scales


def npu_moe_distribute_combine(chip: str, expand_x: Tensor, expert_ids: Tensor, expand_idx: Tensor,
                               ep_send_counts: Tensor, expert_scales: Tensor, group_ep: str, ep_world_size: int,
                               ep_rank_id: int, moe_expert_num: int, *, tp_send_counts: Tensor | None = None,
                               x_active_mask: Tensor | None = None, activation_scale: Tensor | None = None,
                               weight_scale: Tensor | None = None, group_list: Tensor | None = None,
                               expand_scales: Tensor | None = None, shared_expert_x: Tensor | None = None,
                               group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0,
                               expert_shard_type: int = 0, shared_expert_num: int = 1,
                               shared_expert_rank_num: int = 0, global_bs: int = 0, out_dtype: int = 0,
                               comm_quant_mode: int = 0, group_list_type: int = 0) -> Tensor:
    """Send every expert output row back to the rank (and pair) it came from, then
    out[t] = sum_j expert_scales[t, j] * row(t, j), accumulated in fp32, returned in expand_x's dtype [BS, H]."""
    op = "npu_moe_distribute_combine"
    pg = lookup_group(group_ep, op)
    bs, k = expert_ids.shape
    local = _check_common(op, chip, expand_x.new_empty((bs, expand_x.shape[1])), expert_ids, pg, ep_world_size,
                          ep_rank_id, moe_expert_num, tp_world_size, shared_expert_rank_num, global_bs)
    for name, val in (("x_active_mask", x_active_mask), ("activation_scale", activation_scale),
                      ("weight_scale", weight_scale), ("group_list", group_list),
                      ("shared_expert_x", shared_expert_x)):
        check(val is None, op, f"{name} is reserved (unused) in v1: pass the default")
    check(out_dtype == 0 and group_list_type == 0, op, "out_dtype / group_list_type are reserved in v1")
    check(comm_quant_mode == 0, op, "only comm_quant_mode 0 (no int8 communication) is emulated")
    check(expand_idx.dtype == torch.int32 and expand_idx.numel() == bs * k, op, "expand_idx must be int32 [BS*K]")
    check(ep_send_counts.dtype == torch.int32 and ep_send_counts.numel() >= local * ep_world_size, op,
          "ep_send_counts must be dispatch's int32 ep_recv_counts")
    check(expert_scales.shape == expert_ids.shape and expert_scales.dtype == torch.float32, op,
          "expert_scales must be float32 [BS, K]")
    if chip == "910b":  # documented as a required input on A2 (the carried-along expert_scales)
        check(expand_scales is not None, op, "A2 needs dispatch's expand_scales")
    # the owner's rows are expert-major blocks [expert, src]; send src's blocks back to src, expert by expert
    ends = ep_send_counts[:local * ep_world_size].long()
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).view(local, ep_world_size)
    back = _regroup(sizes.t(), major="source")
    send_rows = sizes.sum(0).tolist()
    flat = expert_ids.reshape(-1).long()
    per_expert = torch.bincount(flat, minlength=moe_expert_num)
    recv_rows = per_expert.view(ep_world_size, local).sum(1).tolist()
    rows = _exchange(expand_x[back], send_rows, recv_rows, pg)  # arrives sorted by global expert, then expand_idx
    # put each pair's row back: its expert's block start (from this rank's own routing) + expand_idx
    starts_e = torch.cumsum(per_expert, 0) - per_expert
    pair_rows = rows[starts_e[flat] + expand_idx.long()].float().view(bs, k, -1)
    out = (pair_rows * expert_scales.float().unsqueeze(-1)).sum(1)
    return out.to(expand_x.dtype)
