"""`dsv4 bench` smoke tests: the sweep runs end to end on the tiny config at tiny contexts and writes its table.
No timing is asserted (these machines are shared); only that every measured row is there and that the KV bytes per
token we measure from the cache agree with the analytic formula."""

import argparse
import re

import pytest
import torch

from dsv4.common.bench.cli import add_bench_arguments, parse_contexts, run_bench
from dsv4.common.bench.measure import logits_agreement, required_seq_len
from dsv4.common.bench.runners import cache_nbytes
from dsv4.common.model.cache import kv_bytes_per_token
from dsv4.common.model.config import load_named_config
from dsv4.common.runtime.loading import add_model_arguments


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    add_bench_arguments(p)
    return p.parse_args(argv)


def table_rows(text: str) -> dict[str, list[str]]:
    """context label -> the cells of its table row."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] and cells[0][0].isdigit():
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(autouse=True)
def one_thread():
    """Shared CI boxes are oversubscribed; two OpenMP threads there spin and make a 2 s test take 20 s."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_smoke_writes_table(tmp_path, capsys):
    out = tmp_path / "BENCH.md"
    out.write_text("# Benchmarks\n\nsomeone else's section\n")
    ns = parse(["--contexts", "64,128", "--decode-steps", "2", "--warmup-steps", "1", "--prefill-chunk", "48",
                "--threads", "1", "--results-file", str(out)])
    assert run_bench(ns) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nsomeone else's section\n")  # appended, never rewritten
    assert "## dsv4 bench: tiny" in text and "- Command: `dsv4 bench" in text and "torch " in text
    rows = table_rows(text)
    assert set(rows) == {"64", "128"}
    for cells in rows.values():  # prefill tok/s, decode ms, peak MiB, KV MiB: all measured, all positive
        assert len(cells) == 4 and all(float(c) > 0 for c in cells)
    m = re.search(r"ours analytic ([\d.]+), measured ([\d.]+) .*: agree", text)
    assert m and float(m.group(1)) == float(m.group(2)) > 0
    assert "decode at the longest context" in text
    assert "| context |" in capsys.readouterr().out  # the table is printed too


@pytest.mark.parametrize("name", ["tiny", "flash"])
def test_measured_kv_bytes_per_token_match_analytic(name):
    args = load_named_config(name)
    for dtype in (torch.float32, torch.bfloat16):
        grow = (cache_nbytes(args, 1, 16384, dtype) - cache_nbytes(args, 1, 8192, dtype)) / 8192
        analytic = kv_bytes_per_token(args, torch.empty((), dtype=dtype).element_size(), include_mtp=True)
        assert grow == analytic


def test_context_parsing_and_cache_length():
    assert parse_contexts("4k,1k,1024,32k") == [1024, 4096, 32768]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_contexts("abc")
    # the last context plus every decode step on the way, rounded up to whole 128-token blocks
    assert required_seq_len([1024, 32768], 10) == 32768 + 128
    ns = parse(["--contexts", "64", "--max-seq-len", "64", "--results-file", "-"])
    with pytest.raises(ValueError, match="too short"):
        run_bench(ns)


def test_logits_agreement_figures():
    a = torch.randn(1, 5, 11)
    same = logits_agreement(a, a.clone())
    assert same.top1 == 1.0 and same.max_abs == 0.0 and same.cos_min > 0.9999
    flipped = logits_agreement(a, -a)
    assert flipped.top1 == 0.0 and flipped.cos_median < -0.9999


def test_bench_compare_nano(tmp_path):
    pytest.importorskip("nano_deepseek_v4")
    out = tmp_path / "B.md"
    ns = parse(["--contexts", "64,96", "--decode-steps", "1", "--warmup-steps", "0", "--threads", "1",
                "--compare", "nano", "--agree-tokens", "40", "--results-file", str(out)])
    assert run_bench(ns) == 0
    text = out.read_text()
    rows = table_rows(text)
    assert set(rows) == {"64", "96"} and all(len(c) == 10 for c in rows.values())
    assert "as shipped: cosine median" in text and "config-aligned: cosine median" in text
    assert "nano measured" in text and "faster than nano" in text
