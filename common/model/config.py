"""Model configuration: one dataclass of model args, loaded from our YAML or a Hugging Face config.json.

Field names follow the official inference code's ModelArgs (inference/config.json); the HF names are mapped
in `HF_FIELD_MAP` (see shared/spec/dsv4-architecture.md section 1.1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # installed: dsv4/configs; editable: the repo's configs/

FP8_BLOCK = 128  # weight blocks of FP8 linears and activation blocks of the FP8 GEMM
FP4_BLOCK = 32  # K-blocks of FP4 expert weights and of the FP4 simulation (indexer)
KV_FP8_BLOCK = 64  # blocks of the FP8 simulation of attention KV


class ConfigError(ValueError):
    """A config file or field is malformed; the message names the source and the field."""


@dataclass
class ModelArgs:
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_mtp_layers: int = 1
    n_hash_layers: int = 3
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: list[int] = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    original_seq_len: int = 65536
    rope_factor: float = 16.0
    beta_fast: int = 32
    beta_slow: int = 1
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    # weight formats of the checkpoint: "fp8" (e4m3, 128x128 blocks) or "bf16"; experts "fp4", "fp8" or "bf16"
    dtype: str = "fp8"
    expert_dtype: str = "fp4"
    scale_fmt: str = "ue8m0"
    # KV FP8 simulation inside attention: "e4m3" (true round trip, the QAT intent) or "clamp" (the Flash kernel's
    # in-dtype cast, effectively a no-op); see spec 2.3
    kv_fp8_sim: str = "e4m3"
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    # runtime sizes of the caches
    max_seq_len: int = 4096
    max_batch_size: int = 4

    # ----------------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "config", names: dict[str, str] | None = None) -> None:
        """Raise ConfigError naming the source and the field; `names` maps our field names to the ones the user
        wrote (config.json's hidden_size for dim), so the message names what is in their file."""
        def fail(field_name: str, msg: str) -> None:
            raise ConfigError(f"{source}: field '{(names or {}).get(field_name, field_name)}': {msg}")

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int",) and (not isinstance(v, int) or isinstance(v, bool)):
                fail(f.name, f"expected an integer, got {v!r}")
            if f.type in ("float",) and not isinstance(v, (int, float)):
                fail(f.name, f"expected a number, got {v!r}")
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "head_dim", "rope_head_dim", "q_lora_rank",
                    "o_groups", "o_lora_rank", "window_size", "n_routed_experts", "n_activated_experts",
                    "moe_inter_dim", "index_n_heads", "index_head_dim", "index_topk", "hc_mult",
                    "hc_sinkhorn_iters", "max_seq_len", "max_batch_size"]
        for name in positive:
            if getattr(self, name) <= 0:
                fail(name, f"must be > 0, got {getattr(self, name)}")
        if not isinstance(self.compress_ratios, list) or not all(isinstance(r, int) for r in self.compress_ratios):
            fail("compress_ratios", f"expected a list of integers, got {self.compress_ratios!r}")
        want = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != want:
            fail("compress_ratios", f"length {len(self.compress_ratios)} != n_layers + n_mtp_layers = {want} "
                 "(one entry per main layer, then one per MTP layer)")
        for i, r in enumerate(self.compress_ratios):
            if r not in (0, 4, 128):
                fail("compress_ratios", f"entry {i} is {r}; V4 uses 0 (window only), 4 (CSA) or 128 (HCA)")
        if self.n_mtp_layers not in (0, 1):
            fail("n_mtp_layers", f"must be 0 or 1, got {self.n_mtp_layers}")
        if self.n_mtp_layers and self.compress_ratios[-1] != 0:
            fail("compress_ratios", "the MTP layer (last entry) must be window-only (0)")
        if not 0 <= self.n_hash_layers <= self.n_layers:
            fail("n_hash_layers", f"must be in [0, n_layers={self.n_layers}], got {self.n_hash_layers}")
        if self.n_shared_experts != 1:
            fail("n_shared_experts", f"V4 has exactly one shared expert, got {self.n_shared_experts}")
        if self.n_activated_experts > self.n_routed_experts:
            fail("n_activated_experts", f"{self.n_activated_experts} > n_routed_experts={self.n_routed_experts}")
        if self.rope_head_dim % 2:
            fail("rope_head_dim", f"must be even (rotary pairs), got {self.rope_head_dim}")
        if self.head_dim <= self.rope_head_dim:
            fail("head_dim", f"must be > rope_head_dim={self.rope_head_dim}, got {self.head_dim}")
        if self.index_head_dim <= self.rope_head_dim:
            fail("index_head_dim", f"must be > rope_head_dim={self.rope_head_dim}, got {self.index_head_dim}")
        if self.n_heads % self.o_groups:
            fail("o_groups", f"n_heads={self.n_heads} is not divisible by o_groups={self.o_groups}")
        if self.score_func not in ("sqrtsoftplus", "softmax", "sigmoid"):
            fail("score_func", f"expected sqrtsoftplus, softmax or sigmoid, got {self.score_func!r}")
        if self.dtype not in ("fp8", "bf16"):
            fail("dtype", f"expected 'fp8' or 'bf16', got {self.dtype!r}")
        if self.expert_dtype not in ("fp4", "fp8", "bf16"):
            fail("expert_dtype", f"expected 'fp4', 'fp8' or 'bf16', got {self.expert_dtype!r}")
        if self.scale_fmt not in ("ue8m0", "fp32"):
            fail("scale_fmt", f"expected 'ue8m0' or 'fp32', got {self.scale_fmt!r}")
        if self.kv_fp8_sim not in ("e4m3", "clamp"):
            fail("kv_fp8_sim", f"expected 'e4m3' or 'clamp', got {self.kv_fp8_sim!r}")
        if self.hc_mult < 1:
            fail("hc_mult", "must be >= 1")
        # block sizes: the KV FP8 simulation works on 64-blocks of the non-rotary dims, the indexer's FP4 simulation
        # on 32-blocks, and the Hadamard transform needs a power-of-two width
        nope = self.head_dim - self.rope_head_dim
        if nope % KV_FP8_BLOCK:
            fail("head_dim", f"head_dim - rope_head_dim = {nope} must be a multiple of {KV_FP8_BLOCK} "
                 "(FP8 KV simulation blocks)")
        d_i = self.index_head_dim
        if d_i & (d_i - 1) or d_i % FP4_BLOCK:
            fail("index_head_dim", f"must be a power of two and a multiple of {FP4_BLOCK} (Hadamard, FP4 blocks), "
                 f"got {d_i}")
        if self.dtype == "fp8" or self.expert_dtype != "bf16":
            # the FP8 activation quantisation runs in 1x128 blocks along K; K of every quantised linear must divide
            for name in ("dim", "q_lora_rank", "moe_inter_dim"):
                if getattr(self, name) % FP8_BLOCK:
                    fail(name, f"{getattr(self, name)} is not a multiple of {FP8_BLOCK} (FP8 activation blocks)")
            if (self.o_groups * self.o_lora_rank) % FP8_BLOCK:
                fail("o_lora_rank", f"o_groups*o_lora_rank must be a multiple of {FP8_BLOCK}")
        if self.expert_dtype == "fp4":
            for name in ("dim", "moe_inter_dim"):
                if getattr(self, name) % FP4_BLOCK:
                    fail(name, f"{getattr(self, name)} is not a multiple of {FP4_BLOCK} (FP4 expert blocks)")
        if self.max_seq_len > self.max_position_embeddings:
            fail("max_seq_len", f"{self.max_seq_len} exceeds max_position_embeddings={self.max_position_embeddings}")

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def layer_ratio(self, layer_id: int) -> int:
        return self.compress_ratios[layer_id]

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def arch_hash(self) -> str:
        """Hash of the fields that define the model's arithmetic (runtime cache sizes excluded)."""
        d = self.to_dict()
        for k in ("max_seq_len", "max_batch_size"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config",
                  user_names: dict[str, str] | None = None) -> ModelArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(names)}")
        try:
            args = cls.__new__(cls)
            defaults = cls.__dataclass_fields__
            for name, f in defaults.items():
                if name in d:
                    val = d[name]
                elif f.default is not dataclasses.MISSING:
                    val = f.default
                else:
                    val = f.default_factory()  # type: ignore[misc]
                setattr(args, name, val)
            if isinstance(args.compress_ratios, tuple):
                args.compress_ratios = list(args.compress_ratios)
            for name in ("rope_theta", "compress_rope_theta", "rope_factor", "route_scale", "swiglu_limit",
                         "hc_eps", "norm_eps"):
                if isinstance(getattr(args, name), int) and not isinstance(getattr(args, name), bool):
                    setattr(args, name, float(getattr(args, name)))
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: {e}") from e
        args.validate(source, user_names)
        return args

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:  # one line: the problem and where (str(e) quotes the offending lines)
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML: {getattr(e, 'problem', None) or type(e).__name__}{where}"
                              ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelArgs:
        """Read a Hugging Face config.json with the official V4 field names."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(hf_to_args_dict(data, str(path)), source=str(path),
                             user_names=HF_FIELD_MAP)

    @classmethod
    def load(cls, path: str | Path) -> ModelArgs:
        """A YAML file, a config.json, or a checkpoint directory holding config.json."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if path.suffix == ".json":
            return cls.from_hf_config(path)
        return cls.from_yaml(path)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face config.json a checkpoint of this model carries (official field names)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "num_key_value_heads": 1,
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "tie_word_embeddings": False,
        }
        for ours, theirs in HF_FIELD_MAP.items():
            if "." not in theirs:
                out[theirs] = getattr(self, ours)
        out["rope_scaling"] = {
            "type": "yarn",
            "factor": self.rope_factor,
            "original_max_position_embeddings": self.original_seq_len,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        if self.dtype == "fp8":
            out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": self.scale_fmt,
                                          "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "activation_scheme": "dynamic"}
        out["expert_dtype"] = self.expert_dtype
        out["dsv4_kv_fp8_sim"] = self.kv_fp8_sim
        return out


# ours -> HF config.json key (dotted: nested under rope_scaling)
HF_FIELD_MAP: dict[str, str] = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_mtp_layers": "num_nextn_predict_layers",
    "n_hash_layers": "num_hash_layers",
    "n_heads": "num_attention_heads",
    "head_dim": "head_dim",
    "rope_head_dim": "qk_rope_head_dim",
    "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "window_size": "sliding_window",
    "compress_ratios": "compress_ratios",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "moe_inter_dim": "moe_intermediate_size",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "swiglu_limit": "swiglu_limit",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "original_seq_len": "rope_scaling.original_max_position_embeddings",
    "rope_factor": "rope_scaling.factor",
    "beta_fast": "rope_scaling.beta_fast",
    "beta_slow": "rope_scaling.beta_slow",
}

# HF keys that carry no model arithmetic (or that we derive); accepted and ignored
HF_IGNORED = {
    "architectures", "model_type", "num_key_value_heads", "topk_method", "norm_topk_prob", "tie_word_embeddings",
    "torch_dtype", "transformers_version", "auto_map", "attention_bias", "attention_dropout", "hidden_act",
    "initializer_range", "use_cache", "pad_token_id", "intermediate_size", "first_k_dense_replace",
    "moe_layer_freq", "n_group", "topk_group", "ep_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
    "pretraining_tp", "rope_interleave", "aux_loss_alpha", "seq_aux", "num_experts_per_token", "dtype",
    "expert_dtype", "quantization_config", "rope_scaling", "dsv4_kv_fp8_sim", "max_seq_len", "max_batch_size",
    "scale_fmt", "index_share_for_mtp", "routed_expert_dtype",
}


# config.json fields every official V4 release carries (Flash and Pro, spec 1.1): a checkpoint's config missing one
# is refused rather than filled with Flash's value, which would quietly change the model (index_topk) or surface
# later as a tensor shape mismatch (hidden_size). num_nextn_predict_layers may be absent (the official default, 1).
HF_OPTIONAL = {"num_nextn_predict_layers"}
HF_REQUIRED = [k for k in HF_FIELD_MAP.values() if "." not in k and k not in HF_OPTIONAL] + ["rope_scaling"]
ROPE_SCALING_REQUIRED = ["factor", "original_max_position_embeddings", "beta_fast", "beta_slow"]


def _flash_value(hf_key: str) -> Any:
    ours = next((o for o, t in HF_FIELD_MAP.items() if t == hf_key), None)
    f = ModelArgs.__dataclass_fields__.get(ours or "")
    return None if f is None or f.default is dataclasses.MISSING else f.default


def hf_to_args_dict(data: dict[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(data) - set(HF_FIELD_MAP.values()) - HF_IGNORED)
    if unknown:
        raise ConfigError(f"{source}: unknown config.json field(s) {unknown}")
    missing = [k for k in HF_REQUIRED if k not in data]
    if missing:
        examples = ", ".join(f"{k}: {_flash_value(k)}" for k in missing[:4] if _flash_value(k) is not None)
        raise ConfigError(f"{source}: missing field(s) {', '.join(repr(k) for k in missing)}: every official "
                          "DeepSeek-V4 config.json has them, and guessing would change the model"
                          + (f" (V4-Flash has {examples})" if examples else "")
                          + ("; write \"rope_scaling\": null for a model without YaRN" if "rope_scaling" in missing
                             else ""))
    out: dict[str, Any] = {}
    rope_scaling = data.get("rope_scaling") or {}
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"{source}: field 'rope_scaling': expected an object, got {rope_scaling!r}")
    absent = [k for k in ROPE_SCALING_REQUIRED if rope_scaling and k not in rope_scaling]
    if absent:
        raise ConfigError(f"{source}: field 'rope_scaling' lacks {', '.join(repr(k) for k in absent)} (YaRN needs "
                          f"all of {', '.join(ROPE_SCALING_REQUIRED)})")
    for ours, theirs in HF_FIELD_MAP.items():
        if theirs.startswith("rope_scaling."):
            key = theirs.split(".", 1)[1]
            if key in rope_scaling:
                out[ours] = rope_scaling[key]
        elif theirs in data:
            out[ours] = data[theirs]
    if not rope_scaling:
        out["original_seq_len"] = 0  # no YaRN
    qc = data.get("quantization_config")
    if qc is None:
        out["dtype"] = "bf16"
    else:
        if not isinstance(qc, dict):
            raise ConfigError(f"{source}: field 'quantization_config': expected an object")
        fmt = qc.get("fmt", qc.get("quant_method", "fp8"))
        if "fp8" not in str(fmt) and "e4m3" not in str(fmt):
            raise ConfigError(f"{source}: field 'quantization_config': unsupported format {fmt!r} (expected fp8)")
        out["dtype"] = "fp8"
        if "scale_fmt" in qc:
            out["scale_fmt"] = qc["scale_fmt"] or "fp32"
        bs = qc.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
        if list(bs) != [FP8_BLOCK, FP8_BLOCK]:
            raise ConfigError(f"{source}: field 'quantization_config.weight_block_size': expected "
                              f"[{FP8_BLOCK}, {FP8_BLOCK}], got {bs}")
    # the Flash HF config has no expert_dtype; its inference config says fp4 (spec 1.1)
    out["expert_dtype"] = data.get("expert_dtype", "fp4" if out["dtype"] == "fp8" else "bf16")
    if "dsv4_kv_fp8_sim" in data:
        out["kv_fp8_sim"] = data["dsv4_kv_fp8_sim"]
    return out


def load_named_config(name_or_path: str | Path) -> ModelArgs:
    """'tiny', 'flash', 'pro' (from configs/) or a path."""
    p = Path(name_or_path)
    if not p.exists() and (CONFIG_DIR / f"{name_or_path}.yaml").exists():
        p = CONFIG_DIR / f"{name_or_path}.yaml"
    return ModelArgs.load(p)
