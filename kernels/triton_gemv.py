"""A Triton GEMV for batch-1 decode: y[N] = W[N, K] @ x[K] (bf16 in and out, fp32 accumulation).

At batch 1 every projection must stream its whole weight matrix once; the kernel's only job is to
keep enough loads in flight to run at the memory bandwidth. Each program owns BLOCK_N output rows
and walks K in BLOCK_K steps (software-pipelined by Triton's num_stages), so the whole matrix is
read exactly once with no split-K reduction pass. K must be a multiple of BLOCK_K and N of BLOCK_N
(true of every Llama/Qwen projection); `gemv_pays` says whether a weight qualifies.

With PDL (`kernels/pdl.py`) each program loads its first weight tile before waiting for the
kernel that produces x, so the GEMV starts streaming weights while that kernel finishes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_enter

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn in (8, 16, 32) for bk in (256, 512) for w in (4, 8) for s in (3, 4)
]


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    w_first = tl.load(w_ptrs)  # weights: safe to read before the previous kernel is done
    pdl_enter(USE_PDL)
    acc = w_first.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(w_ptrs + k0)
        x = tl.load(x_ptr + k0 + cols)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty))


def gemv_pays(weight: torch.Tensor) -> bool:
    """Whether batch-1 products with this weight should use `gemv` rather than cuBLAS: every
    bf16 shape it handles. On an H200 it beat cuBLAS on all five Llama-3.1-8B projections, 4-20%
    (benchmarks/bench_gemm_gpu.py, docs/benchmarks.md)."""
    n, k = weight.shape
    return (weight.is_cuda and weight.dtype == torch.bfloat16 and weight.is_contiguous()
            and n % 32 == 0 and k % 512 == 0)


def gemv(x: torch.Tensor, weight: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N] (bf16); N a multiple of 32, K of 512. `pdl`: launch
    with programmatic dependent launch (`kernels/pdl.py`; Hopper and newer)."""
    n, k = weight.shape
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    xc = x.contiguous()
    _gemv_kernel[lambda meta: (n // meta["BLOCK_N"],)](xc, weight, y, n, k, weight.stride(0), USE_PDL=pdl,
                                                        launch_pdl=pdl)
    return y
