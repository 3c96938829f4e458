"""Test doubles for `dsv4 parity endpoint` (tests/test_parity_endpoint*.py): an in-process vLLM-shaped server as an
httpx transport, backed by a real model, so the client, the probing and the metrics run end to end without sockets.
The answers follow the shapes of tests/fixtures/endpoint/*.json (which cite vLLM's and SGLang's sources)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import torch

from dsv4.common.parity.endpoint import reference_greedy


class FakeVLLM:
    """vLLM's routes over `model`: /v1/models, /tokenize, /v1/completions (prompt_logprobs, echo + logprobs with
    return_tokens_as_token_ids, greedy with return_token_ids). `apis` limits which log-prob forms it honours (the
    others are ignored like unknown fields); `script` maps a path to a list of canned (status, headers, body)
    answers served first (for 429s, timeouts: body "TIMEOUT" raises httpx.ReadTimeout)."""

    def __init__(self, model, tokenizer, name: str = "dsv4-tiny", apis: tuple[str, ...] = ("prompt_logprobs", "echo"),
                 max_logprobs: int = 20, tokenize_shift: int = 0, script: dict | None = None,
                 has_tokenize: bool = True) -> None:
        self.model, self.tokenizer, self.name, self.apis = model, tokenizer, name, apis
        self.max_logprobs, self.tokenize_shift, self.script = max_logprobs, tokenize_shift, script or {}
        self.has_tokenize = has_tokenize
        self.calls: list[tuple[str, dict | None]] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(torch.tensor([ids]))[0].float().log_softmax(-1)  # [L, V]; row j predicts ids[j+1]

    def _top(self, row: torch.Tensor, k: int, must: int | None) -> dict[int, float]:
        vals, idx = row.topk(k)
        top = {int(i): float(v) for i, v in zip(idx, vals, strict=True)}
        if must is not None:
            top.setdefault(must, float(row[must]))
        return top

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.calls.append((path, body))
        canned = self.script.get(path)
        if canned:
            status, headers, payload = canned.pop(0)
            if payload == "TIMEOUT":
                raise httpx.ReadTimeout("timed out", request=request)
            return httpx.Response(status, headers=headers, json=payload)
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": self.name, "object": "model"}]})
        if path == "/tokenize" and self.has_tokenize:
            ids = self.encode(body["prompt"], body.get("add_special_tokens", True))
            return httpx.Response(200, json={"count": len(ids), "tokens": ids})
        if path == "/v1/completions":
            return self.completions(body)
        if path == "/generate" and "sglang" in self.apis:
            return self.sglang_generate(body)
        return httpx.Response(404, json={"detail": "Not Found"})

    def sglang_generate(self, body: dict) -> httpx.Response:
        """SGLang's native /generate (shape of tests/fixtures/endpoint/sglang_generate.json)."""
        ids, sp = body["input_ids"], body.get("sampling_params", {})
        gen = reference_greedy(self.model, [ids], max(1, int(sp.get("max_new_tokens", 16))))[0]
        meta: dict = {"prompt_tokens": len(ids), "completion_tokens": len(gen),
                      "finish_reason": {"type": "length", "length": len(gen)}}
        if body.get("return_logprob"):
            lp, k = self._logprobs(ids), int(body.get("top_logprobs_num", 0))
            meta["input_token_logprobs"] = [[None, ids[0], None]] + [
                [float(lp[j - 1, ids[j]]), ids[j], None] for j in range(1, len(ids))]
            meta["input_top_logprobs"] = [None] + [
                [[v, t, None] for t, v in self._top(lp[j - 1], k, None).items()] if k else None
                for j in range(1, len(ids))]
        return httpx.Response(200, json={"text": self.tokenizer.decode(gen), "output_ids": gen, "meta_info": meta})

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """The server's tokenizer: the reference's, shifted by `tokenize_shift` (a different vocabulary)."""
        ids = self.tokenizer.encode(text, add_bos=add_bos)
        return [t + self.tokenize_shift if t != self.tokenizer.bos_id else t for t in ids]

    def _error(self, status: int, message: str) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": message, "type": "BadRequestError", "code": status}})

    def completions(self, body: dict) -> httpx.Response:
        if body.get("model") != self.name:
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        ids = body["prompt"] if isinstance(body["prompt"], list) else self.encode(body["prompt"])
        k = body.get("prompt_logprobs")
        echo_k = body.get("logprobs") if body.get("echo") else None
        for req in (k, body.get("logprobs")):
            if req is not None and req > self.max_logprobs:
                return self._error(400, f"Requested prompt logprobs of {req}, which is greater than max allowed: "
                                        f"{self.max_logprobs}")
        n = max(1, int(body.get("max_tokens", 16)))
        gen = reference_greedy(self.model, [ids], n)[0]
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        choice: dict = {"index": 0, "text": self.tokenizer.decode(gen), "logprobs": None, "finish_reason": "length"}
        if body.get("return_token_ids"):
            choice["token_ids"] = gen
        if k is not None and "prompt_logprobs" in self.apis:
            lp = self._logprobs(ids)
            choice["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": v, "rank": 0, "decoded_token": ""} for t, v in self._top(lp[j - 1], k,
                                                                                              ids[j]).items()}
                for j in range(1, len(ids))]
        spell = (lambda t: f"token_id:{t}") if as_ids else (lambda t: self.tokenizer.tok.id_to_token(t))
        if body.get("logprobs") is not None:
            seq = ids + gen if echo_k is not None and "echo" in self.apis else gen
            off = len(seq) - len(gen)
            lp = self._logprobs(seq)
            kk = max(int(body["logprobs"]), 1)
            tokens, token_lps, tops = [], [], []
            for j, t in enumerate(seq):
                tokens.append(spell(t))
                if j == 0 and off:
                    token_lps.append(None)
                    tops.append(None)
                    continue
                row = lp[j - 1] if j else self._logprobs(ids)[-1]
                token_lps.append(float(row[t]))
                tops.append({spell(a): b for a, b in self._top(row, kk, t).items()})
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                                  "text_offset": list(range(len(seq)))}
        return httpx.Response(200, json={"id": "cmpl-fake", "object": "text_completion", "model": self.name,
                                         "choices": [choice]})


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, ops_factory: Callable | None = None):
    """The embedded tiny model (random weights of `seed`) on the reference ops, or on ops_factory()."""
    from dsv4.common.checkpoint.load import build_random_model
    from dsv4.common.model.config import load_named_config
    from dsv4.common.model.reference import ReferenceOps

    weights = "quantized" if ops_factory else "dequantized"
    return build_random_model(load_named_config("tiny"), ops_factory() if ops_factory else ReferenceOps(),
                              dtype=dtype, seed=seed, weights=weights)
