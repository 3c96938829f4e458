"""V4 against same-shape baselines for `dsv4 plan --claims`: KV bytes and attention FLOPs per token of a V3-style
dense MLA and of MLA + the V3.2 DSA indexer, with V4's depth and heads. Importable from common/planner.py too.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.common.model.config import ModelArgs
from dsv4.common.planner.sizes import (
    attention_flops_per_token,
    indexer_row_bytes,
    kv_cache_bytes,
    matmul_flops_per_token,
)

# V3-style MLA baseline (DeepSeek-V3 config.json: kv_lora_rank 512, qk_rope_head_dim 64). One cached latent plus one
# rotary key per token per layer.
MLA_KV_LORA_RANK = 512
MLA_ROPE_DIM = 64
# DeepSeek-V3.2's FP8 MLA cache row: 512 e4m3 + 4 fp32 scales + 64 bf16 rope = 656 bytes (FlashMLA FP8 KV layout).
MLA_FP8_ROW_BYTES = 656
# V3.2's DSA picks 2048 tokens per query (DeepSeek-V3.2 config.json index_topk = 2048).
DSA_TOPK = 2048


def mla_kv_bytes_per_token(args: ModelArgs, kv_dtype: str = "bf16", indexer: bool = False) -> float:
    """V3-style MLA baseline of the same depth: every layer caches a 512 latent + 64 rope key per token, uncompressed.
    indexer=True adds V3.2's DSA indexer key (D_I per token per layer)."""
    row = 2.0 * (MLA_KV_LORA_RANK + MLA_ROPE_DIM) if kv_dtype == "bf16" else float(MLA_FP8_ROW_BYTES)
    if indexer:
        row += indexer_row_bytes(args, kv_dtype)
    return args.n_layers * row


def mla_attention_flops_per_token(args: ModelArgs, context: int, dsa_topk: int | None = None) -> float:
    """V3-style absorbed MLA with the same heads and depth: q.k over 512 + 64 dims, p.v over 512, for every one of
    `context` keys (dense). dsa_topk=2048 gives V3.2's DSA instead: top-k keys plus an indexer over all tokens."""
    H = args.n_heads
    per_key = 2 * H * (MLA_KV_LORA_RANK + MLA_ROPE_DIM) + 2 * H * MLA_KV_LORA_RANK
    if dsa_topk is None:
        return args.n_layers * per_key * context
    idx = context * (2 * args.index_n_heads * args.index_head_dim + 2 * args.index_n_heads)
    return args.n_layers * (per_key * min(dsa_topk, context) + idx)


@dataclass
class Claims:
    context: int
    kv_v4: float  # bytes per token, averaged over the context (fixed parts amortised), MTP excluded
    kv_mla: float
    kv_dsa: float
    attn_flops_v4: float
    attn_flops_mla: float
    attn_flops_dsa: float
    matmul_flops: float

    @property
    def kv_vs_mla(self) -> float:
        return self.kv_v4 / self.kv_mla

    @property
    def kv_vs_dsa(self) -> float:
        return self.kv_v4 / self.kv_dsa

    @property
    def attn_vs_mla(self) -> float:
        return self.attn_flops_v4 / self.attn_flops_mla

    @property
    def total_vs_mla(self) -> float:
        return (self.attn_flops_v4 + self.matmul_flops) / (self.attn_flops_mla + self.matmul_flops)

    @property
    def total_vs_dsa(self) -> float:
        return (self.attn_flops_v4 + self.matmul_flops) / (self.attn_flops_dsa + self.matmul_flops)


def claims(args: ModelArgs, context: int = 1 << 20, kv_dtype: str = "bf16") -> Claims:
    """V4 against same-shape baselines at `context`: dense MLA (V3-style) and MLA + DSA indexer (V3.2-style).

    The baselines keep V4's depth and heads, so the ratios isolate the attention design. MTP is left out everywhere.
    """
    kv = kv_cache_bytes(args, context, kv_dtype, mtp=False)
    return Claims(
        context=context,
        kv_v4=kv.per_token_avg,
        kv_mla=mla_kv_bytes_per_token(args, kv_dtype),
        kv_dsa=mla_kv_bytes_per_token(args, kv_dtype, indexer=True),
        attn_flops_v4=attention_flops_per_token(args, context),
        attn_flops_mla=mla_attention_flops_per_token(args, context),
        attn_flops_dsa=mla_attention_flops_per_token(args, context, dsa_topk=DSA_TOPK),
        matmul_flops=matmul_flops_per_token(args),
    )


def format_claims(name: str, c: Claims) -> str:
    return "\n".join([
        f"{name} at {c.context:,} tokens (KV per token averaged over the context, MTP excluded):",
        f"  KV cache   V4 {c.kv_v4:,.0f} B/token | MLA {c.kv_mla:,.0f} B ({c.kv_vs_mla:.1%}) | "
        f"MLA+DSA indexer {c.kv_dsa:,.0f} B ({c.kv_vs_dsa:.1%})",
        f"  attention  V4 {c.attn_flops_v4 / 1e9:,.1f} GFLOP/token | dense MLA {c.attn_flops_mla / 1e9:,.1f} "
        f"({c.attn_vs_mla:.1%}) | DSA top-{DSA_TOPK} {c.attn_flops_dsa / 1e9:,.1f} "
        f"({c.attn_flops_v4 / c.attn_flops_dsa:.1%})",
        f"  + matmuls ({c.matmul_flops / 1e9:,.1f} GFLOP): vs dense MLA {c.total_vs_mla:.1%} | "
        f"vs DSA {c.total_vs_dsa:.1%}",
    ])
