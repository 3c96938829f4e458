"""The torch_npu 2.14.0 ground truth (ascend/schemas/torch_npu-2.14.0.yaml, generated from the wheel) and how the
Ascend backend is bound to it: every operator ascend/ calls has its release schema; the emulated kernels take
exactly the schema's arguments; torch's schema binder rejects what the real op would; the capability table cites
doc lines that are really in the docs; the extraction script turns a wheel into that file."""

from __future__ import annotations

import hashlib
import inspect
import re
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from dsv4.ascend import capability as cap
from dsv4.ascend import schemas
from dsv4.ascend.emulation import KERNELS, make_torch_npu

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import extract_torch_npu_schemas as extract  # noqa: E402

DATA = schemas.load("2.14.0")


def test_schema_file_names_the_wheel_it_came_from():
    assert DATA["version"] == DATA["reported_version"] == "2.14.0"  # no post/op-plugin suffix in the release
    assert re.fullmatch(r"[0-9a-f]{64}", DATA["sha256"]) and DATA["sha256"].startswith("7736f7d8")
    assert DATA["wheel"].startswith("torch_npu-2.14.0-")
    assert schemas.requires_torch("2.14.0") == "torch==2.14.0.*"
    assert "generated" in (ROOT / "ascend/schemas/torch_npu-2.14.0.yaml").read_text()[:200].lower()


def called_ops() -> set[str]:
    """npu_* operators ascend/ calls on a torch_npu module: `.npu.npu_x(`, `npu.npu_x` bound to a name."""
    found = set()
    for f in (ROOT / "ascend").glob("*.py"):
        found |= set(re.findall(r"\bnpu\.(npu_[a-z0-9_]+)\b", f.read_text()))
    return found


def test_every_called_op_has_a_release_schema_and_an_emulated_kernel():
    calls = called_ops()
    assert {"npu_mhc_sinkhorn", "npu_moe_finalize_routing", "npu_moe_distribute_dispatch"} <= calls
    assert calls <= set(DATA["ops"]), sorted(calls - set(DATA["ops"]))
    assert calls <= set(KERNELS), sorted(calls - set(KERNELS))
    for name in KERNELS:
        for s in schemas.schemas(name):
            torch._C.parse_schema(s)  # ATen schema syntax, as torch reads it


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_signature_is_the_release_schema(name):
    """Names, order, positional vs keyword-only and defaults of the kernel (after the bound chip) equal the
    schema's: the dispatcher passes arguments by the schema, so a mismatch would break or silently shift them."""
    schema = torch._C.parse_schema(schemas.schemas(name)[0])
    params = list(inspect.signature(KERNELS[name]).parameters.values())[1:]
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for p, a in zip(params, schema.arguments, strict=True):
        assert (p.kind == p.KEYWORD_ONLY) == a.kwarg_only, f"{name}.{a.name}: keyword-only differs"
        if a.has_default_value():
            default = a.default_value
            assert p.default is not p.empty, f"{name}.{a.name}: the schema has a default"
            if isinstance(default, (int, float, str, bool)) or default is None:
                assert p.default == default, f"{name}.{a.name}: default {p.default!r} vs schema {default!r}"
        else:
            assert p.default is p.empty, f"{name}.{a.name}: required in the schema"


def test_the_binder_rejects_what_the_real_op_rejects():
    a5, a2 = make_torch_npu("950dt"), make_torch_npu("910b")
    x = torch.rand(2, 4, 4)
    with pytest.raises(RuntimeError, match="positional"):  # eps / num_iters are keyword-only
        a5.npu_mhc_sinkhorn(x, 1e-6, 20)
    with pytest.raises(RuntimeError, match="Unknown keyword"):
        a5.npu_mhc_sinkhorn(x, iters=20)
    y = a5.npu_mhc_sinkhorn(x, eps=1e-6, num_iters=20)
    assert isinstance(y, tuple) and len(y) == 3  # three outputs, as the schema says (the doc says one)
    rows = torch.rand(4, 2)
    dst = torch.arange(4, dtype=torch.int32)
    with pytest.raises(RuntimeError):  # expanded_src_to_dst_row is required
        a2.npu_moe_finalize_routing(rows, None, None, None, None)
    with pytest.raises(RuntimeError, match="Unknown keyword"):
        a2.npu_moe_finalize_routing(rows, None, None, None, None, dst, None, top_k=2)
    assert a2.npu_moe_finalize_routing(rows, None, None, None, None, dst, None, k=2).shape == (2, 2)


def test_capability_table_rests_on_the_docs():
    assert cap.products_match_docs() == {}  # where a doc lists products, the table IS that list
    for op, c in cap.CAPABILITIES.items():
        assert op in DATA["ops"], op
        if c.doc:
            assert c.doc in schemas.doc(op), f"{op}: {c.doc!r} is not in its 2.14.0 doc"
        else:
            assert not schemas.doc(op), f"{op} has a doc: cite it"
        if c.code_chips:  # chips the wheel's code adds beyond the doc: cited from its meta function, flagged
            assert set(c.code_chips) <= set(c.chips) and c.code in (schemas.op(op)["meta_source"] or ""), op
            assert any(k.startswith(op) for k in cap.UNVERIFIED), f"{op}: a code-only form needs an UNVERIFIED entry"
    for name, (op, fragment, _) in cap.LEGAL_PATHS.items():
        assert fragment in schemas.doc(op), f"{name}: {fragment!r} not in {op}'s doc"
    assert cap.UNVERIFIED


def test_capability_table_is_keyed_by_the_reported_release():
    assert cap.release_of(types.SimpleNamespace(__version__="2.14.0")) == "2.14.0"
    assert cap.release_supported("2.14.0")
    post = cap.release_of(types.SimpleNamespace(__version__="2.7.1.post2+git1234"))
    assert post == "2.7.1.post2" and not cap.release_supported(post)
    assert cap.table_release(post) == schemas.PINNED_RELEASE


# -- the extraction script ------------------------------------------------------------------------------------------
FAKE_SCHEMAS = """\
custom:
- func: npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)
- func: npu_unused_op(Tensor x) -> Tensor
symint:
- func: npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)
"""
FAKE_DOCS = '''
_add_torch_npu_docstr(
    "npu_rms_norm",
    """
torch_npu.npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)
gamma：数据类型需要和self保持一致

支持的型号:
Atlas A2 训练系列产品
Atlas A5 训练系列产品

调用示例:
import torch
"""
)
'''
FAKE_META = '''
@impl(m, "npu_rms_norm")
def npu_rms_norm_meta(self, gamma, epsilon=1e-6):
    return self, self
'''


def test_extract_reads_a_wheel(tmp_path):
    wheel = tmp_path / "torch_npu-9.9.9-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(extract.SCHEMA_YAML, FAKE_SCHEMAS)
        z.writestr(extract.DOCS_PY, FAKE_DOCS)
        z.writestr(extract.META_PY, FAKE_META)
        z.writestr("torch_npu/version.py", "__version__ = '9.9.9'\n")
        z.writestr("torch_npu-9.9.9.dist-info/METADATA", "Name: torch_npu\nRequires-Dist: torch==9.9.9.*\n")
    out = tmp_path / "out.yaml"
    assert extract.main(["--wheel", str(wheel), "--version", "9.9.9", "--out", str(out)]) == 0
    data = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert data["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert data["requires_dist"] == ["torch==9.9.9.*"] and data["reported_version"] == "9.9.9"
    rms = data["ops"]["npu_rms_norm"]
    assert [r["schema"] for r in rms["schemas"]] == [FAKE_SCHEMAS.splitlines()[1].split("func: ")[1]]  # deduped
    assert rms["products"] == ["910b", "950pr", "950dt"] and rms["meta"] is True
    assert "数据类型需要和self保持一致" in rms["doc"] and "import torch" not in rms["doc"]  # example cut off
    assert "npu_unused_op" not in data["ops"]  # only what ascend/ mentions


@pytest.mark.parametrize("torch_v, npu_v, want", [
    ("2.14.0+cpu", "2.14.0", "requires torch==2.14.0.*: supported pair"),
    ("2.14.1", "2.14.0", "UNSUPPORTED pair: install torch==2.14.0.*"),  # ==2.14.0.* is a prefix match
    ("2.13.0", "2.14.0", "UNSUPPORTED pair: install torch==2.14.0.*"),
    ("2.14.0", "2.7.1.post2", "torch_npu 2.7.1.post2: UNSUPPORTED by dsv4"),
    ("2.14.0", None, "torch_npu not installed"),
])
def test_version_report_reads_the_wheel_pin(monkeypatch, torch_v, npu_v, want):
    import dsv4.ascend as ascend

    monkeypatch.setattr(ascend, "_dist_version", {"torch": torch_v, "torch-npu": npu_v}.get)
    assert any(want in line for line in ascend.version_report()), ascend.version_report()


# -- output shapes against the wheel's own meta functions -----------------------------------------------------------
def meta_function(name: str):
    """The op's meta (shape) function from the schema file, executed with stand-ins for torch_npu internals."""
    src = schemas.op(name)["meta_source"]
    src = "\n".join(line for line in src.splitlines() if not line.startswith("@"))  # drop @impl(m, ...)
    env = {"torch": torch, "math": __import__("math"), "ops_error": lambda *a: "",
           "ErrCode": types.SimpleNamespace(VALUE="", TYPE="", NOT_SUPPORT="", PARAM=""),
           "torch_npu": types.SimpleNamespace(int4=object(), float4_e2m1fn_x2=object(), hifloat8=object()),
           "get_cann_version": lambda: "9.9.9", "TORCH_DTYPE_MAP": {BF: BF, torch.float16: torch.float16},
           "TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP": {1: torch.int8, BF: BF, torch.float16: torch.float16},
           # npu_quant_matmul's checks live outside its meta function (not in the schema file): their conditions are
           # the emulation's (tests/test_ascend_emulation.py); here only the output shape is compared
           **{f"quant_matmul_{c}_check": lambda *a: None for c in ("shape", "dtype", "extra_dtype",
                                                                  "scale_offset_out", "group_sizes")},
           "bias_shape_check": lambda *a: None, "is_transpose_last_two_dims": lambda t: False}
    exec(compile(src, f"<meta {name}>", "exec"), env)  # noqa: S102 - the wheel's own shape function, as data
    return next(v for k, v in env.items() if callable(v) and k.endswith(("_meta", "_forward", name)))


def on_meta(v):
    if isinstance(v, torch.Tensor):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, list):
        return [on_meta(t) for t in v]
    return v


def shapes(out):
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [None if t is None else (tuple(t.shape), t.dtype) for t in out]


BF = torch.bfloat16
SFA_KV = torch.randn(1, 6, 1, 512, dtype=BF)  # key and value are one tensor
META_CASES = {
    "npu_rms_norm": (("910b",), (torch.randn(2, 3, 8, dtype=BF), torch.ones(8, dtype=BF)), {}),
    "npu_rotary_mul": (("910b",), (torch.randn(1, 6, 2, 8), torch.rand(1, 6, 1, 8), torch.rand(1, 6, 1, 8),
                                   "interleave"), {}),  # the meta function names it `mode`: positional
    "npu_swiglu": (("910b",), (torch.randn(3, 8, dtype=BF),), {}),
    "npu_dynamic_quant": (("910b",), (torch.randn(5, 16, dtype=BF),), {}),
    "npu_dynamic_mx_quant": (("950dt",), (torch.randn(2, 5, 192, dtype=BF),),
                             {"dst_type": 292, "block_size": 64, "scale_alg": 1, "max_low_bound": 1e-4}),
    "npu_mhc_pre": (("950dt",), (torch.randn(2, 3, 4, 16, dtype=BF), torch.randn(24, 64), torch.ones(3),
                                 torch.zeros(24)), {}),
    "npu_mhc_sinkhorn": (("950dt",), (torch.rand(2, 3, 4, 4),), {"eps": 1e-6, "num_iters": 5}),
    "npu_mhc_post": (("950dt",), (torch.randn(2, 3, 4, 16, dtype=BF), torch.rand(2, 3, 4, 4),
                                  torch.randn(2, 3, 16, dtype=BF), torch.rand(2, 3, 4)), {}),
    "npu_moe_gating_top_k": (("910b",), (torch.randn(5, 8), 2), {"norm_type": 1}),
    "npu_moe_init_routing_v2": (("910b",), (torch.randn(4, 8, dtype=BF), torch.randint(0, 3, (4, 2)).int()),
                                {"active_num": 8, "expert_num": 3, "expert_tokens_num_type": 1,
                                 "expert_tokens_num_flag": True, "active_expert_range": [0, 3]}),
    "npu_moe_finalize_routing": (("910b",), (torch.randn(8, 4), None, None, None, None,
                                             torch.randperm(8).int(), None), {"k": 2}),
    "npu_lightning_indexer": (("910b", "950dt"), (torch.randn(1, 3, 8, 128, dtype=BF),
                                                  torch.randn(1, 5, 1, 128, dtype=BF),
                                                  torch.randn(1, 3, 8, dtype=BF)), {"sparse_count": 4}),
    "npu_sparse_flash_attention": (("950dt",), (torch.randn(1, 2, 2, 512, dtype=BF), SFA_KV, SFA_KV,
                                                torch.tensor([[4, 1, -1, -1]] * 2).int().view(1, 2, 1, 4), 0.05),
                                   {"query_rope": torch.randn(1, 2, 2, 64, dtype=BF),
                                    "key_rope": torch.randn(1, 6, 1, 64, dtype=BF), "sparse_mode": 0,
                                    "attention_mode": 2, "sinks": torch.zeros(2)}),
    # npu_grouped_matmul's meta function calls helpers outside itself (gmm_get_dtype): not executable alone.
    # npu_quant_matmul's calls its quant_matmul_*_check helpers (stubbed in meta_function: shapes only), here in the
    # FP8 G-B form the 950 linear takes (x2 the transposed view of an [N, K] weight)
    "npu_quant_matmul": (("950dt",), (torch.randn(3, 256).to(torch.float8_e4m3fn),
                                      torch.randn(384, 256).to(torch.float8_e4m3fn).t(), torch.ones(2, 3)),
                         {"pertoken_scale": torch.ones(3, 2), "output_dtype": BF, "group_sizes": [1, 128, 128]}),
}


@pytest.mark.parametrize("name", sorted(META_CASES))
def test_emulated_outputs_have_the_meta_functions_shapes(name):
    """Number, shapes and dtypes of the outputs (and which are None) equal what the wheel's meta function
    allocates for the same call: what a caller unpacks on a device is what it unpacks here."""
    chips, args, kwargs = META_CASES[name]
    meta = meta_function(name)
    want = shapes(meta(*[on_meta(a) for a in args], **{k: on_meta(v) for k, v in kwargs.items()}))
    for chip in chips:
        got = shapes(getattr(make_torch_npu(chip), name)(*args, **kwargs))
        assert got == want, f"{name} on {chip}: emulated {got} vs meta {want}"
