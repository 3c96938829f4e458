"""Bad input and ordinary mistakes, tried as a new user would: every case must end with a non-zero exit, one line that
names the flag, file, tensor or field at fault, and no traceback. Never a silent wrong answer (NaN weights used to
print empty text and exit 0).

Most cases call dsv4.common.cli.main in-process (a `python -m dsv4` start costs 1-2 s); the ones that need a real
process boundary (a closed stdout pipe, a rank killed under torchrun) run as subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4.common.checkpoint.writer import make_checkpoint
from dsv4.common.cli import main
from dsv4.common.model.config import load_named_config
from dsv4.common.runtime.loading import choose_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_one_thread():
    """main() picks torch's thread count for the process; give the rest of the suite back its one thread."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny bf16 and FP8 checkpoints, written once; each case copies and damages its own."""
    base = tmp_path_factory.mktemp("ck")
    args = load_named_config("tiny")
    return {q: make_checkpoint(args, base / q, quant=q).path for q in ("none", "fp8")}


def damaged(src: Path, dst: Path, tensor: str, edit) -> Path:
    """A copy of checkpoint `src` whose tensor `tensor` went through edit(tensor) -> tensor."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][tensor]
    tensors = load_file(shard)
    tensors[tensor] = edit(tensors[tensor].clone())
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


def nan_at_3(t):
    t.view(-1)[3] = float("nan")
    return t


def fp8_nan_byte(t):
    t.view(torch.uint8).view(-1)[5] = 0x7F  # e4m3fn: S.1111.111 is NaN
    return t


def huge(t):
    return torch.full_like(t, 3e38)  # finite in bf16, overflows once multiplied: NaN/Inf logits, not at load


def without(field):
    def edit(cfg):
        del cfg[field]
        return cfg
    return edit


def edited_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(cfg)))
    return dst


GEN = ["generate", "--prompt", "hi", "--max-new-tokens", "2"]

# (id, argv, what the one error line must name). "{ck}"/"{ck8}"/"{tmp}" are filled per case.
CASES = [
    ("serve-batched-rows", ["serve", "--port", "0", "--batched-decode-min-rows", "-1"], "--batched-decode-min-rows"),
    ("serve-port-out-of-range", ["serve", "--port", "70000"], "--port must be in 0..65535"),
    # serving counts out of range: each one used to start a server (stalled, refusing, or on a silent default)
    ("serve-max-batch-0", ["serve", "--port", "0", "--max-batch", "0"], "--max-batch must be >= 1"),
    ("serve-step-tokens-0", ["serve", "--port", "0", "--step-tokens", "0"], "--step-tokens must be >= 1"),
    ("serve-long-prefill-chunk-0", ["serve", "--port", "0", "--long-prefill-chunk", "0"],
     "--long-prefill-chunk must be >= 1"),
    ("serve-max-waiting-negative", ["serve", "--port", "0", "--max-waiting", "-1"], "--max-waiting must be >= 0"),
    ("serve-max-body-bytes-0", ["serve", "--port", "0", "--max-body-bytes", "0"], "--max-body-bytes must be >= 1"),
    ("serve-max-logprobs-negative", ["serve", "--port", "0", "--max-logprobs", "-1"], "--max-logprobs must be >= 0"),
    ("serve-drain-timeout-negative", ["serve", "--port", "0", "--drain-timeout", "-1"], "--drain-timeout must be >= 0"),
    ("device-cuda", GEN + ["--device", "cuda:0"], "--device 'cuda:0'"),
    ("device-npu", GEN + ["--device", "npu:0"], "--device 'npu:0'"),
    ("device-unknown", GEN + ["--device", "tpu"], "--device 'tpu'"),
    ("device-bad-index", GEN + ["--device", "cpu:x"], "--device 'cpu:x'"),
    ("tp-0", GEN + ["--tp", "0"], "--tp must be >= 1"),
    ("ep-0", GEN + ["--ep", "0"], "--ep must be >= 1"),
    ("tp-without-torchrun", GEN + ["--tp", "2"], "launch with torchrun --nproc-per-node 2"),
    ("threads-0", GEN + ["--threads", "0"], "--threads must be >= 1"),
    ("max-seq-len-0", GEN + ["--max-seq-len", "0"], "--max-seq-len must be >= 1"),
    ("max-seq-len-too-long", GEN + ["--max-seq-len", "99999999"], "--max-seq-len 99999999 exceeds"),
    ("no-prompt", ["generate"], "give at least one --prompt"),
    ("max-seq-len-too-long-checkpoint", GEN + ["--model", "{ck}", "--max-seq-len", "99999999"],
     "max_seq_len 99999999 (--max-seq-len) exceeds"),
    ("emulate-reference", GEN + ["--emulate"], "--emulate applies to --backend ascend"),
    ("bench-emulate", ["bench", "--emulate", "--backend", "reference"], "--emulate"),
    ("stop-outside-vocab", GEN + ["--stop", "99999"], "--stop: token id(s) [99999] outside the vocabulary"),
    ("prompt-not-utf8", ["generate", "--prompt", "caf\udce9", "--max-new-tokens", "1"],
     "--prompt #1 is not valid UTF-8"),
    ("config-missing", GEN + ["--config", "no-such-config"], "no-such-config"),
    ("model-missing", GEN + ["--model", "{tmp}/nowhere"], "nowhere: no such checkpoint"),
    ("too-large", GEN + ["--config", "pro"], "GiB free"),
    ("parity-too-large", ["parity", "run", "--config", "flash"], "GiB free"),
    ("parity-device", ["parity", "run", "--device", "cuda:1"], "--device 'cuda:1'"),
    ("parity-batch-0", ["parity", "run", "--batch", "0"], "--batch must be >= 1"),  # 0 meant "default" silently
    ("parity-seq-len-0", ["parity", "run", "--seq-len", "0"], "--seq-len must be >= 1"),
    ("parity-tolerances-missing", ["parity", "run", "--tolerances", "{tmp}/tol.yaml"], "tol.yaml: no such file"),
    ("parity-record-out-is-a-folder", ["parity", "record", "--backend", "reference", "--out", "{tmp}"],
     "is a directory; give the golden file's path"),
    ("parity-record-out-folder-missing", ["parity", "record", "--backend", "reference", "--out", "{tmp}/no/g.st"],
     "does not exist"),
    ("parity-tolerances-not-yaml", ["parity", "run", "--tolerances", str(ROOT / "README.md")],
     "README.md: not valid YAML"),
    ("parity-tolerances-not-a-table", ["parity", "run", "--tolerances", str(ROOT / "configs" / "tiny.yaml")],
     "tiny.yaml: expected a tolerance file with a 'tolerances' mapping"),
    ("bench-set-unknown-field", ["bench", "--set", "n_layer=3"], "unknown field(s) ['n_layer']"),
    ("bench-set-bad-value", ["bench", "--set", "dim=abc"], "--set dim=abc: field 'dim'"),
    ("config-not-yaml", ["config", str(ROOT / "README.md")], "README.md: not valid YAML"),
    ("make-checkpoint-out-is-a-file", ["make-checkpoint", "--out", str(ROOT / "README.md")],
     "README.md: exists and is not a directory"),
    ("nan-weight", GEN + ["--model", "{nan}"], "tensor 'layers.1.attn_norm.weight' holds 1 NaN/Inf"),
    ("fp8-nan-byte-kept-quantized", GEN + ["--model", "{fp8nan}", "--weights", "quantized"],
     "tensor 'layers.0.attn.wq_a.weight' holds 1 NaN/Inf"),
    ("overflowing-weight", GEN + ["--model", "{huge}"], "non-finite logits for sequence 0"),
    ("config-no-index-topk", GEN + ["--model", "{no_topk}"], "missing field(s) 'index_topk'"),
    ("config-no-hidden-size", GEN + ["--model", "{no_hidden}"], "missing field(s) 'hidden_size'"),
    ("config-bad-hidden-size", GEN + ["--model", "{bad_hidden}"], "field 'hidden_size': expected an integer"),
    # a capture this machine cannot run fails before the model loads (it used to fail the first request, a traceback)
    ("compile-cuda-graph-on-cpu", GEN + ["--compile-decode", "cuda-graph"],
     "--compile-decode cuda-graph: CUDA graphs need the model on a CUDA device"),
    ("compile-npu-graph-on-reference", GEN + ["--compile-decode", "npu-graph"],
     "--compile-decode npu-graph needs the ascend backend"),
    ("npu-graph-on-reference", GEN + ["--npu-graph"], "--npu-graph needs the ascend backend"),
    ("npu-graph-without-torchair", GEN + ["--backend", "ascend", "--emulate", "--npu-graph"],
     "--npu-graph: graph mode needs torchair"),
]
if importlib.util.find_spec("nano_deepseek_v4") is None:  # the dev extra does not install it
    CASES.append(("compare-nano-missing", ["bench", "--compare", "nano"], "pip install nano-deepseek-v4"))


@pytest.fixture(scope="module")
def paths(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    ck, ck8 = checkpoints["none"], checkpoints["fp8"]
    return {
        "tmp": str(tmp),
        "ck": str(ck),
        "nan": str(damaged(ck, tmp / "nan", "layers.1.attn_norm.weight", nan_at_3)),
        "fp8nan": str(damaged(ck8, tmp / "fp8nan", "layers.0.attn.wq_a.weight", fp8_nan_byte)),
        "huge": str(damaged(ck, tmp / "huge", "layers.0.attn_norm.weight", huge)),
        "no_topk": str(edited_config(ck, tmp / "no_topk", without("index_topk"))),
        "no_hidden": str(edited_config(ck, tmp / "no_hidden", without("hidden_size"))),
        "bad_hidden": str(edited_config(ck, tmp / "bad_hidden", lambda c: dict(c, hidden_size="256"))),
    }


def main_within(argv: list[str], seconds: int) -> int:
    """main(argv), failed after `seconds`: a bad serve flag that is not refused starts a server, which never returns."""
    def too_long(*_):
        raise AssertionError(f"dsv4 {' '.join(argv)} still running after {seconds} s (a server started?)")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(seconds)
    try:
        return main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case_id, argv, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_line(case_id, argv, names, paths, capsys):
    argv = [a.format(**paths) for a in argv]
    rc = main_within(argv, seconds=120)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert rc != 0, f"{case_id}: exit 0; stderr: {err}"
    assert "Traceback" not in out + err
    assert len(errors) == 1 and names in errors[0], f"{case_id}: expected one error line naming {names!r}:\n{err}"


def test_serve_on_a_taken_port_fails_before_loading(capsys):
    """The port is bound before the model loads: a port in use is one line at once, naming the address, not an
    uvicorn error after minutes of loading a real checkpoint."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main(["serve", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use)" in err, err
    assert "model:" not in err, f"failed only after loading: {err}"  # the line printed once the model is up


def test_overflow_names_the_first_layer(paths, capsys):
    """Huge finite attn_norm weights in layer 0: the replay names layer 0's attention, not just 'NaN somewhere'."""
    assert main(GEN + ["--model", paths["huge"]]) != 0
    err = capsys.readouterr().err
    assert "first non-finite output: layer 0 attention" in err


def test_threads_default_follows_idle_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert choose_threads()[0] == 1  # 2 CPUs, one already busy: one thread, not two spinning
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert choose_threads()[0] == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert choose_threads()[0] == 6  # 13 idle CPUs shared by 2 ranks
    assert choose_threads(3) == (3, "--threads")


def test_bench_prints_instead_of_appending_to_benchmarks_md():
    import argparse

    from dsv4.common.bench.cli import add_bench_arguments

    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    assert p.parse_args([]).results_file == ""


def test_closed_pipe_is_no_traceback():
    """`dsv4 config flash | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "-m", "dsv4", "config", "flash"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) != 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_killed_rank_is_named_by_rank0(tmp_path):
    """A rank killed (SIGKILL) mid-generation under torchrun: rank 0 ends with one line naming that rank, not a
    gloo traceback."""
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dsv4", "generate", "--tp", "2", "--prompt", "hi", "--max-new-tokens", "3000",
           "--max-seq-len", "4000", "--ignore-eos"]
    with log.open("w") as f:
        launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "model:" not in log.read_text() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.5)
        time.sleep(2)  # into the decode loop
        victims = []
        for pid in map(int, subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                           text=True).stdout.split()):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if b"RANK=1" in env:
                victims.append(pid)
        assert victims, "rank 1 not found"
        os.kill(victims[0], signal.SIGKILL)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    ours = [line for line in text.splitlines() if "dsv4: error:" in line]
    assert ours and f"rank 1 (pid {victims[0]}) ended" in ours[0], text[-3000:]
    assert "gloo" not in text.split("dsv4: error:")[0]  # no gloo traceback from rank 0 before our line


def test_nonfinite_logits_in_generate_name_the_layer():
    """Weights that went bad after the load check (a backend writing NaN, an in-place edit): generation stops with
    the layer, instead of an argmax over NaN (garbage text, exit 0) or a multinomial traceback when sampling."""
    from dsv4.common.checkpoint.load import build_random_model
    from dsv4.common.model.reference import ReferenceOps
    from dsv4.common.runtime.generate import GenerationConfig, generate
    from dsv4.common.runtime.guards import NonFiniteLogitsError

    model = build_random_model(load_named_config("tiny"), ReferenceOps())
    model.layers[2].ffn.shared_experts.w2.weight.data[0, 0] = float("nan")
    for cfg in (GenerationConfig(max_new_tokens=2), GenerationConfig(max_new_tokens=2, temperature=0.8)):
        with pytest.raises(NonFiniteLogitsError, match="first non-finite output: layer 2 MoE"):
            generate(model, [[0, 5, 6]], cfg)


def test_report_without_matplotlib_says_so_on_the_terminal(tmp_path, monkeypatch, capsys):
    from dsv4.common.parity.cli import _report
    from dsv4.common.parity.compare import Comparison

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    comp = Comparison("reference-x", "reference", "x", "fp32", {"cosine": 1.0}, {}, [{"cosine": 0.99}])
    _report(str(tmp_path / "rep"), [comp], title="t")
    err = capsys.readouterr().err
    assert "plot skipped" in err and "pip install 'dsv4[plot]'" in err
    assert not (tmp_path / "rep" / "error_growth.png").exists()


def test_include_interpreted_arranges_triton_interpret(monkeypatch):
    """--include-interpreted used to crash deep in the interpreter unless TRITON_INTERPRET=1 was exported by hand."""
    from dsv4.common.parity import cli as parity_cli

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    parity_cli._arrange_triton_interpreter()
    assert os.environ["TRITON_INTERPRET"] == "1"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setitem(sys.modules, "triton", object())  # imported before: too late to switch, so refuse
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        parity_cli._arrange_triton_interpreter()
