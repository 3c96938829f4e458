"""The KV block pool and the prefix cache in the plan: how many sequences of a workload fit when the cache is held in
blocks of tokens instead of one max-length slot per sequence, and what prefix-cache hit rate a TTFT target needs.

Closed-form, like the rest of the planner. The layout it counts is the runtime's (common/model/cache.py):
- per running sequence, fixed: the W-row window ring of every layer and the fp32 compressor states;
- per block of `block_tokens` tokens (a multiple of 128, the lcm of the compression ratios 4 and 128), shared by all
  layers: block_tokens / r compressed rows of each ratio-r layer and block_tokens / 4 indexer rows of each CSA layer;
- per prefix-cache boundary (where a cached prefix can be resumed): a snapshot of the fixed per-sequence state.
The slot layout it compares against reserves max-length rows for every sequence, whatever its length.
TTFT is the compute-bound prefill of the uncached tail of a prompt on all cards, as `prefill_s_per_prompt` in plan.py
counts it (roofline: a lower bound on real TTFT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv4.common.model.config import ModelArgs
from dsv4.common.planner.sizes import (
    PlanError,
    attention_flops_per_token,
    kv_cache_bytes,
    matmul_flops_per_token,
)

BLOCK_MULTIPLE = 128  # lcm of V4's compression ratios (4 and 128): a block boundary is a boundary of every layer
DEFAULT_BLOCK_TOKENS = 128


def check_block_tokens(block_tokens: int) -> None:
    if not isinstance(block_tokens, int) or block_tokens < BLOCK_MULTIPLE or block_tokens % BLOCK_MULTIPLE:
        raise PlanError("block_tokens", f"must be a positive multiple of {BLOCK_MULTIPLE} (the lcm of the "
                        f"compression ratios), got {block_tokens!r}")


def parse_workload(text: str) -> list[tuple[int, float]]:
    """'1024:0.9,131072:0.1' -> [(1024, 0.9), (131072, 0.1)]: sequence lengths and their shares (normalised; a
    missing share counts 1)."""
    mix = []
    for part in text.split(","):
        length, _, share = part.strip().partition(":")
        try:
            mix.append((int(length), float(share) if share else 1.0))
        except ValueError:
            raise PlanError("workload", f"expected 'tokens[:share],...' such as '1024:0.9,131072:0.1', got "
                            f"{text!r}") from None
    if not mix or any(n < 1 or s <= 0 for n, s in mix):
        raise PlanError("workload", f"lengths must be >= 1 and shares > 0, got {text!r}")
    total = sum(s for _, s in mix)
    return [(n, s / total) for n, s in mix]


def block_bytes(args: ModelArgs, block_tokens: int, kv_dtype: str, mtp: bool = True) -> float:
    """One block of `block_tokens` tokens across all layers: the per-token rows of kv_cache_bytes, a block's worth
    (every compression ratio divides a block, so no row is split)."""
    return kv_cache_bytes(args, 1, kv_dtype, mtp).per_token_marginal * block_tokens


def fixed_bytes_per_sequence(args: ModelArgs, kv_dtype: str, mtp: bool = True) -> float:
    """The window rings and compressor states of one running sequence: also what a prefix-cache snapshot keeps."""
    kv = kv_cache_bytes(args, 1, kv_dtype, mtp)
    return kv.window + kv.state


def prefill_seconds(args: ModelArgs, start: int, end: int, peak_flops: float, samples: int = 64) -> float:
    """Compute-bound time to prefill positions [start, end) with `peak_flops` (all cards): matmuls per token plus the
    attention of each position over its context (midpoint rule over `samples` pieces)."""
    n = end - start
    if n <= 0:
        return 0.0
    step = n / samples
    attn = sum(attention_flops_per_token(args, max(1, int(start + (i + 0.5) * step))) for i in range(samples)) * step
    return (n * matmul_flops_per_token(args) + attn) / peak_flops


@dataclass
class HitRate:
    ttft_ms: float  # the target
    prompt: int  # tokens
    cold_ms: float  # nothing cached
    cached_tokens: int | None  # the smallest block-aligned cached prefix that meets the target (None: unreachable)
    tail_ms: float  # TTFT with `cached_tokens` cached (or with the longest possible prefix when unreachable)

    @property
    def hit_rate(self) -> float | None:
        return None if self.cached_tokens is None else self.cached_tokens / self.prompt


def needed_hit_rate(args: ModelArgs, prompt: int, ttft_ms: float, block_tokens: int, peak_flops: float) -> HitRate:
    """The share of a `prompt`-token prompt that must come from the prefix cache (whole blocks) for its prefill to take
    at most `ttft_ms`. At least the last token is always computed (its logits give the first output token)."""
    cold = prefill_seconds(args, 0, prompt, peak_flops) * 1e3
    if cold <= ttft_ms:
        return HitRate(ttft_ms, prompt, cold, 0, cold)
    most = (prompt - 1) // block_tokens  # blocks that can be cached while the last token stays uncached

    def ms(blocks: int) -> float:
        return prefill_seconds(args, blocks * block_tokens, prompt, peak_flops) * 1e3

    if ms(most) > ttft_ms:
        return HitRate(ttft_ms, prompt, cold, None, ms(most))
    lo, hi = 0, most  # ms(lo) > target >= ms(hi); ms falls as more blocks are cached
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ms(mid) <= ttft_ms else (mid, hi)
    return HitRate(ttft_ms, prompt, cold, hi * block_tokens, ms(hi))


@dataclass
class PoolPlan:
    block_tokens: int
    block_bytes: float  # one block, all layers
    fixed_bytes: float  # per running sequence (ring + states); a prefix-cache snapshot is the same size
    blocks_per_card: int  # blocks the KV memory of one card holds after the fixed state of `pool_seqs` sequences
    workload: list[tuple[int, float]]  # (tokens, share)
    pool_seqs: int  # concurrent sequences of the workload over the deployment, pool layout
    pool_seqs_by_length: list[tuple[int, int]]  # (tokens, how many of them)
    slot_seqs: int  # the same with one max-length slot per sequence
    hit: HitRate | None


def pool_plan(args: ModelArgs, kv_bytes_per_card: float, dp: int, kv_dtype: str, mtp: bool,
              workload: list[tuple[int, float]], block_tokens: int = DEFAULT_BLOCK_TOKENS,
              ttft_ms: float | None = None, prompt: int | None = None,
              peak_flops: float | None = None) -> PoolPlan:
    """`kv_bytes_per_card`: memory one card has for KV (after weights and reserve); every card of a DP group holds
    all of its group's sequences (MQA: TP does not split the KV)."""
    check_block_tokens(block_tokens)
    blk = block_bytes(args, block_tokens, kv_dtype, mtp)
    fixed = fixed_bytes_per_sequence(args, kv_dtype, mtp)
    # mean bytes of one sequence of the mix; integer counts per length follow the shares
    mean = sum(share * (fixed + math.ceil(n / block_tokens) * blk) for n, share in workload)
    per_group = int(kv_bytes_per_card // mean)
    longest = max(n for n, _ in workload)
    slot = fixed + math.ceil(longest / block_tokens) * blk
    per_group_slots = int(kv_bytes_per_card // slot)
    counts = [(n, int(per_group * share) * dp) for n, share in workload]
    blocks = int((kv_bytes_per_card - per_group * fixed) // blk)
    hit = None
    if ttft_ms is not None:
        if peak_flops is None or prompt is None:
            raise PlanError("ttft_ms", "needs the prompt length and the hardware peak")
        if ttft_ms <= 0:
            raise PlanError("ttft_ms", f"must be > 0, got {ttft_ms}")
        hit = needed_hit_rate(args, prompt, ttft_ms, block_tokens, peak_flops)
    return PoolPlan(block_tokens, blk, fixed, blocks, workload, sum(c for _, c in counts), counts,
                    per_group_slots * dp, hit)


def format_pool_plan(pp: PoolPlan) -> list[tuple[str, str]]:
    mix = ", ".join(f"{c:,} x {n:,}" for n, c in pp.pool_seqs_by_length)
    rows = [
        ("KV block pool", f"blocks of {pp.block_tokens} tokens, {pp.block_bytes / 2**20:.2f} MiB each (all layers); "
                          f"{pp.blocks_per_card:,} per card; {pp.fixed_bytes / 2**20:.1f} MiB fixed per sequence"),
        ("seqs by the pool", f"{pp.pool_seqs:,} of the workload over the deployment ({mix} tokens); one max-length "
                             f"slot each would hold {pp.slot_seqs:,}"),
        ("prefix snapshot", f"{pp.fixed_bytes / 2**20:.1f} MiB per cached boundary (window rings + compressor "
                            "states), on top of the shared blocks"),
    ]
    h = pp.hit
    if h is not None:
        if h.cached_tokens == 0:
            text = f"none needed: a cold {h.prompt:,}-token prefill takes {h.cold_ms:,.1f} ms <= {h.ttft_ms:g} ms"
        elif h.cached_tokens is None:
            text = (f"unreachable: even with all but the last block cached the tail takes {h.tail_ms:,.1f} ms "
                    f"(> {h.ttft_ms:g} ms; cold {h.cold_ms:,.1f} ms)")
        else:
            text = (f"{h.hit_rate:.1%} of a {h.prompt:,}-token prompt ({h.cached_tokens:,} tokens) from the prefix "
                    f"cache for TTFT <= {h.ttft_ms:g} ms (cold {h.cold_ms:,.1f} ms, then {h.tail_ms:,.1f} ms; "
                    "compute-bound prefill)")
        rows.append(("prefix hit needed", text))
    return rows
