"""Benchmark the CUDA backend's Triton kernels at DeepSeek-V4-Flash shapes (one layer's shard) on an H200-class GPU.

    python scripts/bench_kernels.py [--quick]

Reports time (triton.testing.do_bench, median ms), achieved GB/s and TFLOPS, and their fraction of the H200 peaks
(4.8 TB/s HBM3e, ~990 dense bf16 TFLOPS; FP8 dense is ~1979). Refuses to run without a CUDA GPU: the Triton
interpreter would take hours at these shapes and its timings mean nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch

PEAK_GBS = 4800.0
PEAK_TFLOPS_BF16 = 990.0


def _report(name: str, ms: float, nbytes: float, flops: float) -> None:
    gbs = nbytes / ms / 1e6
    tflops = flops / ms / 1e9
    print(f"{name:<44} {ms * 1e3:9.1f} us  {gbs:8.0f} GB/s ({100 * gbs / PEAK_GBS:5.1f}% of 4.8 TB/s)  "
          f"{tflops:7.1f} TFLOPS ({100 * tflops / PEAK_TFLOPS_BF16:5.1f}% of 990)")


def bench_attention(bench, batch: int) -> None:
    from dsv4.cuda.kernels.attention import sparse_attention

    # decode at 64k context: 128 window rows + 512 selected (CSA top-k) or all 512 compressed (HCA) rows = 640
    H, D, ctx, K = 64, 512, 65536, 128 + 512
    n_rows = 128 + ctx // 4  # window ring + CSA compressed rows
    q = torch.randn(batch, 1, H, D, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(batch, n_rows, D, device="cuda", dtype=torch.bfloat16)
    sink = torch.randn(H, device="cuda")
    idx = torch.randint(0, n_rows, (batch, 1, K), device="cuda", dtype=torch.int32)
    ms = bench(lambda: sparse_attention(q, kv, sink, idx, D ** -0.5))
    nbytes = batch * (K * D * 2 + 2 * H * D * 2 + K * 4)
    _report(f"sparse_attention decode B={batch} K={K}", ms, nbytes, 4.0 * batch * H * K * D)


def bench_moe(bench) -> None:
    from dsv4.common.model.quant import quantize_fp4
    from dsv4.cuda.kernels.moe import moe_experts

    T, k, E, d, inter = 64, 6, 256, 4096, 2048
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)])
    wts = torch.rand(T, k, device="cuda")

    def fp4(shape):  # quantise one expert and repeat it: realistic bytes without minutes of host-side quantisation
        w, s = quantize_fp4(torch.randn(*shape, device="cuda") * 0.02)
        return w.expand(E, *w.shape).contiguous(), s.expand(E, *s.shape).contiguous(), "fp4"

    w1, w3, w2 = fp4((inter, d)), fp4((inter, d)), fp4((d, inter))
    ms = bench(lambda: moe_experts(x, wts, ids, w1, w2, w3, 10.0))
    used = ids.unique().numel()
    nbytes = used * 3 * inter * d * (0.5 + 4 / 32)  # packed e2m1 + fp32 1x32 scales of the touched experts
    _report(f"moe_experts fp4 T={T} k={k} ({used} experts)", ms, nbytes, 2.0 * T * k * 3 * d * inter)


def bench_fp8_gemm(bench, M: int) -> None:
    from dsv4.common.model.quant import quantize_fp8
    from dsv4.cuda.kernels.gemm import linear

    N = K = 4096
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w, s = quantize_fp8(torch.randn(N, K, device="cuda") * 0.02)
    ms = bench(lambda: linear(x, w, s, "fp8"))
    nbytes = N * K + M * K * 2 + M * N * 2 + (N // 128) * (K // 128) * 4
    _report(f"linear fp8 {M}x{K} @ {N}x{K}^T (incl. act quant)", ms, nbytes, 2.0 * M * N * K)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU (torch.cuda.is_available() is False); this benchmark only runs on a GPU. "
              "Use tests/test_cuda_kernels.py for correctness checks in the Triton interpreter.", file=sys.stderr)
        return 2
    import triton.testing

    rep = 20 if args.quick else 100

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=rep)

    print(f"device: {torch.cuda.get_device_name()}  (peaks used: {PEAK_GBS:.0f} GB/s, {PEAK_TFLOPS_BF16:.0f} TFLOPS)")
    for b in (1, 64):
        bench_attention(bench, b)
    bench_moe(bench)
    for m in (64, 4096):
        bench_fp8_gemm(bench, m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
