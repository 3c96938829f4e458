"""`dsv4 parity endpoint`: score a running OpenAI-compatible deployment (vLLM, vllm-ascend, SGLang, dsv4 serve)
against dsv4's reference, token by token, through its HTTP API only.

Flow: load the reference (the same checkpoint, on whatever backend this machine has) -> tokenize the prompts and check
that the endpoint tokenizes them the same way (a mismatch is an error, never a low score) -> a continuation per
prompt (the reference's greedy one, or the user's) -> probe which log-prob API the endpoint offers
(endpoint_client.LOGPROB_APIS) -> teacher forcing: the endpoint scores every position of prompt + continuation, the
reference does the same in one forward -> per-position metrics -> free-running greedy: the endpoint continues each
prompt on its own and the first token where it leaves the reference's greedy continuation is reported -> verdict
against the `endpoint` section of configs/parity.yaml -> report (endpoint_report.py) and JSON.

Per position j (predicting ids[j] from ids[:j]):
- top1: the endpoint's most likely token equals the reference's;
- dlogprob: |log p_ref(ids[j]) - log p_end(ids[j])|, the scored token's log-prob;
- topk_overlap: |top-k(ref) & top-k(endpoint)| / k;
- kl_lb: KL(p_ref || p_end) with every token outside the returned set merged into one "rest" bucket. Coarse-graining
  never increases a KL divergence (data-processing inequality), so this is a LOWER BOUND of the full KL whenever the
  endpoint returns only k of the V log-probs; it is exact when it returns all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from dsv4.common.parity.compare import DEFAULT_TOLERANCES, Bound, Violation, check_metrics
from dsv4.common.parity.endpoint_client import (
    LOGPROB_APIS,
    EndpointClient,
    EndpointError,
    EndpointUnsupported,
    PositionLogprobs,
    TokenizationMismatch,
    choice0,
    token_id_of,
)

# default prompts: short texts of different kinds, tokenized by the reference's own tokenizer (the embedded default's
# is byte-level); real checkpoints get real text, and the tokenizer check has text to compare
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "北京是中国的首都，",
    "Q: 17 * 23 = ? A:",
)
KL_FLOOR = 1e-12  # a probability mass below this is treated as this (bf16 rounding can make a top-k sum exceed 1)


# -- the endpoint profile ---------------------------------------------------------------------------------------------
@dataclass
class EndpointProfile:
    """configs/parity.yaml `endpoint`: settings and profiles[name] = {teacher: {metric: bound}, free: {...}}."""

    name: str
    teacher: dict[str, Bound]
    free: dict[str, Bound]
    settings: dict[str, Any]

    @classmethod
    def load(cls, name: str | None = None, path: str | Path | None = None) -> EndpointProfile:
        p = Path(path) if path else DEFAULT_TOLERANCES
        with open(p) as f:
            data = (yaml.safe_load(f) or {}).get("endpoint")
        if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
            raise ValueError(f"{p}: no 'endpoint' section with 'profiles'")
        settings = data.get("settings", {})
        name = name or settings.get("default_profile")
        if name not in data["profiles"]:
            raise ValueError(f"{p}: no endpoint profile {name!r}; have {sorted(data['profiles'])}")
        scopes = data["profiles"][name]

        def bounds(scope: str) -> dict[str, Bound]:
            out = {}
            for metric, spec in (scopes.get(scope) or {}).items():
                if not isinstance(spec, dict) or not ({"min", "max"} & set(spec)) or not spec.get("why"):
                    raise ValueError(f"{p}: endpoint.profiles.{name}.{scope}.{metric}: need min or max, and a 'why'")
                out[metric] = Bound(metric, spec.get("min"), spec.get("max"), spec["why"])
            return out

        return cls(name, bounds("teacher"), bounds("free"), settings)


# -- per-position metrics ---------------------------------------------------------------------------------------------
def position_metrics(ref_logprobs: Tensor, ids: list[int], got: list[PositionLogprobs], k: int) -> dict[str, list]:
    """Per scored position j = 1..len(ids)-1: top1 (bool), dlogprob, topk_overlap, kl_lb, and the token ids involved.
    ref_logprobs [len(ids)-1, V]: row j-1 is the reference's log-softmax predicting ids[j]."""
    if len(got) != len(ids) - 1 or ref_logprobs.shape[0] != len(ids) - 1:
        raise ValueError(f"{len(got)} endpoint positions and {ref_logprobs.shape[0]} reference rows for "
                         f"{len(ids)} tokens")
    ref = ref_logprobs.double()
    k = min(k, ref.shape[-1])
    ref_top = ref.topk(k, dim=-1)
    out: dict[str, list] = {k_: [] for k_ in ("top1", "dlogprob", "topk_overlap", "kl_lb", "ref_argmax",
                                               "end_argmax", "ref_logprob", "end_logprob")}
    for j, pos in enumerate(got):
        tok = ids[j + 1]
        if pos.token_id != tok:
            raise TokenizationMismatch(f"position {j + 1}: endpoint scored token {pos.token_id}, sent {tok}")
        top = pos.top
        end_best = sorted(top.items(), key=lambda kv: -kv[1])
        end_argmax = end_best[0][0]
        ref_argmax = int(ref_top.indices[j, 0])
        ref_lp_tok = float(ref[j, tok])
        end_lp_tok = float(pos.logprob) if pos.logprob is not None else top[tok]
        end_topk = {t for t, _ in end_best[:k]}
        overlap = len(end_topk & set(ref_top.indices[j].tolist())) / k
        # KL over the returned tokens + one bucket for the rest (a lower bound of the full KL, see the module doc)
        tids = torch.tensor(list(top), dtype=torch.long)
        p_ref = ref[j, tids].exp()
        lp_end = torch.tensor(list(top.values()), dtype=torch.float64)
        kl = float((p_ref * (ref[j, tids] - lp_end)).sum())
        rest_ref = max(1.0 - float(p_ref.sum()), 0.0)
        rest_end = max(1.0 - float(lp_end.exp().sum()), KL_FLOOR)
        if rest_ref > KL_FLOOR:
            kl += rest_ref * math.log(rest_ref / rest_end)
        out["top1"].append(ref_argmax == end_argmax)
        out["dlogprob"].append(abs(ref_lp_tok - end_lp_tok))
        out["topk_overlap"].append(overlap)
        out["kl_lb"].append(max(kl, 0.0))  # fp64 round-off can leave -1e-17
        out["ref_argmax"].append(ref_argmax)
        out["end_argmax"].append(end_argmax)
        out["ref_logprob"].append(ref_lp_tok)
        out["end_logprob"].append(end_lp_tok)
    return out


def summarize_teacher(per_prompt: list[dict[str, list]]) -> dict[str, float]:
    """Aggregates over all scored positions of all prompts (the names the profile bounds)."""
    top1 = [x for p in per_prompt for x in p["top1"]]
    dlp = [x for p in per_prompt for x in p["dlogprob"]]
    ov = [x for p in per_prompt for x in p["topk_overlap"]]
    kl = [x for p in per_prompt for x in p["kl_lb"]]
    n = len(top1)
    if n == 0:
        return {}
    nonfinite = sum(1 for x in dlp + kl if not math.isfinite(x))
    return {"positions": float(n), "top1": sum(top1) / n, "dlogprob_mean": sum(dlp) / n, "dlogprob_max": max(dlp),
            "topk_overlap": sum(ov) / n, "kl_lb_mean": sum(kl) / n, "kl_lb_max": max(kl),
            "top1_flips": float(n - sum(top1)), "nonfinite": float(nonfinite)}


def first_divergence(ref: list[int], got: list[int]) -> int | None:
    """Index of the first token where `got` leaves `ref`; None when one is a prefix of the other."""
    for i, (a, b) in enumerate(zip(ref, got, strict=False)):
        if a != b:
            return i
    return None


# -- one run ----------------------------------------------------------------------------------------------------------
@dataclass
class PromptResult:
    index: int
    prompt_len: int
    ids: list[int]  # prompt + continuation, as scored
    positions: dict[str, list] = field(default_factory=dict)
    first_flip: int | None = None  # first scored position (index into ids) whose top-1 differs
    free_ref: list[int] = field(default_factory=list)
    free_got: list[int] = field(default_factory=list)
    free_finish: str | None = None
    free_diverge: int | None = None  # index into the continuation; None = matched all compared tokens


@dataclass
class EndpointResult:
    url: str
    served_model: str
    reference: str
    profile: str
    api: str
    api_probe: list[str]
    tokenizer_check: str
    top_k: int
    kl_is_lower_bound: bool
    teacher: dict[str, float]
    free: dict[str, float]
    prompts: list[PromptResult]
    violations: list[Violation]

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["violations"] = [{"where": v.where, "metric": v.metric, "value": v.value, "bound": v.bound}
                           for v in self.violations]
        d["ok"] = self.ok
        return d


def reference_logprobs(model, ids: list[int]) -> Tensor:
    """[len(ids)-1, V] fp32 log-softmax of the reference's logits predicting ids[1:], in one forward."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], dtype=torch.long, device=model.embed.weight.device))
    return logits[0, :-1].float().cpu().log_softmax(-1)


def reference_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    from dsv4.common.runtime.generate import GenerationConfig, generate

    with torch.inference_mode():
        res = generate(model, prompts, GenerationConfig(max_new_tokens=n, ignore_eos=True))
    return [r.tokens for r in res]


def check_tokenization(client: EndpointClient, texts: list[str | None], prompts: list[list[int]], tokenizer,
                       log) -> str:
    """Compare the endpoint's /tokenize with the reference tokenizer on every text prompt (a leading BOS is not held
    against either side: scoring sends token ids). Without /tokenize, the echo round trip below stands in."""
    bos = getattr(tokenizer, "bos_id", None)
    strip = lambda ids: ids[1:] if ids and ids[0] == bos else ids  # noqa: E731
    checked = 0
    for i, (text, ids) in enumerate(zip(texts, prompts, strict=True)):
        if text is None:
            continue
        try:
            got = client.tokenize(text)
        except EndpointUnsupported as e:
            log(f"tokenizer check: /tokenize unavailable ({e}); checking by token-id round trip instead")
            return roundtrip_tokenization(client, texts, prompts, tokenizer)
        want = strip(ids)
        if strip(got) != want:
            j = next((n for n, (a, b) in enumerate(zip(strip(got), want, strict=False)) if a != b),
                     min(len(strip(got)), len(want)))
            raise TokenizationMismatch(
                f"prompt {i}: the endpoint tokenizes differently from the reference at token {j} "
                f"({len(strip(got))} vs {len(want)} tokens; endpoint {strip(got)[j:j + 4]} vs reference "
                f"{want[j:j + 4]}): wrong tokenizer or a different checkpoint behind {client.url}")
        checked += 1
    return f"/tokenize agrees with the reference tokenizer on {checked} text prompt(s)" if checked else \
        "no text prompts (token ids given): nothing to tokenize"


def roundtrip_tokenization(client: EndpointClient, texts: list[str | None], prompts: list[list[int]],
                           tokenizer) -> str:
    """Without /tokenize: send each text prompt as text with echo + return_tokens_as_token_ids and compare the ids
    the endpoint echoes with the reference's."""
    bos = getattr(tokenizer, "bos_id", None)
    checked = 0
    for i, (text, ids) in enumerate(zip(texts, prompts, strict=True)):
        if text is None:
            continue
        try:
            body = client.request("POST", "/v1/completions", {
                "model": client.model, "prompt": text, "max_tokens": 1, "echo": True, "logprobs": 0,
                "temperature": 0.0, "return_tokens_as_token_ids": True})
            toks = (choice0(body, "echo").get("logprobs") or {}).get("tokens") or []
            got = [token_id_of(str(t), None) for t in toks]
        except EndpointUnsupported as e:
            raise EndpointError(f"cannot check tokenization: no /tokenize and no echo round trip ({e}); pass "
                                "--no-tokenizer-check to score token ids anyway") from None
        want = [t for t in ids if t != bos]
        got = [g for g in got if g != bos]
        if None in got or got[:len(want)] != want:
            raise TokenizationMismatch(f"prompt {i}: the endpoint's echoed token ids {got[:8]}... differ from the "
                                       f"reference's {want[:8]}...: a different tokenizer behind {client.url}")
        checked += 1
    return f"echoed token ids agree with the reference tokenizer on {checked} text prompt(s)"


def run_endpoint(client: EndpointClient, model, tokenizer, texts: list[str | None], prompts: list[list[int]],
                 continuations: list[list[int]] | None, profile: EndpointProfile, top_k: int, max_new_tokens: int,
                 mode: str = "both", api: str | None = None, check_tokenizer: bool = True, reference: str = "",
                 served_model: str | None = None, log=print) -> EndpointResult:
    """Everything but argument parsing and output: see the module docstring."""
    served = client.model or client.resolve_model(served_model)
    log(f"endpoint {client.url}: model {served!r}")
    tok_note = (check_tokenization(client, texts, prompts, tokenizer, log) if check_tokenizer
                else "not checked (--no-tokenizer-check)")
    log(f"tokenizer: {tok_note}")
    if model.dtype != torch.float32:
        log(f"note: the reference runs in {str(model.dtype).replace('torch.', '')}; the endpoint profiles were "
            "measured against an fp32 reference (--dtype fp32)")
    V = model.args.vocab_size
    for i, ids in enumerate(prompts + (continuations or [])):
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            what = f"prompt {i}" if i < len(prompts) else f"continuation {i - len(prompts)}"
            raise ValueError(f"{what}: token id {bad[0]} is outside the reference's vocabulary (0..{V - 1})")
    greedy = reference_greedy(model, prompts, max_new_tokens) if continuations is None or mode != "teacher" else []
    conts = continuations if continuations is not None else greedy
    results = [PromptResult(i, len(p), p + c) for i, (p, c) in enumerate(zip(prompts, conts, strict=True))]
    limit = model.args.max_seq_len
    for r in results:
        if len(r.ids) > limit:
            raise ValueError(f"prompt {r.index}: {r.prompt_len} prompt + {len(r.ids) - r.prompt_len} continuation "
                             f"tokens exceed the reference's max_seq_len {limit} (--max-seq-len)")
    api_used, probe_notes = "-", []
    if mode in ("teacher", "both"):
        lookup = _token_lookup(tokenizer)
        api_used, probe_notes = client.probe_logprob_api(results[0].ids, top_k, lookup, only=api)
        log(f"log-probs through {api_used}" + (f" (rejected: {'; '.join(probe_notes)})" if probe_notes else ""))
        for r in results:
            got = client.teacher_logprobs(api_used, r.ids, top_k, lookup)
            r.positions = position_metrics(reference_logprobs(model, r.ids), r.ids, got, top_k)
            flips = [j for j, ok in enumerate(r.positions["top1"]) if not ok]
            r.first_flip = flips[0] + 1 if flips else None
    if mode in ("free", "both"):
        for r, ref_cont in zip(results, greedy, strict=True):
            got, finish = client.greedy(prompts[r.index], max_new_tokens,
                                        api_used if api_used != "-" else "prompt_logprobs", _token_lookup(tokenizer))
            r.free_ref, r.free_got, r.free_finish = ref_cont, got, finish
            r.free_diverge = first_divergence(ref_cont, got)
    teacher = summarize_teacher([r.positions for r in results if r.positions])
    free = summarize_free(results) if mode in ("free", "both") else {}
    violations = check_metrics("teacher forcing", teacher, profile.teacher) if teacher else []
    if free:
        violations += check_metrics("free-running greedy", free, profile.free)
    return EndpointResult(client.url, served, reference, profile.name, api_used, probe_notes, tok_note, top_k,
                          top_k < V, teacher, free, results, violations)


def summarize_free(results: list[PromptResult]) -> dict[str, float]:
    """Greedy match length per prompt (tokens before the first divergence), worst prompt as a fraction."""
    fracs, lengths = [], []
    for r in results:
        n = len(r.free_ref)
        m = r.free_diverge if r.free_diverge is not None else min(n, len(r.free_got))
        lengths.append(m)
        fracs.append(m / n if n else 1.0)
    return {"greedy_match_frac": min(fracs) if fracs else 1.0, "greedy_match_mean": sum(fracs) / len(fracs),
            "greedy_match_min_tokens": float(min(lengths, default=0))}


def _token_lookup(tokenizer):
    """token string -> id through the reference tokenizer's vocabulary (for echo answers without token ids)."""
    tok = getattr(tokenizer, "tok", None)
    return (lambda s: tok.token_to_id(s)) if tok is not None else None


# -- inputs -----------------------------------------------------------------------------------------------------------
def _jsonl_records(p: Path, flag: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of every non-blank line of a .jsonl file; a bad line is an error naming it."""
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {p}:{n}: not JSON ({e.msg})") from None


def load_prompts(path: str | None, tokenizer) -> tuple[list[str | None], list[list[int]], list[list[int]] | None]:
    """(texts, token ids, continuations or None). FILE: .jsonl lines {"prompt": text} or {"token_ids": [...]}, each
    optionally with "continuation": [ids] or "continuation_text"; any other file: one text prompt per line."""
    if path is None:
        texts = list(DEFAULT_PROMPTS)
        return texts, [tokenizer.encode(t) for t in texts], None
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--prompts {p}: file not found")
    texts, ids, conts = [], [], []
    if p.suffix == ".jsonl":
        for n, rec in _jsonl_records(p, "--prompts"):
            if isinstance(rec.get("token_ids"), list):
                texts.append(None)
                ids.append([int(t) for t in rec["token_ids"]])
            elif isinstance(rec.get("prompt"), str):
                texts.append(rec["prompt"])
                ids.append(tokenizer.encode(rec["prompt"]))
            else:
                raise ValueError(f"--prompts {p}:{n}: expected a 'prompt' string or a 'token_ids' list")
            if "continuation" in rec:
                conts.append([int(t) for t in rec["continuation"]])
            elif "continuation_text" in rec:
                conts.append(tokenizer.encode(rec["continuation_text"], add_bos=False))
    else:
        texts = [line for line in p.read_text().splitlines() if line.strip()]
        ids = [tokenizer.encode(t) for t in texts]
    if not ids:
        raise ValueError(f"--prompts {p}: no prompts")
    if conts and len(conts) != len(ids):
        raise ValueError(f"--prompts {p}: {len(conts)} of {len(ids)} prompts carry a continuation; give all or none")
    return texts, ids, conts or None


def load_continuations(spec: str, n_prompts: int, tokenizer) -> list[list[int]] | None:
    """--continuation greedy (None: the reference's) or FILE: .jsonl, one {"token_ids": [...]} or {"text": ...} per
    prompt, in order."""
    if spec == "greedy":
        return None
    p = Path(spec)
    if not p.exists():
        raise ValueError(f"--continuation {spec}: neither 'greedy' nor an existing file")
    out = []
    for n, rec in _jsonl_records(p, "--continuation"):
        if isinstance(rec.get("token_ids"), list):
            out.append([int(t) for t in rec["token_ids"]])
        elif isinstance(rec.get("text"), str):
            out.append(tokenizer.encode(rec["text"], add_bos=False))
        else:
            raise ValueError(f"--continuation {p}:{n}: expected a 'token_ids' list or a 'text' string")
    if len(out) != n_prompts:
        raise ValueError(f"--continuation {p}: {len(out)} continuations for {n_prompts} prompts")
    return out


# -- CLI --------------------------------------------------------------------------------------------------------------
def add_endpoint_arguments(sub: Any, extra=None) -> argparse.ArgumentParser:
    """`parity endpoint` under the parity sub-commands (common/parity/cli.py)."""
    from dsv4.common.runtime.backend import CHOICES

    e = sub.add_parser("endpoint", help="score a running OpenAI-compatible deployment against the reference, "
                                        "token by token; exit 1 on a violation")
    e.add_argument("--url", required=True, help="API base of the deployment, e.g. http://HOST:PORT/v1")
    e.add_argument("--served-model", default=None, help="model name in requests (default: the only one served)")
    e.add_argument("--prompts", default=None, help="prompts: .jsonl ({prompt|token_ids[, continuation]}) or text "
                                                   "lines (default: 4 built-in texts)")
    e.add_argument("--continuation", default="greedy", help="greedy (the reference's, default) or a .jsonl FILE")
    e.add_argument("--max-new-tokens", type=int, default=None, help="greedy continuation length (default: yaml)")
    e.add_argument("--top-k", type=int, default=None, help="log-probs per position asked of the endpoint "
                                                           "(default 20 = vLLM's --max-logprobs default)")
    e.add_argument("--mode", choices=("teacher", "free", "both"), default="both",
                   help="teacher forcing, free-running greedy, or both (default)")
    e.add_argument("--logprob-api", choices=("auto", *LOGPROB_APIS), default="auto",
                   help="how to ask for log-probs (default: probe in the order listed)")
    e.add_argument("--profile", default=None, help="endpoint profile of the tolerance YAML (default: its "
                                                   "settings.default_profile)")
    e.add_argument("--tolerances", default=None, help="tolerance YAML (default configs/parity.yaml)")
    e.add_argument("--no-tokenizer-check", action="store_true", help="score token ids without checking that the "
                                                                     "endpoint tokenizes text the same way")
    e.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    e.add_argument("--retries", type=int, default=3, help="retries on connection errors, timeouts, 429/503")
    e.add_argument("--max-wait", type=float, default=60.0, help="longest Retry-After honoured, seconds")
    e.add_argument("--api-key", default=None, help="bearer token, if the deployment wants one")
    e.add_argument("--report", default=None, help="directory for report.md and the per-position plot")
    e.add_argument("--json", default=None, help="write the result as JSON (for CI)")
    g = e.add_argument_group("reference")
    g.add_argument("--backend", default="auto", choices=CHOICES, help="reference backend (default: this machine's)")
    g.add_argument("--device", default=None)
    g.add_argument("--emulate", action="store_true", help="ascend only: the CPU emulation of the NPU path")
    g.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="reference dtype (default fp32 on CPU)")
    g.add_argument("--config", default="tiny", help="embedded default only: config name (default tiny)")
    if extra:
        extra(e)
    return e


def cmd_endpoint(ns: argparse.Namespace, model_source=None) -> int:
    """`dsv4 parity endpoint`. 0: within the profile, 1: a violation, 2: unusable endpoint or input."""
    from dsv4.common.parity.endpoint_report import result_table, write_endpoint_report
    from dsv4.common.runtime.loading import load_model

    try:
        profile = EndpointProfile.load(ns.profile, ns.tolerances)
        s = profile.settings
        top_k = ns.top_k if ns.top_k is not None else int(s.get("top_k", 20))
        n_new = ns.max_new_tokens if ns.max_new_tokens is not None else int(s.get("max_new_tokens", 32))
        for a in ("tp", "ep"):
            setattr(ns, a, getattr(ns, a, 1))
        ns.weights = getattr(ns, "weights", "dequantized")
        ns.max_seq_len = getattr(ns, "max_seq_len", None)
        ns.model = getattr(ns, "model", None)
        if top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {top_k}")
        client = EndpointClient(ns.url, timeout=ns.timeout, retries=ns.retries, max_wait=ns.max_wait,
                                api_key=ns.api_key)
        try:
            client.resolve_model(ns.served_model)  # a wrong URL or name fails before minutes of model loading
            model, tokenizer, source = load_model(ns)
            texts, prompts, conts = load_prompts(ns.prompts, tokenizer)
            if ns.continuation != "greedy":
                conts = load_continuations(ns.continuation, len(prompts), tokenizer)
            res = run_endpoint(client, model, tokenizer, texts, prompts, conts, profile, top_k, n_new, ns.mode,
                               None if ns.logprob_api == "auto" else ns.logprob_api, not ns.no_tokenizer_check,
                               f"{source} on {model.ops.name} ({str(model.dtype).replace('torch.', '')})",
                               ns.served_model, log=lambda m: print(m, file=sys.stderr))
        finally:
            client.close()
    except (EndpointError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"parity endpoint: {e}", file=sys.stderr)
        return 2
    print(result_table(res))
    for v in res.violations:
        print(f"VIOLATION {v}")
    if ns.report:
        print(f"report: {write_endpoint_report(ns.report, res)}")
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(res.to_json(), indent=1))
        print(f"json: {ns.json}")
    return 0 if res.ok else 1
