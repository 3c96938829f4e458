"""The HTTP side of `dsv4 serve`: OpenAI-compatible routes (FastAPI) over the continuous-batching engine.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics (Prometheus),
POST /tokenize, POST /detokenize. Streaming is server-sent events: `data: {json}` chunks, then `data: [DONE]`
(vLLM's and OpenAI's framing). Errors are OpenAI-shaped JSON (protocol.APIError) with the status that says why:
400 naming the parameter, 413 for a body over the limit, 503 + Retry-After when the waiting queue is full or the
server is draining. A request that fails inside the engine fails alone (500 or an error event in its stream).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from dsv4.common.model.cache import ContextLengthError
from dsv4.common.runtime.engine import (
    FINISH_ABORT,
    FINISH_ERROR,
    Engine,
    Event,
    Logprobs,
    ParamError,
    QueueFull,
    Request,
    SamplingParams,
)
from dsv4.common.serve.loop import EngineLoop
from dsv4.common.serve.metrics import Metrics
from dsv4.common.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

MAX_N = 16  # choices per request
RETRY_AFTER_S = 1


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes (by Content-Length, or counted as it streams)."""

    def __init__(self, app, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                return await self._too_large(send)
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read the body here, up to the limit, and hand it on in one piece
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, receive, send)
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        self.metrics.rejected(413)
        err = APIError(413, f"request body exceeds the limit of {self.limit} bytes (--max-body-bytes)", "body")
        await JSONResponse(err.body(), status_code=413)({"type": "http"}, None, send)


class Server:
    """The routes' shared state: engine loop, tokenizer, served model name, metrics."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, speculative: bool = False) -> None:
        self.engine, self.tokenizer, self.model_name, self.speculative = engine, tokenizer, model_name, speculative
        self.metrics = Metrics(engine)
        self.loop = EngineLoop(engine, self.metrics)
        self.draining = False

    # -- request building ----------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(400, f"model {name!r} is not served here; this server serves {self.model_name!r} "
                                f"(GET /v1/models)", "model", code="model_not_found")

    def prompts(self, prompt) -> list[list[int]]:
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise APIError(400, "prompt is empty", "prompt")
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in items]

    def params(self, body, max_tokens: int | None, logprobs: int | None, prompt_len: int, j: int,
               prompt_logprobs: int | None) -> SamplingParams:
        if max_tokens is None:  # chat without a limit: the rest of the context, as vLLM does
            max_tokens = max(self.engine.max_seq_len - prompt_len, 0)
        greedy = body.temperature == 0
        spec = self.speculative and greedy and logprobs is None and not body.stop_list()
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
            seed=None if body.seed is None else body.seed + j,  # choice j of n draws with seed + j
            stop_token_ids=tuple(body.stop_token_ids or ()), stop=tuple(body.stop_list()),
            ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs, speculative=spec)

    def submit(self, prompts: list[list[int]], body, max_tokens, logprobs, prompt_logprobs,
               queue: asyncio.Queue) -> list[Request]:
        """One engine request per (prompt, choice); tag = prompt index * n + choice. All or none are queued."""
        if self.draining:
            raise APIError(503, "the server is shutting down", None, headers={"Retry-After": str(RETRY_AFTER_S)})
        if not 1 <= body.n <= MAX_N:
            raise APIError(400, f"n must be in [1, {MAX_N}], got {body.n}", "n")
        if body.stream and prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is not available with stream=true", "prompt_logprobs")
        loop = asyncio.get_running_loop()
        reqs: list[Request] = []
        try:
            for i, p in enumerate(prompts):
                for j in range(body.n):
                    params = self.params(body, max_tokens, logprobs, len(p), j, prompt_logprobs)
                    reqs.append(self.loop.submit(p, params, loop, queue, i * body.n + j))
        except (ParamError, ContextLengthError, QueueFull) as e:
            for r in reqs:
                self.loop.cancel(r)
            raise self._api_error(e, prompts) from None
        return reqs

    def _api_error(self, e: Exception, prompts: list[list[int]]) -> APIError:
        if isinstance(e, QueueFull):
            return APIError(503, f"{e}; retry later", None, headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(e, ContextLengthError):
            too_long = any(len(p) >= self.engine.max_seq_len for p in prompts)
            return APIError(400, str(e), "prompt" if too_long else "max_tokens", code="context_length_exceeded")
        return APIError(400, str(e), e.param)

    # -- token spelling ------------------------------------------------------------------------------------------------
    def token_str(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self.tokenizer.tok.decode([tid], skip_special_tokens=False)

    def completion_logprobs(self, lps: list[Logprobs | None], as_ids: bool, offset0: int = 0,
                            ids: list[int] | None = None) -> dict[str, Any]:
        """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        off = offset0
        for i, lp in enumerate(lps):
            tid = lp.token_id if lp is not None else ids[i]
            s = self.token_str(tid, as_ids)
            out["tokens"].append(s)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            top = None
            if lp is not None:  # the chosen token is always included: up to N + 1 entries (vLLM)
                top = {self.token_str(t, as_ids): v for t, v in lp.top}
                top.setdefault(s, lp.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(off)
            off += len(s)
        return out

    def chat_logprobs(self, lps: list[Logprobs], as_ids: bool) -> dict[str, Any]:
        def entry(tid: int, v: float) -> dict[str, Any]:
            s = self.token_str(tid, as_ids)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    def prompt_logprobs(self, req: Request, k: int, as_ids: bool) -> list[dict[str, Any] | None]:
        """vLLM's shape: per prompt position {token_id: {logprob, rank, decoded_token}} (top k + the prompt token)."""
        out: list[dict[str, Any] | None] = []
        for lp in req.prompt_logprobs:
            if lp is None:
                out.append(None)
                continue
            d = {str(t): {"logprob": v, "rank": i + 1, "decoded_token": self.token_str(t, as_ids)}
                 for i, (t, v) in enumerate(lp.top[:k])}
            d.setdefault(str(lp.token_id), {"logprob": lp.logprob, "rank": lp.rank,
                                            "decoded_token": self.token_str(lp.token_id, as_ids)})
            out.append(d)
        return out


def usage(reqs: list[Request], n: int) -> dict[str, int]:
    prompt = sum(r.stats.prompt_tokens for r in reqs[::n])  # each prompt counted once, whatever n
    completion = sum(r.stats.new_tokens for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def failure(req: Request) -> APIError | None:
    if req.finish_reason == FINISH_ERROR:
        return APIError(500, f"the request failed in the engine: {req.error}", None, type_="server_error")
    if req.finish_reason == FINISH_ABORT:
        return APIError(503, "the request was aborted (server shutting down)", None,
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    return None


async def collect(server: Server, raw: HTTPRequest, reqs: list[Request], queue: asyncio.Queue) -> dict[int, str]:
    """Wait for every request to finish (cancelling them all if the client goes away); the text of each tag. A
    request that failed in the engine fails the response: its APIError (the first such request's) is raised."""
    texts = {i: "" for i in range(len(reqs))}
    left = len(reqs)
    try:
        while left:
            try:
                tag, ev = await asyncio.wait_for(queue.get(), 0.25)
            except TimeoutError:
                if await raw.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            texts[tag] += ev.text
            left -= ev.finished
    finally:
        for r in reqs:
            server.loop.cancel(r)  # no-op for finished ones
    for r in reqs:
        err = failure(r)
        if err is not None:
            raise err
    return texts


async def events(server: Server, reqs: list[Request], queue: asyncio.Queue) -> AsyncIterator[tuple[int, Event]]:
    left = len(reqs)
    try:
        while left:
            tag, ev = await queue.get()
            left -= ev.finished
            yield tag, ev
    finally:  # also when the client disconnects mid-stream: its slots are freed at the next step
        for r in reqs:
            server.loop.cancel(r)


def sse(obj: dict[str, Any] | str) -> str:
    import json

    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def stream_response(server: Server, reqs: list[Request], queue: asyncio.Queue, body: Any, head: dict[str, Any],
                    choice_of: Callable[[int, Event], dict[str, Any]], first: Sequence[dict[str, Any]] = ()
                    ) -> StreamingResponse:
    """The SSE stream of a completion or chat request: the `first` choices, then one chunk per event (its choice
    from choice_of; a failed request's error body instead), usage when stream_options asks, then [DONE]."""
    async def gen() -> AsyncIterator[str]:
        for choice in first:
            yield sse({**head, "choices": [choice]})
        async for tag, ev in events(server, reqs, queue):
            err = failure(ev.request) if ev.finished else None
            if err is not None:
                yield sse(err.body())
                continue
            yield sse({**head, "choices": [choice_of(tag, ev)]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage(reqs, body.n)})
        yield sse("[DONE]")

    return StreamingResponse(gen(), media_type="text/event-stream")


def create_app(server: Server, max_body_bytes: int = 1 << 20) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        yield
        server.draining = True
        await asyncio.get_running_loop().run_in_executor(None, server.loop.stop)

    app = FastAPI(title="dsv4 serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        server.metrics.rejected(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):  # a bug in a route: the client gets an OpenAI-shaped 500, the server lives
        return await api_error(_, APIError(500, f"internal error: {type(e).__name__}: {e}", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        errs = e.errors()
        loc = [str(x) for x in errs[0].get("loc", ()) if x != "body"] if errs else []
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: {er.get('msg')}"
                        for er in errs[:3])
        return await api_error(_, APIError(400, msg or "invalid request", loc[0] if loc else None))

    @app.get("/health")
    async def health():
        if server.loop.failed or not server.loop.thread.is_alive():
            return JSONResponse({"status": "unhealthy", "reason": server.loop.failed or "engine stopped"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "dsv4", "max_model_len": server.engine.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        server.check_model(body.model)
        if body.messages is not None:
            ids = server.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        elif body.prompt is not None:
            ids = server.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        server.check_model(body.model)
        V = server.engine.args.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < V]
        if bad:
            raise APIError(400, f"token ids outside [0, {V}): {bad[:5]}", "tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: HTTPRequest):
        server.check_model(body.model)
        prompts = server.prompts(body.prompt)
        want_prompt_lp = body.prompt_logprobs
        if body.echo and body.logprobs is not None:  # echoed tokens carry log-probs too (vLLM does the same)
            want_prompt_lp = max(want_prompt_lp or 0, body.logprobs)
        if want_prompt_lp is not None and body.prompt_logprobs is None and body.stream:
            raise APIError(400, "echo with logprobs is not available with stream=true", "echo")
        queue: asyncio.Queue = asyncio.Queue()
        reqs = server.submit(prompts, body, body.max_tokens, body.logprobs, want_prompt_lp, queue)
        rid, created, as_ids = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.return_tokens_as_token_ids
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}

        def echo_text(tag: int) -> str:
            return server.tokenizer.decode(prompts[tag // body.n]) if body.echo else ""

        if body.stream:
            started = set()
            offsets = {tag: len(echo_text(tag)) for tag in range(len(reqs))}

            def choice_of(tag: int, ev: Event) -> dict[str, Any]:
                text = ev.text
                if tag not in started:
                    started.add(tag)
                    text = echo_text(tag) + text
                choice = {"index": tag, "text": text, "logprobs": None,
                          "finish_reason": ev.request.finish_reason if ev.finished else None}
                if ev.finished:
                    choice["stop_reason"] = ev.request.stop_reason
                if ev.logprobs is not None:
                    choice["logprobs"] = server.completion_logprobs([ev.logprobs], as_ids, offsets[tag])
                    offsets[tag] += len(text)
                return choice

            return stream_response(server, reqs, queue, body, head, choice_of)

        texts = await collect(server, raw, reqs, queue)
        choices = []
        for tag, r in enumerate(reqs):
            echo = echo_text(tag)
            c: dict[str, Any] = {"index": tag, "text": echo + texts[tag], "logprobs": None,
                                 "finish_reason": r.finish_reason, "stop_reason": r.stop_reason}
            if body.logprobs is not None:
                lps: list = list(r.output_logprobs)
                ids = list(r.output)
                if body.echo:
                    lps = [None if lp is None else _trim(lp, body.logprobs) for lp in r.prompt_logprobs] + lps
                    ids = r.prompt + ids
                c["logprobs"] = server.completion_logprobs(lps, as_ids, 0, ids)
            if body.prompt_logprobs is not None:
                c["prompt_logprobs"] = server.prompt_logprobs(r, body.prompt_logprobs, as_ids)
            choices.append(c)
        return {**head, "choices": choices, "usage": usage(reqs, body.n)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: HTTPRequest):
        server.check_model(body.model)
        try:
            ids = server.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        except Exception as e:  # noqa: BLE001  a template that cannot render these messages
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        top = body.top_logprobs or 0
        if body.logprobs and not 0 <= top <= server.engine.max_logprobs:
            raise APIError(400, f"top_logprobs must be in [0, {server.engine.max_logprobs}], got {top}",
                           "top_logprobs")
        queue: asyncio.Queue = asyncio.Queue()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        reqs = server.submit([ids], body, max_tokens, top if body.logprobs else None, body.prompt_logprobs, queue)
        rid, created, as_ids = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.return_tokens_as_token_ids

        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}

            def choice_of(tag: int, ev: Event) -> dict[str, Any]:
                choice = {"index": tag, "delta": {"content": ev.text} if ev.text or not ev.finished else {},
                          "logprobs": None, "finish_reason": ev.request.finish_reason if ev.finished else None}
                if ev.logprobs is not None:
                    choice["logprobs"] = server.chat_logprobs([ev.logprobs], as_ids)
                return choice

            # the role comes first, as OpenAI streams it
            roles = [{"index": tag, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for tag in range(len(reqs))]
            return stream_response(server, reqs, queue, body, head, choice_of, roles)

        texts = await collect(server, raw, reqs, queue)
        choices = []
        for tag, r in enumerate(reqs):
            c: dict[str, Any] = {"index": tag, "message": {"role": "assistant", "content": texts[tag]},
                                 "logprobs": server.chat_logprobs(r.output_logprobs, as_ids) if body.logprobs else None,
                                 "finish_reason": r.finish_reason, "stop_reason": r.stop_reason}
            choices.append(c)
        out = {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
               "choices": choices, "usage": usage(reqs, body.n)}
        if body.prompt_logprobs is not None:
            out["prompt_logprobs"] = server.prompt_logprobs(reqs[0], body.prompt_logprobs, as_ids)
        return out

    return BodyLimit(app, max_body_bytes, server.metrics)


def _trim(lp: Logprobs, k: int) -> Logprobs:
    return Logprobs(lp.token_id, lp.logprob, lp.rank, lp.top[:k])
