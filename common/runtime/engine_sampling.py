"""Per-request sampling filters and incremental detokenization, shared by the engine and `dsv4 generate`."""

from __future__ import annotations

from torch import Tensor


def filtered_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Probabilities [B,V] from logits [B,V]: temperature, then top-k, then top-p (nucleus)."""
    x = logits.float() / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        xs, order = x.sort(dim=-1, descending=True)
        p = xs.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays
        drop = (p.cumsum(-1) - p) >= top_p
        drop[..., 0] = False
        x = x.scatter(-1, order, xs.masked_fill(drop, float("-inf")))
    return x.softmax(-1)


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
