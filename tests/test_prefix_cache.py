"""Prefix caching (common/runtime/prefix_cache.py and its engine hooks): a prompt resumed from cached blocks and a
boundary snapshot gives the logits, and leaves the cache state, of a cold run of the same prompt.

fp32 with kv_fp8_sim "clamp" (tests/test_decode.py: with "e4m3" different chunkings can flip an FP8 rounding). A hit
prefills only the rest of the prompt, so the comparison is chunked against one-shot prefill: same arithmetic up to
summation order, ATOL = tests/test_decode.py's 5e-5 (measured ~5e-6 there)."""

from __future__ import annotations

import pytest
import torch
from engine_model import rand_prompt, tiny_clamp_model  # tests/ is on sys.path

from dsv4.common.runtime.engine import Engine, Request, SamplingParams
from dsv4.common.runtime.engine_runner import ModelRunner
from dsv4.common.runtime.prefix_cache import PrefixCacheFileError, PrefixCacheOptions, block_keys, model_fingerprint

MAX_SEQ = 512
ATOL = 5e-5  # chunked vs one-shot prefill in fp32 clamp mode (tests/test_decode.py)
B = 128


@pytest.fixture(scope="module")
def model():
    return tiny_clamp_model()


def options(budget: int = 1 << 30, interval: int = B, **kw) -> PrefixCacheOptions:
    return PrefixCacheOptions(budget_bytes=budget, snapshot_interval=interval, **kw)


def engine(model, **kw) -> Engine:
    kw.setdefault("prefix_cache", options())
    return Engine(model, max_batch=kw.pop("max_batch", 2), max_seq_len=MAX_SEQ, prefill_chunk=96, **kw)


def run(eng: Engine, prompts: list[list[int]], n: int = 1, speculative: bool = False) -> list[Request]:
    reqs = [eng.add(Request(p, SamplingParams(max_tokens=n, ignore_eos=True, speculative=speculative)))
            for p in prompts]
    list(eng.run_until_idle())
    assert all(r.finish_reason == "length" for r in reqs), [r.error for r in reqs]
    return reqs


def slot_state(runner: ModelRunner, slot: int, length: int, with_mtp: bool) -> dict[str, torch.Tensor]:
    """Everything of `slot` that positions >= length can read, gathered through its block table: every layer's
    ring (the MTP layer's when it was fed), the compressed rows and indexer keys of complete blocks, the
    compressor states' live rows."""
    a, out = runner.model.args, {}
    n = len(runner.cache.layers) if with_mtp else a.n_layers
    for i in range(n):
        lc = runner.cache.layer_for(i, slice(slot, slot + 1), length)
        out[f"{i}.kv"] = lc.kv[0]  # [W + length // ratio, D]: ring, then the compressed entries
        if lc.ratio:
            pending = lc.comp.rows(length // lc.ratio)  # the block in progress: its rows fed so far
            out[f"{i}.comp.kv"] = lc.comp.kv[0, pending][:length % lc.ratio]
        if lc.index_kv is not None:
            out[f"{i}.index_kv"] = lc.index_kv[0]
        for part, st in (("comp", lc.comp), ("index_comp", lc.index_comp)):
            if st is not None and st.overlap and length >= 4:
                back = st.rows(length // st.ratio - 1)  # the look-back block
                out[f"{i}.{part}.prev_kv"] = st.kv[0, back]
                out[f"{i}.{part}.prev_score"] = st.score[0, back]
    return out


def hit_vs_cold(model, first: list[int], second: list[int], want_hit: int, speculative: bool = False,
                decode_steps: int = 4) -> None:
    """Register `first` through the engine, resume `second` from the cache in a fresh slot, and compare the
    rest-of-prompt logits, a few decode steps and the whole slot state against a cold run of `second`."""
    eng = engine(model)
    run(eng, [first], speculative=speculative)
    runner = eng.runner
    slot = 1
    runner.reset(slot)
    n, _ = runner.use_prefix(slot, second, speculative)
    assert n == want_hit
    cold = ModelRunner(model, 1, MAX_SEQ)
    cold.reset(0)
    if speculative:
        got = runner.prefill_speculative(slot, second[n:], n)[0]
        want = cold.prefill_speculative(0, second, 0)[0, n:]
    else:
        got = runner.forward([second[n:]], [slot])[0]
        want = cold.forward([second], [0])[0, n:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    tok = int(want[-1].argmax())
    if speculative:  # the MTP layer's cache was resumed too: its draft and its ring must be the cold run's
        runner.first_draft(slot, tok, len(second))
        cold.first_draft(0, tok, len(second))
        assert int(runner.draft[slot]) == int(cold.draft[0])
        mtp = model.args.n_layers
        torch.testing.assert_close(runner.cache.layers[mtp].ring[slot], cold.cache.layers[mtp].ring[0], atol=ATOL,
                                   rtol=1e-5)
    for _ in range(decode_steps):  # later blocks (ratio-4 overlap, the HCA block in progress) read the snapshot
        g = runner.forward([[tok]], [slot])[0, -1]
        w = cold.forward([[tok]], [0])[0, -1]
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-5)
        tok = int(w.argmax())
    length = len(second) + decode_steps
    assert int(runner.cache.lengths[slot]) == int(cold.cache.lengths[0]) == length
    got_state, want_state = slot_state(runner, slot, length, speculative), slot_state(cold, 0, length, speculative)
    for k in want_state:
        torch.testing.assert_close(got_state[k], want_state[k], atol=ATOL, rtol=1e-5, msg=k)


def test_hit_on_a_block_boundary(model):
    """The shared prefix is exactly one block (128 tokens): the suffix starts a new block of every compressor."""
    x = rand_prompt(B, 1)
    hit_vs_cold(model, x + rand_prompt(20, 2), x + rand_prompt(30, 3), want_hit=B)


def test_hit_inside_an_hca_block(model):
    """128 + 40: one block is reused, the 40 tokens of the next (unfinished) HCA block are prefilled."""
    first = rand_prompt(300, 4)
    hit_vs_cold(model, first, first[:168], want_hit=B)


def test_hit_across_window_wraps(model):
    """A prefix of 300 > W = 128: the ring has wrapped twice; the resume point is the block boundary 256."""
    first = rand_prompt(300, 5)
    hit_vs_cold(model, first, first + rand_prompt(45, 6), want_hit=2 * B, decode_steps=6)


def test_hit_with_mtp_speculation(model):
    first = rand_prompt(270, 7)
    hit_vs_cold(model, first, first[:256] + rand_prompt(40, 8), want_hit=2 * B, speculative=True)


def test_speculative_request_skips_snapshots_without_mtp_state(model):
    eng = engine(model)
    first = rand_prompt(200, 9)
    run(eng, [first])  # a plain request: its MTP layer was never fed
    eng.runner.reset(1)
    assert eng.runner.use_prefix(1, first, True)[0] == 0
    eng.runner.reset(1)
    assert eng.runner.use_prefix(1, first, False)[0] == B


def test_engine_tokens_equal_cold_and_counters(model):
    """Greedy tokens of requests that hit equal those of an engine without a prefix cache, plain and speculative;
    the hit counters say what was skipped."""
    doc = rand_prompt(260, 10)
    prompts = [doc + rand_prompt(15, 11), doc + rand_prompt(25, 12)]
    for spec in (False, True):
        cold = engine(model, prefix_cache=None)
        want = [r.output for r in run(cold, prompts, n=6, speculative=spec)]
        eng = engine(model)
        got = [run(eng, [p], n=6, speculative=spec)[0] for p in prompts]
        assert [r.output for r in got] == want
        assert [r.stats.cached_tokens for r in got] == [0, 2 * B]
        st = eng.prefix_stats
        assert (st.hits, st.misses, st.hit_tokens) == (1, 1, 2 * B)


def test_where_prompts_diverge_becomes_a_snapshot(model):
    """A document of 2 blocks + 100 tokens and questions of 60, with the default snapshot interval (2048): the first
    prompt's only snapshot (384) lies inside its question, so the second prompt misses, but its blocks match the
    first's for 256 tokens and it snapshots there; the third resumes at 256. Tokens equal the cold ones."""
    doc = rand_prompt(2 * B + 100, 15)
    prompts = [doc + rand_prompt(60, 16 + i) for i in range(3)]
    eng = engine(model, prefix_cache=options(interval=2048))
    got = [run(eng, [p], n=3)[0] for p in prompts]
    assert [r.stats.cached_tokens for r in got] == [0, 0, 2 * B]
    cold = engine(model, prefix_cache=None)
    assert [r.output for r in got] == [run(cold, [p], n=3)[0].output for p in prompts]


def test_whole_prompt_cached_backs_off_one_block(model):
    """A repeated prompt of exactly 2 blocks resumes at 128 (the last token must be computed for logits)."""
    p = rand_prompt(2 * B, 13)
    eng = engine(model)
    first = run(eng, [p], n=3)[0]
    again = run(eng, [p], n=3)[0]
    assert again.stats.cached_tokens == B and again.output == first.output


def test_concurrent_requests_share_a_prefix(model):
    """Three requests over one cached prefix run at once (different suffixes, one with MTP): each gets the tokens
    it gets alone in a cold engine."""
    doc = rand_prompt(256, 14)
    eng = engine(model, max_batch=3)
    run(eng, [doc + [5]], speculative=True)  # its snapshot has the MTP state: every request can use it
    prompts = [doc + rand_prompt(k, 20 + k) for k in (3, 17, 40)]
    specs = [False, True, False]
    reqs = [eng.add(Request(p, SamplingParams(max_tokens=5, ignore_eos=True, speculative=s)))
            for p, s in zip(prompts, specs, strict=True)]
    eng.step()  # all three admitted from the cache
    cache = eng.runner.cache
    shared = [e.block for e in eng.runner.prefix.entries.values()][::-1]  # root first
    assert all(cache.blocks_of(r.slot)[:2] == shared for r in reqs)  # the same pool blocks, not copies
    assert [cache.pool.refcount[b] for b in shared] == [4, 4]  # three requests + the prefix cache
    list(eng.run_until_idle())
    assert [cache.pool.refcount[b] for b in shared] == [1, 1]
    for r, p, s in zip(reqs, prompts, specs, strict=True):
        assert r.stats.cached_tokens == 2 * B
        assert r.output == run(engine(model, prefix_cache=None, max_batch=1), [p], n=5, speculative=s)[0].output


def test_eviction_is_lru_under_the_budget(model):
    eng = engine(model)
    docs = [rand_prompt(B + 10, 30 + i) for i in range(3)]
    run(eng, [docs[0]])
    pc = eng.runner.prefix
    one = pc.nbytes  # one block with its snapshot
    assert one > 0 and len(pc.entries) == 1
    pc.budget_bytes = 2 * one
    run(eng, [docs[1]])
    eng.runner.reset(1)
    assert eng.runner.use_prefix(1, docs[0], False)[0] == B  # docs[0] is now the most recently used
    run(eng, [docs[2]])  # over budget: the least recently used (docs[1]) goes
    assert pc.nbytes <= pc.budget_bytes and len(pc.entries) == 2
    keys = [block_keys(d, B)[0] for d in docs]
    assert keys[1] not in pc.entries and keys[0] in pc.entries and keys[2] in pc.entries
    assert pc.stats.evicted_blocks == 1
    assert list(pc.entries) == [keys[0], keys[2]]  # LRU order kept


def test_eviction_never_takes_a_running_requests_block(model):
    """A budget of one byte evicts every cached block except the one a running request resumed from (it shares
    the pool block); once the request ended, that block goes too. The request's tokens are the cold ones."""
    doc = rand_prompt(B + 30, 40)
    eng = engine(model)
    run(eng, [doc])
    pc, pool = eng.runner.prefix, eng.runner.cache.pool
    run(eng, [rand_prompt(B + 7, 42)])  # a second cached block nobody uses
    assert len(pc.entries) == 2
    p = doc[:B] + rand_prompt(20, 41)
    r = eng.add(Request(p, SamplingParams(max_tokens=8, ignore_eos=True)))
    eng.step()  # admitted (hit) and prefilled
    assert r.stats.cached_tokens == B
    shared = eng.runner.cache.blocks_of(r.slot)[0]
    assert pool.refcount[shared] == 2 and pc.evictable() == 1
    pc.budget_bytes = 1
    pc.evict()
    assert [e.block for e in pc.entries.values()] == [shared]  # only the block in use survived
    assert pc.reclaim(5) == 0  # the allocator cannot take it either
    list(eng.run_until_idle())
    assert r.output == run(engine(model, prefix_cache=None), [p], n=8)[0].output
    assert pool.refcount[shared] == 1 and pc.evictable() == 1
    pc.evict()
    assert not pc.entries and pc.nbytes == 0 and pool.num_used == 0


def test_allocation_evicts_cached_blocks_when_the_pool_runs_short(model):
    """A pool of 4 blocks, 3 of them cached after the first prompt: a new 2-block request takes them back from
    the cache, least recently used first, instead of failing."""
    eng = engine(model, max_batch=1, kv_blocks=4)  # a pool smaller than max_seq_len
    first = rand_prompt(3 * B + 10, 43)
    run(eng, [first])
    pc, pool = eng.runner.prefix, eng.runner.cache.pool
    keys = block_keys(first, B)
    assert list(pc.entries) == keys[::-1] and pool.num_free == 1  # registered leaf first: the tail is oldest
    other = rand_prompt(2 * B - 10, 44)
    got = run(eng, [other], n=4)[0]
    assert got.output == run(engine(model, prefix_cache=None), [other], n=4)[0].output
    # block 2 (the tail, least recently used) was taken back; the new prompt's first block is cached beside
    assert list(pc.entries) == [keys[1], keys[0], block_keys(other, B)[0]]
    assert pool.num_used == 3


def test_accounting_back_to_zero_after_clear(model):
    eng = engine(model)
    run(eng, [rand_prompt(3 * B + 5, 50), rand_prompt(B + 1, 51)])
    pc = eng.runner.prefix
    assert pc.nbytes == sum(e.nbytes for e in pc.entries.values()) > 0
    assert eng.runner.cache.pool.num_used == len(pc.entries)  # the requests ended: only the cache holds blocks
    assert eng.pool_stats()["blocks_free"] == eng.n_blocks  # idle cached blocks count as free
    eng.runner.clear_prefix()
    assert pc.nbytes == 0 and not pc.entries
    assert sorted(eng.free) == [0, 1] and not eng.active and eng.runner.cache.pool.num_used == 0


def test_persisted_cache_round_trip_and_refusals(model, tmp_path):
    fp = model_fingerprint("random:tiny:seed0", model)
    path = tmp_path / "prefix.safetensors"
    doc = rand_prompt(2 * B + 20, 60)
    eng = engine(model, prefix_cache=options(fingerprint=fp, path=str(path)))
    first = run(eng, [doc], n=4)[0]
    assert eng.save_prefix_cache() == 2
    # a fresh engine (a new process in real use) loads it and resumes from it
    eng2 = engine(model, prefix_cache=options(fingerprint=fp, path=str(path)))
    assert eng2.load_prefix_cache() == 2
    again = run(eng2, [doc], n=4)[0]
    assert again.stats.cached_tokens == 2 * B and again.output == first.output
    eng2.runner.reset(1)
    n, _ = eng2.runner.use_prefix(1, doc, False)
    got = eng2.runner.forward([doc[n:]], [1])[0]
    want = ModelRunner(model, 1, MAX_SEQ).forward([doc], [0])[0, n:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)

    foreign = engine(model, prefix_cache=options(fingerprint="another-model", path=str(path)))
    with pytest.raises(PrefixCacheFileError, match="fingerprint"):
        foreign.load_prefix_cache()
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # one bit of one tensor
    bad = tmp_path / "modified.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(PrefixCacheFileError, match="content hash"):
        engine(model, prefix_cache=options(fingerprint=fp, path=str(bad))).load_prefix_cache()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PrefixCacheFileError, match="not a readable"):
        engine(model, prefix_cache=options(fingerprint=fp, path=str(tmp_path / "junk.safetensors"))
               ).load_prefix_cache()


def test_cli_persists_and_refuses_in_one_line(tmp_path, capsys):
    """dsv4 generate --prefix-cache-dir: the second run resumes from the file the first wrote; a file of another
    model or with a changed byte ends with one line naming the file and what did not match, exit 2."""
    from dsv4.common.cli import main

    n = torch.get_num_threads()
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # 181 byte tokens: one cached block
    argv = ["generate", "--prompt", prompt, "--max-new-tokens", "2", "--prefix-cache-dir", str(tmp_path)]
    try:
        assert main(argv) == 0
        assert "0 prompt tok from the prefix cache" in capsys.readouterr().err
        assert main(argv) == 0
        assert f"{B} prompt tok from the prefix cache" in capsys.readouterr().err
        assert main(argv + ["--config", "tiny-release-attn"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "prefix-cache.safetensors: written for model fingerprint" in err[-1]
        assert "Traceback" not in "\n".join(err)
        f = tmp_path / "prefix-cache.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0x10
        f.write_bytes(bytes(data))
        assert main(argv) == 2
        assert "content hash does not match" in capsys.readouterr().err.strip().splitlines()[-1]
        assert main(["generate", "--prompt", "x", "--prefix-cache-bytes", "12Q"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "dsv4: error: --prefix-cache-bytes '12Q': expected a size like 1073741824, 512M or 2G")
    finally:
        torch.set_num_threads(n)


def test_metrics_count_hits_misses_and_hit_tokens(model):
    pytest.importorskip("prometheus_client")
    from dsv4.common.serve.metrics import Metrics

    eng = engine(model)
    metrics = Metrics(eng)
    doc = rand_prompt(B + 20, 70)
    run(eng, [doc, rand_prompt(30, 71)])  # both admitted at once: two misses
    run(eng, [doc])  # a hit of one block
    text = metrics.render().decode()
    for line in ("dsv4_prefix_cache_hits_total 1.0", "dsv4_prefix_cache_misses_total 2.0",
                 f"dsv4_prefix_cache_hit_tokens_total {float(B)}"):
        assert line in text, text
    assert f"dsv4_prefix_cache_bytes {float(eng.prefix_cache_bytes)}" in text and eng.prefix_cache_bytes > 0


def test_hits_through_the_static_decode_step(model):
    """Decode steps of resumed requests through the static-shape step (the block-table gather it builds) give the
    cold engine's tokens."""
    doc = rand_prompt(B + 50, 80)
    prompts = [doc[:B] + rand_prompt(9, 81), doc[:B] + rand_prompt(33, 82)]
    want = [r.output for r in run(engine(model, prefix_cache=None), prompts, n=5)]
    eng = engine(model, compile_decode="eager", compile_batch_sizes=(1, 2))
    run(eng, [doc])
    got = run(eng, prompts, n=5)
    assert [r.stats.cached_tokens for r in got] == [B, B] and [r.output for r in got] == want
