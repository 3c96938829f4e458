"""Checkpoint files: the HF layout writer, the loader (HF, long names, model-parallel files, EP/TP reads), FP8/FP4
dequantisation against hand-computed values, and clear errors for every kind of bad input."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv4.common.checkpoint.layout import CheckpointError, args_for_quant, checkpoint_layout, expert_index, tp_split_dim
from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.checkpoint.reader import (
    CheckpointReader,
    canonical_name,
    load_checkpoint,
    load_into_model,
    tp_slice,
)
from dsv4.common.checkpoint.writer import (
    INDEX_FILE,
    add_make_checkpoint_arguments,
    make_checkpoint,
    parse_size,
    run_make_checkpoint,
)
from dsv4.common.model.config import ModelArgs, load_named_config
from dsv4.common.model.quant import dequant_fp4, dequant_fp8, dequant_weight, e8m0_to_float
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.model.transformer import Transformer

OPS = ReferenceOps()


def small_args() -> ModelArgs:
    # the tiny model cut to one layer of each attention kind (window, CSA, HCA) + MTP, a hash layer and a biased-gate
    # layer, 4 experts: every tensor kind of the release, and FP4 quantisation of a quarter of tiny's experts
    return load_named_config("tiny").replace(n_layers=3, compress_ratios=[0, 4, 128, 0], n_hash_layers=1,
                                             n_routed_experts=4)


def tokens(seed: int = 0, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ck_none(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "tiny-none"
    make_checkpoint(load_named_config("tiny"), out, quant="none", seed=0)
    return out


@pytest.fixture(scope="module")
def ck_fp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "small-fp4"
    make_checkpoint(small_args(), out, quant="fp4", seed=0)
    return out


@pytest.fixture(scope="module")
def model_fp4(ck_fp4: Path) -> Transformer:
    return load_checkpoint(ck_fp4, OPS, progress=False)


def copy_ck(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(ck: Path, edit) -> None:
    """Apply edit(name -> tensor dict, shard file name) to every shard and rewrite the index to match."""
    index = json.loads((ck / INDEX_FILE).read_text())
    weight_map = {}
    for fname in sorted(set(index["weight_map"].values())):
        tensors = load_file(ck / fname)
        edit(tensors, fname)
        save_file(tensors, ck / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    index["weight_map"] = weight_map
    (ck / INDEX_FILE).write_text(json.dumps(index))


def shard_of(ck: Path, name: str) -> str:
    return json.loads((ck / INDEX_FILE).read_text())["weight_map"][name]


# -- the writer --------------------------------------------------------------------------------------------------------
def test_make_checkpoint_writes_the_hf_layout(ck_none: Path, ck_fp4: Path, tmp_path: Path) -> None:
    for ck, args, quant in ((ck_none, load_named_config("tiny"), "none"), (ck_fp4, small_args(), "fp4")):
        a = args_for_quant(args, quant)
        layout = checkpoint_layout(a)
        index = json.loads((ck / INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards == sorted(p.name for p in ck.glob("model-*-of-*.safetensors"))
        assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
        assert set(index["weight_map"]) == set(layout)
        seen, total = {}, 0
        for s in shards:
            with safe_open(ck / s, "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    seen[k] = (tuple(sl.get_shape()), sl.get_dtype())
                    t = f.get_tensor(k)
                    total += t.numel() * t.element_size()
        assert seen == {n: (s.shape, s.dtype) for n, s in layout.items()}
        assert index["metadata"]["total_size"] == total
        assert ModelArgs.load(ck).arch_hash() == a.arch_hash()  # config.json round-trips
        assert (ck / "tokenizer.json").exists() and (ck / "tokenizer_config.json").exists()
    dtypes = {d for _, d in seen.values()}
    assert {"F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I32"} <= dtypes  # the release's real dtypes
    # deterministic: the same (args, quant, seed) gives the same bytes
    again = tmp_path / "again"
    make_checkpoint(load_named_config("tiny"), again, quant="none", seed=0)
    for f in ck_none.glob("*.safetensors"):
        assert (again / f.name).read_bytes() == f.read_bytes()


def test_cli_make_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    add_make_checkpoint_arguments(p)
    ns = p.parse_args(["--config", "tiny", "--out", str(tmp_path / "ck"), "--quant", "none", "--seed", "3",
                       "--shard-size", "4MB"])
    assert run_make_checkpoint(ns) == 0
    sizes = [f.stat().st_size for f in (tmp_path / "ck").glob("model-*.safetensors")]
    assert len(sizes) >= 4 and max(sizes) < 4.2e6  # 4 MB cap (+ header)
    assert "wrote" in capsys.readouterr().out
    assert parse_size("2MiB") == 2 * 2**20 and parse_size("5GB") == 5 * 10**9 and parse_size("123") == 123
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


# -- loading -----------------------------------------------------------------------------------------------------------
def test_load_is_bit_exact_with_the_in_memory_model(ck_none: Path) -> None:
    args = load_named_config("tiny")
    ref = build_random_model(args_for_quant(args, "none"), OPS, seed=0)
    model = load_checkpoint(ck_none, OPS, dtype=torch.float32, progress=False)
    t = tokens(0, 2, 16)
    assert torch.equal(model(t), ref(t))


class NoActivationQuantOps(ReferenceOps):
    """The reference linear without the 1x128 FP8 activation rounding of the official FP8/FP4 GEMMs."""

    def linear(self, x, w):
        if w.fmt == "none":
            return F.linear(x, w.weight.to(x.dtype))
        return F.linear(x.float(), dequant_weight(w.weight, w.scale, w.fmt)).to(x.dtype)


def test_quantized_in_op_matches_dequantized_at_load(ck_fp4: Path, model_fp4: Transformer) -> None:
    t = tokens(0, 2, 8)
    y = model_fp4(t)
    # 1. without activation rounding the two weight modes are the same arithmetic: bit for bit
    plain = load_checkpoint(ck_fp4, NoActivationQuantOps(), weights="quantized", progress=False)
    assert torch.equal(plain(t), y)
    # 2. so the whole difference is the FP8 (e4m3) rounding of activations in 1x128 blocks. One linear: e4m3 keeps 3
    # mantissa bits, so round-to-nearest moves each activation by at most 2^-4 of itself (normal range) or half a
    # subnormal step, 2^-10 * block scale; hence |dy| <= 2^-4 |x| @ |W|^T + 2^-10 * s_max * sum|W| (rigorous).
    quant = load_checkpoint(ck_fp4, OPS, weights="quantized", progress=False)
    lw = quant.layers[1].attn.wq_a.lw
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    w = dequant_weight(lw.weight, lw.scale, lw.fmt)
    dy = (OPS.linear(x, lw) - x @ w.t()).abs()
    s_max = torch.exp2(torch.ceil(torch.log2(x.abs().amax() / 448)))
    bound = 2**-4 * x.abs() @ w.abs().t() + 2**-10 * s_max * w.abs().sum(1) + 1e-5
    assert (dy <= bound).all() and dy.max() > 0
    # 3. through the whole model (3 layers + head, random untrained weights) that ~3% rms per-linear noise compounds,
    # and it flips discrete decisions (top-2 of 4 experts per token), which is where the large per-logit differences
    # come from. Measured on these prompts and 10 more: cosine >= 0.985, relative L2 <= 0.18, max |dy| <= 0.58 *
    # max |y|. The bounds leave about 2x margin on each.
    yq = quant(t)
    rel = ((yq - y).norm() / y.norm()).item()
    cos = F.cosine_similarity(yq.flatten(), y.flatten(), dim=0).item()
    assert cos > 0.97 and rel < 0.35, (cos, rel)
    assert (yq - y).abs().max() < 0.9 * y.abs().max()


def test_fp4_dequantisation_by_hand() -> None:
    # all 16 codes, low nibble = even column; e2m1 code values with bit 3 as the sign
    values = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    codes = list(range(16)) * 4  # 64 columns = two 32-blocks
    packed = torch.tensor([[codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(32)]], dtype=torch.uint8)
    packed = packed.view(torch.int8)
    scale_bytes = torch.tensor([[128, 125]], dtype=torch.uint8)  # ue8m0: 2^(128-127) = 2, 2^(125-127) = 0.25
    got = dequant_fp4(packed, e8m0_to_float(scale_bytes.view(torch.float8_e8m0fnu)))
    want = torch.tensor([[values[c] * (2.0 if i < 32 else 0.25) for i, c in enumerate(codes)]])
    assert torch.equal(got, want)
    assert got[0, 7].item() == 12.0 and got[0, 32 + 15].item() == -1.5  # 6*2, -6*0.25 spelled out
    # ue8m0 byte -> 2^(byte-127): the extremes and one
    e = e8m0_to_float(torch.tensor([0, 127, 254], dtype=torch.uint8))
    assert e.tolist() == [2.0**-127, 1.0, 2.0**127]


def test_fp8_dequantisation_by_hand_with_partial_edge_blocks() -> None:
    # weight [130, 200]: 128x128 blocks with a 2-row and a 72-column edge block; scale [2, 2]
    q = torch.full((130, 200), 1.5).to(torch.float8_e4m3fn)
    q[129, 199] = -448.0  # e4m3's max magnitude, in the corner edge block
    scale = e8m0_to_float(torch.tensor([[127, 128], [126, 131]], dtype=torch.uint8))  # 1, 2 / 0.5, 16
    w = dequant_fp8(q, scale)
    assert w[0, 0] == 1.5 and w[127, 127] == 1.5
    assert w[0, 128] == 3.0 and w[127, 199] == 3.0
    assert w[128, 0] == 0.75 and w[129, 127] == 0.75
    assert w[128, 128] == 24.0 and w[129, 199] == -448.0 * 16
    with pytest.raises(ValueError, match="scale shape"):
        dequant_fp8(q, scale[:1])


def test_loader_dequantises_hand_written_fp4_and_fp8(ck_fp4: Path, tmp_path: Path) -> None:
    ck = copy_ck(ck_fp4, tmp_path / "ck")
    d, inter = 256, 128
    codes = torch.arange(16).repeat(inter, d // 16)  # every code in every row
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    sbytes = (120 + torch.arange(inter * d // 32) % 16).to(torch.uint8).view(inter, d // 32)  # 2^-7 .. 2^8
    q8 = (torch.arange(128 * 256) % 7 - 3).float().view(128, 256).to(torch.float8_e4m3fn)  # -3..3
    s8 = torch.tensor([[130, 124]], dtype=torch.uint8)  # 8 and 1/8

    def edit(tensors: dict, fname: str) -> None:
        if "layers.2.ffn.experts.3.w1.weight" in tensors:
            tensors["layers.2.ffn.experts.3.w1.weight"] = packed
        if "layers.2.ffn.experts.3.w1.scale" in tensors:
            tensors["layers.2.ffn.experts.3.w1.scale"] = sbytes.view(torch.float8_e8m0fnu)
        if "layers.0.attn.wq_a.weight" in tensors:
            tensors["layers.0.attn.wq_a.weight"] = q8
        if "layers.0.attn.wq_a.scale" in tensors:
            tensors["layers.0.attn.wq_a.scale"] = s8.view(torch.float8_e8m0fnu)

    rewrite(ck, edit)
    m = load_checkpoint(ck, OPS, progress=False)
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    w1 = m.layers[2].ffn.experts.w1.weight[3]
    for o, i in ((0, 0), (0, 7), (5, 15), (127, 255), (64, 100)):
        want = table[int(codes[o, i])] * 2.0 ** (int(sbytes[o, i // 32]) - 127)
        assert w1[o, i].item() == want, (o, i)
    wq_a = m.layers[0].attn.wq_a.weight
    for o, i in ((0, 0), (3, 127), (100, 128), (127, 255)):
        want = float((o * 256 + i) % 7 - 3) * (8.0 if i < 128 else 0.125)
        assert wq_a[o, i].item() == want, (o, i)


LONG = {"attn": "self_attn", "ffn": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
        "scale": "weight_scale_inv", "bias": "e_score_correction_bias"}


def long_name(name: str) -> str:
    parts = [LONG.get(p, p) for p in name.split(".")]
    if parts[:1] == ["embed"]:
        parts[0] = "embed_tokens"
    if parts == ["head", "weight"]:
        parts[0] = "lm_head"
    return "model." + ".".join(parts)


def test_long_hf_names_model_prefix_and_i64_tid2eid(ck_fp4: Path, model_fp4: Transformer, tmp_path: Path) -> None:
    ck = copy_ck(ck_fp4, tmp_path / "ck")

    def edit(tensors: dict, fname: str) -> None:
        for k in list(tensors):
            t = tensors.pop(k)
            tensors[long_name(k)] = t.long() if k.endswith("tid2eid") else t
        if fname.startswith("model-00001"):  # MTP copies of embed / head, which convert.py drops too
            tensors["model.mtp.0.emb.tok_emb.weight"] = torch.zeros(512, 256, dtype=torch.bfloat16)
            tensors["model.mtp.0.head.weight"] = torch.zeros(512, 256, dtype=torch.bfloat16)

    rewrite(ck, edit)
    names = json.loads((ck / INDEX_FILE).read_text())["weight_map"]
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.0.self_attn.wq_a.weight_scale_inv" in names
    assert "model.layers.2.mlp.experts.1.down_proj.weight" in names
    with CheckpointReader(ck) as r:
        assert r.entries["layers.0.ffn.gate.tid2eid"].dtype == "I64"
        assert sorted(r.skipped) == ["model.mtp.0.emb.tok_emb.weight", "model.mtp.0.head.weight"]
    m = load_checkpoint(ck, OPS, progress=False)
    t = tokens(1)
    assert torch.equal(m(t), model_fp4(t))
    assert canonical_name("model.layers.3.mlp.shared_experts.up_proj.weight") == "layers.3.ffn.shared_experts.w3.weight"


def write_mp(src: Path, out: Path, mp: int, n_experts: int) -> None:
    """The official inference/convert.py output, written independently: model{r}-mp{mp}.safetensors with short
    names; split dims per tensor; experts by index; wo_a dequantised to bf16 without its scale; FP4 as F4."""
    split = {"embed": 0, "head": 0, "wq_b": 0, "wo_a": 0, "wo_b": 1, "attn_sink": 0, "weights_proj": 0}
    full = {}
    for f in sorted(src.glob("model-*.safetensors")):
        full.update(load_file(f))
    per_rank = n_experts // mp
    ranks: list[dict] = [{} for _ in range(mp)]
    for name, t in full.items():
        parts = name.split(".")
        if ".experts." in name and "shared_experts" not in name:
            e = int(parts[-3])
            ranks[e // per_rank][name] = t.view(torch.float4_e2m1fn_x2) if t.dtype == torch.int8 else t
            continue
        key = parts[-1] if any(x in name for x in ("hc", "attn_sink", "tid2eid", "ape")) else parts[-2]
        dim = split.get(key)
        for r in range(mp):
            ranks[r][name] = t if dim is None else t.chunk(mp, dim=dim)[r].contiguous()
    for r in range(mp):
        for name in [n for n in ranks[r] if n.endswith("wo_a.weight")]:
            w, s = ranks[r][name], ranks[r].pop(name[:-6] + "scale")
            ranks[r][name] = dequant_fp8(w, e8m0_to_float(s)).bfloat16()
        save_file(ranks[r], out / f"model{r}-mp{mp}.safetensors")


def test_model_parallel_files_round_trip(ck_fp4: Path, model_fp4: Transformer, tmp_path: Path) -> None:
    out = tmp_path / "mp"
    out.mkdir()
    write_mp(ck_fp4, out, 2, small_args().n_routed_experts)
    shutil.copy(ck_fp4 / "config.json", out / "config.json")
    with CheckpointReader(out) as r:
        assert r.format == "mp" and r.mp_size == 2
        assert r.entries["layers.0.attn.wo_b.weight"].cat_dim == 1
        assert r.entries["layers.2.ffn.experts.3.w1.weight"].dtype == "F4"
    m = load_checkpoint(out, OPS, progress=False)
    t = tokens(2)
    assert torch.equal(m(t), model_fp4(t))
    # the quantised mode reads the same files (wo_a arrives dense, experts as F4 bytes)
    mq = load_checkpoint(out, OPS, weights="quantized", args=ModelArgs.load(out), progress=False)
    assert torch.equal(mq.layers[2].ffn.experts.w1.weight.view(torch.uint8).flatten()[:64],
                       load_file(ck_fp4 / shard_of(ck_fp4, "layers.2.ffn.experts.0.w1.weight"))[
                           "layers.2.ffn.experts.0.w1.weight"].view(torch.uint8).flatten()[:64])


def test_expert_parallel_reads_only_local_experts(ck_fp4: Path, model_fp4: Transformer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    orig = CheckpointReader.read

    def logged(self, name, *a, **k):
        read.append(name)
        return orig(self, name, *a, **k)

    monkeypatch.setattr(CheckpointReader, "read", logged)
    m = load_checkpoint(ck_fp4, OPS, ep_rank=1, ep_size=2, progress=False)
    experts = {expert_index(n) for n in read} - {None}
    assert experts == {2, 3}
    for layer, full in zip(m.layers, model_fp4.layers, strict=True):
        assert layer.ffn.experts.offset == 2 and layer.ffn.experts.w1.weight.shape[0] == 2
        assert torch.equal(layer.ffn.experts.w2.weight, full.ffn.experts.w2.weight[2:4])


def test_tensor_parallel_slices_read_with_get_slice(ck_fp4: Path) -> None:
    assert tp_split_dim("layers.0.attn.wq_b.weight") == 0 and tp_split_dim("layers.0.attn.wq_b.scale") == 0
    assert tp_split_dim("layers.0.attn.wo_b.weight") == 1 and tp_split_dim("head.weight") == 0
    assert tp_split_dim("layers.0.attn.wq_a.weight") is None and tp_split_dim("layers.0.hc_attn_fn") is None
    assert tp_split_dim("layers.0.ffn.experts.3.w1.weight") is None  # experts go by index
    assert tp_slice("layers.0.attn.attn_sink", (4,), 1, 2) == (0, 2, 4)
    with CheckpointReader(ck_fp4) as r:
        r.remap_bytes = 1  # re-open the file after every read: the path that bounds mapped pages on big shards
        for name in ("layers.0.attn.wq_b.weight", "layers.0.attn.wq_b.scale", "layers.0.attn.wo_b.weight",
                     "layers.0.attn.wo_b.scale", "embed.weight", "layers.0.attn.wq_a.weight"):
            full = r.read(name)
            dim = tp_split_dim(name)
            for rank in range(2):
                part = r.read(name, tp_rank=rank, tp_size=2)
                want = full if dim is None else full.chunk(2, dim)[rank]
                assert torch.equal(part.view(torch.uint8), want.contiguous().view(torch.uint8)), (name, rank)
        with pytest.raises(CheckpointError, match="scale blocks"):
            r.read("layers.0.attn.wo_b.weight", tp_rank=0, tp_size=4)  # 64 columns: cuts a 128-block


# -- bad input ---------------------------------------------------------------------------------------------------------
def _drop(name: str):
    def edit(tensors: dict, fname: str) -> None:
        tensors.pop(name, None)
    return edit


def _put(name: str, value: torch.Tensor, only_where: str | None = None):
    def edit(tensors: dict, fname: str) -> None:
        if (only_where is None and name in tensors) or (only_where and only_where in tensors):
            tensors[name] = value
    return edit


BAD = {
    "missing tensor": (_drop("layers.1.attn.wkv.weight"), r"missing tensor.*layers\.1\.attn\.wkv\.weight", None),
    "unexpected tensor": (_put("layers.0.attn.bogus.weight", torch.zeros(4), only_where="layers.0.attn_norm.weight"),
                          r"unexpected tensor 'layers\.0\.attn\.bogus\.weight'", "layers.0.attn_norm.weight"),
    "wrong shape": (_put("layers.2.ffn_norm.weight", torch.ones(255, dtype=torch.bfloat16)),
                    r"'layers\.2\.ffn_norm\.weight' has shape \[255\], expected \[256\]", "layers.2.ffn_norm.weight"),
    "wrong dtype": (_put("layers.0.attn.wq_a.weight", torch.zeros(128, 256, dtype=torch.bfloat16)),
                    r"'layers\.0\.attn\.wq_a\.weight' has dtype BF16, expected F8_E4M3", "layers.0.attn.wq_a.weight"),
    "fp4 scale shape": (_put("layers.1.ffn.experts.2.w3.scale", torch.ones(128, 4).to(torch.float8_e8m0fnu)),
                        r"'layers\.1\.ffn\.experts\.2\.w3\.scale' has shape \[128, 4\], expected \[128, 8\] "
                        r"\(FP4 scales", "layers.1.ffn.experts.2.w3.scale"),
    "bad tid2eid": (_put("layers.0.ffn.gate.tid2eid", torch.full((512, 2), 4, dtype=torch.int32)),
                    r"'layers\.0\.ffn\.gate\.tid2eid': expert ids must be in \[0, 4\)", "layers.0.ffn.gate.tid2eid"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tensors_are_named_with_their_file(case: str, ck_fp4: Path, tmp_path: Path) -> None:
    edit, pattern, owner = BAD[case]
    ck = copy_ck(ck_fp4, tmp_path / "ck")
    rewrite(ck, edit)
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_checkpoint(ck, OPS, progress=False)
    where = shard_of(ck, owner) if owner else ck.name
    assert where in str(err.value)


def test_bad_files_are_named(ck_fp4: Path, tmp_path: Path) -> None:
    shard = shard_of(ck_fp4, "layers.1.attn.wq_b.weight")
    ck = copy_ck(ck_fp4, tmp_path / "missing")
    (ck / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: shard named by {INDEX_FILE} is missing"):
        load_checkpoint(ck, OPS, progress=False)

    ck = copy_ck(ck_fp4, tmp_path / "truncated")
    data = (ck / shard).read_bytes()
    (ck / shard).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard}: not a readable safetensors file.*not fully covered"):
        load_checkpoint(ck, OPS, progress=False)

    ck = copy_ck(ck_fp4, tmp_path / "corrupt")
    (ck / shard).write_bytes(data[:8] + b"\x00garbage" + data[16:])
    with pytest.raises(CheckpointError, match=rf"{shard}: not a readable safetensors file"):
        load_checkpoint(ck, OPS, progress=False)

    ck = copy_ck(ck_fp4, tmp_path / "index")
    index = json.loads((ck / INDEX_FILE).read_text())
    index["weight_map"]["layers.1.attn.wq_b.weight"] = "model-00001-of-00005.safetensors"
    (ck / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.1\.attn\.wq_b\.weight' is listed in"):
        load_checkpoint(ck, OPS, progress=False)


def test_config_that_does_not_match_the_checkpoint(ck_fp4: Path, tmp_path: Path) -> None:
    ck = copy_ck(ck_fp4, tmp_path / "layers")
    cfg = json.loads((ck / "config.json").read_text())
    fewer = dict(cfg, num_hidden_layers=2, compress_ratios=[0, 4, 0])
    (ck / "config.json").write_text(json.dumps(fewer))
    with pytest.raises(CheckpointError, match=r"'layers\.2\.[^']*' is for index 2 of layers.*config\.json declares "
                                              r"n_layers \(num_hidden_layers in config\.json\) = 2"):
        load_checkpoint(ck, OPS, progress=False)
    (ck / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0])))
    with pytest.raises(CheckpointError, match=r"tensors for 3 layers but .*config\.json declares n_layers"):
        load_checkpoint(ck, OPS, progress=False)
    (ck / "config.json").write_text(json.dumps(dict(cfg, vocab_size=640)))
    with pytest.raises(CheckpointError, match=r"'embed\.weight' has shape \[512, 256\], expected \[640, 256\].*"
                                              r"config\.json"):
        load_checkpoint(ck, OPS, progress=False)
    (ck / "config.json").write_text(json.dumps(dict(cfg, n_routed_experts=8)))
    with pytest.raises(CheckpointError, match=r"tensors for 4 routed experts but .*declares n_routed_experts"):
        load_checkpoint(ck, OPS, progress=False)


def test_load_into_model_leaves_nothing_half_loaded(ck_fp4: Path, tmp_path: Path) -> None:
    ck = copy_ck(ck_fp4, tmp_path / "ck")
    last = sorted(ck.glob("model-*.safetensors"))[-1].name
    bad, value = sorted(load_file(ck / last).items())[-1]  # a tensor of the last shard: all before it are valid
    rewrite(ck, _put(bad, torch.zeros(7, dtype=value.dtype)))
    model = Transformer(args_for_quant(small_args(), "fp4"), OPS)
    for p in model.parameters():
        p.data.zero_()
    with pytest.raises(CheckpointError, match=rf"{last}: tensor '{re.escape(bad)}' has shape \[7\]"):
        load_into_model(model, ck, progress=False)
    assert all(not p.any() for p in model.parameters())
