"""`dsv4 parity endpoint` without a server: the parsers on vLLM- and SGLang-shaped fixtures (tests/fixtures/endpoint,
each citing its source), the per-position metrics against hand-computed values, the client's error handling
(connection refused, timeout, 429 + Retry-After, no log-probs, unknown served model), and whole runs through an
in-process vLLM-shaped transport backed by the tiny model (test_parity_endpoint_fakes.FakeVLLM).
The runs against a real `dsv4 serve` are in test_parity_endpoint_serve.py."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import httpx
import pytest
import torch
from test_parity_endpoint_fakes import FakeVLLM, make_model

from dsv4.common.checkpoint.tokenizer import TextTokenizer
from dsv4.common.parity.endpoint import (
    EndpointProfile,
    first_divergence,
    load_continuations,
    load_prompts,
    position_metrics,
    run_endpoint,
    summarize_teacher,
)
from dsv4.common.parity.endpoint_client import (
    EndpointClient,
    EndpointError,
    PositionLogprobs,
    TokenizationMismatch,
    parse_echo_logprobs,
    parse_generated_ids,
    parse_sglang_generate,
    parse_vllm_prompt_logprobs,
    retry_after_seconds,
)
from dsv4.common.parity.endpoint_report import write_endpoint_report

FIXTURES = Path(__file__).parent / "fixtures" / "endpoint"


def fixture(name: str) -> dict:
    data = json.loads((FIXTURES / name).read_text())
    assert "vllm" in data["_source"].lower() or "sglang" in data["_source"].lower()  # every fixture cites its source
    return data


# -- parsers on the fixtures ------------------------------------------------------------------------------------------
# the distribution the vLLM, SGLang and echo fixtures all encode (position -> (token, its logprob, top ids))
EXPECTED = {1: (76, -3.125, {76, 88}), 2: (105, -0.25, {105, 101}), 3: (108, -4.75, {108, 114, 112}),
            4: (108, -0.0625, {108, 4})}


def check_positions(got: list[PositionLogprobs], n: int) -> None:
    assert len(got) == n
    for j, p in enumerate(got, start=1):
        tok, lp, top = EXPECTED[j]
        assert (p.token_id, p.logprob) == (tok, lp)
        assert set(p.top) == top
        assert p.top[tok] == lp


def test_vllm_prompt_logprobs_fixture():
    fx = fixture("vllm_prompt_logprobs.json")
    ids = fx["request"]["prompt"]
    got = parse_vllm_prompt_logprobs(fx["response"], ids)
    check_positions(got, len(ids) - 1)
    # the scored token outside the top-2 still comes back (vLLM adds it: 3 keys at position 3)
    assert got[2].top == {108: -4.75, 114: -0.5, 112: -1.5}


def test_vllm_prompt_logprobs_rejects_other_token_ids():
    fx = fixture("vllm_prompt_logprobs.json")
    ids = list(fx["request"]["prompt"])
    ids[2] = 106
    with pytest.raises(TokenizationMismatch, match="position 2 .*sent 106, got 105"):
        parse_vllm_prompt_logprobs(fx["response"], ids)


def test_sglang_generate_fixture():
    fx = fixture("sglang_generate.json")
    ids = fx["request"]["input_ids"]
    check_positions(parse_sglang_generate(fx["response"], ids), len(ids) - 1)
    # logprob_start_len > 0 on the server side: the entries cover a suffix, still aligned by token id
    meta = fx["response"]["meta_info"]
    short = {"meta_info": {"input_token_logprobs": meta["input_token_logprobs"][1:],
                           "input_top_logprobs": meta["input_top_logprobs"][1:]}}
    check_positions(parse_sglang_generate(short, ids), len(ids) - 1)


def test_echo_logprobs_fixture():
    fx = fixture("vllm_echo_logprobs.json")
    ids = fx["request"]["prompt"]
    got = parse_echo_logprobs(fx["response"], ids)  # the generated 5th entry is not a prompt position
    check_positions(got, len(ids) - 1)


def test_echo_without_token_ids_maps_strings_or_says_why():
    fx = fixture("vllm_echo_logprobs.json")
    ids = fx["request"]["prompt"]
    body = json.loads(json.dumps(fx["response"]).replace("token_id:", "tok"))
    with pytest.raises(EndpointError, match="maps to no token id"):
        parse_echo_logprobs(body, ids)
    check_positions(parse_echo_logprobs(body, ids, lookup=lambda s: int(s[3:])), len(ids) - 1)


def test_generated_ids_fixture():
    fx = fixture("vllm_greedy_token_ids.json")
    assert parse_generated_ids(fx["response"]) == [108, 108, 111]
    del fx["response"]["choices"][0]["token_ids"]  # an older server: ids from the "token_id:N" tokens
    assert parse_generated_ids(fx["response"]) == [108, 108, 111]
    assert parse_generated_ids(fixture("sglang_generate.json")["response"]) == [111]


def test_models_tokenize_and_error_bodies():
    fx = fixture("vllm_models_tokenize_errors.json")

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/models":
            return httpx.Response(200, json=fx["models"])
        if req.url.path == "/tokenize":
            return httpx.Response(200, json=fx["tokenize"])
        return httpx.Response(400, json=fx["error_max_logprobs"])

    c = EndpointClient("http://h:1/v1", transport=httpx.MockTransport(handler))
    assert c.resolve_model(None) == "deepseek-v4"
    assert c.tokenize("Hello") == [76, 105, 108, 108, 111]
    with pytest.raises(EndpointError, match=r"--served-model 'nope' is not served at http://h:1/v1; it serves: "
                                            "deepseek-v4"):
        c.resolve_model("nope")
    with pytest.raises(EndpointError, match="no usable log-probs.*greater than max allowed: 20"):
        c.probe_logprob_api([0, 1, 2], 50)


# -- metrics ----------------------------------------------------------------------------------------------------------
def test_position_metrics_by_hand():
    ref = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64).log()  # rows: ids[1:]
    ids = [9, 0, 2]
    end = torch.tensor([[0.45, 0.4, 0.1, 0.05], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64).log()
    got = [PositionLogprobs(0, float(end[0, 0]), {0: float(end[0, 0]), 1: float(end[0, 1])}),
           PositionLogprobs(2, float(end[1, 2]), {3: float(end[1, 3]), 2: float(end[1, 2])})]
    m = position_metrics(ref, ids, got, k=2)
    assert m["dlogprob"] == pytest.approx([abs(math.log(0.5 / 0.45)), 0.0])
    assert m["top1"] == [True, True]
    assert m["topk_overlap"] == [1.0, 1.0]
    # position 1: returned {0, 1}; the rest bucket holds ref 0.2 vs endpoint 0.15
    kl0 = 0.5 * math.log(0.5 / 0.45) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.15)
    assert m["kl_lb"][0] == pytest.approx(kl0, rel=1e-9)
    full = float((ref[0].exp() * (ref[0] - end[0])).sum())
    assert m["kl_lb"][0] <= full + 1e-12  # a lower bound of the full KL (data-processing inequality)
    assert m["kl_lb"][1] == pytest.approx(0.0, abs=1e-12)
    # with every token returned the bound is the exact KL
    all_tok = [PositionLogprobs(0, float(end[0, 0]), {t: float(end[0, t]) for t in range(4)})]
    assert position_metrics(ref[:1], ids[:2], all_tok, k=4)["kl_lb"][0] == pytest.approx(full, rel=1e-9)


def test_position_metrics_flags_a_flip_and_summary():
    ref = torch.tensor([[0.6, 0.4, 1e-9, 1e-9]]).log()
    got = [PositionLogprobs(1, math.log(0.7), {1: math.log(0.7), 0: math.log(0.3)})]
    m = position_metrics(ref, [5, 1], got, k=2)
    assert m["top1"] == [False] and (m["ref_argmax"], m["end_argmax"]) == ([0], [1])
    s = summarize_teacher([m])
    assert s["top1"] == 0.0 and s["top1_flips"] == 1.0
    assert s["dlogprob_max"] == pytest.approx(abs(math.log(0.4 / 0.7)))


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) is None  # the endpoint stopped early: a prefix, no divergence


# -- client errors ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_one_line_after_bounded_retries():
    waits = []
    c = EndpointClient(f"http://127.0.0.1:{free_port()}/v1", retries=2, sleep=waits.append)
    with pytest.raises(EndpointError) as e:
        c.served_models()
    msg = str(e.value)
    assert "cannot connect to" in msg and "is the server running?" in msg and "gave up after 3 tries" in msg
    assert "\n" not in msg and waits == [0.5, 1.0]


def test_timeout_message():
    script = {"/v1/models": [(200, {}, "TIMEOUT")] * 2}
    c = EndpointClient("http://h/v1", timeout=7, retries=1, sleep=lambda s: None,
                       transport=FakeVLLM(None, None, script=script).transport())
    with pytest.raises(EndpointError, match=r"did not answer within 7 s \(--timeout\) \(gave up after 2 tries\)"):
        c.served_models()


def test_a_server_that_never_answers_times_out():
    with socket.socket() as srv:  # accepts connections (the kernel's backlog) and never replies
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        c = EndpointClient(f"http://127.0.0.1:{srv.getsockname()[1]}/v1", timeout=0.3, retries=0)
        with pytest.raises(EndpointError, match=r"did not answer within 0.3 s \(--timeout\) \(gave up after 1 tries"):
            c.served_models()


def test_429_retry_after_is_honoured_then_bounded():
    waits = []
    busy = (429, {"Retry-After": "2"}, {"error": {"message": "slow down"}})
    fake = FakeVLLM(None, None, script={"/v1/models": [busy, busy]})
    c = EndpointClient("http://h/v1", retries=3, sleep=waits.append, transport=fake.transport())
    assert c.served_models() == ["dsv4-tiny"] and waits == [2.0, 2.0]
    fake.script["/v1/models"] = [busy] * 4
    with pytest.raises(EndpointError, match=r"answered 429 \(rate limited, Retry-After 2 s\): slow down.*4 tries"):
        c.served_models()
    fake.script["/v1/models"] = [(503, {"Retry-After": "600"}, {"error": {"message": "queue full"}})]
    with pytest.raises(EndpointError, match="beyond --max-wait 60 s, giving up"):
        c.served_models()
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # an HTTP date in the past: retry now


# -- whole runs through the fake server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model = make_model()
    tok = TextTokenizer.byte_level(model.args)
    texts = ["The capital of France is", "Q: 17 * 23 = ? A:"]
    return model, tok, texts, [tok.encode(t) for t in texts]


PROFILE_FP32 = EndpointProfile.load("fp32")


def run(tiny, fake: FakeVLLM, continuations=None, **kw):
    model, tok, texts, prompts = tiny
    c = EndpointClient("http://fake/v1", sleep=lambda s: None, transport=fake.transport())
    kw = {"profile": PROFILE_FP32, "top_k": 20, "max_new_tokens": 8, **kw}
    return run_endpoint(c, model, tok, texts, prompts, continuations, log=lambda m: None, **kw)


def test_same_model_passes_and_writes_report(tiny, tmp_path):
    res = run(tiny, FakeVLLM(tiny[0], tiny[1]))
    assert res.ok, res.violations
    assert res.api == "prompt_logprobs" and res.kl_is_lower_bound
    assert res.teacher["top1"] == 1.0 and res.teacher["dlogprob_max"] == 0.0  # same model, same forward
    assert res.free["greedy_match_frac"] == 1.0
    assert "/tokenize agrees" in res.tokenizer_check
    md = write_endpoint_report(tmp_path, res).read_text()
    assert "LOWER BOUND" in md and "prompt_logprobs" in md and "none" in md
    assert (tmp_path / "delta_logprob.png").stat().st_size > 0
    json.dumps(res.to_json())  # JSON-serialisable for CI


def test_other_seed_is_flagged_with_first_divergence(tiny):
    res = run(tiny, FakeVLLM(make_model(seed=1), tiny[1]))
    assert not res.ok
    metrics = {v.metric for v in res.violations}
    assert {"top1", "dlogprob_mean", "kl_lb_mean"} <= metrics
    assert res.teacher["top1"] < 0.1  # unrelated random weights agree by chance only
    # a first top-1 flip and a first greedy divergence are named per prompt
    assert all(r.first_flip is not None and r.first_flip >= 1 for r in res.prompts)
    assert all(r.free_diverge is not None for r in res.prompts)


def test_echo_only_endpoint_runs_in_echo_mode(tiny):
    res = run(tiny, FakeVLLM(tiny[0], tiny[1], apis=("echo",)), mode="teacher")
    assert res.api == "echo_logprobs" and res.ok
    assert any("prompt_logprobs" in note for note in res.api_probe)  # says what was tried first and why it failed
    # the echo request scores prompt + 1 generated token: a longer forward sums in another order (fp32, ~1e-6)
    assert res.teacher["dlogprob_max"] < 1e-5


def test_sglang_like_endpoint_runs_through_generate(tiny):
    # its OpenAI routes ignore prompt_logprobs and echo: the probe falls through to the native /generate
    res = run(tiny, FakeVLLM(tiny[0], tiny[1], apis=("sglang",)))
    assert res.api == "sglang_generate" and res.ok, res.violations
    assert len(res.api_probe) == 1 and res.api_probe[0].startswith("prompt_logprobs: ")
    assert res.teacher["dlogprob_max"] == 0.0 and res.free["greedy_match_frac"] == 1.0


def test_endpoint_without_logprobs_is_a_clear_error(tiny):
    with pytest.raises(EndpointError, match=r"no usable log-probs \(prompt_logprobs: .*; sglang_generate: .*404.*; "
                                            r"echo_logprobs: .*"):
        run(tiny, FakeVLLM(tiny[0], tiny[1], apis=()), mode="teacher")


def test_tokenizer_mismatch_is_an_error_not_a_score(tiny):
    with pytest.raises(TokenizationMismatch, match="prompt 0: the endpoint tokenizes differently from the "
                                                   "reference at token 0"):
        run(tiny, FakeVLLM(tiny[0], tiny[1], tokenize_shift=1))


def test_tokenizer_check_without_tokenize_round_trips_ids(tiny):
    res = run(tiny, FakeVLLM(tiny[0], tiny[1], has_tokenize=False), mode="teacher")
    assert res.tokenizer_check.startswith("echoed token ids agree") and res.ok
    with pytest.raises(TokenizationMismatch, match="prompt 0: the endpoint's echoed token ids"):
        run(tiny, FakeVLLM(tiny[0], tiny[1], has_tokenize=False, tokenize_shift=1), mode="teacher")


def test_top_k_above_the_server_cap_says_so(tiny):
    with pytest.raises(EndpointError, match="greater than max allowed: 5"):
        run(tiny, FakeVLLM(tiny[0], tiny[1], max_logprobs=5), mode="teacher")


def test_prompts_file_formats(tmp_path, tiny):
    tok = tiny[1]
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Hi"}\n{"token_ids": [0, 7, 8], "continuation": [9, 10]}\n')
    with pytest.raises(ValueError, match="1 of 2 prompts carry a continuation"):
        load_prompts(str(f), tok)
    f.write_text('{"prompt": "Hi", "continuation_text": "!"}\n{"token_ids": [0, 7, 8], "continuation": [9]}\n')
    texts, ids, conts = load_prompts(str(f), tok)
    assert texts == ["Hi", None] and ids == [tok.encode("Hi"), [0, 7, 8]] and conts == [tok.encode("!", False), [9]]
    f.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected a 'prompt' string or a 'token_ids' list"):
        load_prompts(str(f), tok)


def test_continuation_file_and_input_checks(tmp_path, tiny):
    model, tok, texts, prompts = tiny
    f = tmp_path / "c.jsonl"
    f.write_text('{"token_ids": [5, 6]}\n')
    with pytest.raises(ValueError, match="1 continuations for 2 prompts"):
        load_continuations(str(f), 2, tok)
    f.write_text('{"token_ids": [5, 6]}\n{"text": "ok"}\n')
    conts = load_continuations(str(f), 2, tok)
    assert conts == [[5, 6], tok.encode("ok", add_bos=False)]
    res = run(tiny, FakeVLLM(model, tok), mode="teacher", continuations=conts)
    assert [r.ids for r in res.prompts] == [p + c for p, c in zip(prompts, conts, strict=True)] and res.ok
    with pytest.raises(ValueError, match="continuation 0: token id 999 is outside the reference's vocabulary"):
        run(tiny, FakeVLLM(model, tok), mode="teacher", continuations=[[999], [1]])
    with pytest.raises(ValueError, match="exceed the reference's max_seq_len 2048"):
        run(tiny, FakeVLLM(model, tok), mode="teacher", continuations=[[5] * 2048, [1]])


def test_cli_unreachable_endpoint_is_one_line_exit_2(capsys):
    from dsv4.common.cli import main

    rc = main(["parity", "endpoint", "--url", f"http://127.0.0.1:{free_port()}/v1", "--retries", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("parity endpoint: cannot connect to") and "\n" not in err and "Traceback" not in err
