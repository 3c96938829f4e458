"""Parity suite: prove two backends (or a backend and a recorded golden file) give the same answers, and name the op
to blame when they do not.

Layers of this module, bottom up:
- metrics on tensor pairs (cosine, max/mean abs, relative, KL, top-k agreement, greedy match, msprobe-style
  thousandth ratios) and non-finite detection;
- tolerances read from configs/parity.yaml, keyed by backend pair, profile ("<dtype>-<kv_fp8_sim>") and scope;
- running one backend on fixed prompts (prefill + teacher-forced greedy decode) and comparing runs;
- golden files (safetensors, metadata only in the string dict: no pickle) with config/checkpoint/content hashes;
- bisect: a recording proxy over an `Ops` object names every op call ("layers.2.attn/sparse_attention#0");
  a shadow proxy replays backend A's exact inputs into backend B's op so per-op errors do not accumulate;
- the `dsv4 parity` subcommands (run, record, compare, bisect) for common/cli.py.
The markdown/PNG report lives in common/parity_report.py.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .backend import BACKENDS, BackendUnavailable, probe_backend, select_backend
from .config import CONFIG_DIR, ModelArgs, load_named_config
from .ops import OP_NAMES, LinearWeight, Ops

GOLDEN_FORMAT = "dsv4-parity-golden/1"
DEFAULT_TOLERANCES = CONFIG_DIR / "parity.yaml"
ModelFactory = Callable[[Ops, torch.dtype], nn.Module]


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or Inf (a reference that produces NaN cannot judge anything)."""


class GoldenError(ValueError):
    """A golden file cannot be used: wrong format, other checkpoint/config, or modified after recording."""


# =====================================================================================================================
# metrics
# =====================================================================================================================
def nonfinite_count(x: Tensor) -> tuple[int, int]:
    """(number of NaN, number of Inf) in x; integer tensors are always finite."""
    if not x.is_floating_point():
        return 0, 0
    return int(torch.isnan(x).sum()), int(torch.isinf(x).sum())


def assert_finite(x: Tensor, what: str) -> None:
    """Raise NonFiniteError naming `what` when x holds NaN/Inf."""
    nan, inf = nonfinite_count(x)
    if nan or inf:
        raise NonFiniteError(f"{what}: {nan} NaN and {inf} Inf among {x.numel()} elements")


def _pair64(ref: Tensor, got: Tensor) -> tuple[Tensor, Tensor]:
    # fp64 on CPU: the metric itself must not add rounding comparable to the fp32 differences it measures
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: reference {list(ref.shape)} vs candidate {list(got.shape)}")
    return ref.detach().to("cpu", torch.float64), got.detach().to("cpu", torch.float64)


def cosine(ref: Tensor, got: Tensor) -> float:
    """Cosine similarity of the flattened tensors; 1.0 when both are all-zero, 0.0 when exactly one is."""
    a, b = _pair64(ref, got)
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float((a.flatten() @ b.flatten()) / (na * nb))


def max_abs_err(ref: Tensor, got: Tensor) -> float:
    a, b = _pair64(ref, got)
    return float((a - b).abs().max()) if a.numel() else 0.0


def mean_abs_err(ref: Tensor, got: Tensor) -> float:
    a, b = _pair64(ref, got)
    return float((a - b).abs().mean()) if a.numel() else 0.0


def max_abs_norm_err(ref: Tensor, got: Tensor) -> float:
    """max|got - ref| / max|ref|: the worst elementwise error on the tensor's own scale, so one bound fits
    activations of any magnitude (logits ~10, normed hidden ~1, attention probabilities ~1e-2)."""
    a, b = _pair64(ref, got)
    if not a.numel():
        return 0.0
    scale = float(a.abs().max())
    err = float((a - b).abs().max())
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def relative_errors(ref: Tensor, got: Tensor, floor: float = 1e-6) -> Tensor:
    """Elementwise |got - ref| / max(|ref|, floor * max|ref|). The floor is relative to the tensor's scale so that
    exact zeros in the reference do not turn a 1e-9 difference into an infinite relative error."""
    a, b = _pair64(ref, got)
    scale = float(a.abs().max()) if a.numel() else 0.0
    denom = a.abs().clamp(min=max(floor * scale, 1e-30))
    return (a - b).abs() / denom


def max_rel_err(ref: Tensor, got: Tensor) -> float:
    r = relative_errors(ref, got)
    return float(r.max()) if r.numel() else 0.0


def err_ratio(ref: Tensor, got: Tensor, threshold: float) -> float:
    """msprobe's "One Thousandth / Five Thousandths Err Ratio": the fraction of elements whose relative error is
    below `threshold` (0.001 / 0.005). Higher is better; msprobe treats it as a trend indicator, not pass/fail."""
    r = relative_errors(ref, got)
    return float((r < threshold).double().mean()) if r.numel() else 1.0


def kl_divergence(ref_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(p_ref || p) per position over the last dim (softmax of logits), fp64; returns [...] without the last dim."""
    a, b = _pair64(ref_logits, logits)
    lp_ref, lp = a.log_softmax(-1), b.log_softmax(-1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp(min=0.0)  # clamp: fp64 round-off can give -1e-17


def top1_agreement(ref_logits: Tensor, logits: Tensor) -> float:
    """Fraction of positions whose argmax token is the same."""
    a, b = ref_logits.detach().cpu(), logits.detach().cpu()
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


def topk_agreement(ref_logits: Tensor, logits: Tensor, k: int = 5) -> float:
    """Mean over positions of |topk(ref) & topk(got)| / k: does the candidate rank the same few tokens highest."""
    k = min(k, ref_logits.shape[-1])
    a = ref_logits.detach().cpu().float().topk(k, dim=-1).indices
    b = logits.detach().cpu().float().topk(k, dim=-1).indices
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)
    return float((hits.double() / k).mean())


def greedy_match_length(fed: Tensor, choices_a: Tensor, choices_b: Tensor | None = None) -> Tensor:
    """Per row: how many greedy steps agree. `fed` [B,T] are the tokens fed at each decode step (the anchor
    backend's greedy choices); choices_* [B,T] are each backend's argmax under that teacher forcing. Histories are
    identical until the first step where a backend's choice differs from the fed token, so the first such step is
    exactly where a free-running greedy decode of that backend would have left the anchor's sequence (a lower bound
    when neither backend is the anchor)."""
    ok = choices_a.cpu() == fed.cpu()
    if choices_b is not None:
        ok &= choices_b.cpu() == fed.cpu()
    bad = ~ok
    T = fed.shape[-1]
    first = torch.where(bad.any(-1), bad.int().argmax(-1), torch.full(bad.shape[:-1], T))
    return first


def tensor_metrics(ref: Tensor, got: Tensor) -> dict[str, float]:
    """Elementwise metrics of one activation pair (msprobe's tensor-mode columns plus our scale-free max error).
    The reference must be finite (NonFiniteError otherwise); a non-finite candidate is reported in `nonfinite`
    and, like any NaN metric, always fails the check."""
    assert_finite(ref, "reference tensor")
    nan, inf = nonfinite_count(got)
    out = {"nonfinite": float(nan + inf)}
    if nan + inf:
        # metrics over NaN are meaningless: report them as NaN so no bound can pass by accident
        return out | {k: math.nan for k in ("cosine", "max_abs", "max_abs_norm", "max_rel", "mean_abs",
                                             "thousandth", "five_thousandth")}
    out.update(cosine=cosine(ref, got), max_abs=max_abs_err(ref, got), max_abs_norm=max_abs_norm_err(ref, got),
               max_rel=max_rel_err(ref, got), mean_abs=mean_abs_err(ref, got),
               thousandth=err_ratio(ref, got, 1e-3), five_thousandth=err_ratio(ref, got, 5e-3))
    return out


def logits_metrics(ref: Tensor, got: Tensor, k: int = 5) -> dict[str, float]:
    """tensor_metrics plus the distribution metrics that stay meaningful when e4m3 rounding flips amplify small
    differences in a few logits: mean/max KL, top-1 and top-k agreement."""
    out = tensor_metrics(ref, got)
    if out["nonfinite"]:
        return out | {"kl": math.nan, "kl_max": math.nan, "top1": math.nan, "topk": math.nan}
    kl = kl_divergence(ref, got)
    out.update(kl=float(kl.mean()), kl_max=float(kl.max()), top1=top1_agreement(ref, got),
               topk=topk_agreement(ref, got, k))
    return out


def _canonical_outputs(op: str, out: Any) -> list[tuple[str, Tensor]]:
    """An op's output as named tensors in an order-insensitive form where the contract allows any order:
    indexer_topk indices are sorted per row; moe_gate's (weights, ids) are sorted by id together."""
    if op == "indexer_topk":
        return [("indices", out.sort(-1).values)]
    if op == "moe_gate":
        w, ids = out
        ids_sorted, perm = ids.sort(-1)
        return [("weights", w.gather(-1, perm)), ("ids", ids_sorted)]
    if isinstance(out, (tuple, list)):
        return [(str(i), t) for i, t in enumerate(out)]
    return [("", out)]


def op_output_metrics(op: str, ref: Any, got: Any) -> dict[str, float]:
    """Worst-case metrics over an op's output tensors: float parts by cosine / max_abs_norm, integer parts (indices,
    expert ids) by the fraction of rows whose selected set differs."""
    worst: dict[str, float] = {"nonfinite": 0.0}
    for (_, a), (_, b) in zip(_canonical_outputs(op, ref), _canonical_outputs(op, got), strict=True):
        if a.shape != b.shape:
            return {"nonfinite": 0.0, "cosine": 0.0, "max_abs_norm": math.inf, "index_mismatch": 1.0}
        if a.is_floating_point():
            m = tensor_metrics(a, b)
            worst["nonfinite"] += m["nonfinite"]
            worst["cosine"] = min(worst.get("cosine", 1.0), m["cosine"])
            worst["max_abs_norm"] = max(worst.get("max_abs_norm", 0.0), m["max_abs_norm"])
            worst["max_abs"] = max(worst.get("max_abs", 0.0), m["max_abs"])
        else:
            rows = (a.cpu() != b.cpu()).reshape(-1, a.shape[-1] if a.dim() else 1).any(-1)
            mism = float(rows.double().mean()) if rows.numel() else 0.0
            worst["index_mismatch"] = max(worst.get("index_mismatch", 0.0), mism)
    return worst


# =====================================================================================================================
# tolerances
# =====================================================================================================================
@dataclass(frozen=True)
class Bound:
    """One metric's bound: value must be >= min and/or <= max. `why` is the justification from the YAML."""

    metric: str
    min: float | None = None
    max: float | None = None
    why: str = ""

    def violated_by(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return True
        return (self.min is not None and value < self.min) or (self.max is not None and value > self.max)

    def describe(self) -> str:
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"


@dataclass
class Violation:
    where: str  # "prefill logits", "layers.2/rms_norm#1", ...
    metric: str
    value: float
    bound: str

    def __str__(self) -> str:
        # 8 digits: a cosine of 0.99998 must not print as "1" next to a bound of 0.999999
        return f"{self.where}: {self.metric} = {self.value:.8g} (allowed {self.bound})"


def check_metrics(where: str, metrics: dict[str, float], bounds: dict[str, Bound]) -> list[Violation]:
    """Violations of `bounds` by `metrics`. Non-finite candidates fail whatever the YAML says; a bound on a metric
    that this comparison does not produce (e.g. greedy match on prefill) is ignored."""
    out = []
    if metrics.get("nonfinite", 0.0):
        out.append(Violation(where, "nonfinite", metrics["nonfinite"], "== 0 (NaN/Inf always fail)"))
    for name, bound in bounds.items():
        if name in metrics and bound.violated_by(metrics[name]):
            out.append(Violation(where, name, metrics[name], bound.describe()))
    return out


class Tolerances:
    """configs/parity.yaml: tolerances[pair][profile][scope][metric] = {min|max, why}; plus the suite settings.

    pair: "reference-ascend", "reference-cuda", "ascend-cuda", "golden" (any order of the two names is accepted;
    a golden file or the same backend twice maps to "golden");
    profile: "fp32-clamp", "fp32-e4m3", "bf16-e4m3", "bf16-clamp"; scope: "prefill", "decode" (logits),
    "hidden" (per-layer streams of free runs), "op" (one op on identical inputs, bisect)."""

    SCOPES = ("prefill", "decode", "hidden", "op")

    def __init__(self, data: dict[str, Any], source: str = "parity.yaml") -> None:
        self.source = source
        self.suite: dict[str, Any] = data.get("suite", {})
        self.table: dict[str, Any] = data.get("tolerances", {})
        if not self.table:
            raise ValueError(f"{source}: no 'tolerances' section")
        for pair, profiles in self.table.items():
            for profile, scopes in profiles.items():
                for scope, metrics in scopes.items():
                    if scope not in self.SCOPES:
                        raise ValueError(f"{source}: {pair}.{profile}: unknown scope {scope!r}")
                    for metric, spec in metrics.items():
                        if not isinstance(spec, dict) or not ({"min", "max"} & set(spec)) or not spec.get("why"):
                            raise ValueError(f"{source}: {pair}.{profile}.{scope}.{metric}: need min or max, "
                                             "and a one-line 'why'")

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tolerances:
        p = Path(path) if path else DEFAULT_TOLERANCES
        with open(p) as f:
            return cls(yaml.safe_load(f), source=str(p))

    @staticmethod
    def pair_key(a: str, b: str) -> str:
        """Canonical pair name from backend labels ("ascend(emulated)" counts as "ascend")."""
        a, b = a.split("(")[0].strip(), b.split("(")[0].strip()
        # a golden file may come from any backend on any machine; the same backend twice (two devices, two
        # machines) is judged the same way
        if a.startswith("golden") or b.startswith("golden") or a == b:
            return "golden"
        order = {n: i for i, n in enumerate(BACKENDS)}
        a, b = sorted((a, b), key=lambda n: order.get(n, len(order)))
        return f"{a}-{b}"

    def bounds(self, pair: str, profile: str, scope: str) -> dict[str, Bound]:
        if pair not in self.table:
            raise KeyError(f"{self.source}: no tolerances for backend pair {pair!r}; have {sorted(self.table)}")
        profiles = self.table[pair]
        if profile not in profiles:
            raise KeyError(f"{self.source}: no tolerances for {pair} profile {profile!r}; have {sorted(profiles)}")
        scopes = profiles[profile]
        if scope not in scopes:
            raise KeyError(f"{self.source}: no tolerances for {pair} {profile} scope {scope!r}; have {sorted(scopes)}")
        return {m: Bound(m, s.get("min"), s.get("max"), s["why"]) for m, s in scopes[scope].items()}

    def setting(self, name: str, pair: str | None = None, default: Any = None) -> Any:
        """A suite setting; a dict value may hold per-pair overrides next to 'default'."""
        v = self.suite.get(name, default)
        if isinstance(v, dict):
            return v.get(pair, v.get("default", default))
        return v


def dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    if dtype not in names:
        raise ValueError(f"parity profiles exist for fp32 and bf16, not {dtype}")
    return names[dtype]


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose fp32 or bf16")
    return table[name]


def profile_name(dtype: torch.dtype, kv_fp8_sim: str) -> str:
    """Tolerance profile: "<dtype>-<kv_fp8_sim>". e4m3 KV rounding is discontinuous, so it gets its own bounds."""
    return f"{dtype_name(dtype)}-{kv_fp8_sim}"


# =====================================================================================================================
# models and backends
# =====================================================================================================================
@dataclass
class ModelSource:
    """How to build the model on any backend, and what identifies its weights (for golden files).
    factory(ops, dtype) -> Transformer; checkpoint_hash: checkpoint_fingerprint(path) of a real checkpoint or
    random_fingerprint(...) for the embedded random model; label: shown in reports."""

    factory: ModelFactory
    checkpoint_hash: str
    label: str
    vocab_size: int | None = None  # for the default prompts; None: read from a model built on the first backend


def random_fingerprint(config_hash: str, seed: int) -> str:
    """Checkpoint identity of the embedded random model: it is fully determined by the config and the seed."""
    return hashlib.sha256(f"random-checkpoint:{config_hash}:seed={seed}".encode()).hexdigest()[:16]


def checkpoint_fingerprint(path: str | Path) -> str:
    """Identity of a safetensors checkpoint (file or directory) without reading the weights: the sha256 of every
    *.safetensors JSON header (names, dtypes, shapes, byte offsets) and of the index/config JSON files. Headers do
    not hash the tensor bytes; two checkpoints of one layout with different values would also differ in file
    size, which is included."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"{p}: no *.safetensors or *.json files to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors":
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n))
                h.update(str(f.stat().st_size).encode())
            else:
                h.update(fh.read())
    return h.hexdigest()[:16]


_RANDOM_CHECKPOINTS: dict[tuple[str, int], dict[str, Tensor]] = {}


def _random_tensors(args: ModelArgs, seed: int) -> dict[str, Tensor]:
    """The random checkpoint of (args, seed), generated once per process: drawing and FP8/FP4-quantising it costs
    seconds of CPU, and the weights do not depend on kv_fp8_sim, so clamp and e4m3 sources share one copy."""
    from .weights import random_checkpoint

    key = (args.replace(kv_fp8_sim="e4m3").arch_hash(), seed)
    if key not in _RANDOM_CHECKPOINTS:
        _RANDOM_CHECKPOINTS[key] = dict(random_checkpoint(args, seed))
    return _RANDOM_CHECKPOINTS[key]


def default_model_source(config: str = "tiny", seed: int = 0, kv_fp8_sim: str | None = None) -> ModelSource:
    """The embedded default: the model build_random_model(load_named_config(config), ops, dtype, seed) builds.
    kv_fp8_sim overrides the config ("clamp" makes the model continuous, for tight fp32 bounds). One CPU copy per
    dtype is built once and deep-copied onto each backend."""
    from .model import Transformer
    from .weights import load_state_dict_official

    args = load_named_config(config)
    if kv_fp8_sim:
        args = args.replace(kv_fp8_sim=kv_fp8_sim)
    built: dict[torch.dtype, nn.Module] = {}

    def factory(ops: Ops, dtype: torch.dtype) -> nn.Module:
        if dtype not in built:
            # the same steps as weights.build_random_model, with the checkpoint tensors cached
            base = Transformer(args, ops, dtype=dtype)
            load_state_dict_official(base, _random_tensors(args, seed), source=f"random checkpoint (seed {seed})")
            base.ops = None  # the cached copy must not keep (or deep-copy) a backend
            built[dtype] = base
        model = copy.deepcopy(built[dtype])
        model.ops = ops
        return model.to(ops.device)

    return ModelSource(factory, random_fingerprint(args.arch_hash(), seed),
                       f"random {config} (seed {seed}, kv_fp8_sim {args.kv_fp8_sim})", args.vocab_size)


@dataclass
class BackendChoice:
    label: str  # "reference", "ascend", "ascend(emulated)", "cuda", "cuda(interpreted)"
    available: bool
    reason: str
    make: Callable[[], Ops] | None = None


def available_backends(device: str | None = None, include_interpreted: bool = False) -> list[BackendChoice]:
    """Every backend this machine can run, real hardware first; the Ascend CPU emulation stands in for a missing
    NPU ("ascend(emulated)"); the Triton interpreter (100-1000x slower) only when asked for."""
    out = [BackendChoice("reference", True, "pure torch", lambda: select_backend("reference", "cpu"))]
    for name in ("ascend", "cuda"):
        info = probe_backend(name, device)
        if info.available:
            out.append(BackendChoice(name, True, info.reason, lambda n=name: select_backend(n, device)))
            continue
        label = f"{name}(emulated)" if name == "ascend" else f"{name}(interpreted)"
        if name == "cuda" and not include_interpreted:
            out.append(BackendChoice(label, False, f"{info.reason}; the interpreter runs only with "
                                     "--include-interpreted"))
            continue
        ok, why = emulation_available(name)
        out.append(BackendChoice(label, ok, why if ok else f"{info.reason}; {why}",
                                 (lambda n=name: select_backend(n, "cpu", emulate=True)) if ok else None))
    return out


def emulation_available(name: str) -> tuple[bool, str]:
    """Can backend `name` run on this CPU (Ascend emulation / Triton interpreter)? (ok, reason)."""
    try:
        mod = __import__(f"dsv4.{name}", fromlist=["create_ops"])
    except Exception as e:
        return False, f"dsv4.{name} failed to import: {type(e).__name__}: {e}"
    if not hasattr(mod, "create_ops"):
        return False, f"dsv4.{name} is not implemented yet (no create_ops)"
    if name == "cuda":
        try:
            import triton  # noqa: F401
        except Exception as e:
            return False, f"triton not importable: {type(e).__name__}: {e}"
        return True, "Triton interpreter on CPU"
    return True, "CPU emulation of the torch_npu operators"


def make_backend(label: str, device: str | None = None) -> Ops:
    """Ops for a CLI backend label: "reference", "ascend", "cuda", or the CPU stand-ins "ascend(emulated)" /
    "cuda(interpreted)" (also accepted: "ascend-emulated", "cuda-interpreted")."""
    base = label.replace("-", "(").split("(")[0]
    if base not in BACKENDS:
        raise ValueError(f"unknown backend {label!r}; choose from {', '.join(BACKENDS)} "
                         "(or ascend(emulated), cuda(interpreted))")
    if label != base:
        return select_backend(base, "cpu", emulate=True)
    return select_backend(base, device)


# =====================================================================================================================
# running one backend, comparing runs
# =====================================================================================================================
@dataclass
class BackendRun:
    """One backend's answers on fixed prompts. Tensors are on CPU, logits fp32.
    decode_tokens[:, t] is the token fed at decode step t (the anchor's greedy choice) and decode_logits[:, t]
    the logits that step produced; choices[:, t] is this backend's own argmax before step t."""

    backend: str
    dtype: torch.dtype
    kv_fp8_sim: str
    prompts: Tensor
    prefill_logits: Tensor
    hidden: list[Tensor]
    decode_tokens: Tensor
    decode_logits: Tensor

    @property
    def choices(self) -> Tensor:
        # the token this backend would pick before each decode step: argmax of the previous logits
        prev = torch.cat([self.prefill_logits[:, -1:], self.decode_logits[:, :-1]], dim=1)
        return prev.argmax(-1)


def default_prompts(vocab_size: int, batch: int = 2, seq_len: int = 24, seed: int = 0) -> Tensor:
    """Deterministic random prompts [batch, seq_len] int64 (ids >= 2: bos/eos are not content tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (batch, seq_len), generator=g)


def run_backend(model: nn.Module, prompts: Tensor, decode_steps: int, teacher: Tensor | None = None,
                keep_hidden: bool = True, label: str | None = None) -> BackendRun:
    """Prefill `prompts`, then `decode_steps` one-token steps through the KV cache. Without `teacher` the model
    decodes greedily (it is the anchor); with it, it is fed the anchor's tokens so every step stays comparable."""
    device = model.embed.weight.device
    B, S = prompts.shape
    if teacher is not None and teacher.shape[1] < decode_steps:
        raise ValueError(f"teacher tokens cover {teacher.shape[1]} steps, {decode_steps} requested")
    cache = model.new_cache(B, S + decode_steps)
    logits, hidden = model(prompts.to(device), cache, return_hidden=True)
    prefill = logits.float().cpu()
    hid = [h.float().cpu() for h in hidden] if keep_hidden else []
    fed, steps = [], []
    nxt = prefill[:, -1].argmax(-1)
    for t in range(decode_steps):
        tok = teacher[:, t].cpu() if teacher is not None else nxt
        step = model(tok[:, None].to(device), cache).float().cpu()[:, 0]
        fed.append(tok)
        steps.append(step)
        nxt = step.argmax(-1)
    V = prefill.shape[-1]
    return BackendRun(label or getattr(model.ops, "name", "?"), model.dtype, model.args.kv_fp8_sim, prompts.cpu(),
                      prefill, hid,
                      torch.stack(fed, 1) if fed else torch.zeros(B, 0, dtype=torch.long),
                      torch.stack(steps, 1) if steps else torch.zeros(B, 0, V))


@dataclass
class Comparison:
    """The outcome of comparing a candidate run against a reference run for one pair and profile."""

    pair: str
    ref: str
    got: str
    profile: str
    prefill: dict[str, float]
    decode: dict[str, float]
    layers: list[dict[str, float]]
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def compare_runs(ref: BackendRun, got: BackendRun, tol: Tolerances, pair: str | None = None,
                 k: int | None = None) -> Comparison:
    """Compare a candidate run with a reference run: prefill logits, decode logits + greedy match, per-layer
    hidden streams; check every metric against the pair/profile bounds."""
    assert_finite(ref.prefill_logits, f"{ref.backend} prefill logits (reference side)")
    if not torch.equal(ref.prompts, got.prompts) or not torch.equal(ref.decode_tokens, got.decode_tokens):
        raise ValueError("runs were made on different prompts or fed different decode tokens")
    pair = pair or Tolerances.pair_key(ref.backend, got.backend)
    profile = profile_name(ref.dtype, ref.kv_fp8_sim)
    k = k or int(tol.setting("topk", pair, 5))
    prefill = logits_metrics(ref.prefill_logits, got.prefill_logits, k)
    decode: dict[str, float] = {}
    if ref.decode_logits.shape[1]:
        decode = logits_metrics(ref.decode_logits, got.decode_logits, k)
        match = greedy_match_length(ref.decode_tokens, got.choices,
                                    None if ref.choices.equal(ref.decode_tokens) else ref.choices)
        decode["greedy_match_min"] = float(match.min())
        decode["greedy_match_frac"] = float(match.min()) / ref.decode_tokens.shape[1]
    layers = [tensor_metrics(a, b) for a, b in zip(ref.hidden, got.hidden, strict=False)]
    c = Comparison(pair, ref.backend, got.backend, profile, prefill, decode, layers)
    c.violations += check_metrics("prefill logits", prefill, tol.bounds(pair, profile, "prefill"))
    if decode:
        c.violations += check_metrics("decode logits", decode, tol.bounds(pair, profile, "decode"))
    hb = tol.bounds(pair, profile, "hidden")
    for i, m in enumerate(layers):
        c.violations += check_metrics(f"layers.{i} hidden", m, hb)
    return c


# =====================================================================================================================
# golden files
# =====================================================================================================================
def _version(dist: str) -> str | None:
    # importlib.metadata reads the installed version without importing the package (torch_npu/triton are heavy)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cann_version() -> str | None:
    """The CANN toolkit version from its install tree (ASCEND_TOOLKIT_HOME / ASCEND_HOME_PATH), if present."""
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        root = os.environ.get(var)
        if not root:
            continue
        for rel in ("version.cfg", "compiler/version.info", "runtime/version.info"):
            f = Path(root) / rel
            if f.is_file():
                for line in f.read_text(errors="replace").splitlines():
                    if "version" in line.lower() and "=" in line:
                        return line.split("=", 1)[1].strip()
    return None


def device_name(ops: Ops) -> str:
    dev = torch.device(getattr(ops, "device", "cpu"))
    try:
        if dev.type == "cuda":
            return torch.cuda.get_device_name(dev)
        if dev.type == "npu":
            return torch.npu.get_device_name(dev)  # type: ignore[attr-defined]
    except Exception as e:  # a name is informative only; never fail a recording over it
        return f"{dev.type} (name unavailable: {type(e).__name__})"
    return f"cpu ({platform.machine()}, {platform.processor() or 'unknown processor'})"


def environment_metadata(ops: Ops) -> dict[str, str]:
    """Versions and device that produced a run; absent packages are omitted."""
    meta = {"device": device_name(ops), "torch": torch.__version__, "python": platform.python_version()}
    for key, dist in (("torch_npu", "torch-npu"), ("triton", "triton")):
        v = _version(dist)
        if v:
            meta[key] = v
    cann = cann_version()
    if cann:
        meta["cann"] = cann
    return meta


def content_hash(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and every metadata entry except the hash itself."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for k in sorted(metadata):
        if k != "content_sha256":
            h.update(f"{k}={metadata[k]}\n".encode())
    return h.hexdigest()


def record_golden(path: str | Path, run: BackendRun, ops: Ops, config_hash: str, checkpoint_hash: str,
                  extra: dict[str, str] | None = None) -> dict[str, str]:
    """Write a run to a golden safetensors file. Tensors: prompts, prefill.logits, decode.tokens, decode.logits,
    hidden.<i> (when kept). Metadata (strings only, no pickle): format, backend, dtype, kv_fp8_sim, config and
    checkpoint hashes, environment versions, content hash. Returns the metadata."""
    from safetensors.torch import save_file

    tensors = {"prompts": run.prompts.long(), "prefill.logits": run.prefill_logits.float(),
               "decode.tokens": run.decode_tokens.long(), "decode.logits": run.decode_logits.float()}
    for i, h in enumerate(run.hidden):
        tensors[f"hidden.{i}"] = h.float()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"format": GOLDEN_FORMAT, "backend": run.backend, "dtype": dtype_name(run.dtype),
            "kv_fp8_sim": run.kv_fp8_sim, "config_hash": config_hash, "checkpoint_hash": checkpoint_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "decode_steps": str(run.decode_tokens.shape[1])}
    meta.update(environment_metadata(ops))
    meta.update(extra or {})
    meta["content_sha256"] = content_hash(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return meta


@dataclass
class Golden:
    run: BackendRun
    metadata: dict[str, str]


def load_golden(path: str | Path, config_hash: str | None = None, checkpoint_hash: str | None = None) -> Golden:
    """Read and verify a golden file: format, content hash (tampering), and, when given, that it was recorded
    from the same config and checkpoint. Raises GoldenError with the reason."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise GoldenError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != GOLDEN_FORMAT:
        raise GoldenError(f"{path}: not a dsv4 parity golden file (format {meta.get('format')!r}, "
                          f"expected {GOLDEN_FORMAT!r})")
    stored = meta.get("content_sha256")
    if not stored or content_hash(tensors, meta) != stored:
        raise GoldenError(f"{path}: content hash mismatch: the file was modified after it was recorded "
                          "(tensors or metadata differ from what was hashed); re-record it")
    if config_hash and meta.get("config_hash") != config_hash:
        raise GoldenError(f"{path}: recorded with model config {meta.get('config_hash')} but this model's config is "
                          f"{config_hash} (ModelArgs.arch_hash()); compare against a golden file of the same config")
    if checkpoint_hash and meta.get("checkpoint_hash") != checkpoint_hash:
        raise GoldenError(f"{path}: recorded from checkpoint {meta.get('checkpoint_hash')} but this model's "
                          f"checkpoint is {checkpoint_hash}; a golden file only judges the weights it was made with")
    n_hidden = sum(1 for k in tensors if k.startswith("hidden."))
    run = BackendRun(f"golden:{meta.get('backend', '?')}", parse_dtype(meta["dtype"]), meta["kv_fp8_sim"],
                     tensors["prompts"], tensors["prefill.logits"], [tensors[f"hidden.{i}"] for i in range(n_hidden)],
                     tensors["decode.tokens"], tensors["decode.logits"])
    return Golden(run, meta)


def compare_golden(golden: Golden, model: nn.Module, tol: Tolerances, label: str,
                   keep_hidden: bool = True) -> Comparison:
    """Run `model` on the golden prompts, fed the golden decode tokens, and compare (pair 'golden')."""
    g = golden.run
    got = run_backend(model, g.prompts, g.decode_tokens.shape[1], teacher=g.decode_tokens,
                      keep_hidden=keep_hidden and bool(g.hidden), label=label)
    return compare_runs(g, got, tol, pair="golden")


# =====================================================================================================================
# bisect: recording and shadow proxies over Ops
# =====================================================================================================================
class ScopeTracker:
    """Forward hooks on every submodule keep the name of the innermost module currently running, so an op call can
    be named by where the model made it ("layers.2.attn"); ops made by the top-level forward get "model"."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.stack, self.handles = model, [], []

    def __enter__(self) -> ScopeTracker:
        def pre(name: str) -> Callable:
            def hook(module: nn.Module, inputs: Any) -> None:
                self.stack.append(name)
            return hook

        def post(module: nn.Module, inputs: Any, output: Any) -> None:
            self.stack.pop()

        # a forward that raised leaves stale names on the stack; the root's pre-hook clears them
        self.handles.append(self.model.register_forward_pre_hook(lambda m, i: self.stack.clear()))
        for name, mod in self.model.named_modules():
            if name:
                self.handles += [mod.register_forward_pre_hook(pre(name)), mod.register_forward_hook(post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @property
    def scope(self) -> str:
        return self.stack[-1] if self.stack else "model"


def _to_device(x: Any, device: torch.device) -> Any:
    """Move an op's arguments (tensors, LinearWeight, tuples, lists) to another backend's device."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, LinearWeight):
        return LinearWeight(*(_to_device(v, device) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _to_cpu(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(v) for v in x)
    return x


class RecordingOps:
    """A proxy around an Ops object that records every op call's output (on CPU), in order, under a name like
    "layers.2.attn/sparse_attention#0" (#k counts calls of that op in that scope during this forward). Anything
    that is not an op (device, name, all_reduce, describe) is delegated unchanged."""

    def __init__(self, inner: Ops, tracker: ScopeTracker | None = None) -> None:
        self.inner, self.tracker = inner, tracker
        self.records: list[tuple[str, Any]] = []
        self.counts: dict[tuple[str, str], int] = {}

    def reset(self) -> None:
        self.records.clear()
        self.counts.clear()

    def op_name(self, op: str) -> str:
        scope = self.tracker.scope if self.tracker else "model"
        k = self.counts.get((scope, op), 0)
        self.counts[(scope, op)] = k + 1
        return f"{scope}/{op}#{k}"

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self.inner, attr)
        if attr not in OP_NAMES:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            name = self.op_name(attr)
            out = target(*args, **kwargs)
            self.on_call(name, attr, args, kwargs, out)
            return out

        return call

    def on_call(self, name: str, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        self.records.append((name, _to_cpu(out)))


@dataclass
class OpResult:
    name: str
    metrics: dict[str, float]
    violations: list[Violation]


class ShadowOps(RecordingOps):
    """Runs backend A (the model keeps A's results) and, on every call, backend B's same op on the SAME inputs
    (moved to B's device), so B's per-op error is measured in isolation: no error from earlier ops reaches it."""

    def __init__(self, inner: Ops, shadow: Ops, bounds: dict[str, Bound], tracker: ScopeTracker | None = None) -> None:
        super().__init__(inner, tracker)
        self.shadow, self.bounds = shadow, bounds
        self.results: list[OpResult] = []

    def on_call(self, name: str, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        super().on_call(name, op, args, kwargs, out)
        dev = torch.device(self.shadow.device)
        try:
            got = getattr(self.shadow, op)(*_to_device(args, dev), **_to_device(kwargs, dev))
        except Exception as e:  # an op that rejects inputs the other accepts is itself a divergence
            self.results.append(OpResult(name, {}, [Violation(name, f"raised {type(e).__name__}: {e}", math.nan,
                                                              "no exception")]))
            return
        m = op_output_metrics(op, _to_cpu(out), _to_cpu(got))
        self.results.append(OpResult(name, m, check_metrics(name, m, self.bounds)))


@dataclass
class BisectResult:
    backend_a: str
    backend_b: str
    pair: str
    profile: str
    replay: list[OpResult]  # B's op on A's exact inputs, call by call
    accumulated: list[OpResult]  # B's free run vs A's free run, op by op (errors accumulate)
    layers: list[OpResult]  # per-layer hidden streams of the free runs
    logits: dict[str, float]
    first_op: str | None  # first op whose isolated (replayed) error exceeds the op bounds
    first_layer: str | None  # first layer whose hidden stream exceeds the hidden bounds
    structure_error: str | None = None  # the two runs made different sequences of op calls

    @property
    def ok(self) -> bool:
        return self.first_op is None and self.first_layer is None and self.structure_error is None

    def summary(self) -> str:
        if self.ok:
            return f"{self.backend_a} vs {self.backend_b} ({self.profile}): no divergence beyond tolerance"
        lines = [f"{self.backend_a} vs {self.backend_b} ({self.profile}):"]
        if self.first_op:
            v = next(r for r in self.replay if r.name == self.first_op).violations
            lines.append(f"  first divergent op (same inputs): {self.first_op}: " + "; ".join(
                f"{x.metric} = {x.value:.8g} (allowed {x.bound})" for x in v))
        if self.first_layer:
            lines.append(f"  first divergent layer (free runs): {self.first_layer}")
        if self.structure_error:
            lines.append(f"  op sequences differ: {self.structure_error}")
        return "\n".join(lines)


def bisect(factory: ModelFactory, ops_a: Ops, ops_b: Ops, prompts: Tensor, dtype: torch.dtype, tol: Tolerances,
           pair: str | None = None, label_a: str | None = None, label_b: str | None = None) -> BisectResult:
    """Localise a divergence between two backends on one prefill of `prompts`.

    Pass 1 runs model A through a ShadowOps: every op of B is fed A's exact inputs and judged by the 'op' bounds
    (the first violation is the op to blame). Pass 2 runs model B freely, recording op outputs, to show how the
    error accumulates op by op and layer by layer (judged by the 'hidden' bounds). Memory: every op output of
    one prefill is kept on CPU, so use short prompts on large models."""
    label_a = label_a or ops_a.name
    label_b = label_b or ops_b.name
    pair = pair or Tolerances.pair_key(label_a, label_b)
    model_a = factory(ops_a, dtype)
    profile = profile_name(dtype, model_a.args.kv_fp8_sim)
    op_bounds = tol.bounds(pair, profile, "op")
    with ScopeTracker(model_a) as tr:
        shadow = ShadowOps(ops_a, ops_b, op_bounds, tr)
        model_a.ops = shadow
        logits_a, hidden_a = model_a(prompts.to(model_a.embed.weight.device), return_hidden=True)
        model_a.ops = ops_a
    del model_a
    model_b = factory(ops_b, dtype)
    with ScopeTracker(model_b) as tr:
        rec = RecordingOps(ops_b, tr)
        model_b.ops = rec
        logits_b, hidden_b = model_b(prompts.to(model_b.embed.weight.device), return_hidden=True)
        model_b.ops = ops_b

    accumulated, structure_error = [], None
    names_a = [n for n, _ in shadow.records]
    names_b = [n for n, _ in rec.records]
    if names_a != names_b:
        i = next((j for j, (x, y) in enumerate(zip(names_a, names_b, strict=False)) if x != y),
                 min(len(names_a), len(names_b)))
        structure_error = (f"call {i}: {label_a} made {names_a[i] if i < len(names_a) else 'no call'}, "
                           f"{label_b} made {names_b[i] if i < len(names_b) else 'no call'}")
    hb = tol.bounds(pair, profile, "hidden")
    for (name, out_a), (_, out_b) in zip(shadow.records, rec.records, strict=False):
        op = name.split("/")[1].split("#")[0]
        m = op_output_metrics(op, out_a, out_b)
        accumulated.append(OpResult(name, m, check_metrics(name, m, hb)))
    layers = []
    for i, (a, b) in enumerate(zip(hidden_a, hidden_b, strict=True)):
        m = tensor_metrics(a.float().cpu(), b.float().cpu())
        layers.append(OpResult(f"layers.{i}", m, check_metrics(f"layers.{i} hidden", m, hb)))
    first_op = next((r.name for r in shadow.results if r.violations), None)
    first_layer = next((r.name for r in layers if r.violations), None)
    return BisectResult(label_a, label_b, pair, profile, shadow.results, accumulated, layers,
                        logits_metrics(logits_a.float().cpu(), logits_b.float().cpu()), first_op, first_layer,
                        structure_error)


# =====================================================================================================================
# the `dsv4 parity` commands
# =====================================================================================================================
def run_matrix(source: ModelSource, backends: Sequence[tuple[str, Ops]], dtypes: Sequence[torch.dtype],
               tol: Tolerances, prompts: Tensor, decode_steps: int, log: Callable[[str], None] = print
               ) -> list[Comparison]:
    """Run every backend on the same prompts (the first is the anchor: its greedy tokens are fed to the others)
    and compare every pair, for each dtype."""
    out = []
    for dtype in dtypes:
        runs: list[BackendRun] = []
        for label, ops in backends:
            t0 = time.perf_counter()
            model = source.factory(ops, dtype)
            teacher = runs[0].decode_tokens if runs else None
            runs.append(run_backend(model, prompts, decode_steps, teacher, label=label))
            log(f"  ran {label} {dtype_name(dtype)} in {time.perf_counter() - t0:.1f}s")
            del model
        for i in range(len(runs)):
            for j in range(i + 1, len(runs)):
                out.append(compare_runs(runs[i], runs[j], tol))
    return out


def model_source_from_loader(ns: argparse.Namespace, load_model: Callable[[argparse.Namespace, Ops, torch.dtype],
                             nn.Module], checkpoint: str | Path | None, vocab_size: int | None = None) -> ModelSource:
    """The CLI's model loading as a ModelSource: load_model(ns, ops, dtype) for a checkpoint path (fingerprinted by
    its safetensors headers), or the embedded random model when there is no checkpoint. Pass the config's
    vocab_size to spare a model build just to size the default prompts."""
    if not checkpoint:
        return _resolve_source(ns, None)
    return ModelSource(lambda ops, dtype: load_model(ns, ops, dtype), checkpoint_fingerprint(checkpoint),
                       str(checkpoint), vocab_size)


def _vocab_size(source: ModelSource, ops: Ops) -> int:
    if source.vocab_size is None:
        model = source.factory(ops, torch.float32)  # only when the source cannot say: a full model build
        source.vocab_size = model.args.vocab_size
        del model
    return source.vocab_size


def _resolve_source(ns: argparse.Namespace, model_source: ModelSource | None) -> ModelSource:
    if model_source is not None:
        return model_source
    return default_model_source(getattr(ns, "config", "tiny") or "tiny", getattr(ns, "seed", 0),
                                getattr(ns, "kv_fp8_sim", None))


def _prompts_for(ns: argparse.Namespace, vocab_size: int, tol: Tolerances, pair: str | None = None) -> Tensor:
    batch = ns.batch or int(tol.setting("batch", pair, 2))
    seq = ns.seq_len or int(tol.setting("seq_len", pair, 24))
    return default_prompts(vocab_size, batch, seq, ns.prompt_seed)


def cmd_run(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """`dsv4 parity run`: every backend this machine can run, every pair, each dtype; table + optional report."""
    from .parity_report import comparison_table, write_report

    tol = Tolerances.load(ns.tolerances)
    source = _resolve_source(ns, model_source)
    choices = available_backends(ns.device, ns.include_interpreted)
    usable = [c for c in choices if c.available]
    for c in choices:
        print(f"{'ran ' if c.available else 'skip'} {c.label}: {c.reason}")
    if ns.backends:
        unknown = set(ns.backends) - {c.label for c in choices}
        if unknown:
            raise ValueError(f"--backends: {sorted(unknown)} not among {[c.label for c in choices]}")
        usable = [c for c in usable if c.label in ns.backends]
    if len(usable) < 2:
        print("parity run: fewer than two backends can run here; nothing to compare", file=sys.stderr)
        return 2
    backends = [(c.label, c.make()) for c in usable]
    prompts = _prompts_for(ns, _vocab_size(source, backends[0][1]), tol)
    steps = ns.decode_steps if ns.decode_steps is not None else int(tol.setting("decode_steps", None, 4))
    comps = run_matrix(source, backends, [parse_dtype(d) for d in ns.dtype], tol, prompts, steps)
    print(comparison_table(comps))
    for c in comps:
        for v in c.violations:
            print(f"VIOLATION {c.ref} vs {c.got} [{c.profile}] {v}")
    if ns.report:
        print(f"report: {write_report(ns.report, comps, title=f'dsv4 parity run: {source.label}')}")
    return 0 if all(c.ok for c in comps) else 1


def cmd_record(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """`dsv4 parity record --backend X --out golden.safetensors`."""
    tol = Tolerances.load(ns.tolerances)
    source = _resolve_source(ns, model_source)
    ops = make_backend(ns.backend, ns.device)
    dtype = parse_dtype(ns.dtype[0])
    model = source.factory(ops, dtype)
    prompts = _prompts_for(ns, model.args.vocab_size, tol)  # the model is built anyway: no extra cost
    steps = ns.decode_steps if ns.decode_steps is not None else int(tol.setting("decode_steps", None, 4))
    run = run_backend(model, prompts, steps, keep_hidden=not ns.no_hidden, label=ns.backend)
    assert_finite(run.prefill_logits, f"{ns.backend} prefill logits")  # a NaN golden would judge nothing
    meta = record_golden(ns.out, run, ops, model.args.arch_hash(), source.checkpoint_hash,
                         {"model": source.label})
    print(f"recorded {ns.out}: backend {meta['backend']} on {meta['device']}, {meta['dtype']}, "
          f"config {meta['config_hash']}, checkpoint {meta['checkpoint_hash']}")
    return 0


def cmd_compare(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """`dsv4 parity compare golden.safetensors --backend Y`; exit 1 on a violation, 2 on an unusable golden file."""
    from .parity_report import comparison_table, write_report

    tol = Tolerances.load(ns.tolerances)
    source = _resolve_source(ns, model_source)
    ops = make_backend(ns.backend, ns.device)
    try:
        # integrity and checkpoint identity first (the random default's fingerprint covers its config): building
        # the model may take minutes, or not fit this machine at all
        header = load_golden(ns.golden, checkpoint_hash=source.checkpoint_hash)
        model = source.factory(ops, header.run.dtype)
        golden = load_golden(ns.golden, model.args.arch_hash(), source.checkpoint_hash)
    except GoldenError as e:
        print(f"parity compare: {e}", file=sys.stderr)
        return 2
    comp = compare_golden(golden, model, tol, label=ns.backend)
    print(f"golden: {golden.metadata.get('backend')} on {golden.metadata.get('device')} "
          f"(torch {golden.metadata.get('torch')})")
    print(comparison_table([comp]))
    for v in comp.violations:
        print(f"VIOLATION {v}")
    if ns.report:
        print(f"report: {write_report(ns.report, [comp], title=f'dsv4 parity compare: {ns.golden}')}")
    return 0 if comp.ok else 1


def cmd_bisect(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """`dsv4 parity bisect --backends A B`: name the first op and layer where B leaves A."""
    from .parity_report import bisect_table, write_report

    tol = Tolerances.load(ns.tolerances)
    source = _resolve_source(ns, model_source)
    a, b = ns.backends
    ops_a, ops_b = make_backend(a, ns.device), make_backend(b, ns.device)
    dtype = parse_dtype(ns.dtype[0])
    prompts = _prompts_for(ns, _vocab_size(source, ops_a), tol)
    res = bisect(source.factory, ops_a, ops_b, prompts, dtype, tol, label_a=a, label_b=b)
    print(bisect_table(res, only_failures=not ns.verbose))
    print(res.summary())
    if ns.report:
        print(f"report: {write_report(ns.report, [], bisects=[res], title=f'dsv4 parity bisect: {a} vs {b}')}")
    return 0 if res.ok else 1


COMMANDS: dict[str, Callable[[argparse.Namespace, ModelSource | None], int]] = {
    "run": cmd_run, "record": cmd_record, "compare": cmd_compare, "bisect": cmd_bisect}


def add_parity_arguments(subparsers: Any,
                         extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """Add `parity {run,record,compare,bisect}` to a CLI's subparsers. Each sub-command sets ns.parity_command;
    dispatch with run_parity(ns, model_source). Model options (--config/--seed/--kv-fp8-sim) describe the embedded
    random model; a CLI with real checkpoints passes its own ModelSource instead, and `extra(parser)` adds its
    options (e.g. --checkpoint) to every parity sub-command."""
    p = subparsers.add_parser("parity", help="prove two backends agree; find the op to blame when they do not")
    sub = p.add_subparsers(dest="parity_command", required=True)

    def common(sp: argparse.ArgumentParser, dtypes_multi: bool) -> None:
        sp.add_argument("--tolerances", default=None, help="tolerance YAML (default configs/parity.yaml)")
        sp.add_argument("--device", default=None, help="device for the real backends (default: the backend's)")
        sp.add_argument("--config", default="tiny", help="embedded random model config (default tiny)")
        sp.add_argument("--seed", type=int, default=0, help="embedded random model seed")
        sp.add_argument("--kv-fp8-sim", choices=("e4m3", "clamp"), default=None,
                        help="override the config's KV FP8 simulation (clamp: continuous model, tight bounds)")
        sp.add_argument("--dtype", nargs="+" if dtypes_multi else 1, default=["fp32"], choices=("fp32", "bf16"))
        sp.add_argument("--batch", type=int, default=None, help="prompts (default: parity.yaml suite.batch)")
        sp.add_argument("--seq-len", type=int, default=None, help="prompt length (default: suite.seq_len)")
        sp.add_argument("--prompt-seed", type=int, default=0)
        sp.add_argument("--decode-steps", type=int, default=None, help="one-token steps after the prefill")
        sp.add_argument("--report", default=None, help="directory for report.md and the error-growth plot")
        if extra:
            extra(sp)

    r = sub.add_parser("run", help="all backends this machine can run, every pair, table; exit 1 on a violation")
    common(r, True)
    r.add_argument("--backends", nargs="+", default=None, metavar="LABEL",
                   help="only these backends (labels as printed, e.g. reference 'ascend(emulated)' cuda)")
    r.add_argument("--include-interpreted", action="store_true",
                   help="also run the CUDA backend in the Triton interpreter on CPU (slow)")
    rec = sub.add_parser("record", help="write a golden file from one backend")
    common(rec, False)
    rec.add_argument("--backend", required=True, help="reference | ascend | cuda | ascend(emulated) | ...")
    rec.add_argument("--out", required=True, help="golden .safetensors to write")
    rec.add_argument("--no-hidden", action="store_true", help="do not store per-layer activations")
    cmp_ = sub.add_parser("compare", help="check a backend against a golden file; exit 1 on a violation")
    common(cmp_, False)
    cmp_.add_argument("golden", help="golden .safetensors from `parity record`")
    cmp_.add_argument("--backend", required=True)
    bis = sub.add_parser("bisect", help="first op and layer where backend B diverges from A")
    common(bis, False)
    bis.add_argument("--backends", nargs=2, required=True, metavar=("A", "B"))
    bis.add_argument("--verbose", action="store_true", help="print every op, not only the failing ones")
    return p


def run_parity(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """Dispatch a parsed `parity` command. Returns the exit status (0 ok, 1 violation, 2 unusable input)."""
    try:
        return COMMANDS[ns.parity_command](ns, model_source)
    except (BackendUnavailable, NonFiniteError, KeyError, ValueError) as e:
        print(f"parity {ns.parity_command}: {e}", file=sys.stderr)
        return 2
