"""Parity suite: the pytest header says which backends run here and which are skipped, and why.

TRITON_INTERPRET must be set before anything imports the Triton kernel modules (dsv4.cuda.kernels reads it at
import), so it is set here, at conftest import, unless a CUDA GPU is present: there the real kernels run instead.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # as in tests/conftest.py: small ops, shared cores

import parity_support  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = ["parity backends:"]
    for label, (ok, why) in parity_support.STATUS.items():
        lines.append(f"  {'run ' if ok else 'skip'} {label}: {why}")
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    ran = parity_support.RAN
    if ran:
        terminalreporter.write_line("parity backends that ran: " + ", ".join(f"{k} ({v} model runs)"
                                                                               for k, v in ran.items()))
    for label, (ok, why) in parity_support.STATUS.items():
        if not ok:
            terminalreporter.write_line(f"parity backend skipped: {label}: {why}")
