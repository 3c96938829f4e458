"""`dsv4 serve` over HTTP (common/serve): one real server per module on 127.0.0.1 and a free port, in a thread of
this process, called with the `openai` client the way users call it (httpx where the client hides the status).

The model is the embedded tiny one in fp32 with kv_fp8_sim "clamp": the server's greedy tokens are compared for
equality with `generate` (the function `dsv4 generate` runs), and with "e4m3" different batch compositions can round
the FP8 KV simulation differently (tests/test_generate.py). tests/test_serve_process.py starts the real command.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from engine_model import bound_socket, tiny_clamp_model  # tests/ is on sys.path

from dsv4.common.checkpoint.tokenizer import TextTokenizer
from dsv4.common.runtime.engine import Engine
from dsv4.common.runtime.generate import GenerationConfig, generate
from dsv4.common.serve.app import Server, create_app

MAX_SEQ = 256
NAME = "tiny-test"


@pytest.fixture(scope="module")
def model():
    return tiny_clamp_model()


@pytest.fixture(scope="module")
def tok(model):
    return TextTokenizer.byte_level(model.args)


@pytest.fixture(scope="module")
def served(model, tok):
    engine = Engine(model, max_batch=4, max_seq_len=MAX_SEQ, prefill_chunk=32, max_waiting=16, tokenizer=tok)
    server = Server(engine, tok, NAME)
    sock = bound_socket()
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server, max_body_bytes=64 * 1024), host="127.0.0.1", port=port,
                                       log_level="warning"))
    th = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.05)
    yield server, f"http://127.0.0.1:{port}"
    uv.should_exit = True
    th.join(15)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="none", max_retries=0, timeout=60)


def greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True, max_seq_len=MAX_SEQ, prefill_chunk=32)
    return generate(model, [prompt], cfg)[0].tokens


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def complete_ids(client, prompt, n: int, **kw) -> list[int]:
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}, **kw)
    return ids_of(r.choices[0].logprobs.tokens)


PROMPTS = ["Hello world", "The quick brown fox jumps over", "a" * 90, "DeepSeek"]


# -- outputs ----------------------------------------------------------------------------------------------------------
def test_greedy_completion_equals_generate(client, model, tok):
    want = greedy_ids(model, tok.encode(PROMPTS[0]), 12)
    assert complete_ids(client, PROMPTS[0], 12) == want
    # the prompt as token ids gives the same, and the text is the detokenized ids
    r = client.completions.create(model=NAME, prompt=tok.encode(PROMPTS[0]), max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(want) and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(PROMPTS[0])) and r.usage.completion_tokens == 12


def test_concurrent_requests_each_equal_generate(client, model, tok):
    want = [greedy_ids(model, tok.encode(p), 10) for p in PROMPTS]

    def stream_ids(p):
        s = client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0, stream=True, logprobs=0,
                                      extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        return [i for ch in s for c in ch.choices if c.logprobs for i in ids_of(c.logprobs.tokens)]

    with ThreadPoolExecutor(6) as ex:  # 6 requests on 4 slots: some wait, some stream, all overlap
        futs = [ex.submit(complete_ids, client, p, 10) for p in PROMPTS] + [ex.submit(stream_ids, p)
                                                                           for p in PROMPTS[:2]]
        got = [f.result() for f in futs]
    assert got == want + want[:2]


def test_a_list_of_prompts_and_n(client, model, tok):
    r = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [tok.decode(greedy_ids(model, tok.encode(p), 6)) for p in PROMPTS[:2]]
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, n=2, seed=3,
                                  logprobs=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    a, b = (ids_of(c.logprobs.tokens) for c in r.choices)
    assert a != b  # choice j samples with seed + j
    again = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=3,
                                      logprobs=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert ids_of(again.choices[0].logprobs.tokens) == a  # seeded: reproducible whatever ran beside it
    assert r.usage.prompt_tokens == len(tok.encode(PROMPTS[0]))  # counted once for n choices


def test_streaming_text_and_usage(client):
    full = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_speculative_greedy_equals_plain(served, client, model, tok, monkeypatch):
    """With --speculative, greedy requests without logprobs verify MTP drafts; the text is plain greedy's."""
    server, _ = served
    verified = []
    real = server.engine._decode_speculative
    monkeypatch.setattr(server, "speculative", True)
    monkeypatch.setattr(server.engine, "_decode_speculative", lambda reqs: (verified.append(len(reqs)), real(reqs)))
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(greedy_ids(model, tok.encode(PROMPTS[1]), 12))
    assert verified, "no speculative verify step ran"


def test_stop_string(client, model, tok):
    full = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    # a stop string of two printable ASCII characters (random weights emit stray bytes too) after the first one
    at = next(i for i in range(1, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable()
              and full.find(full[i:i + 2]) == i)
    r = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0,
                                  stop=[full[at:at + 2], "never-there"], extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.stop_reason == full[at:at + 2] and c.text == full[:at]


def test_chat_with_logprobs_equals_generate(client, model, tok):
    msgs = [{"role": "user", "content": "Say something"}]
    want = greedy_ids(model, tok.apply_chat_template(msgs), 8)
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3,
                                       extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    content = r.choices[0].logprobs.content
    assert ids_of([c.token for c in content]) == want
    for c in content:  # greedy: the chosen token is the best of the top 3, and its log-prob is <= 0
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob) and c.logprob <= 0
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert r.choices[0].message.content == tok.decode(want)


def test_prompt_logprobs_and_echo(served, model, tok):
    """vLLM's prompt_logprobs shape: [None, {token_id: {logprob, rank, decoded_token}}, ...], values equal to a full
    forward's log_softmax (chunked prefill vs one shot in fp32: summation order only, observed < 1e-5)."""
    _, url = served
    prompt = tok.encode(PROMPTS[1])
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 1,
                                                   "temperature": 0, "prompt_logprobs": 2}, timeout=60).json()
    plp = r["choices"][0]["prompt_logprobs"]
    full = torch.log_softmax(model(torch.tensor([prompt]))[0], -1)
    assert plp[0] is None and len(plp) == len(prompt)
    for i in range(1, len(prompt)):
        entry = plp[i]
        top2 = full[i - 1].topk(2).indices.tolist()
        assert set(entry) == {str(t) for t in top2} | {str(prompt[i])}
        assert entry[str(prompt[i])]["logprob"] == pytest.approx(float(full[i - 1, prompt[i]]), abs=1e-4)
        assert entry[str(top2[0])]["rank"] == 1
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": PROMPTS[0], "max_tokens": 3,
                                                   "temperature": 0, "echo": True, "logprobs": 1}, timeout=60).json()
    c = r["choices"][0]
    assert c["text"].startswith(PROMPTS[0])
    n_prompt = len(tok.encode(PROMPTS[0]))
    assert len(c["logprobs"]["tokens"]) == n_prompt + 3 and c["logprobs"]["token_logprobs"][0] is None


def test_models_health_tokenize_metrics(served, tok):
    _, url = served
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == NAME and models["data"][0]["max_model_len"] == MAX_SEQ
    t = httpx.post(url + "/tokenize", json={"prompt": "héllo"}).json()
    assert t["tokens"] == tok.encode("héllo") and t["count"] == len(t["tokens"])
    assert httpx.post(url + "/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "héllo"
    msgs = [{"role": "user", "content": "x"}]
    assert httpx.post(url + "/tokenize", json={"messages": msgs}).json()["tokens"] == tok.apply_chat_template(msgs)
    m = httpx.get(url + "/metrics").text
    for name in ("dsv4_requests_total", "dsv4_requests_waiting", "dsv4_requests_running", "dsv4_prompt_tokens_total",
                 "dsv4_generation_tokens_total", "dsv4_time_to_first_token_seconds_bucket",
                 "dsv4_inter_token_latency_seconds_bucket", "dsv4_kv_blocks_used", "dsv4_kv_blocks_free",
                 "dsv4_kv_blocks_reserved"):
        assert name in m, name
    assert 'dsv4_requests_total{status="length"}' in m
    assert f"dsv4_kv_blocks_total {4 * MAX_SEQ // 128}.0" in m  # the default pool: MAX_SEQ tokens for each slot


# -- lifecycle --------------------------------------------------------------------------------------------------------
def wait_idle(engine: Engine, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.num_running == 0 and engine.num_waiting == 0:
            return True
        time.sleep(0.05)
    return False


def test_a_cancelled_stream_frees_its_slot(served, client):
    server, _ = served
    assert wait_idle(server.engine)
    s = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    it = iter(s)
    next(it), next(it)
    assert server.engine.num_running == 1
    s.close()  # the client goes away mid-stream
    assert wait_idle(server.engine), "the cancelled request still holds its slot"
    assert server.engine.pool_stats()["blocks_used"] == 0, "the cancelled request still holds KV blocks"
    assert 'dsv4_requests_total{status="abort"}' in server.metrics.render().decode()
    assert complete_ids(client, PROMPTS[3], 3)  # and the server carries on


def test_a_failing_request_fails_alone(served, client, model, tok, monkeypatch):
    server, url = served
    real = server.engine._sample

    def sample(r, row, best):
        if r.params.seed == 666:
            raise RuntimeError("injected sampling failure")
        return real(r, row, best)

    monkeypatch.setattr(server.engine, "_sample", sample)
    want = greedy_ids(model, tok.encode(PROMPTS[1]), 10)
    with ThreadPoolExecutor(2) as ex:
        bad = ex.submit(httpx.post, url + "/v1/completions", json={
            "model": NAME, "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0.5, "seed": 666}, timeout=60)
        good = ex.submit(complete_ids, client, PROMPTS[1], 10)
        assert good.result() == want
        resp = bad.result()
    assert resp.status_code == 500 and "injected sampling failure" in resp.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200


# -- errors -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"temperature": -0.1}, "temperature"),
    ({"model": "no-such-model"}, "model"),
    ({"max_tokens": MAX_SEQ}, "max_tokens"),  # prompt + max_tokens over max_seq_len
    ({"prompt": [[]]}, "prompt"),
    ({"n": 0}, "n"),
    ({"max_tokens": "many"}, "max_tokens"),  # a wrong type is a 400 naming the field too
])
def test_bad_completion_requests_are_400_naming_the_parameter(client, body, param):
    kw = {"model": NAME, "prompt": "hi", "max_tokens": 4, **body}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and err["message"] and err["type"]


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_non_finite_temperature_is_400(served, value):
    """JSON's NaN / Infinity (Python's parser takes them) used to pass the `temperature >= 0` check and fail the
    request inside the sampler as a 500."""
    body = f'{{"model": "{NAME}", "prompt": "hi", "max_tokens": 2, "temperature": {value}}}'
    resp = httpx.post(served[1] + "/v1/completions", content=body, headers={"content-type": "application/json"},
                      timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "temperature", resp.text


def test_bad_chat_requests(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], logprobs=True,
                                       top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"


def test_oversized_body_is_413(served):
    _, url = served
    body = json.dumps({"model": NAME, "prompt": "x" * 70_000, "max_tokens": 1})
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(70):
            yield b"x" * 1000

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_full_queue_is_503_with_retry_after(served, monkeypatch):
    server, url = served
    monkeypatch.setattr(server.engine, "max_waiting", 0)
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert "queue is full" in r.json()["error"]["message"]
