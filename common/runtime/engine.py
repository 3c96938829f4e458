"""Continuous batching: the scheduler that owns the model and its KV cache (through engine_runner.ModelRunner).

Requests arrive at any time (`add`, thread-safe) and wait in a bounded queue. Each `step`:
  1. drops cancelled requests (their slots are free at once),
  2. admits waiting requests into free cache slots (first come, first served) while the KV block pool can promise
     each its worst case (prompt + max_tokens): a request that does not fit waits at the head of the queue, so a
     running request never runs out of blocks (no preemption, no out-of-memory); blocks themselves are allocated as
     the sequence grows (inside the runner's forwards) and freed when the request ends, however it ends,
  3. decodes every running request by one token in ONE forward, wherever their slots are and whatever their
     positions (speculative requests verify [token, draft] in a second forward of their own),
  4. spends what is left of the step's token budget on prompt chunks, shortest remaining prompt first, so a long
     prompt is prefilled a chunk per step beside the decodes instead of stalling them; a step that prefills short
     prompts leaves the long prompt's chunk out (at most every other step), so a short request's first token costs
     its own prefill plus at most one long chunk (_plan_prefill).
Sampling is per request (its own torch.Generator, seeded), so a request's tokens do not depend on what else is in
the batch. `dsv4 generate` (runtime/generate.py) and `dsv4 serve` (common/serve) both drive this engine.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dsv4.common.model.cache import BLOCK_QUANTUM, ContextLengthError
from dsv4.common.runtime.engine_decode import BATCHED_DECODE_MIN_ROWS
from dsv4.common.runtime.engine_runner import Mirror, ModelRunner
from dsv4.common.runtime.engine_sampling import Detokenizer, filtered_probs
from dsv4.common.runtime.guards import check_logits
from dsv4.common.runtime.prefix_cache import PrefixCacheOptions

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"
WAITING, PREFILL, RUNNING, FINISHED = "waiting", "prefill", "running", "finished"
MAX_LOGPROBS = 20  # vLLM's --max-logprobs default (vllm/config/model.py, see shared/notes/serving.md)
MIN_PREFILL_TOKENS = 16  # prompt tokens per step even when the decodes alone fill the budget: prefills progress


class ParamError(ValueError):
    """A request parameter is out of range; `param` names it (the HTTP layer answers 400 with it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The bounded waiting queue is full (the HTTP layer answers 503 with Retry-After)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None: a random seed
    stop_token_ids: tuple[int, ...] = ()  # in addition to eos (unless ignore_eos)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first match
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N log-probs of each generated token (the sampled one always included)
    prompt_logprobs: int | None = None  # top-N log-probs at every prompt position (vLLM's extension)
    speculative: bool = False  # MTP self-speculative decoding (greedy only)

    def validate(self, max_logprobs: int = MAX_LOGPROBS) -> None:
        if self.max_tokens < 0:
            raise ParamError("max_tokens", f"max_tokens must be >= 0, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # NaN fails every comparison
            raise ParamError("temperature", f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ParamError("top_k", f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= max_logprobs:
                # vLLM's wording (vllm/sampling_params.py): "Requested sample logprobs of N, which is greater ..."
                raise ParamError(name, f"requested {name} of {n}, which is outside [0, max allowed: {max_logprobs}]")
        if self.speculative and self.temperature > 0:
            raise ParamError("speculative", "speculative decoding is implemented for greedy decoding only "
                                            "(temperature 0)")
        if self.speculative and (self.logprobs is not None or self.stop):
            raise ParamError("speculative", "speculative decoding does not return logprobs or check stop strings "
                                            "(a verify step emits two tokens at once); drop one of them")


@dataclass
class Logprobs:
    """log_softmax of the raw logits (before temperature/top-k/top-p, as vLLM reports them)."""
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # best first


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # first token to the end
    forwards: int = 0  # decode forwards that included this request
    drafted: int = 0  # speculative: drafts verified
    accepted: int = 0  # speculative: drafts the main model agreed with
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class Event:
    request: Request
    token_id: int | None  # None: the request ended without a new token (stop token, cancel, error)
    text: str  # new text ("" without a tokenizer, inside a multi-byte character or a possible stop string)
    logprobs: Logprobs | None
    finished: bool


class Request:
    def __init__(self, prompt: list[int], params: SamplingParams, request_id: str = "",
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.prompt, self.params, self.id, self.on_event = list(prompt), params, request_id, on_event
        self.status = WAITING
        self.slot: int | None = None
        self.n_fed = 0  # prompt tokens in the cache
        self.snapshot_at: list[int] = []  # prefix cache: prompt positions where its state is registered
        self.cur = 0  # the last emitted token, not yet fed
        self.output: list[int] = []
        self.output_logprobs: list[Logprobs] = []
        self.prompt_logprobs: list[Logprobs | None] = []  # [0] is None: nothing predicts the first token
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.error: str | None = None
        self.exception: BaseException | None = None  # what failed it (offline callers re-raise its kind)
        self.cancelled = False
        self.stats = RequestStats(prompt_tokens=len(prompt))
        self.generator: torch.Generator | None = None
        self.detok = None
        self.text, self.sent = "", 0  # generated text so far; how much of it was sent (stop strings hold back)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


class Engine:
    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 256,
                 step_tokens: int | None = None, max_waiting: int = 64, tokenizer=None,
                 mirror: Mirror | None = None, max_logprobs: int = MAX_LOGPROBS,
                 long_prefill_chunk: int | None = None, compile_decode: str | None = None,
                 compile_batch_sizes: tuple[int, ...] = (1, 2, 4, 8), block_tokens: int = BLOCK_QUANTUM,
                 kv_blocks: int | None = None, prefix_cache: PrefixCacheOptions | None = None,
                 batched_decode_min_rows: int | None = BATCHED_DECODE_MIN_ROWS) -> None:
        """max_batch: cache slots (requests running at once); step_tokens: tokens per step, decodes first, the rest
        for prompt chunks of at most prefill_chunk (default: prefill_chunk + max_batch). long_prefill_chunk: the
        chunk per step of a prompt longer than prefill_chunk (default prefill_chunk); smaller keeps the steps short
        while a long prompt prefills, so short requests arriving meanwhile wait less (vLLM calls the same idea
        long_prefill_token_threshold), at the cost of more steps for the long prompt. compile_decode: run plain
        decode steps through the captured static-shape step in that capture mode (runtime/static_decode.py) when
        the batch fits one of compile_batch_sizes; eager otherwise. block_tokens / kv_blocks: the KV block pool
        (tokens per block, blocks in all; default: max_seq_len tokens for every slot). prefix_cache: reuse the
        cached blocks of earlier prompts (runtime/prefix_cache.py); a prompt's chunks then end at its snapshot
        boundaries. batched_decode_min_rows: without compile_decode, plain decode steps of at least this many rows
        feed every row's compressors at once (engine_decode.py; None: always the eager forward, which groups rows
        by position)."""
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        if batched_decode_min_rows is not None and batched_decode_min_rows < 1:
            raise ValueError(f"batched_decode_min_rows must be >= 1 (None = off), got {batched_decode_min_rows}")
        self.model, self.args, self.tokenizer = model, model.args, tokenizer
        self.max_seq_len = max_seq_len or model.args.max_seq_len
        self.prefill_chunk, self.max_waiting, self.max_logprobs = prefill_chunk, max_waiting, max_logprobs
        self.step_tokens = step_tokens or prefill_chunk + max_batch
        self.long_prefill_chunk = min(long_prefill_chunk or prefill_chunk, prefill_chunk)
        self.runner = ModelRunner(model, max_batch, self.max_seq_len, mirror, compile_decode, compile_batch_sizes,
                                  block_tokens, kv_blocks, prefix_cache, batched_decode_min_rows)
        self.prefix_cache = prefix_cache
        self.block_tokens, self.n_blocks = block_tokens, self.runner.n_blocks
        self.reserved: dict[int, int] = {}  # slot -> KV blocks promised to its request (its worst case)
        self.reserved_blocks = 0  # their sum (an int: /metrics reads it from the HTTP thread)
        self.device = self.runner.device
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()  # guards `waiting` (add runs on the HTTP thread, step on the engine's)
        self.active: list[Request] = []  # admitted, in admission order
        self.free = list(range(max_batch))
        self._events: list[Event] = []
        self._long_yielded = False  # the last step's long prompts yielded to short ones (see _plan_prefill)
        self.on_forward: Callable[[], None] | None = None  # called after each forward of a step (see _forward_done)

    # -- intake --------------------------------------------------------------------------------------------------------
    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Everything that can be wrong with a request, before it costs anything."""
        params.validate(self.max_logprobs)
        V = self.args.vocab_size
        if not prompt:
            raise ParamError("prompt", "the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ParamError("prompt", f"token ids outside [0, {V}): {bad[:5]}")
        need = len(prompt) + params.max_tokens
        if need > self.max_seq_len:
            raise ContextLengthError(
                f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} = {need} exceeds "
                f"max_seq_len={self.max_seq_len} (shorten the prompt, lower max_tokens or raise --max-seq-len up to "
                f"{self.args.max_position_embeddings})")
        blocks = self.blocks_for(len(prompt), params.max_tokens)
        if blocks > self.n_blocks:
            raise ContextLengthError(
                f"{need} tokens need {blocks} KV blocks of {self.block_tokens} tokens, the pool has {self.n_blocks} "
                f"(raise --kv-blocks or lower max_tokens)")
        if params.speculative and not self.args.n_mtp_layers:
            raise ParamError("speculative", "speculative decoding needs the MTP layer (n_mtp_layers = 1)")
        bad = [t for t in params.stop_token_ids if not 0 <= t < V]
        if bad:
            raise ParamError("stop_token_ids", f"--stop: token id(s) {bad} outside the vocabulary [0, {V})")

    def add(self, req: Request) -> Request:
        self.check(req.prompt, req.params)
        p = req.params
        if p.temperature > 0:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(p.seed if p.seed is not None else random.getrandbits(63))
        if self.tokenizer is not None:
            req.detok = Detokenizer(self.tokenizer)
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests)")
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Thread-safe: the request leaves at the start of the next step and its slot is free."""
        req.cancelled = True

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.active)

    def blocks_for(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV blocks a request may fill: every position it can feed (prompt + max_tokens bounds them)."""
        return -(-(prompt_tokens + max_tokens) // self.block_tokens)

    def pool_stats(self) -> dict[str, int]:
        """The KV block pool: blocks in all, allocated, free, and promised to running requests. Blocks only the
        prefix cache holds count as free (the allocator takes them back when its free list runs short)."""
        used, cached = self.runner.blocks_used(), self.runner.blocks_cached_only()
        return {"blocks_total": self.n_blocks, "blocks_used": used, "blocks_free": self.n_blocks - used + cached,
                "blocks_reserved": self.reserved_blocks, "block_tokens": self.block_tokens}

    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    # -- one step ------------------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        self._events = []
        for r in [r for r in self.active if r.cancelled]:
            self._finish(r, FINISH_ABORT)
        self._admit()
        running = [r for r in self.active if r.status == RUNNING]
        # a 2-token verify must not run past the length budget: a request's last token is a plain step
        spec = [r for r in running if r.params.speculative and r.params.max_tokens - len(r.output) >= 2]
        plain = [r for r in running if r not in spec]
        if plain:
            self._guarded(plain, self._decode)
        if spec:
            self._guarded(spec, self._decode_speculative)
        if plain or spec:
            self._forward_done()
        budget = max(self.step_tokens - len(plain) - 2 * len(spec), MIN_PREFILL_TOKENS)
        for (n, spec), reqs in self._plan_prefill(budget).items():  # one length: one forward (speculative: one each)
            for group in ([[r] for r in reqs] if spec else [reqs]):
                self._guarded(group, lambda rs, n=n: self._prefill(rs, n))
                self._forward_done()
        return self._events

    def _plan_prefill(self, budget: int) -> dict[tuple[int, bool], list[Request]]:
        """This step's prompt chunks, {(chunk length, speculative): requests}, within `budget` tokens.
        Shortest remaining prompt first: a short request's only chunk runs (and its first token goes out) this step.
        A long prompt (longer than prefill_chunk) takes long_prefill_chunk tokens of what is left, but yields the
        step to short prompts that prefill in it, never two steps running: the step that carries a short request's
        prefill then costs that prefill alone, so the short request waits at most one long chunk (the step that was
        running when it arrived), and the long prompt still advances at least every other step."""
        order = sorted((r for r in self.active if r.status == PREFILL), key=lambda r: len(r.prompt) - r.n_fed)
        short = [r for r in order if len(r.prompt) <= self.prefill_chunk]
        long = [r for r in order if len(r.prompt) > self.prefill_chunk]
        yielding = bool(short and long) and not self._long_yielded
        self._long_yielded = yielding
        chunks: dict[tuple[int, bool], list[Request]] = {}
        for r in short + ([] if yielding else long):
            if budget <= 0:
                break
            chunk = self.long_prefill_chunk if len(r.prompt) > self.prefill_chunk else self.prefill_chunk
            n = min(budget, chunk, len(r.prompt) - r.n_fed)
            ahead = [b for b in r.snapshot_at if b > r.n_fed]
            if ahead:  # a chunk ends at the next snapshot boundary, where the state is registered
                n = min(n, ahead[0] - r.n_fed)
            chunks.setdefault((n, r.params.speculative), []).append(r)
            budget -= n
        return chunks

    def _forward_done(self) -> None:
        """After each forward of a step: hand its events on at once (on_forward, e.g. the server's one wake-up of
        the HTTP side per forward instead of one per token)."""
        if self.on_forward is not None:
            self.on_forward()

    def _admit(self) -> None:
        admitted = []
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]  # cancelled before they had a slot
            if gone:
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
            while self.waiting and self.free:
                r = self.waiting[0]
                need = self.blocks_for(len(r.prompt), r.params.max_tokens)
                if self.reserved_blocks + need > self.n_blocks:
                    break  # first come, first served: it waits for blocks, and so do those behind it
                self.waiting.popleft()
                self.free.sort()  # lowest slots first: running slots stay contiguous more often (one slice)
                r.slot = self.free.pop(0)
                self.reserved[r.slot] = need
                self.reserved_blocks += need
                r.status = PREFILL
                self.active.append(r)
                self.runner.reset(r.slot)
                admitted.append(r)
        for r in gone:
            r.status, r.finish_reason = FINISHED, FINISH_ABORT
            self._event(r, None, "", None)
        if self.prefix_cache is not None:
            for r in admitted:
                self._guarded([r], self._use_prefix)

    def _use_prefix(self, reqs: list[Request]) -> None:
        """Resume the prompt at its longest cached prefix; plan where its state is registered. A request that
        asks for prompt logprobs is prefilled whole (the cached positions have no logits to report)."""
        r, shared = reqs[0], 0
        if r.params.prompt_logprobs is None:
            r.n_fed, shared = self.runner.use_prefix(r.slot, r.prompt, r.params.speculative)
            r.stats.cached_tokens = r.n_fed
        r.snapshot_at = [b for b in self.runner.prefix.boundaries(len(r.prompt), shared) if b > r.n_fed]

    def _guarded(self, reqs: list[Request], fn: Callable[[list[Request]], None]) -> None:
        """A failure fails the requests of that forward only; the engine carries on with the others."""
        try:
            fn(reqs)
        except Exception as e:  # noqa: BLE001  reported to the request's client
            for r in reqs:
                if not r.finished:
                    r.error, r.exception = f"{type(e).__name__}: {e}", e
                    self._finish(r, FINISH_ERROR)

    # -- prefill and decode --------------------------------------------------------------------------------------------
    def _prefill(self, reqs: list[Request], n: int) -> None:
        """The next n prompt tokens of each request, in one forward (rows may start at different positions)."""
        t0 = time.perf_counter()
        if reqs[0].params.speculative:  # alone: the MTP layer's cache is fed beside the main one
            r = reqs[0]
            logits = self.runner.prefill_speculative(r.slot, r.prompt[r.n_fed:r.n_fed + n], r.n_fed)
        else:
            logits = self.runner.forward([r.prompt[r.n_fed:r.n_fed + n] for r in reqs], [r.slot for r in reqs])
        dt = time.perf_counter() - t0
        for r, rows in zip(reqs, logits, strict=True):  # rows [n,V]
            r.stats.prefill_s += dt
            self._guarded([r], lambda _, r=r, rows=rows: self._after_chunk(r, rows, n))  # a row fails alone

    def _after_chunk(self, r: Request, logits: Tensor, n: int) -> None:
        c0 = r.n_fed
        if r.params.prompt_logprobs is not None:
            if c0 == 0:
                r.prompt_logprobs.append(None)
            targets = r.prompt[c0 + 1:c0 + n + 1]  # row j predicts prompt token c0 + j + 1
            r.prompt_logprobs += self._logprobs(logits[:len(targets)], targets, r.params.prompt_logprobs)
        r.n_fed += n
        if r.n_fed in r.snapshot_at:
            self.runner.register_prefix(r.slot, r.prompt[:r.n_fed], r.params.speculative)
        if r.n_fed < len(r.prompt):
            return
        r.status = RUNNING
        if r.params.max_tokens == 0:  # scoring only (prompt_logprobs / echo)
            self._finish(r, FINISH_LENGTH)
            return
        tok = self._take(r, logits[-1], int(logits[-1].argmax()))
        if r.params.speculative and not r.finished:
            self.runner.first_draft(r.slot, tok, len(r.prompt))

    def _decode(self, reqs: list[Request]) -> None:
        logits = self.runner.forward([[r.cur] for r in reqs], [r.slot for r in reqs])[:, -1]  # [B,V]
        best = logits.argmax(-1).tolist()
        for i, r in enumerate(reqs):
            r.stats.forwards += 1
            self._guarded([r], lambda _, i=i, r=r: self._take(r, logits[i], best[i]))  # a row fails alone

    def _decode_speculative(self, reqs: list[Request]) -> None:
        g, acc = self.runner.spec_step([r.slot for r in reqs], [r.cur for r in reqs])
        for r, (g1, g2), ok in zip(reqs, g, acc, strict=True):
            st = r.stats
            st.forwards += 1
            st.drafted += 1
            st.accepted += int(ok)
            self._emit(r, g1, None)
            if ok and not r.finished:
                self._emit(r, g2, None)

    # -- sampling ------------------------------------------------------------------------------------------------------
    def _take(self, r: Request, row: Tensor, best: int) -> int:
        """Choose r's next token from its logits row [V] (best = the row's argmax), with its logprobs; emit it.
        Non-finite logits fail the request, naming the first layer that produced them (in one process: the replay
        that finds it would need every rank's collectives)."""
        model = self.runner.model if self.runner.mirror is None else None
        check_logits(row[None], model, lambda _: r.prompt[:r.n_fed] + r.output)
        tok = self._sample(r, row, best)
        lp = self._logprobs(row[None], [tok], r.params.logprobs)[0] if r.params.logprobs is not None else None
        self._emit(r, tok, lp)
        return tok

    def _sample(self, r: Request, row: Tensor, best: int) -> int:
        """argmax for a greedy request, else a draw from its filtered distribution with its own generator."""
        p = r.params
        if p.temperature <= 0:
            return best
        probs = filtered_probs(row[None], p.temperature, p.top_k, p.top_p)[0]
        return int(torch.multinomial(probs, 1, generator=r.generator))

    @staticmethod
    def _logprobs(logits: Tensor, targets: list[int], k: int) -> list[Logprobs]:
        """For rows of logits [T,V] and their target ids: the target's log-prob and the top-k."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
        chosen = lp.gather(-1, torch.tensor(targets, device=lp.device)[:, None])  # [T,1]
        ranks = ((lp > chosen).sum(-1) + 1).tolist()
        return [Logprobs(t, c, rk, list(zip(ids, vals, strict=True)))
                for t, c, rk, ids, vals in zip(targets, chosen[:, 0].tolist(), ranks, top_i.tolist(), top_v.tolist(),
                                               strict=True)]

    # -- emitting ------------------------------------------------------------------------------------------------------
    def _emit(self, r: Request, tok: int, lp: Logprobs | None) -> None:
        p = r.params
        now = time.perf_counter()
        if tok in p.stop_token_ids or (tok == self.args.eos_token_id and not p.ignore_eos):
            r.stop_reason = tok
            self._finish(r, FINISH_STOP)
            return
        r.output.append(tok)
        if lp is not None:
            r.output_logprobs.append(lp)
        r.cur = tok
        st = r.stats
        st.new_tokens += 1
        st.token_times.append(now)
        if st.first_token_at is None:
            st.first_token_at = now
        last = len(r.output) >= p.max_tokens
        text, stopped = self._text(r, tok, last)
        if stopped or last:
            self._finish(r, FINISH_STOP if stopped else FINISH_LENGTH, tok, text, lp)
        else:
            self._event(r, tok, text, lp)

    def _text(self, r: Request, tok: int, last: bool) -> tuple[str, bool]:
        """The text this token releases, and whether a stop string ended the request. Text that might be the
        start of a stop string is held back until the next token settles it."""
        if r.detok is None:
            return "", False
        r.text += r.detok.push(tok) + (r.detok.flush() if last else "")
        stops = r.params.stop
        for s in stops:
            at = r.text.find(s, max(0, r.sent - len(s) + 1))
            if at >= 0:
                r.stop_reason = s
                r.text = r.text[:at]
                piece, r.sent = r.text[r.sent:], at
                return piece, True
        hold = 0
        if not last:
            for s in stops:
                hold = max(hold, max((k for k in range(1, len(s)) if r.text.endswith(s[:k])), default=0))
        end = max(len(r.text) - hold, r.sent)
        piece, r.sent = r.text[r.sent:end], end
        return piece, False

    def _finish(self, r: Request, reason: str, tok: int | None = None, text: str = "",
                lp: Logprobs | None = None) -> None:
        if r.sent < len(r.text):  # text held back for a stop string that never came
            text += r.text[r.sent:]
            r.sent = len(r.text)
        r.status, r.finish_reason = FINISHED, reason
        st = r.stats
        if st.first_token_at is not None:
            st.decode_s = time.perf_counter() - st.first_token_at
        if r in self.active:
            self.active.remove(r)
            self.runner.release(r.slot)  # its blocks back to the pool (every rank's: a mirrored call)
            self.reserved_blocks -= self.reserved.pop(r.slot, 0)
            self.free.append(r.slot)
        self._event(r, tok, text, lp)

    def _event(self, r: Request, tok: int | None, text: str, lp: Logprobs | None) -> None:
        ev = Event(r, tok, text, lp, r.finished)
        self._events.append(ev)
        if r.on_event is not None:
            r.on_event(ev)

    # -- driving -------------------------------------------------------------------------------------------------------
    def run_until_idle(self):
        """Offline use: step until every request has finished, yielding events as they come."""
        while self.has_work():
            yield from self.step()

    @property
    def prefix_stats(self):
        """The prefix cache's hit/miss counters (PrefixStats), None when it is off or not built yet (read from other
        threads too: this never builds the cache)."""
        pc = self.runner.built_prefix
        return None if pc is None else pc.stats

    @property
    def prefix_cache_bytes(self) -> int:
        pc = self.runner.built_prefix
        return 0 if pc is None else pc.nbytes

    def load_prefix_cache(self) -> int:
        """Read the persisted prefix cache (options.path) when the file exists; returns the entries loaded. Raises
        PrefixCacheFileError for a file of another model or a modified one."""
        return self.runner.load_prefix()

    def save_prefix_cache(self) -> int:
        """Write the prefix cache to options.path (rank 0); returns the entries written (0 when off)."""
        return self.runner.save_prefix()

    def close(self) -> None:
        """Release the other ranks from `follow()` (multi-rank serving)."""
        self.runner.stop_followers()


__all__ = ["Engine", "Event", "Logprobs", "ParamError", "QueueFull", "Request", "RequestStats", "SamplingParams",
           "FINISH_STOP", "FINISH_LENGTH", "FINISH_ABORT", "FINISH_ERROR"]
