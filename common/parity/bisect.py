"""Parity suite: bisect. A recording proxy over an `Ops` object names every op call
("layers.2.attn/sparse_attention#0"); a shadow proxy replays backend A's exact inputs into backend B's op so per-op
errors do not accumulate, naming the first op and layer where B leaves A. The core is common/parity.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from dsv4.common.model.ops import OP_NAMES, LinearWeight, Ops
from dsv4.common.parity.compare import (
    Bound,
    ModelFactory,
    Tolerances,
    Violation,
    check_metrics,
    logits_metrics,
    op_output_metrics,
    profile_name,
    tensor_metrics,
)


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


def _map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply fn to every tensor of an op's arguments or outputs (tensors, LinearWeight, tuples, lists)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, LinearWeight):
        return LinearWeight(*(_map_tensors(v, fn) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


def _to_device(x: Any, device: torch.device) -> Any:
    """Move an op's arguments to another backend's device."""
    return _map_tensors(x, lambda t: t.to(device))


def _to_cpu(x: Any) -> Any:
    return _map_tensors(x, lambda t: t.detach().cpu())


class RecordingOps:
    """A proxy around an Ops object that records every op call's output (on CPU), in order, under a name like
    "layers.2.attn/sparse_attention#0" (#k counts calls of that op in that scope during this forward). Anything
    that is not an op (device, name, all_reduce, describe) is delegated unchanged."""

    def __init__(self, inner: Ops, tracker: ScopeTracker | None = None) -> None:
        self.inner, self.tracker = inner, tracker
        self.records: list[tuple[str, Any]] = []
        self.counts: dict[tuple[str, str, str], int] = {}
        self.phase = ""  # "" during prefill, "decode<k>:" during the k-th one-token step
        self.current: str | None = None  # the op call under way (names the op when a backend raises)

    def reset(self) -> None:
        self.records.clear()
        self.counts.clear()

    def op_name(self, op: str) -> str:
        scope = self.tracker.scope if self.tracker else "model"
        key = (self.phase, scope, op)
        k = self.counts.get(key, 0)
        self.counts[key] = k + 1
        return f"{self.phase}{scope}/{op}#{k}"

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self.inner, attr)
        if attr not in OP_NAMES:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            name = self.current = self.op_name(attr)
            seen_args, seen_kwargs = args, kwargs
            into = kwargs.get("out") is not None
            if into:  # the op writes into `out`, which may be its own input (rope rotating x in place): record and
                # replay the call as it came (its inputs cloned first, without `out`), and a copy of what it wrote
                seen_args = _map_tensors(args, torch.clone)
                seen_kwargs = {k: v for k, v in kwargs.items() if k != "out"}
            out = target(*args, **kwargs)
            self.current = None
            self.on_call(name, attr, seen_args, seen_kwargs, out.clone() if into else out)
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

    def __init__(self, inner: Ops, shadow: Ops, bounds: dict[str, Bound] | Callable[[str], dict[str, Bound]],
                 tracker: ScopeTracker | None = None) -> None:
        super().__init__(inner, tracker)
        self.shadow = shadow
        # one dict for every op, or op name -> its bounds (Tolerances.op_bounds: per-op overrides)
        self.bounds_for = bounds if callable(bounds) else (lambda op: bounds)
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
        self.results.append(OpResult(name, m, check_metrics(name, m, self.bounds_for(op))))


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
    crash: str | None = None  # a backend raised: where (op call, or building the model) and the error

    @property
    def ok(self) -> bool:
        return (self.first_op is None and self.first_layer is None and self.structure_error is None
                and self.crash is None)

    def summary(self) -> str:
        if self.ok:
            return f"{self.backend_a} vs {self.backend_b} ({self.profile}): no divergence beyond tolerance"
        lines = [f"{self.backend_a} vs {self.backend_b} ({self.profile}):"]
        replayed = next((r for r in self.replay if r.name == self.first_op), None)
        if replayed:
            lines.append(f"  first divergent op (same inputs): {self.first_op}: "
                         + "; ".join(x.detail for x in replayed.violations))
        if self.first_layer:
            lines.append(f"  first divergent layer (free runs): {self.first_layer}")
        if self.structure_error:
            lines.append(f"  op sequences differ: {self.structure_error}")
        if self.crash:
            lines.append(f"  crashed: {self.crash}")
        return "\n".join(lines)


class BackendCrash(Exception):
    """A backend raised while bisect ran it; `where` names the op call (or the model build) it raised in."""

    def __init__(self, label: str, where: str, error: BaseException) -> None:
        super().__init__(f"{label} raised in {where}: {type(error).__name__}: {error}")
        self.label, self.where, self.error = label, where, error


def _op_layer(where: str) -> str:
    """'decode1:layers.2.attn/sparse_attention#0' -> 'layers.2' (the layer an op call belongs to)."""
    scope = where.split(":")[-1].split("/")[0]
    parts = scope.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[0] in ("layers", "mtp") else scope


def _proxied_run(model: nn.Module, ops: Ops, proxy: RecordingOps, prompts: Tensor, decode_steps: int = 0,
                 tokens: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One prefill of `prompts`, then `decode_steps` one-token steps through the cache, with the model's `ops`
    swapped for `proxy` (which records every call, named by scope), then restored. The steps feed `tokens` when
    given (so a second backend decodes exactly what the first did), else the greedy choices, which are returned."""
    dev = model.embed.weight.device
    B, S = prompts.shape
    fed: list[Tensor] = []
    with ScopeTracker(model) as tr:
        proxy.tracker = tr
        model.ops = proxy
        try:
            cache = model.new_cache(B, S + decode_steps)
            logits, hidden = model(prompts.to(dev), cache, return_hidden=True)
            step_logits = logits
            for k in range(decode_steps):
                proxy.phase = f"decode{k + 1}:"
                nxt = tokens[k] if tokens is not None else step_logits[:, -1].argmax(-1, keepdim=True).cpu()
                fed.append(nxt)
                step_logits = model(nxt.to(dev), cache)
        finally:
            model.ops = ops
    return logits, hidden, fed


T = TypeVar("T")


def _guarded(label: str, where: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except Exception as e:
        raise BackendCrash(label, where, e) from e


def _guarded_run(label: str, model: nn.Module, ops: Ops, proxy: RecordingOps, prompts: Tensor, decode_steps: int,
                 tokens: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """_proxied_run, with an exception turned into BackendCrash naming the op call it came from."""
    try:
        return _proxied_run(model, ops, proxy, prompts, decode_steps, tokens)
    except Exception as e:
        raise BackendCrash(label, proxy.current or "the model's forward (outside any op)", e) from e


def first_replayed_violation(factory: ModelFactory, ops_a: Ops, ops_b: Ops, prompts: Tensor, dtype: torch.dtype,
                             tol: Tolerances, pair: str, label_a: str) -> OpResult | None:
    """Pass 1 of `bisect` alone, on one prefill of `prompts`: every op of B fed A's exact inputs and judged by the
    pair's 'op' bounds; the first op call outside them (None: every call within). What the parity suite adds to
    its whole-model comparison where both sides compute the same formulas: a changed eps or one Sinkhorn iteration
    less moves the logits less than a flipped FP8 rounding does, but moves its own op far beyond its bound."""
    model_a = factory(ops_a, dtype)
    profile = profile_name(dtype, model_a.args.kv_fp8_sim)
    shadow = ShadowOps(ops_a, ops_b, lambda op: tol.op_bounds(pair, profile, op))
    _guarded_run(label_a, model_a, ops_a, shadow, prompts, 0)  # B's own exceptions are violations (ShadowOps)
    return next((r for r in shadow.results if r.violations), None)


def bisect(factory: ModelFactory, ops_a: Ops, ops_b: Ops, prompts: Tensor, dtype: torch.dtype, tol: Tolerances,
           pair: str | None = None, label_a: str | None = None, label_b: str | None = None,
           decode_steps: int = 0) -> BisectResult:
    """Localise a divergence between two backends on one prefill of `prompts` and `decode_steps` one-token steps
    after it (decode ops are named "decode<k>:<scope>/<op>#<n>"; both backends decode A's greedy tokens).

    Pass 1 runs model A through a ShadowOps: every op of B is fed A's exact inputs and judged by the 'op' bounds
    (the first violation is the op to blame). Pass 2 runs model B freely, recording op outputs, to show how the
    error accumulates op by op and layer by layer (judged by the 'hidden' bounds). Memory: every op output of
    the run is kept on CPU, so use short prompts on large models."""
    label_a = label_a or ops_a.name
    label_b = label_b or ops_b.name
    pair = pair or Tolerances.pair_key(label_a, label_b)
    profile, shadow = profile_name(dtype, "?"), None
    try:
        model_a = _guarded(label_a, "building the model", lambda: factory(ops_a, dtype))
        profile = profile_name(dtype, model_a.args.kv_fp8_sim)
        tol.bounds(pair, profile, "op")  # a missing scope is named before anything runs
        shadow = ShadowOps(ops_a, ops_b, lambda op: tol.op_bounds(pair, profile, op))
        logits_a, hidden_a, fed = _guarded_run(label_a, model_a, ops_a, shadow, prompts, decode_steps)
        del model_a
        model_b = _guarded(label_b, "building the model", lambda: factory(ops_b, dtype))
        rec = RecordingOps(ops_b)
        logits_b, hidden_b, _ = _guarded_run(label_b, model_b, ops_b, rec, prompts, decode_steps, fed)
    except BackendCrash as e:
        # a backend cannot run the model: the verdict is the op it raised in (when B raised on A's inputs, pass 1
        # already blamed that op), with its layer and the error; there is nothing further to compare
        replay = shadow.results if shadow else []
        first_op = next((r.name for r in replay if r.violations), None)
        where = e.where if e.where == "building the model" else f"{e.where} ({_op_layer(e.where)})"
        return BisectResult(label_a, label_b, pair, profile, replay, [], [], {}, first_op or e.where, None,
                            crash=f"{e.label} raised in {where}: {type(e.error).__name__}: {e.error}")

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

