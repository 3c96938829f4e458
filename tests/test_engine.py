"""The continuous-batching engine (common/runtime/engine.py, engine_runner.py) and the slot-index path of the model
and cache (common/model/cache.py layer_for / write_back). fp32 with kv_fp8_sim "clamp" (see tests/test_generate.py:
with "e4m3" different chunkings can round the FP8 KV simulation differently, which would make token equality depend
on near-ties rather than on the scheduling under test)."""

from __future__ import annotations

import pytest
import torch
from engine_model import rand_prompt, tiny_clamp_model  # tests/ is on sys.path

from dsv4.common.model.cache import ContextLengthError
from dsv4.common.runtime.engine import Engine, ParamError, QueueFull, Request, SamplingParams

MAX_SEQ = 512


@pytest.fixture(scope="module")
def model():
    return tiny_clamp_model()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def alone(model, prompt: list[int], params: SamplingParams) -> list[int]:
    eng = Engine(model, max_batch=1, max_seq_len=MAX_SEQ, prefill_chunk=64)
    r = eng.add(Request(prompt, params))
    list(eng.run_until_idle())
    return r.output


P = [rand_prompt(9, 1), rand_prompt(40, 2), rand_prompt(131, 3), rand_prompt(20, 4)]


@pytest.fixture(scope="module")
def greedy_alone(model):
    return [alone(model, p, greedy(8)) for p in P]


def test_index_slots_equal_slice_slots(model):
    """One forward over slots [2, 0] (an index tensor, rows at different positions) gives bit for bit the logits
    and cache contents of the same batch held in slots [0, 1] and run through a slice: only the gather differs."""
    a, b = model.new_cache(3, MAX_SEQ), model.new_cache(3, MAX_SEQ)
    pa, pb = torch.tensor([P[0][:7]]), torch.tensor([P[2][:130]])  # 130: the ratio-128 layer has one entry
    model(pa, a, slots=slice(2, 3))
    model(pb, a, slots=slice(0, 1))
    model(pa, b, slots=slice(0, 1))
    model(pb, b, slots=slice(1, 2))
    x = torch.tensor([[P[0][7]], [P[2][130]]])
    got = model(x, a, slots=torch.tensor([2, 0]))
    want = model(x, b, slots=slice(0, 2))
    assert torch.equal(got, want)
    assert a.lengths.tolist() == [131, 0, 8] and b.lengths.tolist() == [8, 131, 0]
    W = model.args.window_size
    for i in range(len(a.layers)):  # each slot's rows, gathered through its block table, up to what it holds
        la, lb = a.layer_for(i, torch.tensor([2, 0]), 131), b.layer_for(i, torch.tensor([0, 1]), 131)
        for row, n in ((0, 8), (1, 131)):
            assert torch.equal(la.kv[row, :W + (n // la.ratio if la.ratio else 0)],
                               lb.kv[row, :W + (n // lb.ratio if lb.ratio else 0)])
            if la.index_kv is not None:
                assert torch.equal(la.index_kv[row, :n // 4], lb.index_kv[row, :n // 4])
        if la.comp is not None:
            assert torch.equal(la.comp.kv, lb.comp.kv)
    # and each row equals its sequence run alone, up to batch-size effects on the GEMMs (fp32: observed ~1e-6)
    c = model.new_cache(1, MAX_SEQ)
    model(pb, c)
    torch.testing.assert_close(got[1:], model(x[1:], c), atol=1e-4, rtol=1e-4)


def test_late_arrivals_and_scattered_slots_keep_each_output(model, greedy_alone, monkeypatch):
    """Requests arrive while others decode, one finishes early so the running slots are not one run; every
    request's greedy tokens equal its run alone, and some decode forward really used an index tensor."""
    used_index = []
    real = model.forward

    def spy(tokens, cache=None, slots=None, return_hidden=False):
        used_index.append(isinstance(slots, torch.Tensor) and tokens.shape[0] > 1)
        return real(tokens, cache, slots, return_hidden)

    monkeypatch.setattr(model, "forward", spy)
    eng = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, prefill_chunk=32)
    reqs = [eng.add(Request(P[0], greedy(8))), eng.add(Request(P[1], greedy(2))), eng.add(Request(P[3], greedy(8)))]
    for _ in range(4):  # P[1] finishes: slots 0 and 2 decode together (an index tensor)
        eng.step()
    assert reqs[1].finished and not reqs[0].finished
    reqs.append(eng.add(Request(P[2], greedy(8))))  # arrives mid-decode, takes slot 1: rows [0, 2, 1]
    list(eng.run_until_idle())
    assert reqs[3].slot == 1
    for r, want in zip(reqs, [greedy_alone[0], greedy_alone[1][:2], greedy_alone[3], greedy_alone[2]], strict=True):
        assert r.output == want
    assert any(used_index), "no decode forward ran on an index tensor of slots"


def test_captured_decode_step_keeps_each_output(model, greedy_alone):
    """The same late arrivals and scattered slots with decode steps through the static-shape step (compile_decode,
    uncaptured "eager" mode: the arithmetic a capture records): every request's greedy tokens are unchanged, and the
    plain decode steps really ran static (padded 3 -> 4 rows), none eager."""
    eng = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, prefill_chunk=32, compile_decode="eager",
                 compile_batch_sizes=(1, 2, 4))
    reqs = [eng.add(Request(P[0], greedy(8))), eng.add(Request(P[1], greedy(2))), eng.add(Request(P[3], greedy(8)))]
    for _ in range(4):
        eng.step()
    reqs.append(eng.add(Request(P[2], greedy(8))))
    list(eng.run_until_idle())
    for r, want in zip(reqs, [greedy_alone[0], greedy_alone[1][:2], greedy_alone[3], greedy_alone[2]], strict=True):
        assert r.output == want
    steps = eng.runner.static.steps
    assert steps["static"] > 0 and steps["eager"] == 0, steps


def test_long_prompt_does_not_stall_decodes(model, greedy_alone):
    """A 300-token prompt with a 32-token budget per step prefills over many steps; the decoding request gets one
    token in every one of those steps."""
    eng = Engine(model, max_batch=2, max_seq_len=MAX_SEQ, prefill_chunk=32, step_tokens=32)
    dec = eng.add(Request(P[0], greedy(30)))
    while not dec.output:
        eng.step()
    long = eng.add(Request(rand_prompt(300, 9), greedy(2)))
    steps = 0
    while long.status != "running" and not long.finished:
        n = len(dec.output)
        eng.step()
        steps += 1
        assert len(dec.output) == n + 1, "a decode step was skipped while the long prompt prefilled"
    assert steps >= 300 // 32
    list(eng.run_until_idle())
    assert dec.output[:8] == greedy_alone[0]


def test_seeded_sampling_ignores_the_batch(model):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    solo = alone(model, P[1], params)
    eng = Engine(model, max_batch=3, max_seq_len=MAX_SEQ, prefill_chunk=16)
    eng.add(Request(P[0], SamplingParams(max_tokens=5, temperature=0.8, seed=1, ignore_eos=True)))
    eng.step()
    r = eng.add(Request(P[1], params))
    eng.add(Request(P[2], greedy(6)))
    list(eng.run_until_idle())
    assert r.output == solo
    assert alone(model, P[1], SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=8,
                                             ignore_eos=True)) != solo


def test_cancel_frees_the_slot(model):
    eng = Engine(model, max_batch=1, max_seq_len=MAX_SEQ, prefill_chunk=64)
    r = eng.add(Request(P[0], greedy(50)))
    eng.step()
    eng.step()
    waiting = eng.add(Request(P[1], greedy(3)))
    eng.step()
    assert waiting.status == "waiting"  # the only slot is taken
    eng.cancel(r)
    list(eng.run_until_idle())
    assert r.finish_reason == "abort" and len(r.output) < 50
    assert waiting.finish_reason == "length" and len(waiting.output) == 3


def test_a_failing_request_fails_alone(model, greedy_alone, monkeypatch):
    eng = Engine(model, max_batch=2, max_seq_len=MAX_SEQ, prefill_chunk=64)
    ok = eng.add(Request(P[0], greedy(8)))
    bad = eng.add(Request(P[1], greedy(8)))
    real = eng._sample

    def sample(r, row, best):
        if r is bad and len(bad.output) == 2:
            raise RuntimeError("injected failure")
        return real(r, row, best)

    monkeypatch.setattr(eng, "_sample", sample)
    list(eng.run_until_idle())
    assert bad.finish_reason == "error" and "injected failure" in bad.error and len(bad.output) == 2
    assert ok.finish_reason == "length" and ok.output == greedy_alone[0]  # shared every decode forward with bad
    later = eng.add(Request(P[0], greedy(8)))
    list(eng.run_until_idle())
    assert later.output == greedy_alone[0]


def test_speculative_request_beside_plain_ones(model, greedy_alone):
    eng = Engine(model, max_batch=3, max_seq_len=MAX_SEQ, prefill_chunk=32)
    spec = eng.add(Request(P[2], greedy(8, speculative=True)))
    plain = [eng.add(Request(P[0], greedy(8))), eng.add(Request(P[1], greedy(8)))]
    list(eng.run_until_idle())
    assert spec.output == greedy_alone[2]
    assert [r.output for r in plain] == greedy_alone[:2]
    assert spec.stats.drafted > 0


def test_prompt_and_sample_logprobs_equal_a_full_forward(model):
    prompt = P[1]
    eng = Engine(model, max_batch=1, max_seq_len=MAX_SEQ, prefill_chunk=16)  # several chunks
    r = eng.add(Request(prompt, greedy(3, logprobs=3, prompt_logprobs=2)))
    list(eng.run_until_idle())
    full = torch.log_softmax(model(torch.tensor([prompt + r.output]))[0], -1)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        lp = r.prompt_logprobs[i]
        assert lp.token_id == prompt[i]
        # chunked vs one-shot prefill in fp32: same arithmetic up to summation order (observed < 1e-5)
        assert lp.logprob == pytest.approx(float(full[i - 1, prompt[i]]), abs=1e-4)
        assert [t for t, _ in lp.top] == full[i - 1].topk(2).indices.tolist()
    for j, lp in enumerate(r.output_logprobs):
        row = full[len(prompt) - 1 + j]
        assert lp.token_id == r.output[j] == int(row.argmax())
        assert lp.top[0][0] == lp.token_id and len(lp.top) == 3
        assert lp.logprob == pytest.approx(float(row.max()), abs=1e-4)


def test_request_errors_name_the_parameter(model):
    eng = Engine(model, max_batch=1, max_seq_len=64, prefill_chunk=16, max_waiting=1)
    cases = [(SamplingParams(max_tokens=-1), "max_tokens"), (SamplingParams(temperature=-0.5), "temperature"),
             (SamplingParams(logprobs=21), "logprobs"), (SamplingParams(prompt_logprobs=50), "prompt_logprobs"),
             (SamplingParams(top_p=0.0), "top_p"), (SamplingParams(speculative=True, temperature=1.0), "speculative"),
             (SamplingParams(temperature=float("nan")), "temperature"),
             (SamplingParams(temperature=float("inf")), "temperature")]
    for params, name in cases:
        with pytest.raises(ParamError) as e:
            eng.add(Request([5, 6], params))
        assert e.value.param == name and name in str(e.value)
    with pytest.raises(ContextLengthError, match="max_seq_len=64"):
        eng.add(Request([5] * 60, SamplingParams(max_tokens=10)))
    eng.add(Request([5], SamplingParams(max_tokens=1)))
    with pytest.raises(QueueFull):
        eng.add(Request([5], SamplingParams(max_tokens=1)))


def test_stop_strings_end_the_text_and_are_held_back_until_settled(model):
    """A stop string ends the request with the text before it; text that could start a stop string is not sent
    until the next token settles it, so the streamed pieces always add up to the final text."""
    from dsv4.common.checkpoint.tokenizer import TextTokenizer

    tok = TextTokenizer.byte_level(model.args)
    prompt = tok.encode("a" * 90)
    eng = Engine(model, max_batch=1, max_seq_len=MAX_SEQ, prefill_chunk=64, tokenizer=tok)
    free = eng.add(Request(prompt, greedy(24)))
    list(eng.run_until_idle())
    text = free.text
    # two printable ASCII characters after the first one (random weights emit stray bytes too)
    first = next(i for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable()
                 and text.find(text[i:i + 2]) == i)
    stop = text[first:first + 2]
    pieces = []
    r = eng.add(Request(prompt, greedy(24, stop=(stop, "never-there")), on_event=lambda ev: pieces.append(ev.text)))
    list(eng.run_until_idle())
    assert r.finish_reason == "stop" and r.stop_reason == stop
    assert r.text == text[:first] and "".join(pieces) == text[:first]


def test_a_request_cancelled_while_waiting_leaves_the_queue(model):
    eng = Engine(model, max_batch=1, max_seq_len=MAX_SEQ, prefill_chunk=64)
    running = eng.add(Request(P[0], greedy(4)))
    queued = [eng.add(Request(P[1], greedy(2))), eng.add(Request(P[3], greedy(2)))]
    eng.step()
    eng.cancel(queued[1])  # behind another waiting request, no slot free
    eng.step()
    assert queued[1].finish_reason == "abort" and eng.num_waiting == 1
    list(eng.run_until_idle())
    assert running.finish_reason == queued[0].finish_reason == "length" and queued[1].output == []
