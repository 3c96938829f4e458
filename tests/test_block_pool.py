"""The KV block pool (common/model/block_pool.py, common/model/cache.py): the allocator's accounting, and logits
through block tables equal to the per-slot layout it replaced (common/model/cache_dense.py) bit for bit.

fp32 with kv_fp8_sim "clamp" (tests/test_decode.py explains why equality tests use it). The pool changes where rows
live, not what is computed: the gathered tensors a layer sees have the same shapes and values, so eager logits must
be EQUAL, not close. Tables are made non-trivial on purpose (blocks freed out of order before the run, sequences
growing in turns) so that an error in the position -> row translation reads or writes someone else's rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from engine_model import tiny_clamp_model  # tests/ is on sys.path

from dsv4.common.model.block_pool import BlockPool, PoolExhausted
from dsv4.common.model.cache import ContextLengthError, KVCache, SharedBlockWrite
from dsv4.common.model.cache_dense import SlotKVCache
from dsv4.common.runtime.engine import Engine, Request, SamplingParams
from dsv4.common.runtime.engine_runner import ModelRunner
from dsv4.common.runtime.static_decode import StaticDecoder

MAX_SEQ = 512
# the static step's GEMMs see other shapes than the eager forward's (one flat batch): fp32 last-bit differences,
# measured ~1e-6 (tests/test_static_decode.py uses the same bound)
STATIC_VS_EAGER = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_clamp_model()


def seqs(n_rows: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 512, (n_rows, n), generator=torch.Generator().manual_seed(seed))


def fragmented(model, max_batch: int, **kw) -> KVCache:
    """A pool cache whose free list is out of order (blocks taken and given back shuffled), so that no slot's blocks
    come out contiguous or ascending."""
    cache = model.new_cache(max_batch, MAX_SEQ, **kw)
    ids = cache.pool.alloc(cache.pool.num_free)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1)).tolist()
    cache.pool.decref([ids[i] for i in perm])
    return cache


# -- the allocator ----------------------------------------------------------------------------------------------------
def test_alloc_free_refcount():
    pool = BlockPool(4)
    a = pool.alloc(3)
    assert a == [0, 1, 2] and pool.num_free == 1 and pool.num_used == 3
    with pytest.raises(PoolExhausted, match="2 block\\(s\\) needed, 1 free of 4") as e:
        pool.alloc(2)
    assert e.value.needed == 2 and pool.num_free == 1  # all or nothing
    pool.incref([1])
    assert pool.decref(a) == [0, 2]  # block 1 still held once
    assert pool.refcount == [0, 1, 0, 0] and pool.num_free == 3
    assert pool.decref([1]) == [1] and pool.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        pool.decref([1])
    with pytest.raises(ValueError, match="is free"):
        pool.incref([0])
    with pytest.raises(ValueError, match="outside"):
        pool.decref([7])
    assert pool.alloc(4) == [3, 0, 2, 1]  # freed blocks are reused last, in the order they were freed


def test_block_tokens_must_be_a_multiple_of_128(model):
    for bad in (0, 64, 100, 200):
        with pytest.raises(ValueError, match=f"--block-tokens\\) must be a positive multiple of 128.*got {bad}"):
            model.new_cache(1, MAX_SEQ, block_tokens=bad)
    with pytest.raises(ValueError, match="n_blocks"):
        model.new_cache(1, MAX_SEQ, n_blocks=0)
    c = model.new_cache(3, 300, block_tokens=256)
    assert c.max_blocks_per_seq == 2 and c.n_blocks == 6  # default: max_seq_len tokens per slot


def test_cache_accounting_and_sharing(model):
    cache = model.new_cache(3, MAX_SEQ, n_blocks=6)
    assert cache.ensure_capacity(0, 300) == [0, 1, 2] and cache.ensure_capacity(0, 384) == []
    assert cache.block_table[0].tolist() == [0, 1, 2, -1]
    with pytest.raises(PoolExhausted):
        cache.ensure_capacity(1, 512)  # 4 needed, 3 free: nothing taken
    assert cache.pool.num_free == 3 and cache.blocks_of(1) == []
    cache.set_blocks(1, cache.blocks_of(0)[:2])  # slot 1 shares slot 0's first two blocks
    assert cache.pool.refcount[:3] == [2, 2, 1]
    cache.lengths[1] = 256
    with pytest.raises(SharedBlockWrite, match="slot 1: positions 200..200 fall in block 1"):
        cache.check_room(slice(1, 2), torch.tensor([200]), 1)
    cache.check_room(slice(1, 2), torch.tensor([200]), 1, pool_writes=False)  # a window-only layer (MTP): its ring
    cache.check_room(slice(1, 2), torch.tensor([256]), 10)  # past the shared blocks: a fresh block of its own
    assert cache.blocks_of(1) == [0, 1, 3]
    cache.release(0)
    assert cache.pool.refcount[:4] == [1, 1, 0, 1] and cache.pool.num_free == 3
    cache.reset()
    assert cache.pool.num_free == 6 and (cache.block_table == -1).all() and cache.lengths.sum() == 0


# -- logits through the pool == the slot layout ---------------------------------------------------------------------
def run_both(model, fn):
    """fn(cache) -> list of logits, on a fragmented pool and on the per-slot layout; asserts bitwise equality and
    returns both caches."""
    pool, dense = fragmented(model, 4), SlotKVCache(model.args, 4, MAX_SEQ, torch.float32)
    got, want = fn(pool), fn(dense)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"output {i}: max |diff| {(g - w).abs().max().item():.3g}"
    return pool, dense


def test_prefill_chunks_and_scattered_decode_equal_the_slot_layout(model):
    s = seqs(3, 300)

    def run(cache):
        out = [model(s[:1, :270], cache, slots=slice(2, 3))]  # one-shot prefill over 3 blocks
        for lo, hi in ((0, 100), (100, 200), (200, 260)):  # chunks across block and HCA boundaries
            out.append(model(s[1:2, lo:hi], cache, slots=torch.tensor([0])))
        out.append(model(s[2:3, :130], cache, slots=slice(3, 4)))
        for k in range(4):  # rows of slots [3, 2, 0] at positions 130+k, 270+k, 260+k (block 2 ends at 383)
            x = torch.stack([s[2, 130 + k:131 + k], s[0, 270 + k:271 + k], s[1, 260 + k:261 + k]])
            out.append(model(x, cache, slots=torch.tensor([3, 2, 0])))
        out.append(model(torch.stack([s[1, 264:266], s[2, 134:136]]), cache, slots=torch.tensor([0, 3])))  # S=2
        return out

    pool, _ = run_both(model, run)
    assert pool.lengths.tolist() == [266, 0, 274, 136]
    assert [len(pool.blocks_of(b)) for b in range(4)] == [3, 0, 3, 2]
    assert sorted(sum((pool.blocks_of(b) for b in range(4)), [])) != list(range(8))  # really scattered


def test_decode_across_block_boundaries_equals_the_slot_layout(model):
    """Two sequences growing a token at a time over positions 250..262 and 376..388 (block ends 255 and 383, CSA
    and HCA entries completing on the last row of a block)."""
    s = seqs(2, 400, seed=3)

    def run(cache):
        model(s[:1, :250], cache, slots=slice(1, 2))
        model(s[1:, :376], cache, slots=slice(0, 1))
        return [model(torch.stack([s[0, 250 + k:251 + k], s[1, 376 + k:377 + k]]), cache, slots=torch.tensor([1, 0]))
                for k in range(12)]

    run_both(model, run)


def test_mtp_layer_through_the_pool_equals_the_slot_layout(model):
    s = seqs(2, 200, seed=5)

    def run(cache):
        out = []
        for b, n in ((0, 140), (1, 90)):
            logits, hidden = model(s[b:b + 1, :n], cache, slots=slice(b, b + 1), return_hidden="last")
            out += [logits, model.mtp_forward(hidden[-1][:, :-1], s[b:b + 1, 1:n], cache, slice(b, b + 1))]
        x = torch.stack([s[0, 140:142], s[1, 90:92]])
        logits, hidden = model(x, cache, slots=torch.tensor([0, 1]), return_hidden="last")
        start = cache.lengths[:2] - 2
        out += [logits, model.mtp_forward(hidden[-1], x, cache, torch.tensor([0, 1]), start=start)]
        return out

    run_both(model, run)


def test_one_token_decode_attends_over_the_pool_in_place(model, monkeypatch):
    """The eager one-token path reads and writes the pool through translated flat rows, nothing gathered: on one
    contiguous run of slots (a slice) and on scattered slots (an index tensor, rows in another order), across the
    first ring wrap (W = 128) and block boundaries (positions 127/128 and 255/256: CSA and HCA entries completing on a
    block's last row, a new block allocated), with the MTP layer's one-token step, and after a slot's blocks are
    replaced mid-run (the translation tables kept across steps must follow). Logits equal the per-slot layout's bit
    for bit, and so do the rows the pool holds afterwards."""
    W = model.args.window_size
    s = seqs(4, 300, seed=13)
    lens = [120, 247, 60]
    in_place = []  # per KVCache.layer_for call: whether the layer got the store itself (no gathered copy)
    layer_for = KVCache.layer_for

    def spy(self, *args, **kw):
        lc = layer_for(self, *args, **kw)
        in_place.append(lc.store is not None and lc.kv is None)
        return lc

    def run(cache):
        out = []
        for b, n in enumerate(lens):
            model(s[b:b + 1, :n], cache, slots=slice(b, b + 1))
        for _ in range(12):  # one contiguous run of slots, with the MTP layer's step after each token
            p = cache.lengths[:3].clone()
            logits, hidden = model(s[torch.arange(3), p][:, None], cache, slots=slice(0, 3), return_hidden="last")
            out += [logits, model.mtp_forward(hidden[-1], s[torch.arange(3), p + 1][:, None], cache, slice(0, 3))]
        order = torch.tensor([2, 0, 1])
        for _ in range(10):  # scattered: rows of slots 2, 0, 1 at positions 72.., 132.., 259..
            out.append(model(s[order, cache.lengths[order]][:, None], cache, slots=order))
        if isinstance(cache, KVCache):  # slot 0 starts another sequence in other blocks
            cache.release(0)
        cache.lengths[0] = 0
        out.append(model(s[3:, :200], cache, slots=slice(0, 1)))
        for k in range(8):  # the same slot set as before, at 82.., 200.., 269..
            out.append(model(torch.stack([s[2, 82 + k:83 + k], s[3, 200 + k:201 + k], s[1, 269 + k:270 + k]]), cache,
                             slots=order))
        return out

    monkeypatch.setattr(KVCache, "layer_for", spy)
    pool, dense = run_both(model, run)
    n_layers = len(pool.layers) - 1  # the MTP layer comes on top in the MTP steps
    one_token = 12 * (n_layers + 1) + 10 * n_layers + 8 * n_layers
    assert sum(in_place) == one_token and len(in_place) == one_token + 4 * n_layers  # + 4 prefills, gathered
    assert pool.lengths.tolist() == dense.lengths.tolist() == [208, 277, 90, 0]
    for i, st in enumerate(pool.layers):  # every row the decode wrote is where the gathered layout reads it
        for b, n in enumerate(pool.lengths[:3].tolist()):
            got, want = pool.layer_for(i, slice(b, b + 1), n), dense.layers[i]
            assert torch.equal(got.kv[0], want.kv[b, :W + (n // st.ratio if st.ratio else 0)]), (i, b)
            if st.flat_index_kv is not None:
                assert torch.equal(got.index_kv[0], want.index_kv[b, :n // 4]), (i, b)


def test_static_step_through_block_tables(model):
    """The captured decode step reads entries through the block table: on a fragmented pool of 128-token blocks and
    on a contiguous pool of 256-token blocks (two different translations) it gives equal logits, and both are the
    eager per-slot layout's within the static/eager GEMM-shape bound."""
    s = seqs(3, 300, seed=7)
    lengths = [250, 122, 126]  # the ring wrap (128), a block end (255) and the 256-context bucket on the way

    def prefill(cache):
        for b, n in enumerate(lengths):
            model(s[b:b + 1, :n], cache, slots=slice(b, b + 1))
        return cache

    frag = prefill(fragmented(model, 3))
    wide = prefill(model.new_cache(3, MAX_SEQ, block_tokens=256))
    dense = prefill(SlotKVCache(model.args, 3, MAX_SEQ, torch.float32))
    dec_f = StaticDecoder(model, frag, batch_sizes=(4,), capture="eager")
    dec_w = StaticDecoder(model, wide, batch_sizes=(4,), capture="eager")
    for _ in range(8):
        pos = dense.lengths.clone()
        nxt = s[torch.arange(3), pos]
        want = model(nxt[:, None], dense, slots=torch.tensor([0, 1, 2]))[:, 0]
        order = [2, 0, 1]  # rows in another order than the slots
        got_f = dec_f.step(nxt[order], order)
        got_w = dec_w.step(nxt[order], order)
        assert torch.equal(got_f, got_w)
        torch.testing.assert_close(got_f, want[order], atol=STATIC_VS_EAGER, rtol=0)
    assert dec_f.steps == {"static": 8, "eager": 0}
    assert frag.lengths.tolist() == [258, 130, 134] and len(frag.blocks_of(0)) == 3


def test_copy_slot_is_a_deep_copy(model):
    s = seqs(1, 200, seed=9)
    cache = fragmented(model, 3)
    model(s[:, :170], cache, slots=slice(0, 1))
    cache.copy_slot(0, 2)
    assert set(cache.blocks_of(2)).isdisjoint(cache.blocks_of(0))
    a = model(s[:, 170:180], cache, slots=slice(2, 3))
    b = model(s[:, 170:180], cache, slots=slice(0, 1))
    assert torch.equal(a, b)


def test_an_exhausted_pool_takes_nothing(model):
    cache = model.new_cache(2, MAX_SEQ, n_blocks=3)
    s = seqs(2, 300, seed=11)
    model(s[:1, :200], cache, slots=slice(0, 1))
    before = copy.deepcopy((cache.block_table, cache.lengths, cache.pool.refcount))
    with pytest.raises(PoolExhausted):
        model(s[1:, :260], cache, slots=slice(1, 2))  # 3 blocks needed, 1 free
    assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
               for x, y in zip(before, (cache.block_table, cache.lengths, cache.pool.refcount), strict=True))


# -- the engine admits by blocks ----------------------------------------------------------------------------------
def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def prompt(n: int, seed: int) -> list[int]:
    return seqs(1, n, seed)[0].tolist()


def alone(model, p: list[int], params: SamplingParams) -> list[int]:
    eng = Engine(model, max_batch=1, max_seq_len=MAX_SEQ, prefill_chunk=64)
    r = eng.add(Request(p, params))
    list(eng.run_until_idle())
    return r.output


def test_an_exhausted_pool_makes_requests_wait(model):
    """3 blocks of 128 tokens; each request may fill 2 (100 prompt + 40 new tokens): one runs at a time, the others
    wait (slots are free: it is the pool that holds them back), every output equals its run alone, and the pool is
    empty at the end."""
    prompts = [prompt(100, s) for s in (1, 2, 3)]
    eng = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, prefill_chunk=64, kv_blocks=3)
    reqs = [eng.add(Request(p, greedy(40))) for p in prompts]
    seen = []
    while eng.has_work():
        eng.step()
        st = eng.pool_stats()
        seen.append((eng.num_running, eng.num_waiting, st["blocks_used"], st["blocks_reserved"]))
        assert st["blocks_used"] <= st["blocks_reserved"] <= 3
    assert max(s[0] for s in seen) == 1 and (1, 2, 1, 2) in seen and (1, 2, 2, 2) in seen
    for r, p in zip(reqs, prompts, strict=True):
        assert r.finish_reason == "length" and r.output == alone(model, p, greedy(40))
    assert eng.pool_stats()["blocks_used"] == 0 and eng.reserved_blocks == 0 and eng.reserved == {}


def test_a_request_larger_than_the_pool_is_refused_at_once(model):
    eng = Engine(model, max_batch=2, max_seq_len=MAX_SEQ, kv_blocks=2)
    with pytest.raises(ContextLengthError, match="need 3 KV blocks of 128 tokens, the pool has 2"):
        eng.add(Request(prompt(200, 1), greedy(100)))


def test_finished_cancelled_and_failed_requests_free_their_blocks(model, monkeypatch):
    eng = Engine(model, max_batch=3, max_seq_len=MAX_SEQ, prefill_chunk=64, kv_blocks=9)
    ok = eng.add(Request(prompt(150, 1), greedy(6)))
    gone = eng.add(Request(prompt(140, 2), greedy(50)))
    bad = eng.add(Request(prompt(130, 3), greedy(50, seed=666)))
    spec = eng.add(Request(prompt(20, 4), greedy(30, speculative=True)))  # waits for a slot, then MTP-verifies
    real = eng._sample

    def sample(r, row, best):
        if r.params.seed == 666 and len(r.output) == 3:
            raise RuntimeError("injected sampling failure")
        return real(r, row, best)

    monkeypatch.setattr(eng, "_sample", sample)
    for _ in range(8):
        eng.step()
    assert eng.pool_stats()["blocks_used"] >= 5  # 150/140/130 tokens and more: two blocks each
    eng.cancel(gone)
    list(eng.run_until_idle())
    assert (ok.finish_reason, gone.finish_reason, bad.finish_reason, spec.finish_reason) == \
        ("length", "abort", "error", "length")
    assert spec.stats.drafted > 0 and spec.output == alone(model, spec.prompt, greedy(30))
    assert eng.pool_stats() == {"blocks_total": 9, "blocks_used": 0, "blocks_free": 9, "blocks_reserved": 0,
                                "block_tokens": 128}
    assert (eng.runner.cache.block_table == -1).all()


class RecordingMirror:
    """Rank 0's side of Mirror, in one process: the calls a follower rank would receive."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def send(self, name: str, args: tuple) -> None:
        self.calls.append((name, copy.deepcopy(args)))


def test_a_follower_replaying_the_mirrored_calls_has_the_same_block_tables(model):
    """Blocks are allocated inside the mirrored calls and freed by a mirrored release: a follower that replays rank
    0's calls (as engine_runner.follow does) ends with the same tables, refcounts and free list at every point."""
    mirror = RecordingMirror()
    eng = Engine(model, max_batch=3, max_seq_len=MAX_SEQ, prefill_chunk=64, kv_blocks=6, mirror=mirror)
    follower = ModelRunner(model, 3, MAX_SEQ, block_tokens=128, kv_blocks=6)
    follower.following = True
    reqs = [eng.add(Request(prompt(n, n), greedy(k))) for n, k in ((150, 4), (90, 30), (200, 6), (30, 5))]
    replayed = 0
    while eng.has_work():
        eng.step()
        if eng.num_running and reqs[1].status == "running" and not reqs[1].cancelled:
            eng.cancel(reqs[1])
        for name, args in mirror.calls[replayed:]:
            getattr(follower, name)(*args)
        replayed = len(mirror.calls)
        a, b = eng.runner.cache, follower.cache
        assert torch.equal(a.block_table, b.block_table) and a.pool.refcount == b.pool.refcount
        assert list(a.pool._free) == list(b.pool._free)
    assert [r.finish_reason for r in reqs] == ["length", "abort", "length", "length"]
    assert "release" in {name for name, _ in mirror.calls} and follower.cache.pool.num_used == 0
