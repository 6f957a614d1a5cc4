"""Bandwidth of the decode GEMMs of the Llama-3.1-8B shape (bf16) per BLAS library and batch size.

    python benchmarks/bench_gemm_gpu.py [--batches 1 8 64] [--blas cublas cublaslt triton-gemv]

At small batch a decode step is a chain of GEMVs that must stream the weights: this reports each
projection's time and the bandwidth it reaches (weight bytes / time; an H200 copies at 4.28 TB/s,
shared/gpu/README.md). Each GEMM is timed as a CUDA graph of 48 back-to-back calls (as the decode
runs it), so host launch costs do not hide the small GEMMs' kernel times.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kernels.triton_gemv import _gemv_kernel, gemv

# (name, out_features, in_features) of one Llama-3.1-8B layer, fused as Skiff runs them
SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096)]
LAYER = ("qkv", "o_proj", "gate_up", "down")


def time_ms(fn, calls: int = 48, replays: int = 10) -> float:
    """Mean device time of one fn(i) call, i = 0..calls-1, from a CUDA graph of the calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):  # warm-up outside the graph (Triton autotuning, cuBLAS handles)
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--blas", nargs="+", default=["cublas", "cublaslt", "triton-gemv"],
                    help="cublas / cublaslt (torch's F.linear) or triton-gemv (kernels/triton_gemv.py, batch 1)")
    args = ap.parse_args()
    # Enough copies of each matrix that no call finds its weights in the 50 MB L2 (as in a model,
    # where every layer has its own).
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
                      for _ in range(-(-(256 << 20) // (2 * n * k)))] for name, n, k in SHAPES}
    print(torch.cuda.get_device_name())
    print(f"{'blas':9} {'batch':>5} " + " ".join(f"{name + ' us':>10} {'TB/s':>5}" for name, _, _ in SHAPES)
          + f" {'layer us':>9} {'32 layers + lm_head ms':>22}")
    for blas in args.blas:
        if blas != "triton-gemv":
            torch.backends.cuda.preferred_blas_library(blas)
        for m in args.batches if blas != "triton-gemv" else [1]:
            cells, ms = [], {}
            for name, n, k in SHAPES:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ws = weights[name]
                if blas == "triton-gemv":
                    ref = x.float() @ ws[0].float().T
                    err = (gemv(x, ws[0]).float() - ref).abs().max().item()
                    err_cublas = (F.linear(x, ws[0]).float() - ref).abs().max().item()
                    print(f"  {name}: max |error| vs float32: triton gemv {err:.4f}, cuBLAS {err_cublas:.4f}")
                ms[name] = time_ms(lambda i: (gemv if blas == "triton-gemv" else F.linear)(x, ws[i % len(ws)]))
                cells.append(f"{1e3 * ms[name]:10.1f} {n * k * 2 / ms[name] / 1e9:5.2f}")
            layer = sum(ms[name] for name in LAYER)
            print(f"{blas:9} {m:5} " + " ".join(cells) + f" {1e3 * layer:9.1f} {32 * layer + ms['lm_head']:22.3f}")
    if "triton-gemv" in args.blas:
        for key, config in _gemv_kernel.cache.items():  # autotuned per (N, K, dtypes)
            print(f"  triton gemv config for {key}: {config}")


if __name__ == "__main__":
    main()
