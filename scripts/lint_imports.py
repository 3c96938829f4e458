"""Check the package layering with import-linter (the contracts in pyproject.toml) on a plain install of the repo.

import-linter reads packages from the file system, and the repo maps its top-level folders onto dsv4.* through
package-dir (common/ is dsv4.common), which an editable install resolves only at import time. So the tree is
installed non-editable into a temporary folder first and the contracts are checked there. The same install is
what tests/test_packaging.py imports every module from.

    python scripts/lint_imports.py          # exit 0 when every contract is kept
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache",
                              ".ruff_cache", "out")


def install_plain(target: Path) -> None:
    """pip install the repo (no dependencies, not editable) into `target`, from a copy so that the build leaves
    nothing in the working tree."""
    src = target.parent / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target), str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # setuptools is here already: no download of a build environment
    subprocess.run(cmd, check=True)


def lint_imports(target: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([exe, "--no-cache", str(ROOT / "pyproject.toml")], cwd=target, env=env,
                          capture_output=True, text=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dsv4-lint-") as tmp:
        target = Path(tmp) / "site"
        install_plain(target)
        res = lint_imports(target)
        print(res.stdout[res.stdout.find("Contracts"):] if "Contracts" in res.stdout else res.stdout, end="")
        print(res.stderr, end="", file=sys.stderr)
        return res.returncode


if __name__ == "__main__":
    sys.exit(main())
