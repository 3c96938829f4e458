"""Offline text generation (`dsv4 generate`): a fixed set of prompts run through the serving engine
(common/runtime/engine.py), so offline and online share one code path: continuous batching over the one model graph
and its explicit KV cache, chunked prefill beside running decodes, per-prompt seeded sampling, MTP speculation.

Prompt i samples with a torch.Generator seeded `seed + i`; its tokens do not depend on the other prompts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from dsv4.common.model.cache import BLOCK_QUANTUM, ContextLengthError, kv_bytes_per_token
from dsv4.common.runtime.engine import FINISH_LENGTH, FINISH_STOP, Engine, Request, RequestStats, SamplingParams
from dsv4.common.runtime.engine_sampling import Detokenizer, filtered_probs
from dsv4.common.runtime.guards import NonFiniteLogitsError
from dsv4.common.runtime.prefix_cache import PrefixCacheOptions, add_prefix_cache_arguments, prefix_cache_options
from dsv4.common.runtime.static_decode import CAPTURE_MODES, compile_mode

GenerationStats = RequestStats  # prompt/new tokens, prefill and decode time, forwards, MTP drafted/accepted


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
    block_tokens: int = BLOCK_QUANTUM  # tokens per KV block (common/model/cache.py)
    kv_blocks: int | None = None  # KV blocks in the pool; None = max_seq_len tokens for every prompt at once
    # reuse cached prompt prefixes (runtime/prefix_cache.py); with a path, loaded at start and written at the end
    prefix_cache: PrefixCacheOptions | None = None

    def validate(self) -> None:
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.compile_decode is not None and self.compile_decode not in CAPTURE_MODES:
            raise ValueError(f"compile_decode must be one of {', '.join(CAPTURE_MODES)}, got {self.compile_decode!r}")
        p = self.params(0)
        try:
            p.validate()
        except ValueError as e:  # the engine names request fields; this API calls max_tokens max_new_tokens
            raise ValueError(str(e).replace("max_tokens", "max_new_tokens")) from None

    def params(self, i: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed + i, stop_token_ids=self.stop_token_ids,
                              ignore_eos=self.ignore_eos, speculative=self.speculative)


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


def sample_next(logits: Tensor, cfg: GenerationConfig, generators: list | None = None) -> Tensor:
    """Next ids [B] from logits [B,V]: argmax at temperature 0, else temperature, top-k, top-p, then one draw per
    row with that row's generator (the engine's per-request sampling, for a whole batch)."""
    import torch

    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = filtered_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


# -- on the engine ----------------------------------------------------------------------------------------------------
class GenerationStream:
    """Iterate to receive TokenEvents as tokens are produced; `results` is complete once iteration ends."""

    def __init__(self, model, prompts: list[list[int]], cfg: GenerationConfig, tokenizer=None) -> None:
        cfg.validate()
        if not prompts:
            raise ValueError("no prompts")
        # every prompt is checked before any compute or cache allocation: the whole request must fit
        self.engine = Engine(model, max_batch=len(prompts), max_seq_len=cfg.max_seq_len,
                             prefill_chunk=cfg.prefill_chunk, step_tokens=cfg.prefill_chunk,
                             max_waiting=len(prompts), tokenizer=tokenizer, compile_decode=cfg.compile_decode,
                             compile_batch_sizes=cfg.compile_batch_sizes, block_tokens=cfg.block_tokens,
                             kv_blocks=cfg.kv_blocks, prefix_cache=cfg.prefix_cache)
        for i, p in enumerate(prompts):
            try:
                self.engine.check(p, cfg.params(i))
            except ValueError as e:  # ContextLengthError stays itself (a ValueError too)
                msg = str(e).replace("lower max_tokens", "lower --max-new-tokens").replace("max_tokens",
                                                                                           "max_new_tokens")
                raise (ContextLengthError if isinstance(e, ContextLengthError) else ValueError)(
                    f"prompt {i}: {msg}") from None
        self.requests = [Request(p, cfg.params(i), str(i)) for i, p in enumerate(prompts)]
        self.index = {id(r): i for i, r in enumerate(self.requests)}
        self.results = [GenerationResult(r.output, FINISH_LENGTH, r.stats) for r in self.requests]
        self._skip = cfg.max_new_tokens == 0  # nothing to generate: no prefill, no cache
        self._started = False
        if cfg.prefix_cache is not None and not self._skip:
            self.engine.load_prefix_cache()  # a refused file stops here, before any compute

    @property
    def finished(self) -> list[bool]:
        """Per prompt: generation has ended (a stop token ends it without a TokenEvent)."""
        return [self._skip or r.finished for r in self.requests]

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._started:  # the engine's cache and results belong to one pass
            raise RuntimeError("a GenerationStream can be iterated only once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[TokenEvent]:
        if self._skip:
            return
        for r in self.requests:
            self.engine.add(r)
        for ev in self.engine.run_until_idle():
            i = self.index[id(ev.request)]
            if ev.finished:
                r = ev.request
                if r.finish_reason not in (FINISH_STOP, FINISH_LENGTH):
                    if isinstance(r.exception, NonFiniteLogitsError):  # a user-facing error: keep its kind
                        raise NonFiniteLogitsError(f"prompt {i}: {r.exception}") from None
                    raise RuntimeError(f"prompt {i}: generation failed: {r.error or r.finish_reason}")
                res = self.results[i]
                res.finish_reason = r.finish_reason
                res.stop_token = r.stop_reason if isinstance(r.stop_reason, int) else None
            if ev.token_id is not None:
                yield TokenEvent(i, ev.token_id, ev.text)
        self.engine.save_prefix_cache()


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
    add_compile_decode_argument(g)
    add_kv_pool_arguments(g)
    add_prefix_cache_arguments(parser.add_argument_group("prefix cache"))


def add_kv_pool_arguments(g) -> None:
    """--block-tokens / --kv-blocks / --kv-memory-gib, shared by generate and serve."""
    g.add_argument("--block-tokens", type=int, default=BLOCK_QUANTUM,
                   help=f"tokens per KV cache block, a multiple of {BLOCK_QUANTUM} (the lcm of the compression "
                        f"ratios); memory is handed out to sequences in these blocks as they grow "
                        f"(default: {BLOCK_QUANTUM})")
    g.add_argument("--kv-blocks", type=int, default=None,
                   help="KV cache blocks in the pool: requests are admitted while the pool can hold their prompt + "
                        "max tokens, others wait (default: --max-seq-len tokens for every slot)")
    g.add_argument("--kv-memory-gib", type=float, default=None,
                   help="size the pool by memory instead of --kv-blocks: GiB of compressed KV (entries + indexer "
                        "keys; the per-slot window rings come on top)")


def kv_pool_options(args: argparse.Namespace, model) -> tuple[int, int | None]:
    """(block_tokens, kv_blocks) from the flags; --kv-memory-gib turns into blocks of this model's bytes per token."""
    bt = getattr(args, "block_tokens", None) or BLOCK_QUANTUM
    blocks, gib = getattr(args, "kv_blocks", None), getattr(args, "kv_memory_gib", None)
    if blocks is not None and gib is not None:
        raise ValueError("give --kv-blocks or --kv-memory-gib, not both")
    if blocks is not None and blocks < 1:
        raise ValueError(f"--kv-blocks must be >= 1, got {blocks}")
    if gib is not None:
        per_block = bt * kv_bytes_per_token(model.args, model.embed.weight.element_size(),
                                            include_mtp=bool(model.args.n_mtp_layers))
        blocks = int(gib * 2**30 // per_block)
        if blocks < 1:
            raise ValueError(f"--kv-memory-gib {gib} holds no block of {bt} tokens ({per_block:.0f} bytes each)")
    return bt, blocks


def add_compile_decode_argument(g) -> None:
    """--compile-decode, shared by generate and serve."""
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
            max_seq_len=getattr(args, "max_seq_len", None), compile_decode=compile_mode(args),
            prefix_cache=prefix_cache_options(args, model))
        cfg.block_tokens, cfg.kv_blocks = kv_pool_options(args, model)
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
        if cfg.prefix_cache is not None:
            line += f", {s.cached_tokens} prompt tok from the prefix cache"
        if s.acceptance_rate is not None:
            line += f", MTP acceptance {s.acceptance_rate:.2f} ({s.accepted}/{s.drafted})"
        print(line, file=err)
    return 0


__all__ = ["GenerationConfig", "GenerationResult", "GenerationStats", "GenerationStream", "TokenEvent",
           "ContextLengthError", "Detokenizer", "add_generate_arguments", "add_kv_pool_arguments", "generate",
           "kv_pool_options", "run_generate", "sample_next", "stream"]
