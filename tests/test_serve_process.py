"""`dsv4 serve` as the real command, in its own process: equal to `dsv4 generate`, SIGTERM drains, and under
torchrun with 2 gloo ranks (TP 2) it answers exactly what one process answers.

The embedded tiny model runs from a YAML config with kv_fp8_sim "clamp" (fp32 on CPU), so greedy tokens can be
compared for equality across batchings and across the TP split (tests/test_generate.py says why).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ = "256"
NAME = "tiny-clamp"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny_clamp.yaml"
    path.write_text((ROOT / "configs" / "tiny.yaml").read_text() + "\nkv_fp8_sim: clamp\n")
    return str(path)


def env() -> dict[str, str]:
    # one torch thread per process: the machine's cores are shared by the ranks and the test (tests/conftest.py)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def model_args(config: str) -> list[str]:
    return ["--config", config, "--backend", "reference", "--dtype", "fp32", "--max-seq-len", MAX_SEQ]


class Served:
    """A `dsv4 serve --port 0` process: it binds a free port before loading and names it in its 'serving' line, so
    no port is chosen here and then taken by someone else (a gloo connection did, once) before the server binds."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.log: list[str] = []
        self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 60
        self.url = None
        while True:
            assert self.proc.poll() is None, f"server exited: {''.join(self.log)}"
            assert time.monotonic() < deadline, f"server did not come up: {''.join(self.log)}"
            if self.url is None:
                found = re.search(r"serving '[^']*' on (http://127\.0\.0\.1:\d+)/v1", "".join(self.log))
                if found is None:
                    time.sleep(0.2)
                    continue
                self.url = found.group(1)
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self) -> int:
        """SIGTERM to the command (under torchrun: to the launcher, which passes it on); every process of its
        session must be gone within a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
            deadline = time.monotonic() + 30
            while self._group_alive():
                assert time.monotonic() < deadline, f"ranks left running: {''.join(self.log)}"
                time.sleep(0.2)
            self.reader.join(10)  # the log is complete once every process has closed its end of the pipe
            return rc
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not exit after SIGTERM: {''.join(self.log)}") from None
        finally:
            if self._group_alive():
                os.killpg(self.proc.pid, signal.SIGKILL)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False


def serve_argv(config: str) -> list[str]:
    # decode steps of 2+ rows run batched (common/runtime/engine_decode.py), so the 2-rank test covers it under TP
    return [sys.executable, "-m", "dsv4", "serve", *model_args(config), "--port", "0",
            "--served-model-name", NAME, "--max-batch", "4", "--prefill-chunk", "32", "--batched-decode-min-rows", "2"]


@pytest.fixture(scope="module")
def single(config):
    s = Served(serve_argv(config))
    yield s
    s.stop()


# --standalone: the launcher's rendezvous store binds a free port itself (torch/distributed/run.py, localhost:0)
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
PROMPTS = ["Hello world", "The quick brown fox", "x" * 70]


def ask(client, prompt: str, n: int = 10, top_k: int = 0, **kw) -> list[str]:
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, logprobs=0,
                                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, "top_k": top_k},
                                  **{"temperature": 0, **kw})
    return r.choices[0].logprobs.tokens


def answers(client) -> list[list[str]]:
    """Three greedy requests in flight together and one seeded sample."""
    with ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(ask, client, p) for p in PROMPTS]
        futs.append(ex.submit(ask, client, PROMPTS[0], 8, temperature=0.9, top_k=40, seed=11))
        return [f.result() for f in futs]


def test_served_greedy_text_equals_dsv4_generate(single, config):
    out = subprocess.run([sys.executable, "-m", "dsv4", "generate", *model_args(config), "--prompt", PROMPTS[1],
                          "--max-new-tokens", "12", "--ignore-eos"], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = single.client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert r.choices[0].text == out.stdout.removesuffix("\n")


def test_two_gloo_ranks_serve_what_one_process_serves(single, config):
    argv = [*TORCHRUN_2, "-m", "dsv4", *serve_argv(config)[3:], "--tp", "2"]
    tp2 = Served(argv)
    try:
        got = answers(tp2.client)
    finally:
        tp2.stop()  # torchrun itself reports the SIGTERM it got with exit code 1; what counts is that all ranks end
    assert got == answers(single.client)
    assert "drained" in "".join(tp2.log), "".join(tp2.log)


def test_two_gloo_ranks_resume_from_the_prefix_cache_alike(single, config, tmp_path):
    """--prefix-cache under torchrun: rank 0 decides the hit and every rank installs the same blocks and snapshot
    (mirrored calls); if rank 1 did not, its half of the TP split would read another cache and the answer change.
    After the drain the cache is on disk (--prefix-cache-dir)."""
    argv = [*TORCHRUN_2, "-m", "dsv4", *serve_argv(config)[3:], "--tp", "2",
            "--prefix-cache-dir", str(tmp_path), "--prefix-snapshot-interval", "128"]
    doc = "A shared document, long enough to fill one KV block of 128 tokens. " * 2  # 138 byte tokens
    tp2 = Served(argv)
    try:
        got = [ask(tp2.client, doc + q) for q in ("Question one?", "Question two?")]
        metrics = httpx.get(tp2.url + "/metrics", timeout=10).text
    finally:
        tp2.stop()
    want = [ask(single.client, doc + q) for q in ("Question one?", "Question two?")]
    assert got == want
    assert "dsv4_prefix_cache_hits_total 1.0" in metrics and "dsv4_prefix_cache_hit_tokens_total 128.0" in metrics
    assert (tmp_path / "prefix-cache.safetensors").stat().st_size > 0, "".join(tp2.log)

    # a second 2-rank server reads that file on every rank: its first request already hits, with the same answer
    again = Served(argv)
    try:
        log = "".join(again.log)
        resumed = ask(again.client, doc + "Question three?")
        metrics = httpx.get(again.url + "/metrics", timeout=10).text
    finally:
        again.stop()
    assert "blocks loaded from" in log, log
    assert "dsv4_prefix_cache_hits_total 1.0" in metrics and "dsv4_prefix_cache_hit_tokens_total 128.0" in metrics
    assert resumed == ask(single.client, doc + "Question three?")


def test_sigterm_drains_the_request_in_flight_and_exits(single):
    """Last in this module: it ends the module's server."""
    s = single
    stream = s.client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=60, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    it = iter(stream)
    first = next(it)
    s.proc.send_signal(signal.SIGTERM)
    rest = list(it)  # the stream in flight runs to its end
    chunks = [first, *rest]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert s.stop() == 0, "".join(s.log)
    assert "drained" in "".join(s.log)
    with pytest.raises(httpx.TransportError):  # and nothing listens any more
        httpx.get(s.url + "/health", timeout=2)
