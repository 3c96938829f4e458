"""The emulated torch_npu operators against small hand-computed cases: layouts, index formats, documented
constraints (the torch_npu 2.14.0 docs in ascend/schemas/torch_npu-2.14.0.yaml). These pin the op contracts the
Ascend backend relies on."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.ascend.emulation import NpuOpError, make_torch_npu
from dsv4.ascend.formats import pack_int4, round_e4m3, unpack_int4

A5 = make_torch_npu("950dt")
A2 = make_torch_npu("910b")


def test_chip_namespaces_hide_ops_the_chip_lacks():
    assert hasattr(A5, "npu_mhc_pre") and not hasattr(A2, "npu_mhc_pre")
    # finalize_routing / the grouped GEMM: A2 by the docstrings, 950 by the wheel's code (capability.code_chips)
    assert hasattr(A2, "npu_moe_finalize_routing") and hasattr(A5, "npu_moe_finalize_routing")
    assert hasattr(A5, "npu_grouped_matmul") and hasattr(A5, "npu_moe_init_routing_v2")
    a3 = make_torch_npu("910c")  # 2.14.0 products: grouped GEMM and swiglu A2 only, rotary interleave A2/A3
    assert hasattr(a3, "npu_moe_init_routing_v2") and not hasattr(a3, "npu_grouped_matmul")
    assert not hasattr(a3, "npu_swiglu") and hasattr(a3, "npu_rotary_mul") and not hasattr(A5, "npu_rotary_mul")


def test_rms_norm_returns_y_and_fp32_rstd():
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]], dtype=torch.bfloat16)
    y, rstd = A2.npu_rms_norm(x, torch.tensor([1.0, 2.0], dtype=torch.bfloat16), epsilon=0.0)
    with pytest.raises(NpuOpError, match="gamma dtype"):  # doc: gamma has self's dtype (or fp32: the mixed form)
        A2.npu_rms_norm(x, torch.tensor([1.0, 2.0], dtype=torch.float16), epsilon=0.0)
    with pytest.raises(NpuOpError, match="gamma dtype"):  # an fp32 x takes no half gamma
        A2.npu_rms_norm(x.float(), torch.tensor([1.0, 2.0], dtype=torch.bfloat16), epsilon=0.0)
    assert rstd.dtype == torch.float32 and rstd.shape == (2, 1)
    assert torch.allclose(rstd[:, 0], torch.tensor([1 / math.sqrt(12.5), 1.0]))
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), torch.tensor([[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)], [1.0, 2.0]]),
                          atol=1e-2)
    # mixed form (bf16 x, fp32 gamma, as V4's norms): fp32 inside, ONE rounding to bf16 at the end, so it equals the
    # fp32 op's result rounded once; a gamma rounded to bf16 first would not (random fp32 gammas are no bf16 values)
    xm = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    g = torch.randn(64, generator=torch.Generator().manual_seed(1))
    ym, rstd_m = A2.npu_rms_norm(xm, g, epsilon=1e-6)
    y32, rstd32 = A2.npu_rms_norm(xm.float(), g, epsilon=1e-6)
    assert ym.dtype == torch.bfloat16 and torch.equal(ym, y32.bfloat16()) and torch.equal(rstd_m, rstd32)
    assert not torch.equal(ym, A2.npu_rms_norm(xm, g.bfloat16(), epsilon=1e-6)[0])


def test_rotary_mul_interleave_and_half_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    c0, s0, c1, s1 = 0.6, 0.8, 0.0, 1.0
    r1 = torch.tensor([c0, c0, c1, c1]).view(1, 1, 1, 4)  # interleave: full width, repeat-interleaved
    r2 = torch.tensor([s0, s0, s1, s1]).view(1, 1, 1, 4)
    y = A2.npu_rotary_mul(x, r1, r2, rotary_mode="interleave").flatten()
    # pair (1,2) rotated by (0.6, 0.8): (1*.6 - 2*.8, 1*.8 + 2*.6); pair (3,4) by 90 degrees: (-4, 3)
    assert torch.allclose(y, torch.tensor([0.6 - 1.6, 0.8 + 1.2, -4.0, 3.0]))
    y = A2.npu_rotary_mul(x, torch.zeros(1, 1, 1, 4), torch.ones(1, 1, 1, 4), rotary_mode="half").flatten()
    assert torch.equal(y, torch.tensor([-3.0, -4.0, 1.0, 2.0]))  # rotate_half
    with pytest.raises(NpuOpError):
        A2.npu_rotary_mul(x, r1.view(1, 1, 4), r2, rotary_mode="interleave")  # rank mismatch
    # doc, interleave + BSND: r1/r2 are 1S1D; per-row positions (B,S,1,D) are not accepted
    xb = torch.randn(2, 3, 2, 4)
    per_row = torch.rand(2, 3, 1, 4)
    with pytest.raises(NpuOpError, match="1S1D"):
        A2.npu_rotary_mul(xb, per_row, per_row, rotary_mode="interleave")
    assert A2.npu_rotary_mul(xb, per_row[:1], per_row[:1], rotary_mode="interleave").shape == xb.shape


def test_dynamic_quant_and_quant_matmul_hand():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    q, s = A2.npu_dynamic_quant(x)
    assert torch.allclose(s, torch.tensor([2 / 127, 0.0]))
    assert q.tolist() == [[64, -127, 32], [0, 0, 0]]  # 63.5 -> 64 and 31.75 -> 32
    with pytest.raises(NpuOpError):
        A2.npu_dynamic_quant(x.float())  # fp16/bf16 only
    w = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int8)  # [k=3, n=2]
    y = A2.npu_quant_matmul(q, w, torch.tensor([0.5, 2.0]), pertoken_scale=s, output_dtype=torch.bfloat16)
    want = torch.tensor([[64 - 381 + 160, 128 - 508 + 192], [0, 0]]) * torch.tensor([0.5, 2.0]) * s[:, None]
    assert torch.allclose(y.float(), want, rtol=8e-3)
    # A2/A3: FP8 operands are refused (the TorchAir converter: "In soc versions prior to A5, x1 and x2 only
    # supports int8 or int32"), and the doc's int8 table has no group_sizes
    f8 = torch.ones(2, 128).to(torch.float8_e4m3fn)
    for chip in ("910b", "910c"):
        with pytest.raises(NpuOpError, match="prior to A5"):
            make_torch_npu(chip).npu_quant_matmul(f8, f8.t(), torch.ones(1, 1), pertoken_scale=torch.ones(2, 1),
                                                  output_dtype=torch.bfloat16, group_sizes=[1, 128, 128])
    with pytest.raises(NpuOpError, match="group_sizes"):
        A2.npu_quant_matmul(q, w, torch.ones(2), pertoken_scale=s, output_dtype=torch.bfloat16, group_sizes=[1, 1, 1])


def gb_operands(M=3, K=256, N=384, seed=0):
    """FP8 G-B operands: x1 [M, K] e4m3, x2 = the transposed view of an [N, K] weight, pertoken_scale [M, K/128],
    scale [K/128, N/128], every scale a different power of two so a block mixed up shows."""
    g = torch.Generator().manual_seed(seed)
    x1 = (torch.randn(M, K, generator=g) * 4).to(torch.float8_e4m3fn)
    wt = (torch.randn(N, K, generator=g) * 4).to(torch.float8_e4m3fn)
    kb, nb = K // 128, N // 128
    ps = torch.exp2(torch.randint(-4, 4, (M, kb), generator=g).float())
    sc = torch.exp2(torch.randint(-4, 4, (kb, nb), generator=g).float())
    return x1, wt.t(), ps, sc


def test_quant_matmul_fp8_gb_on_950_by_hand():
    """y[m, n] = sum_kb (x1[m, kb-block] . x2[kb-block, n]) * pertoken_scale[m, kb] * scale[kb, n // 128]: checked
    against both operands dequantised element by element in fp64, to the bf16 output rounding (the NPU sums in
    another order: fp32 noise, far below half a bf16 ulp)."""
    x1, x2, ps, sc = gb_operands()
    for chip in ("950dt", "950pr"):
        y = make_torch_npu(chip).npu_quant_matmul(x1, x2, sc, pertoken_scale=ps, output_dtype=torch.bfloat16,
                                                  group_sizes=[1, 128, 128])
        assert y.dtype == torch.bfloat16 and y.shape == (3, 384)
        a = x1.double() * ps.double().repeat_interleave(128, 1)  # [M, K]
        b = x2.double() * sc.double().repeat_interleave(128, 0).repeat_interleave(128, 1)  # [K, N]
        want = (a @ b).float()
        torch.testing.assert_close(y.float(), want, rtol=2.0 ** -8, atol=0)  # within half a bf16 ulp, relative
    # fp16 output too; x2 given as a contiguous [K, N] tensor is the same call (the meta reads x2 by shape)
    y16 = A5.npu_quant_matmul(x1, x2.contiguous(), sc, pertoken_scale=ps, output_dtype=torch.float16,
                              group_sizes=[1, 128, 128])
    assert y16.dtype == torch.float16


def test_quant_matmul_fp8_gb_rejects_what_the_meta_rejects():
    x1, x2, ps, sc = gb_operands()
    kw = dict(pertoken_scale=ps, output_dtype=torch.bfloat16, group_sizes=[1, 128, 128])
    cases = [  # (call arguments, a fragment of the wheel's meta message)
        ((x1[:, :128], x2, sc), kw, "k dim of x1 and x2 need be same"),
        ((x1, x2, sc), {**kw, "group_sizes": [1, 128]}, "group_sizes's length must be 3"),
        ((x1, x2, sc), {**kw, "pertoken_scale": None}, "pertoken_scale is None"),
        ((x1, x2, sc), {**kw, "group_sizes": [1, 128, 64]}, "must be equal to 32 or 128"),
        ((x1, x2, sc.t().contiguous()), kw, "scale's size\\(-1\\)"),  # the [N/128, K/128] checkpoint orientation
        ((x1, x2, sc[:1]), kw, "k dimension of scale and pertoken_scale must be equal"),
        ((x1, x2, sc[:, :2]), {**kw, "group_sizes": [1, 256, 128]}, "must be equal to 128"),  # N blocks fit
    ]
    for args, kwargs, msg in cases:
        with pytest.raises(NpuOpError, match=msg):
            A5.npu_quant_matmul(*args, **kwargs)
    # forms the meta accepts but the emulation does not implement say so (never a silent wrong answer)
    with pytest.raises(NpuOpError, match="only FP8"):
        A5.npu_quant_matmul(torch.ones(2, 128, dtype=torch.int8), torch.ones(128, 128, dtype=torch.int8),
                            torch.ones(128), pertoken_scale=torch.ones(2), output_dtype=torch.bfloat16)
    with pytest.raises(NpuOpError, match="G-B form"):  # B-B
        A5.npu_quant_matmul(x1, x2, sc, pertoken_scale=ps, output_dtype=torch.bfloat16, group_sizes=[128, 128, 128])
    with pytest.raises(NpuOpError, match="without group_sizes"):
        A5.npu_quant_matmul(x1, x2, torch.ones(384), pertoken_scale=torch.ones(3), output_dtype=torch.bfloat16)


def test_init_routing_v2_three_tokens():
    x = torch.tensor([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])
    ids = torch.tensor([[1, 0], [2, 1], [0, 2]], dtype=torch.int32)
    # flattened src = t*k + j: experts [1,0,2,1,0,2]; stable sort -> src order [1,4,0,3,2,5]
    ex, row, cnt, _ = A2.npu_moe_init_routing_v2(x, ids, active_num=6, expert_num=4, expert_tokens_num_type=1,
                                                 expert_tokens_num_flag=True)
    assert ex[:, 0].tolist() == [10.0, 30.0, 10.0, 20.0, 20.0, 30.0]
    assert row.tolist() == [2, 0, 4, 3, 1, 5]  # scatter index: output row of each src
    assert cnt.tolist() == [2, 2, 2, 0]  # expert 3 gets no token
    _, gather, _, _ = A2.npu_moe_init_routing_v2(x, ids, active_num=6, expert_num=4, expert_tokens_num_type=1,
                                                 expert_tokens_num_flag=True, row_idx_type=1)
    assert gather.tolist() == [1, 4, 0, 3, 2, 5]
    with pytest.raises(NpuOpError, match="expert_tokens_num_type"):  # doc: "当前仅支持1和2"
        A2.npu_moe_init_routing_v2(x, ids, expert_num=4, expert_tokens_num_type=0, expert_tokens_num_flag=True)
    with pytest.raises(NpuOpError, match="expert_num"):  # doc: ids below expert_num
        A2.npu_moe_init_routing_v2(x, ids, expert_num=2, expert_tokens_num_type=1, expert_tokens_num_flag=True,
                                   active_expert_range=[0, 2])
    ex, row, cnt, _ = A2.npu_moe_init_routing_v2(x, ids, active_num=6, expert_num=4, expert_tokens_num_type=1,
                                                 expert_tokens_num_flag=True, active_expert_range=[1, 3])
    assert ex[:4, 0].tolist() == [10.0, 20.0, 20.0, 30.0] and ex[4:].abs().sum() == 0
    assert row.tolist() == [0, -1, 2, 1, -1, 3] and cnt.tolist() == [2, 2]
    with pytest.raises(NpuOpError):
        A2.npu_moe_init_routing_v2(x, ids.long(), expert_num=4)  # ids must be int32


def test_grouped_matmul_group_list_forms_and_empty_group():
    x = torch.arange(12.0).view(4, 3)
    w = torch.stack([torch.eye(3), 2 * torch.eye(3), 3 * torch.eye(3)])  # [E=3, K, N]
    kw = dict(split_item=3, group_type=0)
    y_cnt = A2.npu_grouped_matmul([x], [w], group_list=torch.tensor([1, 0, 3]), group_list_type=1, **kw)[0]
    y_cum = A2.npu_grouped_matmul([x], [w], group_list=torch.tensor([1, 1, 4]), group_list_type=0, **kw)[0]
    assert torch.equal(y_cnt, y_cum)
    assert torch.equal(y_cnt, torch.cat([x[:1], 3 * x[1:]]))
    with pytest.raises(NpuOpError):
        A2.npu_grouped_matmul([x], [w], group_list=torch.tensor([1, 0, 5]), group_list_type=1, **kw)
    # W8A8: int8 rows, per-expert per-channel scale, per-token scale
    xq = torch.tensor([[1, 2], [3, 4]], dtype=torch.int8)
    wq = torch.tensor([[[1, 0], [0, 1]], [[2, 0], [0, 2]]], dtype=torch.int8)
    y = A2.npu_grouped_matmul([xq], [wq], scale=[torch.tensor([[1.0, 1.0], [0.5, 0.25]])],
                              per_token_scale=[torch.tensor([1.0, 2.0])], group_list=torch.tensor([1, 1]),
                              group_list_type=1, output_dtype=torch.bfloat16, **kw)[0]
    assert y.float().tolist() == [[1.0, 2.0], [6.0, 4.0]]


E8M0 = 293  # torch_npu.float8_e8m0fnu's code (the wheel's TORCH_NPU_DTYPE_TO_STRING_MAP)


def mx_operands(M=5, K=192, N=48, E=3, seed=0):
    """MX operands: x [M, K] e4m3 with e8m0 bytes [M, K/64, 2], weight = the transposed view [E, K, N] of e4m3
    codes [E, N, K] with bytes [E, N, K/64, 2]; every 32-block's scale a different power of two, so a scale read
    for the wrong block, row or expert shows. K = 192: three scale pairs."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 4).to(torch.float8_e4m3fn)
    w = (torch.randn(E, N, K, generator=g) * 4).to(torch.float8_e4m3fn)
    xs = torch.randint(120, 134, (M, K // 64, 2), generator=g, dtype=torch.uint8)
    ws = torch.randint(120, 134, (E, N, K // 64, 2), generator=g, dtype=torch.uint8)
    return x, xs, w, ws


def test_grouped_matmul_mx_fp8_on_950_by_hand():
    """y[m] = (x[m] * xscale per 32 of K) @ (W_e * wscale per 32 of K) for the rows m of group e, against both
    operands dequantised element by element in fp64, to the bf16 output rounding; rows past the last group (950
    allows group sizes adding up to fewer than M) come back NaN: undefined on the device."""
    x, xs, w, ws = mx_operands()
    M, K = x.shape
    ends = torch.tensor([2, 2, 4])  # expert 1 empty, row 4 outside every group
    y = A5.npu_grouped_matmul([x], [w.transpose(1, 2)], scale=[ws], per_token_scale=[xs], group_list=ends,
                              group_list_type=0, split_item=3, group_type=0, output_dtype=torch.bfloat16,
                              scale_dtype=E8M0, per_token_scale_dtype=E8M0)[0]
    assert y.dtype == torch.bfloat16 and y.shape == (5, 48)
    xd = x.double() * torch.exp2(xs.double() - 127).flatten(1).repeat_interleave(32, 1)  # [M, K]
    wd = w.double() * torch.exp2(ws.double() - 127).flatten(2).repeat_interleave(32, 2)  # [E, N, K]
    expert = [0, 0, 2, 2]
    want = torch.stack([xd[m] @ wd[expert[m]].t() for m in range(4)]).float()
    torch.testing.assert_close(y[:4].float(), want, rtol=2.0 ** -8, atol=0)  # within half a bf16 ulp
    assert y[4].isnan().all()
    # an untransposed [E, K, N] weight takes its scale as [E, K/64, N, 2] (aclnnGroupedMatmulV4, 910_95 mx table)
    y2 = A5.npu_grouped_matmul([x], [w.transpose(1, 2).contiguous()], scale=[ws.permute(0, 2, 1, 3).contiguous()],
                               per_token_scale=[xs], group_list=ends, group_list_type=0, split_item=3, group_type=0,
                               output_dtype=torch.bfloat16, scale_dtype=E8M0, per_token_scale_dtype=E8M0)[0]
    assert torch.equal(y2[:4], y[:4])


def test_grouped_matmul_mx_rejects_what_the_meta_and_cann_reject():
    x, xs, w, ws = mx_operands()
    wt = w.transpose(1, 2)
    kw = dict(group_list=torch.tensor([2, 2, 5]), group_list_type=0, split_item=3, group_type=0,
              output_dtype=torch.bfloat16)
    mx = dict(scale=[ws], per_token_scale=[xs], scale_dtype=E8M0, per_token_scale_dtype=E8M0)
    cases = [  # (arguments, a fragment of the message)
        ({**mx, "scale_dtype": 23}, "scale_dtype only supports float8_e8m0fnu"),  # the meta's check
        ({**mx, "per_token_scale_dtype": 6}, "per_token_scale_dtype only supports float8_e8m0fnu"),
        ({**mx, "x_dtype": 292}, "x_dtype supports hifloat8, mxfp4"),  # e4m3 x is told by its tensor dtype
        ({**mx, "scale_dtype": None}, "emulated as MX only"),  # a G-B / per-channel FP8 call
        ({**mx, "scale": [ws.permute(0, 2, 1, 3).contiguous()]}, "transposed weight"),  # the other layout
        ({**mx, "per_token_scale": [xs[:, :2]]}, "per_token_scale must be e8m0 bytes"),
        ({**mx, "per_token_scale": [xs.float()]}, "per_token_scale must be e8m0 bytes"),
        ({**mx, "group_list": torch.tensor([2, 2, 6])}, "at most x's 5 rows"),  # 950: "不大于", not more
        ({**mx, "output_dtype": None}, "output_dtype must be bf16/fp16/fp32"),
    ]
    for extra, msg in cases:
        with pytest.raises(NpuOpError, match=msg):
            A5.npu_grouped_matmul([x], [wt], **{**kw, **extra})
    # A2: FP8 operands are A5 forms, and the group sizes must cover every row (doc)
    with pytest.raises(NpuOpError, match="\\*_dtype are not in the 2.14.0 doc"):
        A2.npu_grouped_matmul([x], [wt], **kw, **mx)
    with pytest.raises(NpuOpError, match="A5"):
        A2.npu_grouped_matmul([x], [wt], scale=[ws], per_token_scale=[xs], **kw)
    xb = torch.randn(5, 8)
    with pytest.raises(NpuOpError, match="add up to x's 5 rows"):
        A2.npu_grouped_matmul([xb], [torch.randn(3, 8, 4)], group_list=torch.tensor([2, 2, 4]), group_list_type=0,
                              split_item=3, group_type=0)
    yb = A5.npu_grouped_matmul([xb.bfloat16()], [torch.randn(3, 8, 4).bfloat16()],
                               group_list=torch.tensor([2, 2, 4]), group_list_type=0, split_item=3, group_type=0)[0]
    assert yb[:4].isfinite().all() and yb[4].isnan().all()  # the float form on 950: row 4 in no group
    with pytest.raises(NpuOpError, match="bf16/fp16"):  # 950's float form: bf16/fp16 only (A2's doc allows fp32)
        A5.npu_grouped_matmul([xb], [torch.randn(3, 8, 4)], group_list=torch.tensor([2, 2, 5]), group_list_type=0,
                              split_item=3, group_type=0)


def test_grouped_matmul_int4_weight_only_per_group():
    # doc table "伪量化": bf16 x, int4 weight (8 per int32), per-group antiquant_scale in x's dtype
    q = torch.randint(-7, 8, (1, 64, 8))
    s = (torch.rand(1, 2, 8) + 0.5).bfloat16()  # two groups of 32 along K
    x = torch.randn(3, 64).bfloat16()
    kw = dict(split_item=3, group_type=0)
    y = A2.npu_grouped_matmul([x], [pack_int4(q)], antiquant_scale=[s], group_list=torch.tensor([3]),
                              group_list_type=0, **kw)[0]
    wd = (q.float() * s.float().repeat_interleave(32, dim=1))[0].bfloat16().float()
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x.float() @ wd, rtol=8e-3, atol=1e-2)
    with pytest.raises(NpuOpError, match="length 1"):  # doc: a counts list cannot have length 1
        A2.npu_grouped_matmul([x], [pack_int4(q)], antiquant_scale=[s], group_list=torch.tensor([3]),
                              group_list_type=1, **kw)
    with pytest.raises(NpuOpError, match="int8 weights"):  # the doc has no int8-x / int4-weight row
        A2.npu_grouped_matmul([x.to(torch.int8)], [pack_int4(q)], scale=[s.float()[:, 0]],
                              per_token_scale=[torch.ones(3)], group_list=torch.tensor([3]), group_list_type=0,
                              output_dtype=torch.bfloat16, **kw)


def test_int4_pack_roundtrip_and_nibble_order():
    q = torch.tensor([[1, -1, 2, -8, 7, 0, 3, -2]])
    p = pack_int4(q)
    assert p.dtype == torch.int32 and p.shape == (1, 1)
    assert int(p) & 0xF == 1 and (int(p) >> 4) & 0xF == 0xF  # element 0 in the lowest nibble
    assert torch.equal(unpack_int4(p).long(), q)


def test_round_e4m3_matches_the_dtype_cast():
    all_vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = all_vals[torch.isfinite(all_vals)].unique().sort().values
    mids = (vals[1:] + vals[:-1]) / 2  # exact ties: round-half-even must agree
    probe = torch.cat([vals, mids, mids + 1e-7, mids - 1e-7, torch.randn(4000) * 50]).clamp(-448, 448)
    assert torch.equal(round_e4m3(probe), probe.to(torch.float8_e4m3fn).float())


def test_finalize_routing_hand():
    # doc formula: rows[dst[i + k * NUM_ROWS]], slot-major. NUM_ROWS = 2, K = 2: (t0,j0)->3, (t1,j0)->2,
    # (t0,j1)->0, (t1,j1)->1
    rows = torch.tensor([[1.0], [2.0], [4.0], [8.0]])
    dst = torch.tensor([3, 2, 0, 1], dtype=torch.int32)
    experts = torch.tensor([[1, 0], [5, 0]], dtype=torch.int32)
    skip = torch.ones(2, 1)
    out = A2.npu_moe_finalize_routing(rows, skip, skip, None, torch.tensor([[0.5, 2.0], [3.0, 1.0]]), dst, experts)
    assert out.flatten().tolist() == [2 + 0.5 * 8 + 2 * 1, 2 + 3 * 4 + 1 * 2]
    # scales None: doc "当scales为None时，则需要指定k"; NUM_ROWS = len(dst) / k
    out = A2.npu_moe_finalize_routing(rows, None, None, None, None, dst, experts, k=2)
    assert out.flatten().tolist() == [8 + 1, 4 + 2]
    assert A2.npu_moe_finalize_routing(rows, None, None, None, None, dst, experts).shape == (4, 1)  # k=1 default
    with pytest.raises(NpuOpError, match="NUM_ROWS"):  # no -1 (dropped) entries in drop_pad_mode 0
        A2.npu_moe_finalize_routing(rows, None, None, None, None, dst.clone().fill_(-1), experts, k=2)
    with pytest.raises(NpuOpError, match="skip2 None"):
        A2.npu_moe_finalize_routing(rows, skip, None, None, None, dst, experts, k=2)


def test_gating_top_k_softmax_sigmoid_hash():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    y, ids, s = A2.npu_moe_gating_top_k(x, 2, norm_type=0, out_flag=True, routed_scaling_factor=2.0)
    p = x.softmax(-1)
    assert ids.dtype == torch.int32 and ids.tolist() == [[3, 2]]
    assert torch.allclose(y, 2 * p[:, [3, 2]]) and torch.allclose(s, p)
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])
    y, ids, _ = A2.npu_moe_gating_top_k(x, 2, bias=bias, norm_type=1)
    sg = x.sigmoid()[0]
    assert ids.tolist() == [[0, 3]]  # the bias picks expert 0; weights still come from the unbiased scores
    assert torch.allclose(y, torch.stack([sg[0], sg[3]]).view(1, 2) / (sg[0] + sg[3]))
    tid2eid = torch.tensor([[1, 2], [0, 3]], dtype=torch.int32)
    _, ids, _ = A2.npu_moe_gating_top_k(x, 2, input_ids=torch.tensor([1]), tid2eid=tid2eid, norm_type=1)
    assert ids.tolist() == [[0, 3]]
    with pytest.raises(NpuOpError, match="both"):  # meta check: input_ids and tid2eid both or neither
        A2.npu_moe_gating_top_k(x, 2, input_ids=torch.tensor([1]), norm_type=1)
    with pytest.raises(NpuOpError, match="bias"):  # doc: bias has x's dtype
        A2.npu_moe_gating_top_k(x, 2, bias=bias.double(), norm_type=1)


def test_lightning_indexer_bsnd_causal_and_constraints():
    # 1 batch, 3 queries, 1 head, 4 keys; k_j = e_j scaled so score = w * relu(q_j) is easy to read
    q = torch.zeros(1, 3, 1, 128)
    q[0, :, 0, :4] = torch.tensor([[1.0, 4.0, 2.0, 3.0]] * 3)
    k = torch.zeros(1, 4, 1, 128)
    k[0, :, 0, :4] = torch.eye(4)
    w = torch.ones(1, 3, 1, dtype=torch.bfloat16)
    idx, _ = A2.npu_lightning_indexer(q.bfloat16(), k.bfloat16(), w, sparse_count=3, sparse_mode=3)
    assert idx.dtype == torch.int32 and idx.shape == (1, 3, 1, 3)
    # right-down causal with S1=3, S2=4: query i sees keys j <= i + 1
    assert idx[0, :, 0].tolist() == [[1, 0, -1], [1, 2, 0], [1, 3, 2]]
    bad = dict(sparse_count=3, sparse_mode=0)
    with pytest.raises(NpuOpError, match="D must be 128"):
        A2.npu_lightning_indexer(q[..., :64].bfloat16(), k[..., :64].bfloat16(), w, **bad)
    with pytest.raises(NpuOpError, match="sparse_count"):
        A2.npu_lightning_indexer(q.bfloat16(), k.bfloat16(), w, sparse_count=2500)
    with pytest.raises(NpuOpError, match="heads"):
        A5.npu_lightning_indexer(q.bfloat16(), k.bfloat16(), w, **bad)  # N1=1 not in {8,...,64} on 950
    with pytest.raises(NpuOpError, match="weights must be bf16/fp16"):  # doc, every chip
        A2.npu_lightning_indexer(q.bfloat16(), k.bfloat16(), w.float(), **bad)
    with pytest.raises(NpuOpError, match="bf16 or fp16"):
        A2.npu_lightning_indexer(q, k, w, **bad)
    with pytest.raises(NpuOpError, match="contiguous"):  # doc: "不支持非连续"
        A2.npu_lightning_indexer(torch.cat([q, q], -1).bfloat16()[..., :128], k.bfloat16(), w, **bad)


def test_sparse_flash_attention_one_query_and_constraints():
    torch.manual_seed(0)
    q, qr = torch.randn(1, 1, 2, 512).bfloat16(), torch.randn(1, 1, 2, 64).bfloat16()
    kv, kr = torch.randn(1, 6, 1, 512).bfloat16(), torch.randn(1, 6, 1, 64).bfloat16()
    idx = torch.tensor([4, 1, -1, -1], dtype=torch.int32).view(1, 1, 1, 4)
    sinks = torch.tensor([0.5, -1.0])
    out = A5.npu_sparse_flash_attention(q, kv, kv, idx, 0.05, query_rope=qr, key_rope=kr, sparse_mode=0,
                                        attention_mode=2, sinks=sinks)[0]
    keys = torch.cat([kv, kr], -1)[0, [4, 1], 0].float()
    for h in range(2):
        lg = torch.cat([torch.cat([q, qr], -1)[0, 0, h].float() @ keys.t() * 0.05, sinks[h:h + 1]])
        p = lg.softmax(0)[:2].bfloat16().float()
        assert torch.allclose(out[0, 0, h].float(), p @ keys[:, :512], atol=2e-2)
    kw = dict(query_rope=qr, key_rope=kr, sparse_mode=0, attention_mode=2)
    with pytest.raises(NpuOpError, match="950"):
        A2.npu_sparse_flash_attention(q, kv, kv, idx, 0.05, sinks=sinks, **kw)
    with pytest.raises(NpuOpError, match="packed"):
        A5.npu_sparse_flash_attention(q, kv, kv, idx.flip(-1), 0.05, **kw)
    with pytest.raises(NpuOpError, match="512"):
        A5.npu_sparse_flash_attention(q[..., :128], kv[..., :128], kv[..., :128], idx, 0.05, **kw)
    none = torch.full((1, 1, 1, 4), -1, dtype=torch.int32)
    assert A5.npu_sparse_flash_attention(q, kv, kv, none, 0.05, sinks=sinks, **kw)[0].abs().sum() == 0


def test_mhc_ops_hand():
    c, aux1, aux2 = A5.npu_mhc_sinkhorn(torch.randn(3, 4, 4), num_iters=20)  # schema: three outputs
    assert aux1 is None and aux2 is None  # out_flag 0: the meta function's undefined intermediates
    assert torch.allclose(c.sum(-2), torch.ones(3, 4), atol=1e-5)  # columns exactly normalised last
    assert torch.allclose(c.sum(-1), torch.ones(3, 4), atol=1e-3)
    x = torch.arange(8.0).view(1, 1, 4, 2).bfloat16()
    res = torch.eye(4).view(1, 1, 4, 4)
    y = A5.npu_mhc_post(x, res, torch.ones(1, 1, 2).bfloat16(), torch.tensor([[[1.0, 0, 0, 2]]]))
    assert y.float().flatten().tolist() == [1, 2, 2, 3, 4, 5, 8, 9]
    from dsv4.ascend.emulation.mhc import npu_mhc_post

    with pytest.raises(NpuOpError, match="950"):  # called directly for an A2 chip (the namespace hides it)
        npu_mhc_post("910b", x, res, torch.ones(1, 1, 2).bfloat16(), torch.ones(1, 1, 4))
    with pytest.raises(NpuOpError, match="n must be"):
        A5.npu_mhc_pre(torch.zeros(1, 1, 3, 16).bfloat16(), torch.zeros(15, 48), torch.zeros(3), torch.zeros(15))
