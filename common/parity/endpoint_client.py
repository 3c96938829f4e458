"""The HTTP side of `dsv4 parity endpoint`: an httpx client for an OpenAI-compatible server (vLLM, vllm-ascend,
SGLang, dsv4 serve) with bounded retries and one-line errors, and the parsers that turn each server's log-prob format
into one shape (PositionLogprobs per scored position). The parsers are checked on tests/fixtures/endpoint/*.json.

Three ways to get teacher-forced log-probs, tried in this order by `probe_logprob_api`:
- "prompt_logprobs": vLLM's extension on /v1/completions (vLLM >= 0.5.3; vllm-ascend follows vLLM). Request: a
  token-id prompt, max_tokens 1, prompt_logprobs k. Response: choices[0].prompt_logprobs, a list with one entry per
  prompt token, the first null, each a dict {"<token id>": {"logprob", "rank", "decoded_token"}} that holds the top k
  AND the prompt's own token (so up to k+1 keys). Read from vllm-project/vllm vllm/entrypoints/openai/completion/
  protocol.py (CompletionResponseChoice.prompt_logprobs: list[dict[int, Logprob] | None]) and vllm/logprobs.py
  (Logprob: logprob, rank, decoded_token); JSON turns the int keys into strings.
- "sglang_generate": SGLang's native POST /generate with input_ids, return_logprob, logprob_start_len 0 and
  top_logprobs_num k. Response: meta_info.input_token_logprobs, one [logprob, token_id, text] per input token (the
  first logprob null), and meta_info.input_top_logprobs, one list of [logprob, token_id, text] (or null) per token.
  Read from sgl-project/sglang docs/references/sampling_params.md (GenerateReqInput) and
  python/sglang/srt/managers/tokenizer_manager.py (detokenize_logprob_tokens builds the triples).
- "echo_logprobs": the legacy OpenAI completions form, echo + logprobs k (+ vLLM's return_tokens_as_token_ids so the
  tokens come back as "token_id:N"). Response: choices[0].logprobs = {tokens, token_logprobs, top_logprobs,
  text_offset}, the prompt's tokens first (token_logprobs[0] null), top_logprobs dicts keyed by token string.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

try:  # httpx comes with the [parity] / [serve] extras; `dsv4 --help` must work without it
    import httpx
except ImportError:  # pragma: no cover - exercised only in a minimal install
    httpx = None

LOGPROB_APIS = ("prompt_logprobs", "sglang_generate", "echo_logprobs")
TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spelling (CompletionRequest docs in protocol.py)


class EndpointError(RuntimeError):
    """Anything that stops a run against an endpoint; the message is one line meant for the operator."""


class EndpointUnsupported(EndpointError):
    """The endpoint answered, but not with what this request needs (4xx/5xx, or a field missing): a probe moves on."""


class TokenizationMismatch(EndpointError):
    """The endpoint's tokens are not the reference's: scoring would compare different sequences."""


@dataclass
class PositionLogprobs:
    """The endpoint's answer at one scored position j: log p(ids[j] | ids[:j]) and its top-k {token id: logprob}."""

    token_id: int
    logprob: float | None
    top: dict[int, float] = field(default_factory=dict)


# -- parsers ----------------------------------------------------------------------------------------------------------
def choice0(body: Any, where: str) -> dict:
    """choices[0] of an OpenAI completions answer."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EndpointUnsupported(f"{where}: response has no choices[0]")
    return choices[0]


def _float(v: Any, where: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise EndpointUnsupported(f"{where}: expected a number, got {v!r}") from None


def _check_ids(got: list[int], ids: list[int], where: str) -> None:
    if got != ids:
        j = next((i for i, (a, b) in enumerate(zip(got, ids, strict=False)) if a != b), min(len(got), len(ids)))
        g = got[j] if j < len(got) else "end"
        w = ids[j] if j < len(ids) else "end"
        raise TokenizationMismatch(f"{where}: the endpoint's token ids differ from the ones sent at position {j} "
                                   f"(sent {w}, got {g}; {len(ids)} sent, {len(got)} back): it re-tokenized the "
                                   "prompt or added special tokens")


def parse_vllm_prompt_logprobs(body: Any, ids: list[int]) -> list[PositionLogprobs]:
    """vLLM /v1/completions with prompt_logprobs: positions 1..len(ids)-1."""
    ch = choice0(body, "prompt_logprobs")
    plp = ch.get("prompt_logprobs", body.get("prompt_logprobs"))  # per choice on completions, top level on chat
    if not isinstance(plp, list):
        raise EndpointUnsupported("prompt_logprobs: the response has no prompt_logprobs list (the server ignored "
                                  "the field)")
    if isinstance(ch.get("prompt_token_ids"), list):
        _check_ids([int(t) for t in ch["prompt_token_ids"]], ids, "prompt_logprobs")
    if len(plp) != len(ids):
        raise TokenizationMismatch(f"prompt_logprobs: {len(plp)} entries for a prompt of {len(ids)} token ids")
    out = []
    for j in range(1, len(ids)):
        entry = plp[j]
        if not isinstance(entry, dict) or not entry:
            raise EndpointUnsupported(f"prompt_logprobs[{j}]: expected a dict of token id -> logprob, got {entry!r}")
        top = {}
        for key, val in entry.items():
            lp = val.get("logprob") if isinstance(val, dict) else val  # {"logprob", "rank", "decoded_token"}
            top[int(key)] = _float(lp, f"prompt_logprobs[{j}][{key}]")
        if ids[j] not in top:
            raise EndpointUnsupported(f"prompt_logprobs[{j}] lacks the prompt's own token {ids[j]} (vLLM always "
                                      "includes it): not vLLM's format")
        out.append(PositionLogprobs(ids[j], top[ids[j]], top))
    return out


def _triple(entry: Any, where: str) -> tuple[float | None, int]:
    if not isinstance(entry, (list, tuple)) or len(entry) < 2:
        raise EndpointUnsupported(f"{where}: expected [logprob, token_id, text], got {entry!r}")
    return (None if entry[0] is None else _float(entry[0], where)), int(entry[1])


def parse_sglang_generate(body: Any, ids: list[int]) -> list[PositionLogprobs]:
    """SGLang /generate with return_logprob: positions 1..len(ids)-1. The entries are aligned by their token ids
    (they cover the last len(entries) input tokens, whatever logprob_start_len the server applied)."""
    if isinstance(body, list) and body:
        body = body[0]
    meta = body.get("meta_info") if isinstance(body, dict) else None
    if not isinstance(meta, dict):
        raise EndpointUnsupported("/generate: response has no meta_info")
    lps, tops = meta.get("input_token_logprobs"), meta.get("input_top_logprobs")
    if not isinstance(lps, list) or not lps:
        raise EndpointUnsupported("/generate: meta_info has no input_token_logprobs")
    if not isinstance(tops, list) or len(tops) != len(lps):
        raise EndpointUnsupported("/generate: meta_info.input_top_logprobs missing or not one per input token")
    triples = [_triple(e, f"input_token_logprobs[{i}]") for i, e in enumerate(lps)]
    start = len(ids) - len(triples)
    if start < 0:
        raise TokenizationMismatch(f"/generate: {len(triples)} input log-probs for {len(ids)} token ids sent")
    _check_ids([t for _, t in triples], ids[start:], "/generate input_token_logprobs")
    out = []
    for i, ((lp, tok), top_entry) in enumerate(zip(triples, tops, strict=True)):
        j = start + i
        if j == 0:
            continue  # nothing predicts the first token
        if lp is None:
            raise EndpointUnsupported(f"/generate: input_token_logprobs[{i}] has no logprob (position {j})")
        top = {}
        for c in top_entry or []:
            clp, cid = _triple(c, f"input_top_logprobs[{i}]")
            if clp is not None:
                top[cid] = clp
        top.setdefault(tok, lp)
        out.append(PositionLogprobs(tok, lp, top))
    if len(out) != len(ids) - 1:
        raise EndpointUnsupported(f"/generate: log-probs cover positions {start}.. only; logprob_start_len ignored?")
    return out


def token_id_of(token: str, lookup: Callable[[str], int | None] | None) -> int | None:
    """A completions-logprobs token string as an id: "token_id:N" (return_tokens_as_token_ids), else `lookup`."""
    if token.startswith(TOKEN_ID_PREFIX):
        try:
            return int(token[len(TOKEN_ID_PREFIX):])
        except ValueError:
            return None
    return lookup(token) if lookup else None


def parse_echo_logprobs(body: Any, ids: list[int],
                        lookup: Callable[[str], int | None] | None = None) -> list[PositionLogprobs]:
    """Completions with echo + logprobs: the first len(ids) entries are the prompt's; positions 1..len(ids)-1.
    Token strings map to ids through "token_id:N" or `lookup` (the reference tokenizer); a top-k entry whose string
    maps to no id (or to a different id than the one sent, for the scored token) is an error or dropped."""
    lp = choice0(body, "echo+logprobs").get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list) or not isinstance(
            lp.get("token_logprobs"), list):
        raise EndpointUnsupported("echo+logprobs: choices[0].logprobs has no tokens/token_logprobs")
    tokens, token_lps, tops = lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs") or []
    if len(tokens) < len(ids):
        raise EndpointUnsupported(f"echo+logprobs: {len(tokens)} tokens back for a prompt of {len(ids)}: the "
                                  "server did not echo the prompt")
    got = [token_id_of(str(t), lookup) for t in tokens[:len(ids)]]
    if any(g is None for g in got):
        bad = next(i for i, g in enumerate(got) if g is None)
        raise EndpointUnsupported(f"echo+logprobs: token {tokens[bad]!r} at position {bad} maps to no token id "
                                  "(the server ignored return_tokens_as_token_ids)")
    _check_ids([int(g) for g in got], ids, "echo+logprobs")
    out = []
    for j in range(1, len(ids)):
        if token_lps[j] is None:
            raise EndpointUnsupported(f"echo+logprobs: token_logprobs[{j}] is null")
        top = {}
        entry = tops[j] if j < len(tops) else None
        for key, val in (entry or {}).items():
            tid = token_id_of(str(key), lookup)
            if tid is not None:
                top[tid] = _float(val, f"top_logprobs[{j}][{key!r}]")
        tok_lp = _float(token_lps[j], f"token_logprobs[{j}]")
        top.setdefault(ids[j], tok_lp)
        out.append(PositionLogprobs(ids[j], tok_lp, top))
    return out


def parse_generated_ids(body: Any, lookup: Callable[[str], int | None] | None = None) -> list[int] | None:
    """Generated token ids of a /v1/completions (or SGLang /generate) answer: vLLM's return_token_ids field, else the
    logprobs tokens ("token_id:N"), else SGLang's output_ids; None when the answer names no ids."""
    if isinstance(body, dict) and isinstance(body.get("output_ids"), list):
        return [int(t) for t in body["output_ids"]]
    ch = choice0(body, "completions")
    if isinstance(ch.get("token_ids"), list):
        return [int(t) for t in ch["token_ids"]]
    lp = ch.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("tokens"), list):
        ids = [token_id_of(str(t), lookup) for t in lp["tokens"]]
        if all(i is not None for i in ids):
            return [int(i) for i in ids]
    return None


# -- HTTP -------------------------------------------------------------------------------------------------------------
def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(resp: httpx.Response) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}}, or FastAPI's {"detail"}), one line."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip().splitlines()[0][:200] if resp.text.strip() else resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err).replace("\n", " ")[:300]
    return str(body)[:300]


class EndpointClient:
    """Requests to one OpenAI-compatible server. `url` is the API base (http://host:port/v1); /tokenize and
    /generate live at the server root (vLLM and SGLang both serve them there). Connection failures, timeouts and 429 /
    503 (honouring Retry-After up to `max_wait` seconds) are retried `retries` times, then raise EndpointError."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3, max_wait: float = 60.0,
                 api_key: str | None = None, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if httpx is None:
            raise EndpointError("dsv4 parity endpoint needs httpx: pip install 'dsv4[parity]'")
        self.url = url.rstrip("/")
        self.root = self.url[:-3] if self.url.endswith("/v1") else self.url
        self.timeout, self.retries, self.max_wait, self.sleep = timeout, max(0, retries), max_wait, sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers, transport=transport)
        self.model: str | None = None

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """JSON of a 2xx answer. `path` starting with "/v1" goes under the API base, else under the server root."""
        url = (self.url + path[3:]) if path.startswith("/v1") else (self.root + path)
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(self.max_wait, 0.5 * 2 ** attempt)
            try:
                resp = self.http.request(method, url, json=body)
            except httpx.ConnectError as e:
                last = f"cannot connect to {url}: {e or type(e).__name__}; is the server running?"
            except httpx.TimeoutException:
                last = f"{url} did not answer within {self.timeout:g} s (--timeout)"
            except httpx.HTTPError as e:
                last = f"{url}: {type(e).__name__}: {e}"
            else:
                if resp.status_code in (429, 503):
                    after = retry_after_seconds(resp.headers.get("Retry-After"))
                    why = "rate limited" if resp.status_code == 429 else "busy"
                    last = (f"{url} answered {resp.status_code} ({why}"
                            f"{f', Retry-After {after:g} s' if after is not None else ''}): {_error_text(resp)}")
                    if after is not None and after > self.max_wait:
                        raise EndpointError(f"{last}; that is beyond --max-wait {self.max_wait:g} s, giving up")
                    wait = after if after is not None else wait
                elif resp.status_code >= 400:
                    raise EndpointUnsupported(f"{method} {url}: HTTP {resp.status_code}: {_error_text(resp)}")
                else:
                    try:
                        return resp.json()
                    except ValueError:
                        raise EndpointUnsupported(f"{method} {url}: answer is not JSON: {resp.text[:120]!r}") from None
            if attempt < self.retries:
                self.sleep(wait)
        raise EndpointError(f"{last} (gave up after {self.retries + 1} tries)")

    # -- models and tokenizer -----------------------------------------------------------------------------------------
    def served_models(self) -> list[str]:
        body = self.request("GET", "/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise EndpointError(f"{self.url}/models: not an OpenAI model list (no 'data'); is --url the /v1 base?")
        return [str(m.get("id")) for m in data if isinstance(m, dict)]

    def resolve_model(self, served: str | None) -> str:
        """The served-model name to put in requests: `served`, which must be listed, or the only model listed."""
        names = self.served_models()
        if served is not None:
            if served not in names:
                raise EndpointError(f"--served-model {served!r} is not served at {self.url}; it serves: "
                                    f"{', '.join(names) or 'nothing'}")
            self.model = served
        elif len(names) == 1:
            self.model = names[0]
        else:
            raise EndpointError(f"{self.url} serves {len(names)} models ({', '.join(names) or 'none'}); "
                                "name one with --served-model")
        return self.model

    def tokenize(self, text: str) -> list[int]:
        """POST /tokenize (vLLM: {"prompt"} -> {"tokens"}; dsv4 serve the same), special tokens left out."""
        body = self.request("POST", "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        toks = body.get("tokens", body.get("token_ids")) if isinstance(body, dict) else None
        if not isinstance(toks, list):
            raise EndpointUnsupported("/tokenize: answer has no 'tokens' list")
        return [int(t) for t in toks]

    # -- log-probs ----------------------------------------------------------------------------------------------------
    def teacher_logprobs(self, api: str, ids: list[int], k: int,
                         lookup: Callable[[str], int | None] | None = None) -> list[PositionLogprobs]:
        """The endpoint's log-probs at positions 1..len(ids)-1 of `ids`, through `api` (one of LOGPROB_APIS)."""
        if api == "prompt_logprobs":
            body = self.request("POST", "/v1/completions", {
                "model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k})
            return parse_vllm_prompt_logprobs(body, ids)
        if api == "sglang_generate":
            body = self.request("POST", "/generate", {
                "input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k})
            return parse_sglang_generate(body, ids)
        if api == "echo_logprobs":
            body = self.request("POST", "/v1/completions", {
                "model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "echo": True,
                "logprobs": k, "return_tokens_as_token_ids": True})
            return parse_echo_logprobs(body, ids, lookup)
        raise ValueError(f"unknown log-prob API {api!r}; choose from {', '.join(LOGPROB_APIS)}")

    def probe_logprob_api(self, ids: list[int], k: int, lookup: Callable[[str], int | None] | None = None,
                          only: str | None = None) -> tuple[str, list[str]]:
        """The first API of LOGPROB_APIS (or `only`) that returns parseable log-probs for a short prompt, and what
        each rejected one said. Connection failures and timeouts end the probe (EndpointError)."""
        tried = []
        probe_ids = ids[: max(2, min(8, len(ids)))]
        for api in [only] if only else LOGPROB_APIS:
            try:
                got = self.teacher_logprobs(api, probe_ids, k, lookup)
            except TokenizationMismatch:
                raise
            except EndpointUnsupported as e:
                tried.append(f"{api}: {e}")
                continue
            if k > 1 and all(len(p.top) <= 1 for p in got):
                tried.append(f"{api}: only the scored token's log-prob came back, no top-{k}")
                continue
            return api, tried
        raise EndpointError("the endpoint returned no usable log-probs (" + "; ".join(tried) + ")")

    def greedy(self, ids: list[int], n: int, api: str,
               lookup: Callable[[str], int | None] | None = None) -> tuple[list[int], str]:
        """The endpoint's own greedy continuation of `ids` (n tokens, eos ignored where the server allows), and its
        finish reason."""
        if api == "sglang_generate":
            body = self.request("POST", "/generate", {
                "input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}})
            got = parse_generated_ids(body)
            reason = str(((body or {}).get("meta_info") or {}).get("finish_reason", "?"))
        else:
            body = self.request("POST", "/v1/completions", {
                "model": self.model, "prompt": ids, "max_tokens": n, "temperature": 0.0, "logprobs": 1,
                "return_token_ids": True, "return_tokens_as_token_ids": True, "ignore_eos": True})
            got = parse_generated_ids(body, lookup)
            reason = str(choice0(body, "completions").get("finish_reason"))
        if got is None:
            raise EndpointUnsupported("greedy completion: the answer names no token ids (no token_ids field and "
                                      "no 'token_id:N' tokens)")
        return got[:n], reason
