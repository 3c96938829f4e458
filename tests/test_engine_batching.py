"""What makes the serving engine fast under load, and what it must keep: the batched decode step
(common/runtime/engine_decode.py), the prefill plan that lets short prompts go first beside a long one
(Engine._plan_prefill), and the engine loop's one hand-over of events per forward (common/serve/loop.py).
fp32 with kv_fp8_sim "clamp", as tests/test_engine.py (token equality then does not hang on FP8 near-ties)."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_model import rand_prompt, tiny_clamp_model  # tests/ is on sys.path

from dsv4.common.runtime.engine import Engine, Request, SamplingParams
from dsv4.common.runtime.engine_decode import BatchedDecode
from dsv4.common.serve.loop import EngineLoop

MAX_SEQ = 512
# the batched step runs the static step's arithmetic: equal to the eager forward up to GEMM batch-shape rounding
# (tests/test_static_decode.py STATIC_VS_EAGER, measured 2e-6 on logits of magnitude ~4)
BATCHED_VS_EAGER = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_clamp_model()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def alone(model, prompt: list[int], n: int) -> list[int]:
    eng = Engine(model, max_batch=1, max_seq_len=MAX_SEQ, prefill_chunk=64)
    r = eng.add(Request(prompt, greedy(n)))
    list(eng.run_until_idle())
    return r.output


def test_batched_decode_equals_the_eager_forward(model):
    """Five slots at positions on both sides of block boundaries (4 for CSA and the indexer, 128 for HCA), fed in a
    scattered slot order for six steps: the batched step's logits and cache rows equal each row's eager forward."""
    lengths = [3, 127, 126, 254, 40]
    seqs = [rand_prompt(n + 6, 10 + b) for b, n in enumerate(lengths)]
    cache = model.new_cache(len(lengths), MAX_SEQ)
    for b, n in enumerate(lengths):
        model(torch.tensor([seqs[b][:n]]), cache, slots=slice(b, b + 1))
    ref = copy.deepcopy(cache)
    dec = BatchedDecode(model, cache, min_rows=2)
    order = [4, 0, 2, 1, 3]
    for t in range(6):
        tok = torch.tensor([seqs[b][lengths[b] + t] for b in order])
        got = dec.step(tok, order)
        want = torch.cat([model(tok[i:i + 1, None], ref, slots=slice(b, b + 1))[:, 0] for i, b in enumerate(order)])
        torch.testing.assert_close(got, want, atol=BATCHED_VS_EAGER, rtol=0)
    assert dec.steps == 6
    assert cache.lengths.tolist() == [n + 6 for n in lengths] == ref.lengths.tolist()
    slots, end = torch.arange(len(lengths)), max(lengths) + 6
    W = model.args.window_size
    for i in range(len(cache.layers)):  # every slot's rows, gathered through its own block table
        lc, lr = cache.layer_for(i, slots, end), ref.layer_for(i, slots, end)
        for b, n in enumerate(cache.lengths.tolist()):
            # the ring and the entry rows of the slot's allocated blocks; beyond them the gather reads the scratch row,
            # whose content is undefined (it takes the writes that have no row of their own)
            held = cache.blocks_needed(n) * cache.block_tokens
            got_kv, want_kv = (t[b, :W + (held // lc.ratio if lc.ratio else 0)] for t in (lc.kv, lr.kv))
            torch.testing.assert_close(got_kv, want_kv, atol=BATCHED_VS_EAGER, rtol=0)
            if lc.index_kv is not None:  # FP4-simulated: a last-bit difference can move a value one FP4 grid step
                torch.testing.assert_close(lc.index_kv[b, :held // 4], lr.index_kv[b, :held // 4], atol=1e-4, rtol=0)


def test_batched_decode_refuses_what_the_eager_forward_refuses(model):
    cache = model.new_cache(2, 8)
    model(torch.tensor([[5] * 8]), cache, slots=slice(0, 1))
    with pytest.raises(Exception, match="max_seq_len=8"):  # the cache's ContextLengthError, with its advice
        BatchedDecode(model, cache).step(torch.tensor([3]), [0])
    with pytest.raises(ValueError, match="position 0"):
        BatchedDecode(model, cache).step(torch.tensor([3]), [1])


def test_engine_decodes_many_rows_in_one_batched_step_with_the_same_tokens(model):
    """Four requests at different positions (late arrival, one finishing early): from `min_rows` decoding rows the
    engine's decode steps run batched, fewer rows run eager, and every request's greedy tokens equal its run alone."""
    prompts = [rand_prompt(n, 20 + i) for i, n in enumerate((9, 40, 131, 20))]
    want = [alone(model, p, 8) for p in prompts]
    eng = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, prefill_chunk=32, batched_decode_min_rows=3)
    reqs = [eng.add(Request(p, greedy(8))) for p in prompts[:3]]
    for _ in range(3):
        eng.step()
    reqs.append(eng.add(Request(prompts[3], greedy(8))))
    list(eng.run_until_idle())
    assert [r.output for r in reqs] == want
    batched = eng.runner.batched
    assert batched is not None and batched.steps > 0
    total = sum(r.stats.forwards for r in reqs)
    assert batched.steps * 3 <= total  # each batched step served at least min_rows requests


def test_one_token_prompt_prefills_through_the_eager_forward(model):
    """A one-token prompt's prefill is a one-token step at position 0, which the batched step does not take (the eager
    forward initialises the compressor states there). Here it shares its forward with another prompt's last token
    (rows at positions 16 and 0); the decodes after it run batched, their positions differing."""
    long_p, short_p = rand_prompt(17, 61), [7]
    eng = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, prefill_chunk=32, step_tokens=16, batched_decode_min_rows=2)
    a = eng.add(Request(long_p, greedy(4)))
    eng.step()  # the step budget (16) takes a's first 16 tokens
    b = eng.add(Request(short_p, greedy(4)))
    list(eng.run_until_idle())
    assert [a.output, b.output] == [alone(model, long_p, 4), alone(model, short_p, 4)]
    assert eng.runner.batched.steps == 3


def test_rows_at_one_position_decode_through_the_eager_forward(model):
    """Requests that started together with equal prompt lengths decode at one position: the eager forward runs the
    compressors once for all of them and is the cheaper path there (scripts/bench_decode_rows.py), so the batched
    step is not taken; the tokens equal each request's run alone."""
    prompts = [rand_prompt(12, 70 + i) for i in range(4)]
    eng = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, batched_decode_min_rows=2)
    reqs = [eng.add(Request(p, greedy(3))) for p in prompts]
    list(eng.run_until_idle())
    assert [r.output for r in reqs] == [alone(model, p, 3) for p in prompts]
    assert eng.runner.batched is not None and eng.runner.batched.steps == 0


def test_engine_without_batched_decode_keeps_the_eager_forward(model):
    eng = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, batched_decode_min_rows=None)
    for i in range(4):
        eng.add(Request(rand_prompt(12, 30 + i), greedy(3)))
    list(eng.run_until_idle())
    assert eng.runner.batched is None


def test_short_prompt_prefills_in_the_next_step_while_a_long_one_chunks(model):
    """A long prompt prefills 16 tokens a step. A short request that arrives meanwhile gets its whole prefill (and
    its first token) in the very next step, which leaves the long chunk out; the long prompt never yields two
    steps running (it cannot starve); its tokens equal its run alone."""
    long_prompt = rand_prompt(300, 40)
    eng = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, prefill_chunk=32, long_prefill_chunk=16)
    long = eng.add(Request(long_prompt, greedy(3)))
    eng.step()
    eng.step()
    assert long.n_fed == 32
    forwards = []
    real = eng.runner.forward

    def spy(rows, slots):
        forwards.append([len(r) for r in rows])
        return real(rows, slots)

    eng.runner.forward = spy
    short = eng.add(Request(rand_prompt(20, 41), greedy(1)))
    eng.step()
    assert short.finished and len(short.output) == 1  # admitted, prefilled and its first token out: one step
    assert long.n_fed == 32 and forwards == [[20]]  # that step cost the short prefill alone
    # two short requests in consecutive steps: the first step yields, the second carries the long chunk too
    a = eng.add(Request(rand_prompt(20, 42), greedy(1)))
    forwards.clear()
    eng.step()
    assert a.finished and long.n_fed == 48  # the step after a yield always advances the long prompt
    b = eng.add(Request(rand_prompt(20, 43), greedy(1)))
    eng.step()
    assert b.finished and long.n_fed == 48  # yields again: one step in two at most
    eng.step()
    assert long.n_fed == 64
    list(eng.run_until_idle())
    assert long.output == alone(model, long_prompt, 3)


class FakeLoop:
    """Stands in for the asyncio loop of the HTTP side: records each hand-over and runs it at once."""

    def __init__(self) -> None:
        self.calls = 0

    def call_soon_threadsafe(self, fn, *args) -> None:
        self.calls += 1
        fn(*args)


class FakeQueue:
    def __init__(self) -> None:
        self.items = []

    def put_nowait(self, item) -> None:
        self.items.append(item)


def test_loop_hands_events_on_once_per_forward(model):
    """Four streaming requests decoding together: one wake-up of the HTTP side per forward (not one per token), each
    request's events in order, the same tokens as driving the engine directly."""
    prompts = [rand_prompt(16, 50 + i) for i in range(4)]
    eng = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, prefill_chunk=32, step_tokens=64)
    loop, fake = EngineLoop(eng), FakeLoop()
    queues = [FakeQueue() for _ in prompts]
    reqs = [loop.submit(p, greedy(5), fake, q, tag) for tag, (p, q) in enumerate(zip(prompts, queues, strict=True))]
    forwards = 0
    real = eng.runner.forward

    def count(rows, slots):
        nonlocal forwards
        forwards += 1
        return real(rows, slots)

    eng.runner.forward = count
    while eng.has_work():
        eng.step()
        loop.flush()
    assert fake.calls == forwards == 5  # one prefill forward (4 rows of 16), then 4 decode forwards
    assert eng.runner.batched.steps == 0  # 4 rows at one position: the eager forward (see above)
    for tag, (r, q) in enumerate(zip(reqs, queues, strict=True)):
        assert [t for t, _ in q.items] == [tag] * 5
        assert [ev.token_id for _, ev in q.items] == r.output == alone(model, prompts[tag], 5)
        assert [ev.finished for _, ev in q.items] == [False] * 4 + [True]
