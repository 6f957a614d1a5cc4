"""A Triton GEMV for batch-1 decode: y[N] = W[N, K] @ x[K] (bf16 in and out, fp32 accumulation).

At batch 1 every projection must stream its whole weight matrix once; the kernel's only job is to
keep enough loads in flight to run at the memory bandwidth. Each program owns BLOCK_N output rows
and walks K in BLOCK_K steps (software-pipelined by Triton's num_stages), so the whole matrix is
read exactly once with no split-K reduction pass. K must be a multiple of BLOCK_K and N of BLOCK_N
(true of every Llama/Qwen projection); `gemv_pays` says whether a weight qualifies.

With `silu_and_mul`, the weight is a fused [gate; up] projection (2N rows) and the output is
silu(gate @ x) * (up @ x): each program streams its BLOCK_N gate rows and the matching up rows and
applies the activation in its epilogue, with the rounding of the separate bf16 GEMV followed by
`kernels.triton_ops.silu_and_mul`. The MLP's activation kernel disappears from batch-1 decode.
(Fusing it into the down projection's input instead costs more than it saves: every program
recomputes the activation of the whole input, +2.7 us per call on an H200.)

With `norm`, the input is first put through (residual add +) RMSNorm, as the pre-norm block's
norm kernel would: every program reduces the whole (summed) input once, 8-16 KB out of L2, then
normalises each slice as it streams it; program 0 writes the summed residual. This replaces a
separate RMSNorm launch before the qkv and gate_up projections.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn in (8, 16, 32) for bk in (256, 512) for w in (4, 8) for s in (3, 4)
]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "SILU_AND_MUL", "NORM", "HAS_RES"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, res_ptr, res_out_ptr, gamma_ptr, eps, N, K, stride_w,
                 SILU_AND_MUL: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
                 NORM_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    if NORM:
        # Same arithmetic as kernels.triton_ops.fused_add_rmsnorm: the sum is rounded to the
        # activation dtype, the variance taken in float32. One load of the whole row: a loop of
        # BLOCK_K slices would pay an L2 round trip per slice before any weight is read.
        row = tl.arange(0, NORM_BLOCK)
        in_row = row < K
        h = tl.load(x_ptr + row, mask=in_row, other=0.0)
        if HAS_RES:
            h = h + tl.load(res_ptr + row, mask=in_row, other=0.0)
            tl.store(res_out_ptr + row, h, mask=in_row & (pid == 0))
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / K + eps)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if SILU_AND_MUL:
        up_ptrs = w_ptrs + N.to(tl.int64) * stride_w
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs + k0)
        x = tl.load(x_ptr + k0 + cols)
        if NORM:
            if HAS_RES:
                x = x + tl.load(res_ptr + k0 + cols)
            x = (x.to(tl.float32) * rstd).to(x.dtype) * tl.load(gamma_ptr + k0 + cols)
        x = x.to(tl.float32)[None, :]
        acc += w.to(tl.float32) * x
        if SILU_AND_MUL:
            acc_up += tl.load(up_ptrs + k0).to(tl.float32) * x
    y = tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty)
    if SILU_AND_MUL:
        gate = y.to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(y_ptr.dtype.element_ty)
        y = (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))


def gemv_pays(weight: torch.Tensor) -> bool:
    """Whether batch-1 products with this weight should use `gemv` rather than cuBLAS: every
    bf16 shape it handles. On an H200 it beat cuBLAS on all five Llama-3.1-8B projections, 4-20%
    (benchmarks/bench_gemm_gpu.py, docs/benchmarks.md)."""
    n, k = weight.shape
    return (weight.is_cuda and weight.dtype == torch.bfloat16 and weight.is_contiguous()
            and n % 32 == 0 and k % 512 == 0)


class GemvNorm(NamedTuple):
    """RMSNorm applied to a GEMV's input: normed(x + residual) (residual None: normed(x)); the sum
    is written to `residual_out`, which must not alias `residual` (every program reads it)."""

    weight: torch.Tensor
    eps: float
    residual: Optional[torch.Tensor] = None
    residual_out: Optional[torch.Tensor] = None


def gemv(x: torch.Tensor, weight: torch.Tensor, silu_and_mul: bool = False,
         norm: Optional[GemvNorm] = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N] (bf16); N a multiple of 32, K of 512. With
    `silu_and_mul`, weight is [gate; up] (2N rows, N a multiple of 32) and the result is
    silu(x @ gate.T) * (x @ up.T), [1, N]. With `norm`, x is replaced by its RMSNorm (see GemvNorm)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"gemv: input width {x.shape[-1]} does not match weight {tuple(weight.shape)}")
    if silu_and_mul:
        if n % 64:
            raise ValueError(f"gemv: a fused [gate; up] weight needs a multiple of 64 rows, not {n}")
        n //= 2
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    xc = x.contiguous()
    has_res = norm is not None and norm.residual is not None
    if has_res and (norm.residual_out is None or norm.residual.shape != x.shape
                    or norm.residual_out.shape != x.shape):
        raise ValueError("gemv: a norm with a residual needs residual and residual_out shaped like x")
    res = norm.residual.contiguous() if has_res else xc
    res_out = norm.residual_out if has_res else xc
    gamma = norm.weight if norm is not None else xc
    eps = norm.eps if norm is not None else 0.0
    _gemv_kernel[lambda meta: (n // meta["BLOCK_N"],)](xc, weight, y, res, res_out, gamma, eps, n, k,
                                                       weight.stride(0), SILU_AND_MUL=silu_and_mul,
                                                       NORM=norm is not None, HAS_RES=has_res,
                                                       NORM_BLOCK=triton.next_power_of_2(k) if norm is not None else 1)
    return y
