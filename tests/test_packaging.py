"""Packaging and layering: a plain (non-editable) install holds every module of common/, ascend/ and cuda/ and the
configs, importable from the install alone; the import-linter contracts of pyproject.toml hold on that install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import lint_imports  # noqa: E402

FOLDERS = {"common": "dsv4.common", "ascend": "dsv4.ascend", "cuda": "dsv4.cuda"}


def source_modules() -> list[str]:
    """Every module the repo's source folders define, by its dsv4.* name."""
    names = ["dsv4", "dsv4.__main__"]
    for folder, package in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join([package, *parts]))
    return names


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("plain") / "site"
    lint_imports.install_plain(target)
    return target


def test_plain_install_imports_every_module(plain_install):
    modules = source_modules()
    assert "dsv4.cuda.kernels.gemm" in modules and "dsv4.common.model.transformer" in modules
    probe = (
        "import importlib, sys, pathlib\n"
        f"target = pathlib.Path({str(plain_install)!r})\n"
        "missing = []\n"
        f"for name in {modules!r}:\n"
        "    m = importlib.import_module(name)\n"
        "    if target not in pathlib.Path(m.__file__).resolve().parents:\n"
        "        missing.append(f'{name} from {m.__file__}')\n"
        "from dsv4.common.model.config import CONFIG_DIR, load_named_config\n"
        "assert CONFIG_DIR.resolve().parent == target / 'dsv4', CONFIG_DIR\n"
        "for name in ('tiny', 'flash', 'pro', 'tiny-release-attn'):\n"
        "    load_named_config(name)\n"
        "from dsv4.ascend import schemas\n"  # the torch_npu ground truth is package data of dsv4.ascend
        "assert target in pathlib.Path(schemas.HERE).resolve().parents, schemas.HERE\n"
        "assert schemas.load('2.14.0')['ops']['npu_mhc_sinkhorn']['schemas']\n"
        "for f in ('parity.yaml', 'hardware.yaml'):\n"
        "    assert (CONFIG_DIR / f).is_file(), f\n"
        "print('\\n'.join(missing))\n"
    )
    # the install alone on the path, run from outside the repo, so nothing resolves to the working tree
    env = {**os.environ, "PYTHONPATH": str(plain_install), "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", probe], cwd=plain_install, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "", f"modules not from the plain install:\n{res.stdout}"


def test_cli_runs_from_plain_install(plain_install):
    env = {**os.environ, "PYTHONPATH": str(plain_install)}
    res = subprocess.run([sys.executable, "-m", "dsv4", "config", "tiny"], cwd=plain_install, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dim:" in res.stdout


def test_import_contracts_hold(plain_install):
    res = lint_imports.lint_imports(plain_install)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
    assert " 0 broken" in res.stdout, res.stdout[-2000:]
