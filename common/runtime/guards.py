"""Guards against silent wrong answers at run time: non-finite logits stop generation with an error that names where
the NaN/Inf first appeared (which layer, attention or MoE), instead of an argmax over NaN (empty or garbage text, exit
0) or a sampling traceback. Non-finite *weights* are caught earlier, at load (dsv4.common.checkpoint.load).

`check_logits` costs one reduction over the logits per step. Only when they are bad does it replay the row's tokens
through the model once more, on a fresh cache, with forward hooks that record the first module whose output is not
finite: the error path pays for the diagnosis, the normal path does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN/Inf logits; the message names the first layer (and part) whose output went bad."""


def _first_bad(t: object) -> bool:
    """True when a module output (a tensor, or a tuple whose first item is one) holds NaN/Inf."""
    if isinstance(t, (tuple, list)) and t:
        t = t[0]
    return isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())


def locate_nonfinite(model: nn.Module, tokens: Sequence[int]) -> str:
    """Replay `tokens` (one sequence) from position 0 on a fresh cache and name the first module whose output holds
    NaN/Inf: 'layer 3 attention', 'layer 3 MoE', 'the embedding rows of the tokens' or 'the output head'."""
    watched: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(model.layers):
        for part, label in (("attn", "attention"), ("ffn", "MoE")):
            sub = getattr(layer, part, None)
            if isinstance(sub, nn.Module):
                watched.append((f"layer {i} {label}", sub))
        watched.append((f"layer {i} (hyper-connection mixing)", layer))
    found: list[str] = []
    handles = []
    for name, module in watched:
        def hook(_m, _inp, out, name=name):
            if not found and _first_bad(out):
                found.append(name)
        handles.append(module.register_forward_hook(hook))
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=model.embed.weight.device)
    try:
        emb = model.embed.weight[ids.clamp(0, model.embed.weight.shape[0] - 1)]
        if not bool(torch.isfinite(emb.float()).all()):
            return "the embedding rows of the tokens (embed.weight)"
        with torch.no_grad():
            logits = model(ids, model.new_cache(1, max(len(tokens), 1)))
    finally:
        for h in handles:
            h.remove()
    if found:
        return found[0]
    if not bool(torch.isfinite(logits).all()):
        return "the output head (hc_head, norm, head.weight)"
    return "no layer on a replay of the same tokens from a fresh cache (the cache state or the batch made the " \
           "difference)"


def check_logits(logits: Tensor, model: nn.Module | None = None,
                 tokens_of_row: Callable[[int], Sequence[int]] | None = None) -> None:
    """Raise NonFiniteLogitsError when `logits` [B,V] hold NaN/Inf. With the model and `tokens_of_row(i)` (the
    tokens row i was fed so far, from position 0), the message names the first layer that produced them."""
    finite = torch.isfinite(logits).all(dim=-1)
    if bool(finite.all()):
        return
    row = int((~finite).nonzero()[0, 0])
    bad = logits[row]
    nan, inf = int(torch.isnan(bad).sum()), int(torch.isinf(bad).sum())
    where = ""
    if model is not None and tokens_of_row is not None:
        try:
            where = f"; first non-finite output: {locate_nonfinite(model, tokens_of_row(row))}"
        except Exception as e:  # the diagnosis must never hide the error it diagnoses
            where = f"; could not locate the layer ({type(e).__name__}: {e})"
    raise NonFiniteLogitsError(
        f"the model produced non-finite logits for sequence {row} ({nan} NaN, {inf} Inf of {bad.numel()}){where}. "
        "The weights passed the load check, so look for values that overflow in this dtype (try --dtype fp32) or a "
        "backend bug (compare backends with `dsv4 parity run`)")


__all__ = ["NonFiniteLogitsError", "check_logits", "locate_nonfinite"]
