"""Generation (common/runtime/generate.py): greedy and sampling, stop tokens, batches, streaming, MTP speculative
decoding, context-length errors and the CLI entry point. fp32, tiny config.

The model runs with kv_fp8_sim="clamp": with "e4m3" a 2-token verify chunk and a 1-token decode can round the FP8 KV
simulation differently (see tests/test_decode.py), which makes bit-level token comparisons between code paths
depend on near-ties instead of on the logic under test.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from engine_model import rand_prompt, tiny_clamp_model  # tests/ is on sys.path

from dsv4.common.checkpoint.tokenizer import TextTokenizer
from dsv4.common.model.cache import ContextLengthError
from dsv4.common.model.config import load_named_config
from dsv4.common.runtime import generate as gen
from dsv4.common.runtime.engine_runner import ModelRunner
from dsv4.common.runtime.generate import GenerationConfig, generate, sample_next

MAX_SEQ = 512


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: intra-op threads only add hand-off cost on a shared 2-core machine (see tests/test_decode.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_clamp_model()


def cfg(**kw) -> GenerationConfig:
    base = dict(max_new_tokens=8, ignore_eos=True, max_seq_len=MAX_SEQ, prefill_chunk=64)
    return GenerationConfig(**{**base, **kw})


PROMPTS = [rand_prompt(5, 1), rand_prompt(37, 2), rand_prompt(130, 3)]


@pytest.fixture(scope="module")
def greedy_alone(model):
    """Greedy tokens of each prompt generated on its own."""
    return [generate(model, [p], cfg(max_new_tokens=10))[0].tokens for p in PROMPTS]


# -- batches ----------------------------------------------------------------------------------------------------------
def test_batch_equals_each_prompt_alone(model, greedy_alone):
    res = generate(model, PROMPTS, cfg(max_new_tokens=10))
    assert [r.tokens for r in res] == greedy_alone
    assert all(r.finish_reason == "length" and len(r.tokens) == 10 for r in res)
    assert [r.stats.prompt_tokens for r in res] == [5, 37, 130]


def test_finished_slots_drop_out(model, greedy_alone):
    """The middle prompt stops early: the others continue (as two runs of slots) with unchanged output."""
    stop = greedy_alone[1][2]
    res = generate(model, PROMPTS, cfg(max_new_tokens=10, stop_token_ids=(stop,)))
    for r, alone in zip(res, greedy_alone, strict=True):
        want = alone[:alone.index(stop)] if stop in alone else alone
        assert r.tokens == want
        assert r.finish_reason == ("stop" if stop in alone else "length")
    assert res[1].stop_token == stop and len(res[1].tokens) <= 2


def test_prefill_chunk_size_does_not_change_output(model, greedy_alone):
    res = generate(model, [PROMPTS[2]], cfg(max_new_tokens=10, prefill_chunk=7))
    assert res[0].tokens == greedy_alone[2]


# -- sampling ---------------------------------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed(model):
    c = cfg(temperature=1.0, top_k=50, top_p=0.95, seed=123)
    a = generate(model, PROMPTS[:2], c)
    b = generate(model, PROMPTS[:2], c)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    other = generate(model, PROMPTS[:2], cfg(temperature=1.0, top_k=50, top_p=0.95, seed=124))
    assert [r.tokens for r in other] != [r.tokens for r in a]  # 16 draws from ~50 tokens: a clash is negligible


def test_top_k_1_and_tiny_top_p_equal_greedy(model, greedy_alone):
    for c in (cfg(max_new_tokens=10, temperature=1.5, top_k=1, seed=5),
              cfg(max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=5)):
        assert generate(model, [PROMPTS[0]], c)[0].tokens == greedy_alone[0]


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 0.0, 4.9]])
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    assert sample_next(logits, cfg()).tolist() == [1, 0]  # temperature 0: argmax
    for _ in range(20):  # top-k 2 keeps only the two best of each row
        out = sample_next(logits, cfg(temperature=1.0, top_k=2), g).tolist()
        assert out[0] in (1, 2) and out[1] in (0, 3)
    # top-p 0.5: row 0's best token alone holds > 0.5 of the mass; row 1's best holds ~0.52 as well
    assert sample_next(logits, cfg(temperature=1.0, top_p=0.5), g).tolist() == [1, 0]


def test_stop_token_ends_generation(model, greedy_alone):
    toks = greedy_alone[0]
    stop = toks[3]
    first = toks.index(stop)
    res = generate(model, [PROMPTS[0]], cfg(max_new_tokens=10, stop_token_ids=(stop,)))[0]
    assert res.finish_reason == "stop" and res.stop_token == stop
    assert res.tokens == toks[:first]


def test_eos_stops_unless_ignored(model, greedy_alone):
    """eos is a stop token by default: make the model's eos the first greedy token of prompt 0."""
    eos = greedy_alone[0][0]
    m_args = model.args
    model.args = m_args.replace(eos_token_id=eos)
    try:
        assert generate(model, [PROMPTS[0]], cfg(ignore_eos=False))[0].finish_reason == "stop"
        assert generate(model, [PROMPTS[0]], cfg(ignore_eos=True))[0].finish_reason == "length"
    finally:
        model.args = m_args


# -- streaming ---------------------------------------------------------------------------------------------------------
def test_streaming_callback_sees_tokens_in_order(model):
    seen: list[tuple[int, int, str]] = []
    res = generate(model, PROMPTS[:2], cfg(max_new_tokens=6), on_token=lambda s, t, x: seen.append((s, t, x)))
    for slot, r in enumerate(res):
        assert [t for s, t, _ in seen if s == slot] == r.tokens
    # decode steps interleave the slots: slot 1's first token (its prefill) comes before slot 0's second token
    order = [s for s, _, _ in seen]
    assert order[:3] == [0, 1, 0]


def test_stream_iterator_yields_text_pieces(model):
    tok = TextTokenizer.byte_level(model.args)
    prompt = tok.encode("hello")
    s = gen.stream(model, [prompt], cfg(max_new_tokens=6), tokenizer=tok)
    events = list(s)
    assert [e.token_id for e in events] == s.results[0].tokens
    assert "".join(e.text for e in events) == tok.decode(s.results[0].tokens)


def test_detokenizer_holds_back_split_characters():
    tok = TextTokenizer.byte_level(load_named_config("tiny"))
    ids = tok.encode("né€", add_bos=False)  # 1 + 2 + 3 bytes: one token per byte
    d = gen.Detokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert pieces == ["n", "", "é", "", "", "€"]


# -- context length ----------------------------------------------------------------------------------------------------
def test_context_length_error_before_compute(model, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed before checking the context length")

    monkeypatch.setattr(model, "forward", boom)
    monkeypatch.setattr(model, "new_cache", boom)
    with pytest.raises(ContextLengthError, match="max_seq_len=64"):
        generate(model, [[5] * 10, [5] * 60], cfg(max_new_tokens=5, max_seq_len=64))
    with pytest.raises(ContextLengthError):
        gen.stream(model, [[5] * 60], cfg(max_new_tokens=5, max_seq_len=64))
    # exactly full is fine (validated only: max_new_tokens 0 computes nothing)
    assert generate(model, [[5] * 64], cfg(max_new_tokens=0, max_seq_len=64))[0].tokens == []


def test_invalid_requests(model):
    with pytest.raises(ValueError, match="greedy"):
        generate(model, [[5]], cfg(speculative=True, temperature=0.7))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], cfg())
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[model.args.vocab_size]], cfg())


# -- speculative (MTP) -------------------------------------------------------------------------------------------------
N_SPEC = 40


@pytest.fixture(scope="module")
def spec_prompt():
    return rand_prompt(21, 7)


@pytest.fixture(scope="module")
def plain_40(model, spec_prompt):
    return generate(model, [spec_prompt], cfg(max_new_tokens=N_SPEC))[0].tokens


def test_speculative_equals_plain_greedy(model, spec_prompt, plain_40):
    res = generate(model, [spec_prompt], cfg(max_new_tokens=N_SPEC, speculative=True))[0]
    assert res.tokens == plain_40
    rate = res.stats.acceptance_rate
    print(f"MTP acceptance rate (random tiny weights): {rate:.3f} ({res.stats.accepted}/{res.stats.drafted})")
    assert rate is not None and 0.0 <= rate <= 1.0


def test_speculative_batch_equals_plain(model, greedy_alone):
    """Three slots, the middle one stopping early (the others then verify as two separate runs)."""
    stop = greedy_alone[1][2]
    c = dict(max_new_tokens=10, stop_token_ids=(stop,))
    plain = generate(model, PROMPTS, cfg(**c))
    spec = generate(model, PROMPTS, cfg(**c, speculative=True))
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in plain]


def test_speculative_keeps_the_mtp_cache_consistent(model, spec_prompt, plain_40, monkeypatch):
    """Every MTP position's last computed logits (rejected drafts leave a bogus entry that the next step
    recomputes) equal a one-shot MTP pass over the final sequence: the MTP cache saw the right tokens in order,
    through chunked prefill (chunk 8) and the decode steps."""
    real, seen = model.mtp_forward, {}

    def recording(streams, next_tokens, cache, slots=None, start=None):
        logits = real(streams, next_tokens, cache, slots, start)
        for i in range(logits.shape[1]):
            seen[int(start[0]) + i] = logits[0, i].clone()
        return logits

    monkeypatch.setattr(model, "mtp_forward", recording)
    n_new = 16
    res = generate(model, [spec_prompt], cfg(max_new_tokens=n_new, speculative=True, prefill_chunk=8))[0]
    monkeypatch.undo()
    assert res.tokens == plain_40[:n_new]
    truth = torch.tensor(spec_prompt + res.tokens)[None]
    _, hidden = model(truth, return_hidden=True)
    ref = model.mtp_forward(hidden[-1][:, :-1], truth[:, 1:], model.new_cache(1, MAX_SEQ), start=torch.tensor([0]))[0]
    last = len(spec_prompt) + n_new - 3  # the final verify may leave its last MTP row unconfirmed
    assert sorted(seen)[:last + 1] == list(range(last + 1))
    got = torch.stack([seen[p] for p in range(last + 1)])
    torch.testing.assert_close(got, ref[:last + 1], atol=5e-5, rtol=1e-5)


def test_speculative_rollback_with_an_oracle_drafter(model, spec_prompt, plain_40, monkeypatch):
    """Random MTP weights rarely guess right, so the accept path and both rollback paths are driven by an oracle:
    the real MTP layer still runs (its cache must stay consistent), but its logits are replaced by a one-hot on the
    true greedy token, except at positions p % 3 == 0, where the draft is wrong. Over 40 tokens that mixes
    accepts, cheap rejections and rejections whose draft completed a compressor block (restore + re-feed)."""
    truth = spec_prompt + plain_40
    real = model.mtp_forward
    V = model.args.vocab_size

    def oracle(streams, next_tokens, cache, slots=None, start=None):
        logits = real(streams, next_tokens, cache, slots, start)
        out = torch.zeros_like(logits)
        for b in range(logits.shape[0]):
            for i in range(logits.shape[1]):
                p = int(start[b]) + i + 2  # the position this row predicts
                want = truth[p] if p < len(truth) else 0
                out[b, i, want if p % 3 else (want + 1) % V] = 1.0
        return out

    restores = []
    restore = ModelRunner._restore

    def counting_restore(self, b, snap, cur):
        restores.append(b)
        restore(self, b, snap, cur)

    monkeypatch.setattr(model, "mtp_forward", oracle)
    monkeypatch.setattr(ModelRunner, "_restore", counting_restore)
    res = generate(model, [spec_prompt], cfg(max_new_tokens=N_SPEC, speculative=True))[0]
    assert res.tokens == plain_40
    st = res.stats
    assert 0 < st.accepted < st.drafted
    assert st.forwards < N_SPEC  # accepted drafts gave two tokens per verify forward
    assert restores, "no rejected draft had completed a compressor block (the restore + re-feed path)"
    print(f"oracle acceptance {st.acceptance_rate:.3f} ({st.accepted}/{st.drafted}), {len(restores)} restores")


def test_speculative_all_correct_drafts(model, spec_prompt, plain_40, monkeypatch):
    truth = spec_prompt + plain_40
    real = model.mtp_forward

    def oracle(streams, next_tokens, cache, slots=None, start=None):
        logits = real(streams, next_tokens, cache, slots, start)
        out = torch.zeros_like(logits)
        for i in range(logits.shape[1]):
            p = int(start[0]) + i + 2
            out[0, i, truth[p] if p < len(truth) else 0] = 1.0
        return out

    monkeypatch.setattr(model, "mtp_forward", oracle)
    res = generate(model, [spec_prompt], cfg(max_new_tokens=N_SPEC, speculative=True))[0]
    assert res.tokens == plain_40
    assert res.stats.acceptance_rate == 1.0
    assert res.stats.forwards <= N_SPEC // 2 + 1


# -- CLI ---------------------------------------------------------------------------------------------------------------
def cli_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    gen.add_generate_arguments(p)
    return p.parse_args(list(argv))


def test_run_generate_streams_text(model, capsys):
    tok = TextTokenizer.byte_level(model.args)
    rc = gen.run_generate(cli_args("--prompt", "hi", "--max-new-tokens", "4", "--ignore-eos"), model, tok)
    out = capsys.readouterr()
    assert rc == 0
    assert "generated 4 tok (length)" in out.err


def test_run_generate_chat_batch_and_errors(model, capsys):
    tok = TextTokenizer.byte_level(model.args)
    a = cli_args("--prompt", "a", "--prompt", "bc", "--chat", "--max-new-tokens", "3", "--speculative",
                 "--stop", "7")
    assert gen.run_generate(a, model, tok) == 0
    out = capsys.readouterr()
    assert out.out.startswith("[0] ") and "\n[1] " in out.out
    assert "MTP acceptance" in out.err
    a = cli_args("--prompt", "x" * 40, "--max-new-tokens", "30")
    a.max_seq_len = 64  # the lead's CLI owns --max-seq-len; run_generate reads it when present
    assert gen.run_generate(a, model, tok) == 2
    assert "max_seq_len=64" in capsys.readouterr().err
    assert gen.run_generate(cli_args("--prompt", "a", "--stop", "ab"), model, tok) == 2
