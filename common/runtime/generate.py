"""Text generation on the one model graph and its explicit KV cache (common/model.py, common/cache.py).

Flow: every prompt is prefilled into its own cache slot (in chunks of `prefill_chunk` tokens), then all unfinished
slots decode together, one token per forward. Slots that finish drop out: each step runs one forward per contiguous
run of still-active slots (the model takes a contiguous slice of slots), so a finished slot costs nothing.

Speculative mode (greedy only) drafts one token with the MTP layer and verifies it with one main forward over
[current, draft]; the output is the plain greedy output (see `_Engine._spec_step` for the exact rollback).

Nothing here knows which backend runs the ops: every backend serves the same cache and the same decode path.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from dsv4.common.model.cache import ContextLengthError, KVCache
from dsv4.common.runtime.static_decode import CAPTURE_MODES, StaticDecoder

FINISH_STOP, FINISH_LENGTH = "stop", "length"


# -- public types -----------------------------------------------------------------------------------------------------
@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int = 0  # prompt i samples with torch.Generator seeded seed + i (independent of its batch neighbours)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's eos (unless ignore_eos)
    prefill_chunk: int = 512
    speculative: bool = False  # MTP self-speculative decoding (greedy only)
    ignore_eos: bool = False  # benchmarks and tests want a fixed number of tokens
    max_seq_len: int | None = None  # cache size; None = the model's args.max_seq_len
    # plain decode steps through the captured static-shape step (common/runtime/static_decode.py) when the batch
    # fits: None = eager only; "eager" | "aot_eager" | "inductor" | "npu-graph" | "cuda-graph" = its capture mode
    compile_decode: str | None = None
    compile_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.speculative and self.temperature > 0:
            raise ValueError("speculative decoding is implemented for greedy decoding only (temperature 0)")
        if self.compile_decode is not None and self.compile_decode not in CAPTURE_MODES:
            raise ValueError(f"compile_decode must be one of {', '.join(CAPTURE_MODES)}, got {self.compile_decode!r}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # this prompt's prefill
    decode_s: float = 0.0  # wall time of the batch's decode phase until this prompt finished
    forwards: int = 0  # main-model decode forwards that included this prompt
    drafted: int = 0  # speculative: drafts verified
    accepted: int = 0  # speculative: drafts the main model agreed with

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids; a stop token that ended generation is not included
    finish_reason: str  # "stop" or "length"
    stats: GenerationStats
    stop_token: int | None = None


@dataclass(frozen=True)
class TokenEvent:
    slot: int  # index of the prompt
    token_id: int
    text: str  # the new text this token completes ("" without a tokenizer or inside a multi-byte character)


class Detokenizer:
    """Incremental text for one sequence: decodes the whole id list and returns what is new, holding back a trailing
    incomplete UTF-8 character (byte-level tokens can split one)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        return piece

    def flush(self) -> str:
        """What push held back (an incomplete character at the very end): sent with a sequence's last token when it
        ends by length; a sequence ended by a stop token drops it (the stop token itself is not text)."""
        text = self.tokenizer.decode(self.ids)
        piece = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return piece


# -- sampling ---------------------------------------------------------------------------------------------------------
def sample_next(logits: Tensor, cfg: GenerationConfig, generators: list[torch.Generator] | None = None) -> Tensor:
    """Next ids [B] from logits [B,V]: argmax at temperature 0, else temperature, top-k, top-p, then one draw per
    row with that row's generator."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    x = logits.float() / cfg.temperature
    V = x.shape[-1]
    if 0 < cfg.top_k < V:
        kth = x.topk(cfg.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        xs, order = x.sort(dim=-1, descending=True)
        p = xs.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays
        drop = (p.cumsum(-1) - p) >= cfg.top_p
        drop[..., 0] = False
        x = x.scatter(-1, order, xs.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


# -- the engine -------------------------------------------------------------------------------------------------------
def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Maximal contiguous runs [lo, hi) of sorted slot indices."""
    out: list[tuple[int, int]] = []
    for s in slots:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


class _Engine:
    def __init__(self, model, prompts: list[list[int]], cfg: GenerationConfig, tokenizer=None) -> None:
        cfg.validate()
        a = model.args
        if not prompts:
            raise ValueError("no prompts")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < a.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {a.vocab_size}): {bad[:5]}")
        if cfg.speculative and not a.n_mtp_layers:
            raise ValueError("speculative decoding needs the MTP layer (n_mtp_layers = 1)")
        max_seq_len = cfg.max_seq_len or a.max_seq_len
        # checked before any compute or cache allocation: the whole request must fit
        for i, p in enumerate(prompts):
            need = len(p) + cfg.max_new_tokens
            if need > max_seq_len:
                raise ContextLengthError(
                    f"prompt {i}: {len(p)} prompt tokens + max_new_tokens {cfg.max_new_tokens} = {need} exceeds "
                    f"max_seq_len={max_seq_len} (shorten the prompt, lower --max-new-tokens or raise --max-seq-len "
                    f"up to {a.max_position_embeddings})")
        self.model, self.prompts, self.cfg = model, prompts, cfg
        self.device = model.embed.weight.device
        self.stops = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else {a.eos_token_id})
        n = len(prompts)
        self.results = [GenerationResult([], FINISH_LENGTH, GenerationStats(prompt_tokens=len(p))) for p in prompts]
        self.done = [cfg.max_new_tokens == 0] * n
        self.detok = [Detokenizer(tokenizer) if tokenizer is not None else None for _ in range(n)]
        self.gens = None
        if cfg.temperature > 0:
            self.gens = []
            for i in range(n):
                g = torch.Generator(device=self.device)
                g.manual_seed(cfg.seed + i)
                self.gens.append(g)
        self.cache: KVCache | None = None
        self.static: StaticDecoder | None = None  # the captured plain decode step (cfg.compile_decode)
        self.cur = torch.zeros(n, dtype=torch.long, device=self.device)  # last emitted token, not yet fed
        self.draft = torch.zeros(n, dtype=torch.long, device=self.device)  # MTP guess for the token after cur
        # a draft at position p is cheap to take back unless it completes some compressor's block (see _spec_step)
        self.block_ratios = sorted({r for r in a.compress_ratios[:a.n_layers] if r})
        self.events: list[TokenEvent] = []
        self.t_decode0 = 0.0

    # -- bookkeeping ---------------------------------------------------------------------------------------------------
    def _emit(self, b: int, tok: int) -> None:
        res = self.results[b]
        if tok in self.stops:
            res.finish_reason, res.stop_token = FINISH_STOP, tok
            self._finish(b)
            return
        res.tokens.append(tok)
        res.stats.new_tokens += 1
        last = len(res.tokens) >= self.cfg.max_new_tokens
        dt, text = self.detok[b], ""
        if dt is not None:
            text = dt.push(tok) + (dt.flush() if last else "")
        self.events.append(TokenEvent(b, tok, text))
        if last:
            self._finish(b)

    def _finish(self, b: int) -> None:
        self.done[b] = True
        self.results[b].stats.decode_s = time.perf_counter() - self.t_decode0

    def _choose(self, logits: Tensor, lo: int, hi: int) -> Tensor:
        return sample_next(logits, self.cfg, None if self.gens is None else self.gens[lo:hi])

    # -- prefill -------------------------------------------------------------------------------------------------------
    def _prefill(self, b: int) -> None:
        """Feed prompt b into slot b in chunks; emit its first token; in speculative mode keep the MTP layer's cache
        fed (it lags the main model by one position: position i needs token i+1) and draft the second token."""
        model, chunk, spec = self.model, self.cfg.prefill_chunk, self.cfg.speculative
        t0 = time.perf_counter()
        toks = torch.tensor(self.prompts[b], dtype=torch.long, device=self.device)
        P, sl = toks.numel(), slice(b, b + 1)
        pending = None  # last-block streams [1,1,n,d] of the last fed position, waiting for its next token
        for c0 in range(0, P, chunk):
            piece = toks[c0:c0 + chunk][None]
            if not spec:
                logits = model(piece, self.cache, slots=sl)
                continue
            logits, hidden = model(piece, self.cache, slots=sl, return_hidden="last")
            X = hidden[-1]
            streams = X if pending is None else torch.cat([pending, X], dim=1)
            q0 = c0 - (pending is not None)  # first MTP position fed now
            c1 = c0 + piece.shape[1]
            if c1 - 1 > q0:  # positions q0 .. c1-2 now know their next token
                model.mtp_forward(streams[:, :-1], toks[q0 + 1:c1][None], self.cache, sl,
                                  start=torch.tensor([q0]))
            pending = X[:, -1:]
        first = self._choose(logits[:, -1], b, b + 1)
        self.results[b].stats.prefill_s = time.perf_counter() - t0
        self.cur[b] = first[0]
        if spec:  # MTP at position P-1 (streams there + the first generated token) guesses token P+1
            lm = model.mtp_forward(pending, first[None], self.cache, sl, start=torch.tensor([P - 1]))
            self.draft[b] = lm[0, -1].argmax()

    # -- decode steps --------------------------------------------------------------------------------------------------
    def _plain_step(self, lo: int, hi: int) -> None:
        model, sl, spec = self.model, slice(lo, hi), self.cfg.speculative
        start = self.cache.lengths[sl].clone()
        x = self.cur[sl][:, None]
        if spec:
            logits, hidden = model(x, self.cache, slots=sl, return_hidden="last")
        elif self.static is not None:  # runs eager itself when the batch or context does not fit a captured shape
            logits = self.static.step(x[:, 0], range(lo, hi))[:, None]
        else:
            logits = model(x, self.cache, slots=sl)
        nxt = self._choose(logits[:, -1], lo, hi)
        self.cur[sl] = nxt
        if spec:  # MTP at the position just fed, with the token just chosen, drafts the one after it
            lm = model.mtp_forward(hidden[-1], nxt[:, None], self.cache, sl, start=start)
            self.draft[sl] = lm[:, -1].argmax(-1)
        for i, tok in enumerate(nxt.tolist()):
            self.results[lo + i].stats.forwards += 1
            self._emit(lo + i, tok)

    def _completes_block(self, pos: int) -> bool:
        return any((pos + 1) % r == 0 for r in self.block_ratios)

    def _snapshot(self, b: int, ring_row: int) -> list[tuple[Tensor, Tensor]]:
        """Copies of slot b's compressor states and its ring row `ring_row` in every main layer (all small)."""
        views: list[Tensor] = []
        for lc in self.cache.layers[:self.model.args.n_layers]:
            views.append(lc.kv[b, ring_row])
            for st in (lc.comp, lc.index_comp):
                if st is not None:
                    views += [t[b] for t in (st.kv, st.score, st.prev_kv, st.prev_score) if t is not None]
        return [(v, v.clone()) for v in views]

    def _restore(self, b: int, snap: list[tuple[Tensor, Tensor]]) -> None:
        for view, saved in snap:
            view.copy_(saved)
        self.cache.lengths[b] -= 2  # back to L, then re-feed the valid token alone
        self.model(self.cur[b:b + 1, None], self.cache, slots=slice(b, b + 1))

    def _spec_step(self, lo: int, hi: int) -> None:
        """Verify [cur, draft] at positions [L, L+1] in one forward; g1/g2 = the greedy picks after L and L+1.
        Accepted (g1 == draft): emit draft and g2; the cache is exactly as after feeding both.
        Rejected: emit g1; the cache holds one position too many. Taking it back:
          - lengths: L+2 -> L+1.
          - ring row (L+1) % W got the draft's KV: harmless, the true token at L+1 rewrites it before any query
            reads it, and no later query looks back at position L+1-W.
          - compressor state, when the draft did NOT complete a block: the draft only wrote the row of the block in
            progress after L's; the next chunk reads rows before its start only, so that row is never read. A block
            completed at L (by the valid token) was pooled from valid rows only. Compressed rows written for a block
            are rewritten when the block truly completes, and queries see entries by position. Nothing to do.
          - when the draft completed a block ((L+2) % ratio == 0 for some layer), the chunk pooled the draft into it,
            overwrote the overlap look-back rows and never stored row L in the pending rows. Those steps snapshot the
            compressor states (and ring row (L+1) % W, which holds position L+1-W, still inside L's window) before
            verifying; a rejection restores them and re-feeds token L alone.
        The MTP layer is then fed positions [L, L+1] with their true next tokens [g1, g2]; a rejected slot keeps the
        draft from position L, and its bogus position L+1 entry sits in a ring row that is rewritten before use."""
        model, cache, sl = self.model, self.cache, slice(lo, hi)
        W = model.args.window_size
        start = cache.lengths[sl].clone()
        snaps = {}
        for i, L in enumerate(start.tolist()):
            if self._completes_block(L + 1):
                snaps[lo + i] = self._snapshot(lo + i, (L + 1) % W)
        x = torch.stack([self.cur[sl], self.draft[sl]], dim=1)
        logits, hidden = model(x, cache, slots=sl, return_hidden="last")
        g = logits.argmax(-1)  # [B,2]
        acc = g[:, 0] == self.draft[sl]
        acc_list = acc.tolist()
        for i, ok in enumerate(acc_list):
            b = lo + i
            if ok:
                continue
            if b not in snaps:
                cache.lengths[b] -= 1  # L+2 -> L+1: the cheap, exact take-back
                continue
            self._restore(b, snaps[b])
        lm = model.mtp_forward(hidden[-1], g, cache, sl, start=start)  # [B,2,V]
        self.draft[sl] = torch.where(acc, lm[:, 1].argmax(-1), lm[:, 0].argmax(-1))
        self.cur[sl] = torch.where(acc, g[:, 1], g[:, 0])
        for i, (ok, (g1, g2)) in enumerate(zip(acc_list, g.tolist(), strict=True)):
            b = lo + i
            st = self.results[b].stats
            st.forwards += 1
            st.drafted += 1
            st.accepted += int(ok)
            self._emit(b, g1)
            if ok and not self.done[b]:
                self._emit(b, g2)

    # -- driver --------------------------------------------------------------------------------------------------------
    def run(self) -> Iterator[TokenEvent]:
        cfg, n = self.cfg, len(self.prompts)
        if all(self.done):
            return
        self.cache = self.model.new_cache(n, cfg.max_seq_len or self.model.args.max_seq_len)
        if cfg.compile_decode is not None:
            self.static = StaticDecoder(self.model, self.cache, cfg.compile_batch_sizes, cfg.compile_decode)
        self.t_decode0 = time.perf_counter()
        for b in range(n):
            self._prefill(b)
            self.t_decode0 = time.perf_counter()  # decode time starts when the last prompt is in
            self._emit(b, int(self.cur[b]))
            yield from self._flush()
        while not all(self.done):
            active = [b for b in range(n) if not self.done[b]]
            for lo, hi in _runs(active):
                need = min(cfg.max_new_tokens - len(self.results[b].tokens) for b in range(lo, hi))
                if cfg.speculative and need >= 2:  # a 2-token verify must not run past the length budget
                    self._spec_step(lo, hi)
                else:
                    self._plain_step(lo, hi)
            yield from self._flush()

    def _flush(self) -> Iterator[TokenEvent]:
        ev, self.events = self.events, []
        yield from ev


class GenerationStream:
    """Iterate to receive TokenEvents as tokens are produced; `results` is complete once iteration ends."""

    def __init__(self, model, prompts: list[list[int]], cfg: GenerationConfig, tokenizer=None) -> None:
        self._engine = _Engine(model, prompts, cfg, tokenizer)  # validation (incl. context length) happens here
        self.results = self._engine.results
        self._started = False

    @property
    def finished(self) -> list[bool]:
        """Per prompt: generation has ended (a stop token ends it without a TokenEvent)."""
        return list(self._engine.done)

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._started:  # the engine's cache and results belong to one pass
            raise RuntimeError("a GenerationStream can be iterated only once")
        self._started = True
        return self._engine.run()


def stream(model, prompts: list[list[int]], cfg: GenerationConfig, tokenizer=None) -> GenerationStream:
    return GenerationStream(model, prompts, cfg, tokenizer)


def generate(model, prompts: list[list[int]], cfg: GenerationConfig,
             on_token: Callable[[int, int, str], None] | None = None, tokenizer=None) -> list[GenerationResult]:
    """Generate for each prompt (lists of token ids). on_token(slot, token_id, text_piece) is called as tokens are
    produced (text_piece is "" without a tokenizer). Raises ContextLengthError before any compute when a prompt plus
    max_new_tokens does not fit max_seq_len."""
    s = stream(model, prompts, cfg, tokenizer)
    for ev in s:
        if on_token is not None:
            on_token(ev.slot, ev.token_id, ev.text)
    return s.results


# -- CLI ---------------------------------------------------------------------------------------------------------------
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[],
                   help="extra stop token: an id, or text that encodes to exactly one token (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sentence token")
    g.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward")
    g.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding (greedy only)")
    g.add_argument("--compile-decode", default=None, choices=CAPTURE_MODES,
                   help="run plain decode steps as one captured static-shape graph per (batch, context bucket): "
                        "inductor / aot_eager (torch.compile on CPU), cuda-graph, npu-graph (TorchAir; also what "
                        "--npu-graph selects), or eager (the static step uncaptured)")


def _stop_id(spec: str, tokenizer) -> int:
    if spec.lstrip("-").isdigit():
        return int(spec)
    ids = tokenizer.encode(spec, add_bos=False)
    if len(ids) != 1:
        raise ValueError(f"--stop {spec!r} encodes to {len(ids)} tokens {ids}; a stop token must be one token")
    return ids[0]


def run_generate(args: argparse.Namespace, model, tokenizer) -> int:
    """Generate for --prompt(s) and print as tokens stream (one prompt) or per prompt when it finishes (several).
    Returns the exit code: 0, or 2 for a request that cannot run (bad arguments, context too long)."""
    out, err = sys.stdout, sys.stderr
    if not args.prompt:
        print("error: give at least one --prompt", file=err)
        return 2
    try:
        if args.chat:
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in args.prompt]
        else:
            prompts = [tokenizer.encode(p) for p in args.prompt]
        cfg = GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, stop_token_ids=tuple(_stop_id(s, tokenizer) for s in args.stop),
            prefill_chunk=args.prefill_chunk, speculative=args.speculative, ignore_eos=args.ignore_eos,
            max_seq_len=getattr(args, "max_seq_len", None),
            compile_decode=getattr(args, "compile_decode", None) or ("npu-graph" if getattr(args, "npu_graph", False)
                                                                      else None))
        gen = stream(model, prompts, cfg, tokenizer)
    except (ValueError, ContextLengthError) as e:  # ContextLengthError is a ValueError; named for the reader
        print(f"error: {e}", file=err)
        return 2
    single = len(prompts) == 1
    printed = [False] * len(prompts)
    texts = [""] * len(prompts)

    def print_finished() -> None:  # several prompts: each completion is printed whole, as soon as it is done
        for i, done in enumerate(gen.finished):
            if done and not printed[i]:
                printed[i] = True
                out.write(f"[{i}] {texts[i]}\n")
                out.flush()

    for ev in gen:
        texts[ev.slot] += ev.text
        if single:
            out.write(ev.text)
            out.flush()
        else:
            print_finished()
    if single:
        out.write("\n")
    else:
        print_finished()
    for i, r in enumerate(gen.results):
        s = r.stats
        line = (f"[{i}] prompt {s.prompt_tokens} tok, generated {s.new_tokens} tok ({r.finish_reason}), "
                f"prefill {s.prefill_s:.2f} s, decode {s.decode_tokens_per_s:.2f} tok/s")
        if s.acceptance_rate is not None:
            line += f", MTP acceptance {s.acceptance_rate:.2f} ({s.accepted}/{s.drafted})"
        print(line, file=err)
    return 0


__all__ = ["GenerationConfig", "GenerationResult", "GenerationStats", "GenerationStream", "TokenEvent",
           "ContextLengthError", "Detokenizer", "add_generate_arguments", "generate", "run_generate", "sample_next",
           "stream"]
