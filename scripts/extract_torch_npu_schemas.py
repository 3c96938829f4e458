"""Extract the ground truth of the torch_npu operators that dsv4.ascend calls from a released torch-npu wheel, into
ascend/schemas/torch_npu-<version>.yaml (package data, read by ascend/schemas/__init__.py). The output is generated:
never edit it by hand, re-run this script for a new release.

    python scripts/extract_torch_npu_schemas.py --version 2.14.0            # download the wheel (no install)
    python scripts/extract_torch_npu_schemas.py --wheel path/to/torch_npu-2.14.0-...whl

The wheel is fetched with `pip download --no-deps --only-binary=:all:` for one fixed platform (the Python-level files
this reads are the same in every platform build) and read as a zip; it is never installed or imported.
Per operator, from the wheel (shared/notes/toolchain.md, "The torch_npu release as ground truth"):
- schemas: every `func:` line of torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml for the op and its
  overloads (`torch_npu.X` is bound to `torch.ops.npu.X`, so this schema is what binds a call);
- doc: the operator's docstring from torch_npu/_op_plugin_docs.py (Chinese, kept verbatim; examples cut off), and
  `products`: the chips its "supported products" (支持的型号) section names, mapped to dsv4's chip keys;
- meta: whether torch_npu/op_plugin/meta/_meta_registrations.py registers a shape function, and its source.
Which operators: every `npu_*` name in ascend/**/*.py that the wheel's schema file defines.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ASCEND = ROOT / "ascend"
SCHEMA_YAML = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
DOCS_PY = "torch_npu/_op_plugin_docs.py"
META_PY = "torch_npu/op_plugin/meta/_meta_registrations.py"
PLATFORM, PYTHON = "manylinux_2_28_x86_64", "3.11"
# the docs' product names -> dsv4 chip keys (capability.CHIPS); other products (Atlas inference series = 310P, the
# first-generation training series) are not V4 targets and are dropped
PRODUCT_PATTERNS = [
    (re.compile(r"Atlas\s*A2"), ("910b",)),
    (re.compile(r"Atlas\s*A3"), ("910c",)),
    (re.compile(r"Atlas\s*A5|昇腾\s*950|Ascend\s*950"), ("950pr", "950dt")),
]
PRODUCTS_HEADER = re.compile(r"^\s*支持的型号")
EXAMPLE_HEADER = re.compile(r"^\s*(调用示例|示例\s*\d*|单算子模式调用)\s*[:：]?\s*$")


def download(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
           "--platform", PLATFORM, f"torch-npu=={version}", "-d", str(dest)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wheels = sorted(dest.glob(f"torch_npu-{version}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no torch_npu-{version} wheel in {dest}")
    return wheels[0]


def called_ops() -> set[str]:
    """Every npu_* identifier in ascend/ (calls, capability keys, emulation names); filtered by the schema file."""
    names: set[str] = set()
    for path in ASCEND.rglob("*.py"):
        names |= set(re.findall(r"\b(npu_[a-z0-9_]+)\b", path.read_text()))
    return names


def op_name(func: str) -> str:
    return func.split("(", 1)[0].split(".", 1)[0]


def read_schemas(text: str) -> dict[str, list[dict[str, str]]]:
    """op -> [{section, schema}], deduplicated (an op can appear in several sections, e.g. custom and symint)."""
    data = yaml.safe_load(text)
    out: dict[str, list[dict[str, str]]] = {}
    for section, entries in data.items():
        if not isinstance(entries, list):
            continue
        for e in entries:
            func = e.get("func") if isinstance(e, dict) else None
            if not func:
                continue
            rows = out.setdefault(op_name(func), [])
            if all(r["schema"] != func for r in rows):
                rows.append({"section": section, "schema": func})
    return out


def read_docs(text: str) -> dict[str, str]:
    docs: dict[str, str] = {}
    for node in ast.walk(ast.parse(text)):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_add_torch_npu_docstr"
                and len(node.args) == 2 and all(isinstance(a, ast.Constant) for a in node.args)):
            docs[node.args[0].value] = node.args[1].value
    return docs


def strip_examples(doc: str) -> str:
    lines = doc.strip("\n").splitlines()
    for i, line in enumerate(lines):
        if EXAMPLE_HEADER.match(line):
            return "\n".join(lines[:i]).rstrip() + "\n"
    return "\n".join(lines).rstrip() + "\n"


def products(doc: str) -> tuple[list[str] | None, list[str]]:
    """(chip keys, raw lines) of the 支持的型号 section; (None, []) when the doc has no such section."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if PRODUCTS_HEADER.match(line):
            raw = []
            for nxt in lines[i + 1:]:
                s = nxt.strip().lstrip("-").strip()
                if not s:
                    if raw:
                        break
                    continue
                if EXAMPLE_HEADER.match(nxt) or s.startswith("import "):
                    break
                raw.append(s)
            chips: list[str] = []
            for s in raw:
                for pat, keys in PRODUCT_PATTERNS:
                    if pat.search(s):
                        chips += [k for k in keys if k not in chips]
            return chips, raw
    return None, []


def read_meta(text: str) -> dict[str, str]:
    """op -> source of the function registered with @impl(m, "op")."""
    out: dict[str, str] = {}
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if (isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "impl" and len(dec.args) >= 2
                    and isinstance(dec.args[1], ast.Constant)):
                out[dec.args[1].value] = "\n".join(lines[node.lineno - 1:node.end_lineno]) + "\n"
    return out


def requires_dist(metadata: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


class Literal(str):
    pass


def _literal(dumper: yaml.SafeDumper, s: Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|")


def extract(wheel: Path, version: str) -> dict:
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        schemas = read_schemas(z.read(SCHEMA_YAML).decode())
        docs = read_docs(z.read(DOCS_PY).decode())
        meta = read_meta(z.read(META_PY).decode())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta_name).decode()
        version_py = z.read("torch_npu/version.py").decode()
    reported = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", version_py)
    ops = {}
    for op in sorted(called_ops() & set(schemas)):
        doc = docs.get(op)
        chips, raw = products(doc) if doc else (None, [])
        ops[op] = {
            "schemas": schemas[op],
            "products": chips,
            "products_raw": raw,
            "meta": op in meta,
            "doc": Literal(strip_examples(doc)) if doc else None,
            "meta_source": Literal(meta[op]) if op in meta else None,
        }
    return {
        "generated_by": "scripts/extract_torch_npu_schemas.py (do not edit by hand)",
        "package": "torch-npu",
        "version": version,
        "reported_version": reported.group(1) if reported else None,
        "wheel": wheel.name,
        "sha256": sha,
        "requires_dist": requires_dist(metadata),
        "files": {"schemas": SCHEMA_YAML, "docs": DOCS_PY, "meta": META_PY},
        "ops": ops,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", default="2.14.0", help="torch-npu release (default 2.14.0)")
    ap.add_argument("--wheel", type=Path, help="an already downloaded wheel (skips pip download)")
    ap.add_argument("--out", type=Path, help="output file (default ascend/schemas/torch_npu-<version>.yaml)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download(args.version, Path(tmp))
        data = extract(wheel, args.version)
    out = args.out or ASCEND / "schemas" / f"torch_npu-{args.version}.yaml"
    dumper = yaml.SafeDumper
    dumper.add_representer(Literal, _literal)
    header = (f"# GENERATED by scripts/extract_torch_npu_schemas.py from {data['wheel']} (sha256 {data['sha256']}).\n"
              "# Do not edit: re-run the script. Docs are the wheel's own (Chinese) text, examples cut off.\n")
    out.write_text(header + yaml.dump(data, Dumper=dumper, allow_unicode=True, sort_keys=False, width=1000))
    missing = sorted(n for n in called_ops() - set(data["ops"]) if not n.endswith("_"))
    print(f"wrote {out} ({len(data['ops'])} ops, sha256 {data['sha256'][:12]}…)")
    if missing:
        print(f"npu_* names in ascend/ that the wheel's schema file does not define: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
