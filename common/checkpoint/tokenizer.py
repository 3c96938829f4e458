"""Tokenizers: a checkpoint's own tokenizer.json (Hugging Face `tokenizers` format) and, for the embedded default,
a byte-level tokenizer saved in that same format, so both take the same loading path."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dsv4.common.model.config import ModelArgs

# DeepSeek's special tokens; ids 0 and 1 are bos/eos as in the release config (spec 1.1)
BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
SPECIALS = [BOS, EOS, USER, ASSISTANT]
# a DeepSeek-style template for the byte-level default (a real checkpoint brings its own)
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


def byte_level_tokenizer() -> Tokenizer:
    """4 special tokens, then one token per byte (ids 4..259), no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def _byte_of(ch: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to `ch` (printable bytes map to themselves)."""
    cp = ord(ch)
    if 33 <= cp <= 126 or 161 <= cp <= 172 or 174 <= cp <= 255:
        return cp
    # the remaining bytes were shifted to 256 + k in ascending byte order
    shifted = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return shifted[cp - 256]


def save_tokenizer(out_dir: str | Path, args: ModelArgs) -> None:
    """Write tokenizer.json and tokenizer_config.json (with a chat template) for the byte-level tokenizer."""
    out = Path(out_dir)
    tok = byte_level_tokenizer()
    if tok.get_vocab_size() > args.vocab_size:
        raise ValueError(f"byte-level tokenizer needs {tok.get_vocab_size()} ids but vocab_size={args.vocab_size}")
    tok.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": BOS, "eos_token": EOS, "chat_template": DEFAULT_CHAT_TEMPLATE,
           "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": args.max_position_embeddings}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


class TextTokenizer:
    """encode/decode plus the checkpoint's chat template."""

    def __init__(self, tok: Tokenizer, bos_id: int, eos_id: int, chat_template: str | None) -> None:
        self.tok, self.bos_id, self.eos_id, self.chat_template = tok, bos_id, eos_id, chat_template

    @classmethod
    def from_dir(cls, path: str | Path, args: ModelArgs) -> TextTokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise FileNotFoundError(f"{tj}: tokenizer.json not found in the checkpoint directory")
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:
            raise ValueError(f"{tj}: not a valid tokenizer.json: {e}") from None
        template = None
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.exists():
            template = json.loads(cfg_path.read_text()).get("chat_template")
        return cls(tok, args.bos_token_id, args.eos_token_id, template)

    @classmethod
    def byte_level(cls, args: ModelArgs) -> TextTokenizer:
        return cls(byte_level_tokenizer(), args.bos_token_id, args.eos_token_id, DEFAULT_CHAT_TEMPLATE)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json: chat_template)")
        import jinja2

        text = jinja2.Environment().from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.tok.id_to_token(self.bos_id) or "")
        return self.tok.encode(text, add_special_tokens=False).ids
