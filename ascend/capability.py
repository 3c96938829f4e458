"""Which fused torch_npu operators each Ascend chip may run, and the documented constraints AscendOps honours.

THE one capability table of the Ascend backend, keyed by the torch_npu release the installed package reports
(`torch_npu.__version__`, e.g. "2.14.0": no suffix). Its ground truth is the release's own schema file,
ascend/schemas/torch_npu-<release>.yaml (generated from the wheel; see scripts/extract_torch_npu_schemas.py):
- where an op's doc names its supported products (支持的型号), `chips` IS that list (a test keeps them equal);
- where the doc names none, `chips` says what we run and `doc` quotes the line the choice rests on;
- `doc` is a verbatim fragment of the op's doc in the schema file (tests check it is really there), `why` the
  English reading. Ops whose doc says nothing about a chip stay enabled there and are listed in UNVERIFIED;
- where the wheel's CODE (meta function, TorchAir converter) gives a chip a form its older docstring omits, the
  code wins (the release's own contract): those chips are `code_chips`, with `code` a verbatim fragment of the
  op's meta function in the schema file (tests check it), and an UNVERIFIED entry saying the form is code-only.
Where a doc forbids what V4 needs, LEGAL_PATHS says which legal path the backend takes instead (shown by
`dsv4 doctor`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .schemas import PINNED_RELEASE, available, documented_products

CHIPS = ("910b", "910c", "950pr", "950dt")
DEFAULT_EMULATED_CHIP = "950dt"
A2A3 = ("910b", "910c")
A5 = ("950pr", "950dt")
SUPPORTED_RELEASES = available()  # torch_npu releases with a generated schema file


@dataclass(frozen=True)
class OpCap:
    chips: tuple[str, ...]
    doc: str  # verbatim fragment of the op's doc in the schema file ("" where the wheel ships no doc)
    why: str
    code_chips: tuple[str, ...] = ()  # chips given the op by the wheel's code, beyond the doc's products
    code: str = ""  # verbatim fragment of the op's meta_source in the schema file that those chips rest on


CAPABILITIES: dict[str, OpCap] = {
    "npu_rms_norm": OpCap(CHIPS, "gamma：Tensor类型，数据类型需要和self保持一致",
                          "no product list in the doc; the doc asks gamma in x's dtype, the meta function checks no "
                          "gamma dtype (y takes x's): bf16/fp16 x with V4's fp32 gamma is run (UNVERIFIED)"),
    "npu_rotary_mul": OpCap(A2A3, "支持Atlas A2训练系列产品，Atlas A3训练系列产品。",
                            "the doc's jit_compile=False section (the only one with interleave mode) names A2/A3"),
    "npu_swiglu": OpCap(("910b",), "Atlas A2 训练系列产品", "supported products: A2 only"),
    "npu_dynamic_quant": OpCap(A2A3, "Atlas A3 训练系列产品", "supported products: A2, A3"),
    "npu_dynamic_mx_quant": OpCap(A5, "Ascend 950PR/Ascend 950DT",
                                  "supported products: 950 (FP8 with scale_alg 1 = V4's ue8m0 round-up scale; FP4 "
                                  "e2m1 with scale_alg 2 and dst_type_max 6 + 2^-21 = V4's FP4 scale for bf16)"),
    # no docstring in the 2.14.0 wheel (schema, meta function, TorchAir converter only); CANN's aclnnAntiMxQuant.md
    # (hicann/ops-nn quant/anti_mx_quant/docs) supports Ascend 950PR/950DT only
    "npu_anti_mx_quant": OpCap(A5, "", "no doc in the wheel; CANN aclnnAntiMxQuant.md: 950PR/950DT only",
                               code_chips=A5, code="y_shape = (*(input_dummy_shape[:-1]), input_dummy_shape[-1] * 2)"),
    # the docstring lists A2/A3 with int8/int4 tables; the same wheel's meta function takes FP8 operands with block
    # scales (group_sizes), and its TorchAir converter lets non-integer x1/x2 through only on A5 (950): "In soc
    # versions prior to A5, x1 and x2 only supports int8 or int32" (ge_converter/custom/quantmatmul.py line 94)
    "npu_quant_matmul": OpCap(A2A3 + A5, "Atlas A3 训练系列产品",
                              "doc products: A2, A3 (int8/int4 tables); 950: the FP8 G-B form of the meta + converter",
                              code_chips=A5, code="is_a8w4_float = x1.dtype == torch.float8_e4m3fn"),
    "npu_lightning_indexer": OpCap(CHIPS, "数据类型支持bfloat16和float16，支持输入shape[B,S1,N1]",
                                   "no product list; weights (shape [B,S1,N1]) bf16/fp16 only"),
    "npu_sparse_flash_attention": OpCap(CHIPS, "sparse_indices（Tensor）：必选参数",
                                        "no product list; `sinks` is in the schema, not in the doc (UNVERIFIED)"),
    "npu_mhc_pre": OpCap(A5, "昇腾950 AI处理器", "supported products: 950"),
    "npu_mhc_sinkhorn": OpCap(A5, "Atlas A5 训练系列产品", "supported products: A5 (950)"),
    "npu_mhc_post": OpCap(A5, "昇腾950 AI处理器", "supported products: 950"),
    "npu_moe_gating_top_k": OpCap(CHIPS, "`1`表示使用Sigmoid函数，`0`表示Softmax函数",
                                  "no product list; softmax/sigmoid scoring only"),
    # 950 (A5) from the wheel's CODE, not the docstrings (A2/A3, A2): npu_moe_init_routing_v2_meta's MXFP8 quant modes
    # emit float8_e8m0fnu scales (an A5-only dtype); npu_grouped_matmul_meta's is_fp8 form with float8_e8m0fnu
    # scale_dtype / per_token_scale_dtype and the TorchAir converter's is_arch35() branches (ge_converter/custom/
    # grouped_matmul.py); npu_moe_finalize_routing's converter picks MoeFinalizeRoutingV2 on arch35 (`not
    # is_arch35()`, custom/npu_moe_finalize_routing.py ~line 75): its meta has no chip-specific form to cite, so the
    # `code` quoted is the dropless shape the backend relies on
    "npu_moe_init_routing_v2": OpCap(A2A3 + A5, "Atlas A3 训练系列产品/Atlas A3 推理系列产品",
                                     "doc products: A2, A3; 950: the meta's MX forms (e8m0 scales) and converter",
                                     code_chips=A5, code="expanded_scale_dtype = torch.float8_e8m0fnu"),
    "npu_grouped_matmul": OpCap(("910b",) + A5, "Atlas A2 训练系列产品/Atlas 800I A2 推理产品",
                                "doc products: A2 (and the 310P inference series); 950: the meta's FP8 form with "
                                "e8m0 scales (MX), the converter's arch35 branches",
                                code_chips=A5, code="per_token_scale_dtype == torch_npu.float8_e8m0fnu"),
    "npu_moe_finalize_routing": OpCap(("910b",) + A5, "Atlas A2 训练系列产品/Atlas 800I A2 推理产品",
                                      "doc products: A2; 950: the TorchAir converter's arch35 branch "
                                      "(MoeFinalizeRoutingV2)",
                                      code_chips=A5,
                                      code="dropLess场景, expanded_permuted_rows shape 为[NUM_ROWS * K, H]"),
    # the 2.14.0 wheel ships no docstring for the MC2 ops (only schema + meta): products and limits come from the
    # op-plugin docs (shared/spec/torch-npu-ops.md section 6), which name A2/A3
    "npu_moe_distribute_dispatch": OpCap(A2A3, "", "no doc in the wheel; op-plugin docs name A2/A3"),
    "npu_moe_distribute_combine": OpCap(A2A3, "", "no doc in the wheel; op-plugin docs name A2/A3"),
}

# per V4 op: where the 2.14.0 docs forbid what V4 needs, the legal path AscendOps takes and the doc line it rests on
LEGAL_PATHS: dict[str, tuple[str, str, str]] = {
    # op: (doc op, doc fragment, what we do)
    "rms_norm": ("npu_rms_norm", "gamma：Tensor类型，数据类型需要和self保持一致",
                 "V4's norm weights are fp32 and x is bf16: the op gets bf16 x with the fp32 gamma (the meta function "
                 "derives y's dtype from x alone and checks no gamma dtype; aclnnRmsNorm's dtype table has BFLOAT16 x "
                 "with FLOAT32 gamma -> BFLOAT16 on 950/A3/A2): fp32 inside, one rounding at the end, the reference "
                 "math"),
    "rope": ("npu_rotary_mul", "input为BSND: 1S1D;",
             "interleave + BSND wants r1/r2 as 1S1D, but V4 has per-row positions [B,S]: x is viewed as one batch of "
             "B*S tokens [1, B*S, H, r] with r1/r2 [1, B*S, 1, r]; 950 (not in the doc's products) runs torch"),
    "indexer_topk": ("npu_lightning_indexer",
                     "数据类型支持bfloat16和float16，支持输入shape[B,S1,N1]",
                     "the indexer's per-head weights are fp32 in V4: cast to bf16 (scores move by ~1e-3 relative)"),
    "moe_gate": ("npu_moe_gating_top_k", "`1`表示使用Sigmoid函数，`0`表示Softmax函数",
                 "V4 scores with sqrt(softplus): torch. For softmax/sigmoid the op gets input_ids and tid2eid both or "
                 "neither (its meta check)"),
    "moe_experts": ("npu_grouped_matmul", "当group_list_type为1时, 数值的总和与x中tensor的第一维相等",
                    "group sizes must sum to x's rows (A2; 950: at most x's rows): routed pairs outside this rank's "
                    "experts go to one spare expert id (init_routing_v2 wants ids below expert_num), sort last and "
                    "are zeroed after the GEMMs (A2: folded into the last group, 950: outside every group), so no "
                    "count is read on the host; W4 experts run the documented weight-only (antiquant) form with bf16 "
                    "activations on 910B, the MX FP8 form on 950 (FP4 weights re-encoded as e4m3 with their own "
                    "per-32 e8m0 scales, exact); 910C loops over experts with the W8A8 GEMM"),
    "moe_finalize": ("npu_moe_finalize_routing", "当scales为None时，则需要指定k",
                     "scales=None (V4 weights before w2), so k is passed"),
    "hc_pre": ("npu_mhc_sinkhorn", "Atlas A5 训练系列产品", "910B/910C: no mHC op: torch"),
    "linear": ("npu_quant_matmul", "Atlas A3 训练系列产品",
               "950's FP8 GEMM is npu_quant_matmul's G-B form (from the wheel's meta + TorchAir converter, not its "
               "docstring): activation FP8 per token per 128 of K by npu_dynamic_mx_quant (scale_alg 1, the ue8m0 "
               "scale as fp32), the checkpoint's FP8 weight as x2 [K, N] with its 128x128 block scale; shapes off "
               "128-multiples or fp32 activations run the same math in torch"),
}

# what the CPU emulation cannot establish: listed here and in the README, each with the doc line (or its absence)
UNVERIFIED: dict[str, str] = {
    "npu_sparse_flash_attention sinks": "`Tensor? sinks=None` is in the 2.14.0 schema, but the doc never mentions "
                                        "it; op-plugin docs: 950 only. Used on 950 only.",
    "npu_sparse_flash_attention attention_mode": "schema default 0; the doc does not describe it; op-plugin docs: 2 "
                                                 "= MLA-absorb (what we pass)",
    "npu_lightning_indexer heads/D": "the 2.14.0 doc states no N1 or D limits; op-plugin docs: D = 128, N1 <= 64 "
                                     "(950: N1 in {8,16,24,32,64}); both honoured",
    "npu_moe_init_routing_v2 row order": "the doc defines shapes, not the order inside an expert's block nor "
                                         "whether expanded_row_idx is token- or slot-major; the emulation sorts "
                                         "stably, token-major (finalize_routing's doc formula reads "
                                         "expandedSrcToDstRow[i + k * num_rows]: the backend transposes)",
    "npu_grouped_matmul weight-only precision": "the doc's formula x * (w + offset) * scale does not say at which "
                                                "precision the dequantised weight is formed; emulated in x's dtype",
    "npu_moe_distribute_dispatch/combine": "no doc in the wheel: schema and meta (output shapes) only; row layout "
                                           "and counts semantics from op-plugin docs",
    "npu_mhc_pre phi layout": "the doc gives shapes [n^2 + 2n, nD], not the row order of pre/post/res",
    "npu_grouped_matmul on 910C": "absent from the products list (A2 only): not used there, although vllm-ascend "
                                   "runs it on A3",
    "npu_grouped_matmul MX on 950": "the 2.14.0 docstring lists A2 only; the form comes from the wheel's code: "
                                    "npu_grouped_matmul_meta accepts float8_e4m3fn x/weight (is_fp8) with "
                                    "scale_dtype / per_token_scale_dtype float8_e8m0fnu, the TorchAir converter has "
                                    "arch35 (950) branches. Shapes (scale [E, N, K/64, 2] for the transposed [E, K, N] "
                                    "view, per_token_scale [M, K/64, 2]), the 'at most M' group-list rule and the rows "
                                    "left undefined past the last group are CANN's aclnnGroupedMatmulV4.md (910_95), "
                                    "not tried on a 950. The wheel's converter also has an MxA8W4 form (e4m3 x, "
                                    "packed FP4 weight, weight_dtype float4_e2m1fn_x2) that would keep the experts in "
                                    "FP4; not used: CANN's 910_95 table has no such row and vllm-ascend feeds it "
                                    "FRACTAL_NZ weights (npu_format_cast 29) whose layout the emulation cannot check",
    "npu_moe_init_routing_v2 on 950": "absent from the docstring's products (A2/A3); the wheel's meta gives it MX "
                                      "quant modes with e8m0 scales (A5 dtypes). The unquantised dropless form used "
                                      "is the A2/A3 one, not tried on a 950",
    "npu_moe_finalize_routing on 950": "absent from the docstring's products (A2); the TorchAir converter maps it to "
                                       "MoeFinalizeRoutingV2 on arch35 (950). Not tried on a 950",
    "npu_rotary_mul on 950": "absent from the doc's products: torch on 950",
    "npu_swiglu on 910C/950": "products list A2 only: torch on 910C/950",
    "npu_quant_matmul FP8 G-B on 950": "the 2.14.0 docstring has no FP8 row and no 950; the form comes from the "
                                       "wheel's code: npu_quant_matmul_meta + quant_matmul_group_sizes_check "
                                       "(op_plugin/meta/_meta_registrations.py) accept float8_e4m3fn x1/x2, fp32 "
                                       "pertoken_scale [M, K/128] and scale [K/128, N/128], group_sizes "
                                       "[1,128,128]; the TorchAir converter maps them to QuantBatchMatmulV4 on A5 "
                                       "only. Exact scale shapes and the half-precision output are the "
                                       "emulation's reading, not tried on a 950",
    "npu_rms_norm bf16 x with fp32 gamma": "the 2.14.0 docstring asks gamma in x's dtype; the wheel's meta "
                                           "function (npu_rms_norm_meta) returns y in x's dtype and checks no gamma "
                                           "dtype, its TorchAir converter passes both to ge.RmsNorm, whose CANN doc "
                                           "(hicann/ops-nn aclnnRmsNorm.md) lists FLOAT16/BFLOAT16 x with FLOAT32 "
                                           "gamma on 950, A3 and A2 (golden: fp32 x * rstd * gamma, one cast); "
                                           "torch_npu's C++ check of the pair is not in the wheel, not tried on a "
                                           "device",
    "npu_anti_mx_quant": "no docstring in the 2.14.0 wheel: its schema, meta function (y of x's shape, the last dim "
                         "doubled for packed FP4 uint8) and TorchAir converter (uint8 x bitcast to FLOAT4 with the "
                         "last dim doubled; dst_type as torch dtype codes) are the contract, with CANN's "
                         "aclnnAntiMxQuant.md (y = x * 2^(sf - 127) per 32-block, 950PR/950DT). The nibble order of "
                         "packed FP4 (element 2i low) is torch's float4_e2m1fn_x2 convention; not tried on a 950",
    "npu_dynamic_mx_quant FP4 scale_alg 2": "the second case of aclnnDynamicMxQuantV3.md's scenario 3 (dst_type_max "
                                            "not 0/6/7): S = amax * fp32(1 / dst_type_max) (the kernel multiplies by "
                                            "the reciprocal, the doc divides: equal for bf16/fp16 amax, a test), "
                                            "exponent rounded up when S is normal with a mantissa. V4's FP4 "
                                            "simulation rides it with dst_type_max 6 + 2^-21 for bf16; blocks whose "
                                            "amax < 6 * 2^-126 get scale 2^-127 (V4: 2^-126) and differ unless "
                                            "zero; not tried on a 950",
    "npu_dynamic_mx_quant scale_alg 1": "the wheel's doc names scale_alg 1 (CuBALS Scale算法) without a formula; the "
                                        "emulated one (S = max(amax, max_low_bound) / 448, exponent rounded up) is "
                                        "hicann/ops-nn aclnnDynamicMxQuantV3.md's; its uint8 scale bytes are read "
                                        "through a torch.float8_e8m0fnu view, not tried on torch_npu",
}


def normalise_chip(chip: str) -> str:
    c = chip.lower().replace("ascend", "").replace("_", "").replace("-", "").strip()
    if c in CHIPS:
        return c
    raise ValueError(f"unknown Ascend chip {chip!r}; choose one of {', '.join(CHIPS)}")


def chip_from_device_name(name: str) -> str:
    """torch.npu.get_device_name() -> our chip key. Names seen: 'Ascend910B1'..'Ascend910B4' (A2),
    'Ascend910_9391'.. (A3 = 910C; the '93' series), 'Ascend950PR' / 'Ascend950DT'. Unknown names map to 910b,
    the most restrictive table row, so an unknown chip never picks an op it may lack."""
    n = name.upper().replace(" ", "")
    if "950" in n:
        return "950dt" if "DT" in n else "950pr"
    if "910_93" in n or "910C" in n or "91093" in n:
        return "910c"
    return "910b"


def detect_chip(chip: str | None = None, emulate: bool = False) -> str:
    """Explicit option > DSV4_ASCEND_CHIP env var > the hardware name (real NPU) > 950dt (emulation default)."""
    if chip:
        return normalise_chip(chip)
    env = os.environ.get("DSV4_ASCEND_CHIP")
    if env:
        return normalise_chip(env)
    if emulate:
        return DEFAULT_EMULATED_CHIP
    import torch  # torch.npu exists only once torch_npu has been imported by probe()/create_ops()

    return chip_from_device_name(torch.npu.get_device_name(0))


def release_of(module: object) -> str:
    """The torch_npu release as the module reports it: its __version__ up to a local '+...' tag ('2.14.0',
    '2.7.1.post2'). No suffix is assumed: the table is only as good as the release's schema file."""
    return str(getattr(module, "__version__", "") or "unknown").split("+", 1)[0]


def release_supported(release: str) -> bool:
    return release in SUPPORTED_RELEASES


def table_release(release: str) -> str:
    """The schema file a release is judged by: its own when generated, else the pinned one (doctor warns)."""
    return release if release_supported(release) else PINNED_RELEASE


def op_in_table(op: str, chip: str) -> bool:
    cap = CAPABILITIES.get(op)
    return cap is not None and chip in cap.chips


def op_available(npu: object, op: str, chip: str) -> bool:
    """The table gives the chip the op AND the module really exposes it (a trimmed build may not)."""
    return op_in_table(op, chip) and hasattr(npu, op)


def products_match_docs(release: str = PINNED_RELEASE) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Ops whose table chips (less those the wheel's code adds, `code_chips`) differ from the products their doc
    lists: {op: (table, doc)} (empty = consistent)."""
    out = {}
    for op, cap in CAPABILITIES.items():
        documented = documented_products(op, release)
        if documented is not None and set(documented) != set(cap.chips) - set(cap.code_chips):
            out[op] = (cap.chips, documented)
    return out


def custom_op(namespace: str, name: str):
    """torch.ops.<namespace>.<name> (vllm-ascend's _C_ascend, cann-recipes' custom) if registered, else None."""
    import torch

    try:
        ns = getattr(torch.ops, namespace)
        return getattr(ns, name)
    except (AttributeError, RuntimeError):
        return None
