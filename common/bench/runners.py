"""The implementations `dsv4 bench` measures: ours, and nano-deepseek-v4 (an independent pure-PyTorch DeepSeek-V4)
side by side at the same config and the very same weights, behind one `Runner` interface. Importable from
common/bench.py too.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from dsv4.common.model.cache import KVCache
from dsv4.common.model.config import ModelArgs

NANO_VERSION = "0.2.0"
NANO_MISSING = (f"--compare nano needs the nano-deepseek-v4 package: pip install nano-deepseek-v4=={NANO_VERSION} "
                "(an independent pure-PyTorch DeepSeek-V4; the version the comparison was written against)")
# the known differences of nano-deepseek-v4 0.2.0 from the official code (shared/notes/toolchain.md), and which of
# them the "config-aligned" agreement run removes by giving BOTH models the same setting
NANO_DIFFERENCES_CONFIG = [
    ("no YaRN; theta 10000 for q/kv on compressed layers",
     "both: compress_rope_theta = rope_theta, ours original_seq_len = 0 (no YaRN)"),
    ("shared expert's SwiGLU clamped", "both: swiglu_limit = 1e4 (no clamp anywhere)"),
    ("no FP8 simulation of KV", "ours: kv_fp8_sim = clamp (no e4m3 rounding)"),
]
NANO_DIFFERENCES_FIXED = [
    "hyper-connection comb: sigmoid instead of softmax before Sinkhorn; post without the factor 2; residual mixed "
    "with C instead of C^T",
    "indexer without FP4 simulation (its missing Hadamard alone would not matter: H is orthogonal and rotates both "
    "q and k, so q.k is unchanged)",
]
ALIGN_SWIGLU_LIMIT = 1e4


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable through attributes, dicts and lists (a cache object's whole state)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v) for v in vars(obj).values())
    return 0


def cache_nbytes(args: ModelArgs, batch: int, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes our KVCache allocates for `batch` sequences of `max_seq_len` (built on the meta device: shapes only,
    nothing is allocated, so any length of any config costs nothing to measure)."""
    return KVCache(args, batch, max_seq_len, dtype, "meta", with_mtp=bool(args.n_mtp_layers)).nbytes()


class Runner:
    """One implementation: a model plus its cache for one growing batch of sequences."""

    name = "?"

    def reset(self) -> None:
        raise NotImplementedError

    def step(self, tokens: Tensor) -> Tensor:
        """Feed tokens [B,S] after everything fed so far; return logits [B,S,V]."""
        raise NotImplementedError

    def full_logits(self, tokens: Tensor) -> Tensor:
        """Logits of a fresh full forward (no cache kept)."""
        raise NotImplementedError

    def state_bytes(self, length: int) -> int:
        """Bytes the KV state holds (ours: allocates) for the batch at `length` tokens."""
        raise NotImplementedError


class OursRunner(Runner):
    name = "ours"

    def __init__(self, model, batch: int, max_seq_len: int) -> None:
        self.model, self.batch, self.max_seq_len = model, batch, max_seq_len
        self.cache: KVCache | None = None

    def reset(self) -> None:
        self.cache = None  # drop the old cache before allocating the next one
        self.cache = self.model.new_cache(self.batch, self.max_seq_len)

    def step(self, tokens: Tensor) -> Tensor:
        return self.model(tokens, self.cache)

    def full_logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def state_bytes(self, length: int) -> int:
        # our cache is preallocated for max_seq_len: report what a cache sized exactly to `length` allocates
        return cache_nbytes(self.model.args, self.batch, length, self.model.dtype)


class NanoRunner(Runner):
    name = "nano"

    def __init__(self, model) -> None:
        self.model = model
        self.cache = None

    def reset(self) -> None:
        self.cache = None

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        out = self.model(tokens, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits

    @torch.no_grad()
    def full_logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens).logits

    def state_bytes(self, length: int) -> int:
        return tensor_bytes(self.cache)  # nano's cache grows with the sequence: measure what it holds


def import_nano():
    try:
        import nano_deepseek_v4
    except ImportError as e:
        raise ImportError(NANO_MISSING) from e
    if getattr(nano_deepseek_v4, "__version__", NANO_VERSION) != NANO_VERSION:
        print(f"[bench] warning: nano-deepseek-v4 {nano_deepseek_v4.__version__} installed; the comparison and its "
              f"notes were written against {NANO_VERSION}", file=sys.stderr)
    return nano_deepseek_v4


def nano_config(args: ModelArgs, nano):
    """Our ModelArgs as nano's DeepSeekV4Config, through the official config.json field names (the mapping nano
    itself uses for release checkpoints). nano ignores rope_scaling, kv_fp8_sim and the weight formats."""
    return nano.DeepSeekV4Config.from_official_json(args.to_hf_config())


def build_nano(args: ModelArgs, tensors: dict[str, Tensor] | None, checkpoint_dir: str | None,
               dtype: torch.dtype, device: torch.device):
    """nano's model with the same weights as ours: the identical official-layout tensors (FP8/FP4 + E8M0 scales)
    fed through nano's own official-name converter, or nano's loader on the same checkpoint directory."""
    nano = import_nano()
    from nano_deepseek_v4.checkpoint import convert_deepseek_official_state_dict

    model = nano.DeepSeekV4ForCausalLM(nano_config(args, nano)).eval()
    if checkpoint_dir:
        report = nano.load_deepseek_official_checkpoint(model, checkpoint_dir)
        missing, unconverted = report.missing_keys, report.conversion.unconverted_keys
    else:
        converted, conversion = convert_deepseek_official_state_dict(tensors, model)
        incompatible = model.load_state_dict(converted, strict=False)
        missing, unconverted = list(incompatible.missing_keys), conversion.unconverted_keys
    # nano registers a router bias on hash layers and a hash table on biased layers; the checkpoint has neither and
    # they are unused there. MTP tensors we do not run are harmless too. Anything else missing is a real mismatch.
    real = [k for k in missing if not k.endswith(("e_score_correction_bias", "tid2eid"))]
    if real or unconverted:
        raise RuntimeError(f"nano-deepseek-v4 did not take our weights: missing {real[:6]}, "
                           f"unconverted {list(unconverted)[:6]}")
    return model.to(device=device, dtype=dtype)


def build_ours(args: ModelArgs, tensors: dict[str, Tensor], ops, dtype: torch.dtype, weights: str):
    """What build_random_model does, from tensors already drawn (so nano can be given the very same ones)."""
    from dsv4.common.checkpoint.load import load_state_dict_official
    from dsv4.common.model.transformer import Transformer

    model = Transformer(args, ops, dtype=dtype, weights=weights)
    load_state_dict_official(model, tensors, source="random checkpoint (seed 0)")
    return model.to(ops.device)


def aligned_args(args: ModelArgs) -> ModelArgs:
    """The config-level switches that remove the nano differences a config can remove (NANO_DIFFERENCES_CONFIG).
    The weight layout does not depend on any of them, so the same tensors load."""
    return args.replace(compress_rope_theta=args.rope_theta, original_seq_len=0, kv_fp8_sim="clamp",
                        swiglu_limit=ALIGN_SWIGLU_LIMIT)
