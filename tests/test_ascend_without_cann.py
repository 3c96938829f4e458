"""torch-npu installed on a host without CANN: `import torch` itself fails there (torch auto-loads the torch_npu
backend entry point, whose .so needs libhccl/libascendcl), so dsv4 turns auto-loading off before torch is imported
(dsv4/__init__.py) and imports torch_npu only in the Ascend probe. A fake torch_npu distribution that registers the
same `torch.backends` entry point and raises the real error at import stands in for such an install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MISSING = "libhccl.so: cannot open shared object file: No such file or directory"


@pytest.fixture(scope="module")
def fake_torch_npu(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fake_npu")
    (root / "torch_npu").mkdir()
    (root / "torch_npu" / "__init__.py").write_text(f"raise ImportError({MISSING!r})\n")
    info = root / "torch_npu-2.14.0.dist-info"
    info.mkdir()
    # the real wheel's metadata and entry point (torch_npu-2.14.0.dist-info/entry_points.txt)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.14.0\n"
                                   "Requires-Dist: torch==2.14.0.*\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}  # as a fresh shell has it
    env["PYTHONPATH"] = str(root)
    return env


def run(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_fake_really_breaks_plain_import_torch(fake_torch_npu, tmp_path):
    res = run(fake_torch_npu, sys.executable, "-c", "import torch", cwd=tmp_path)
    assert res.returncode != 0 and "Failed to load the backend extension: torch_npu" in res.stderr, res.stderr[-500:]


def check_doctor(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    ascend = next(line for line in res.stdout.splitlines() if "backend ascend" in line)
    assert "unavailable" in ascend and "libhccl.so" in ascend and "CANN" in ascend, ascend
    assert "torch_npu 2.14.0" in res.stdout
    # the CPU torch here is 2.13: the wheel's Requires-Dist pin says the pair is not supported
    assert "requires torch==2.14.0.*: UNSUPPORTED pair" in res.stdout, res.stdout[:800]


def test_python_m_dsv4_doctor_explains(fake_torch_npu, tmp_path):
    check_doctor(run(fake_torch_npu, sys.executable, "-m", "dsv4", "doctor", cwd=tmp_path))


def test_console_script_doctor_explains(fake_torch_npu, tmp_path):
    script = Path(sys.executable).parent / "dsv4"
    if not script.exists():
        pytest.skip("no dsv4 console script next to this interpreter (not a pip-installed environment)")
    check_doctor(run(fake_torch_npu, str(script), "doctor", cwd=tmp_path))
