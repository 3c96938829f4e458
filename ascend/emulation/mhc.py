"""CPU emulation of the manifold-constrained hyper-connection ops, with their torch_npu 2.14.0 schemas; the docs'
products: 950 only (npu_mhc_pre/post "昇腾950 AI处理器", npu_mhc_sinkhorn "Atlas A5 训练系列产品").

Row layout of phi / bias (n^2 + 2n rows): [0, n) pre weights, [n, 2n) post weights, [2n, 2n + n^2) the residual
mixing matrix, row-major h_res[j, k] = row 2n + j*n + k (the DeepSeek-V4 kernel's layout, which these ops were built
for; our reading of OPDOC:npu_mhc_pre).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .basic import HALF_ACT, check, is_a5

MHC_STREAMS = (4, 6, 8)


def _check_chip(chip: str, op: str) -> None:
    check(is_a5(chip), op, f"only on 950PR/950DT, chip is {chip}")


def npu_mhc_pre(chip: str, x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, *, gamma: Tensor | None = None,
                norm_eps: float = 1e-6, hc_eps: float = 1e-6, out_flag: int = 0,
                inner_precise: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (B,S,n,D) or (T,n,D) bf16/fp16. mix = (flat(x) @ phi^T) * inv_rms, inv_rms = rsqrt(mean(flat(x)^2)+eps);
    h_pre = sigmoid(mix[:n]*alpha0 + bias[:n]) + hc_eps; h_post = 2*sigmoid(mix[n:2n]*alpha1 + bias[n:2n]);
    h_res = (mix[2n:]*alpha2 + bias[2n:]) as n x n, un-normalised (Sinkhorn is npu_mhc_sinkhorn);
    h_in = sum_j h_pre_j x_j in x.dtype. Returns (h_in, h_post, h_res, inv_rms [B,S], h_mix, h_pre): six tensors
    whatever out_flag (the meta function allocates all six; the doc calls the last three optional outputs)."""
    op = "npu_mhc_pre"
    _check_chip(chip, op)
    check(x.dim() in (3, 4) and x.dtype in HALF_ACT, op, "x must be (B,S,n,D)/(T,n,D) bf16/fp16")
    n, D = x.shape[-2], x.shape[-1]
    check(n in MHC_STREAMS, op, f"n must be one of {MHC_STREAMS}, got {n}")
    check(D % 16 == 0 and D <= 16384, op, f"D must be 16-aligned and <= 16384, got {D}")
    rows = n * n + 2 * n
    check(phi.dtype == torch.float32 and tuple(phi.shape) == (rows, n * D), op, f"phi must be fp32 ({rows}, {n * D})")
    check(alpha.dtype == torch.float32 and alpha.numel() == 3, op, "alpha must be fp32 [3]")
    check(bias.dtype == torch.float32 and bias.numel() == rows, op, f"bias must be fp32 [{rows}]")
    check(gamma is None, op, "gamma (a fused norm weight) is not emulated")
    xf = x.flatten(-2).float()
    inv_rms = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    mix = (xf @ phi.t()) * inv_rms
    h_pre = torch.sigmoid(mix[..., :n] * alpha[0] + bias[:n]) + hc_eps
    h_post = 2.0 * torch.sigmoid(mix[..., n:2 * n] * alpha[1] + bias[n:2 * n])
    h_res = (mix[..., 2 * n:] * alpha[2] + bias[2 * n:]).unflatten(-1, (n, n))
    h_in = (h_pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
    return h_in, h_post, h_res, inv_rms.squeeze(-1), mix, h_pre


def npu_mhc_sinkhorn(chip: str, x: Tensor, *, eps: float = 1e-6, num_iters: int = 20,
                     out_flag: int = 0) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Sinkhorn of fp32 [..., n, n] (indexed [j, k]): softmax over k (the first row normalisation) + eps, then a
    column normalisation, then (num_iters - 1) x (row, column) normalisations, each dividing by (sum + eps).
    doc: x fp32, 3-D (T,n,n) or 4-D (B,S,n,n), n in {4,6,8}, num_iters in [1,100]. Returns (y, None, None) with
    out_flag 0: three outputs by the schema (the doc says one), the last two undefined tensors, as the meta
    function returns them; out_flag 1 (training intermediates) is not emulated."""
    op = "npu_mhc_sinkhorn"
    _check_chip(chip, op)
    check(x.dtype == torch.float32 and x.dim() in (3, 4) and x.shape[-1] == x.shape[-2], op,
          "x must be fp32 (T,n,n) or (B,S,n,n)")
    check(x.shape[-1] in MHC_STREAMS, op, f"n must be one of {MHC_STREAMS}, got {x.shape[-1]}")
    check(1 <= num_iters <= 100, op, f"num_iters must be in [1, 100], got {num_iters}")
    check(out_flag == 0, op, "out_flag 1 (training intermediates) is not emulated")
    c = x.softmax(-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(num_iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c, None, None


def npu_mhc_post(chip: str, x: Tensor, h_res: Tensor | None, h_out: Tensor, h_post: Tensor) -> Tensor:
    """doc: x_{l+1} = H_res^T x_l + h_out (x) H_post, i.e. y[k] = sum_j h_res[j, k] * x[j] + h_post[k] * h_out;
    h_res None: y = x + h_out (x) H_post (950 only). x (B,S,n,D) the residual streams, h_res fp32 (B,S,n,n), h_out
    (B,S,D) the sub-layer output, h_post fp32 (B,S,n). fp32 math, returned in x's dtype (meta function)."""
    op = "npu_mhc_post"
    _check_chip(chip, op)
    n = x.shape[-2]
    check(x.dtype in HALF_ACT and h_out.dtype == x.dtype, op, "x / h_out must be bf16/fp16")
    check(h_post.dtype == torch.float32 and h_post.shape[-1] == n, op, "h_post must be fp32 (..,n)")
    if h_res is None:
        mixed = x.float()
    else:
        check(h_res.dtype == torch.float32 and tuple(h_res.shape[-2:]) == (n, n), op, "h_res must be fp32 (..,n,n)")
        mixed = torch.einsum("...jk,...jd->...kd", h_res.float(), x.float())
    y = mixed + h_post.float().unsqueeze(-1) * h_out.float().unsqueeze(-2)
    return y.to(x.dtype)
