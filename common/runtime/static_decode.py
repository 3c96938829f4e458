"""The captured decode step: common/model/static.py's static-shape step, run per (batch size, context bucket) as one
graph, with the eager model forward as the fallback when a batch does not fit.

    decoder = StaticDecoder(model, cache, batch_sizes=(1, 2, 4, 8), capture="inductor")
    logits = decoder.step(tokens, slots)   # [B,V]; advances cache.lengths[slots] by one

Buckets: the context is rounded up to a power of two (at least MIN_CONTEXT, at most the cache's max_seq_len), so
the compressed-entry capacities (context // 4 for the indexer, context // 128 for HCA) double from bucket to bucket
and a sequence growing to 32k passes through about eight shapes, each captured once. The batch is padded up to the
next captured size by repeating its last row (same slot, token and position: duplicates write identical values).

Capture modes (`capture`):
  "eager"      the static step uninterpreted (no compile): what the captures record, for tests and op counts;
  "aot_eager"  torch.compile(fullgraph=True) tracing without code generation (tests: fast to compile);
  "inductor"   torch.compile(fullgraph=True) with generated C++/Triton code (CPU benchmarks);
  "npu-graph"  TorchAir (dsv4.ascend.compile_graph) on an Ascend NPU;
  "cuda-graph" torch.cuda.CUDAGraph capture per shape, replayed with static input buffers (code path ready,
               not run on hardware here).
Host bookkeeping (lengths, bucket choice, padding) happens here, outside the graph: lengths live on the host, so
choosing a bucket never waits for the device.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dsv4.common.model.cache import KVCache
from dsv4.common.model.static import decode_step, routed_experts

CAPTURE_MODES = ("eager", "aot_eager", "inductor", "npu-graph", "cuda-graph")
MIN_CONTEXT = 256
# backends whose moe_experts keeps its shapes static (device-side group sizes): they run their own in the step.
# The reference loops over ids.unique() (host sync), so the step uses routed_experts for it.
STATIC_MOE_BACKENDS = ("ascend", "cuda")


def context_buckets(max_seq_len: int, minimum: int = MIN_CONTEXT) -> list[int]:
    """Powers of two from `minimum` up to max_seq_len, which is always the last bucket."""
    out, c = [], minimum
    while c < max_seq_len:
        out.append(c)
        c *= 2
    return out + [max_seq_len]


def compile_mode(args) -> str | None:
    """The decode capture mode a command's flags ask for: --compile-decode, or TorchAir for --npu-graph."""
    return getattr(args, "compile_decode", None) or ("npu-graph" if getattr(args, "npu_graph", False) else None)


def check_capture_runs(mode: str | None, ops, flag: str) -> None:
    """Fail before any model is loaded when this machine cannot capture `mode` (named as `flag` in the message):
    a CUDA graph needs the model on a CUDA device, TorchAir needs the ascend backend and torchair."""
    if mode == "cuda-graph" and ops.device.type != "cuda":
        raise ValueError(f"{flag}: CUDA graphs need the model on a CUDA device, this run's is {ops.device} "
                         f"(backend {ops.name}); use --compile-decode inductor or aot_eager on a CPU")
    if mode == "npu-graph":
        if not ops.name.startswith("ascend"):
            raise ValueError(f"{flag} needs the ascend backend, not {ops.name!r}")
        # what TorchAir captures is the static decode step (capture "npu-graph"); prefill stays eager
        if importlib.util.find_spec("torchair") is None:
            raise ValueError(f"{flag}: graph mode needs torchair (ships with torch_npu on NPU hosts); "
                             "it is not importable here")


def _compile(fn: Callable, capture: str) -> Callable:
    if capture in ("aot_eager", "inductor"):
        # every (batch, bucket) is its own graph of the one function: allow that many specialisations
        limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.cache_size_limit = limit
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        return torch.compile(fn, backend=capture, fullgraph=True, dynamic=False)
    if capture == "npu-graph":
        from dsv4.ascend import compile_graph  # the runtime may import a backend package lazily, on request

        return compile_graph(fn, fullgraph=True)
    return fn


class StaticDecoder:
    """One-token decode steps for up to max(batch_sizes) rows of `cache`, captured per (batch size, bucket)."""

    def __init__(self, model, cache: KVCache, batch_sizes: Sequence[int] = (1, 2, 4, 8), capture: str = "inductor",
                 min_context: int = MIN_CONTEXT) -> None:
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {', '.join(CAPTURE_MODES)}, got {capture!r}")
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {tuple(batch_sizes)}")
        if capture == "cuda-graph" and model.embed.weight.device.type != "cuda":
            raise ValueError("capture 'cuda-graph' needs the model on a CUDA device")
        self.model, self.cache, self.capture = model, cache, capture
        self.batch_sizes = sorted(set(batch_sizes))
        self.buckets = context_buckets(cache.max_seq_len, min(min_context, cache.max_seq_len))
        self.device = model.embed.weight.device
        self.routed = None if model.ops.name in STATIC_MOE_BACKENDS else routed_experts(model.ops)
        self._fn = _compile(self._step, capture)
        self._graphs: dict[tuple[int, int], tuple] = {}  # cuda-graph: (B, bucket) -> (graph, inputs, output)
        self.steps = {"static": 0, "eager": 0}  # how the steps ran (the engine reports it)

    def _step(self, cache: KVCache, tokens: Tensor, slots: Tensor, pos: Tensor, context: int) -> Tensor:
        return decode_step(self.model, cache, tokens, slots, pos, context, self.routed)

    # -- host side ----------------------------------------------------------------------------------------------------
    def shape_for(self, batch: int, max_pos: int) -> tuple[int, int] | None:
        """(padded batch, context bucket) of a step, or None when it does not fit a captured shape."""
        b = next((s for s in self.batch_sizes if s >= batch), None)
        c = next((c for c in self.buckets if c > max_pos), None)
        if b is None or c is None or max_pos < 1:
            return None
        return b, c

    def step(self, tokens: Tensor, slots: Tensor | Sequence[int]) -> Tensor:
        """Logits [B,V] fp32 for one token per row (tokens [B] at the slots' cached lengths); advances
        cache.lengths[slots]. Runs the captured step when (B, max position) fits, else the eager forward."""
        cache = self.cache
        slots_host = torch.as_tensor(slots, dtype=torch.long).cpu()
        pos_host = cache.lengths[slots_host]
        B = slots_host.numel()
        max_pos = int(pos_host.max())
        # max_seq_len (ContextLengthError with the advice) and the blocks of the new positions, allocated here on the
        # host: the step itself only reads the block table
        cache.check_room(slots_host, pos_host, 1)
        shape = self.shape_for(B, max_pos)
        if shape is None:
            self.steps["eager"] += 1
            return self._eager(tokens, slots_host)
        Bp, context = shape
        pad = Bp - B
        idx = torch.cat([torch.arange(B), torch.full((pad,), B - 1)]) if pad else torch.arange(B)
        dev = self.device
        args = (tokens.to(dev)[idx.to(dev)], slots_host[idx].to(dev), pos_host[idx].to(dev))
        logits = self._run(Bp, context, *args)
        cache.lengths[slots_host] += 1
        self.steps["static"] += 1
        return logits[:B]

    def _run(self, Bp: int, context: int, tokens: Tensor, slots: Tensor, pos: Tensor) -> Tensor:
        if self.capture != "cuda-graph":
            return self._fn(self.cache, tokens, slots, pos, context)
        key = (Bp, context)
        if key not in self._graphs:
            # the first step of a shape runs for real on a side stream (it is also the warm-up), then the same step
            # is recorded: recording launches nothing, so the cache is written exactly once
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._step(self.cache, tokens, slots, pos, context)
            torch.cuda.current_stream().wait_stream(side)
            inputs = (tokens.clone(), slots.clone(), pos.clone())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._step(self.cache, *inputs, context)
            self._graphs[key] = (graph, inputs, static_out)
            return out
        graph, inputs, static_out = self._graphs[key]
        for buf, new in zip(inputs, (tokens, slots, pos), strict=True):
            buf.copy_(new)
        graph.replay()
        return static_out.clone()

    def _eager(self, tokens: Tensor, slots: Tensor) -> Tensor:
        """The model's own forward, once per contiguous run of slots (it takes a slice of slots)."""
        out, s, i = [], slots.tolist(), 0
        while i < len(s):
            j = i + 1
            while j < len(s) and s[j] == s[j - 1] + 1:
                j += 1
            out.append(self.model(tokens[i:j, None].to(self.device), self.cache, slots=slice(s[i], s[j - 1] + 1)))
            i = j
        return torch.cat(out)[:, 0]
