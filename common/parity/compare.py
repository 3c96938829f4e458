"""Parity suite: prove two backends (or a backend and a recorded golden file) give the same answers, and name the op
to blame when they do not.

This module (dsv4.common.parity.compare) is the core, bottom up:
- metrics on tensor pairs (cosine, max/mean abs, relative, KL, top-k agreement, greedy match, msprobe-style
  thousandth ratios) and non-finite detection;
- tolerances read from configs/parity.yaml, keyed by backend pair, profile ("<dtype>-<kv_fp8_sim>") and scope;
- running one backend on fixed prompts (prefill + teacher-forced greedy decode) and comparing runs.
Built on it (each imports this module, never the other way round):
- sources.py: model sources (embedded random model, checkpoint fingerprints) and the backends this
  machine can run;
- golden.py: golden files (safetensors, metadata only in the string dict: no pickle) with
  config/checkpoint/content hashes;
- bisect.py: a recording proxy over an `Ops` object names every op call
  ("layers.2.attn/sparse_attention#0"); a shadow proxy replays backend A's exact inputs into backend B's op so
  per-op errors do not accumulate;
- cli.py: the `dsv4 parity` subcommands (run, record, compare, bisect) for common/cli.py;
- report.py: the markdown/PNG report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from dsv4.common.model.config import CONFIG_DIR
from dsv4.common.model.ops import Ops
from dsv4.common.runtime.backend import BACKENDS

DEFAULT_TOLERANCES = CONFIG_DIR / "parity.yaml"
ModelFactory = Callable[[Ops, torch.dtype], nn.Module]


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or Inf (a reference that produces NaN cannot judge anything)."""


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

    @property
    def detail(self) -> str:
        # 8 digits: a cosine of 0.99998 must not print as "1" next to a bound of 0.999999
        return f"{self.metric} = {self.value:.8g} (allowed {self.bound})"

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


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
    "hidden" (per-layer streams of free runs), "op" (one op on identical inputs, bisect; "op.<name>" overrides
    metrics of one op)."""

    SCOPES = ("prefill", "decode", "hidden", "op")

    def __init__(self, data: dict[str, Any], source: str = "parity.yaml") -> None:
        self.source = source
        if not isinstance(data, dict) or not isinstance(data.get("tolerances"), dict) or not data["tolerances"]:
            raise ValueError(f"{source}: expected a tolerance file with a 'tolerances' mapping "
                             "(see configs/parity.yaml)")
        self.suite: dict[str, Any] = data.get("suite", {})
        self.table: dict[str, Any] = data["tolerances"]
        for pair, profiles in self.table.items():
            for profile, scopes in profiles.items():
                for scope, metrics in scopes.items():
                    if scope not in self.SCOPES and not scope.startswith("op."):
                        raise ValueError(f"{source}: {pair}.{profile}: unknown scope {scope!r}")
                    for metric, spec in metrics.items():
                        if not isinstance(spec, dict) or not ({"min", "max"} & set(spec)) or not spec.get("why"):
                            raise ValueError(f"{source}: {pair}.{profile}.{scope}.{metric}: need min or max, "
                                             "and a one-line 'why'")

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tolerances:
        p = Path(path) if path else DEFAULT_TOLERANCES
        with open(p) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls(data, source=str(p))

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

    def op_bounds(self, pair: str, profile: str, op: str) -> dict[str, Bound]:
        """The 'op' bounds of one op: the pair's "op" scope, with the metrics its "op.<op>" scope (if any) names
        replaced (where one fused op's summation order differs measurably and the others are bitwise equal)."""
        out = self.bounds(pair, profile, "op")
        special = self.table[pair][profile].get(f"op.{op}", {})
        out.update({m: Bound(m, s.get("min"), s.get("max"), s["why"]) for m, s in special.items()})
        return out

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
