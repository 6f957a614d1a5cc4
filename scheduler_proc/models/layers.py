"""Tensor-parallel building blocks of the Llama-family model.

Sharding (Megatron style): a ColumnParallelLinear splits its output features across ranks and
leaves the output sharded; a RowParallelLinear splits its input features, so each rank's partial
product is summed with an all-reduce over `tp_group`. Attention heads and MLP intermediate features
are column-split, the following o_proj / down_proj row-split: one all-reduce per block. With
tp_size == 1 every layer is a plain linear and no collective is ever called.

Every parameter carries a `weight_loader(param, full_hf_tensor, shard_id=None)` that takes the
FULL tensor from the checkpoint and copies this rank's slice (dtype and device conversion happen
in the copy), so checkpoints never need to be pre-sharded.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class ShardingError(ValueError):
    """A layer size does not split evenly over the tensor-parallel ranks, or a shard id is unknown."""


@functools.lru_cache(maxsize=None)
def cuda_fused_ops() -> Optional[ModuleType]:
    """`kernels.triton_ops` (fused RMSNorm / RoPE / SiLU-and-mul kernels) when Triton is importable, else None.

    Used for CUDA tensors only: on GPU the torch chains cost 6-24x more (docs/benchmarks.md).
    """
    try:
        import kernels.triton_ops as ops
    except ImportError:
        return None
    return ops


def _divide(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        raise ShardingError(f"{what} ({n}) is not divisible by tp_size ({tp_size})")
    return n // tp_size


def _set_loader(param: nn.Parameter, loader: Callable[..., None]) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def _check_shape(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{name}: checkpoint shard has shape {tuple(loaded.shape)}, "
                         f"expected {tuple(param.shape)}")


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Replicated parameters (norms): copy the whole tensor."""
    _check_shape(param, loaded, "replicated weight")
    with torch.no_grad():
        param.copy_(loaded)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           gemv: bool = False, pdl: bool = False) -> torch.Tensor:
    """F.linear; with `gemv`, a single row goes to the Triton GEMV (kernels/triton_gemv.py),
    launched with programmatic dependent launch when `pdl`."""
    if gemv and x.dim() == 2 and x.shape[0] == 1:
        from kernels.triton_gemv import gemv as triton_gemv  # noqa: PLC0415 - CUDA only
        y = triton_gemv(x, weight, pdl=pdl)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def enable_gemv(model: nn.Module) -> int:
    """Route batch-1 products of the projections whose weights qualify (`gemv_pays`) to the
    Triton GEMV; returns how many were switched."""
    from kernels.triton_gemv import gemv_pays  # noqa: PLC0415 - CUDA only
    count = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            module.gemv = gemv_pays(module.weight)
            count += module.gemv
    return count


def enable_pdl(model: nn.Module) -> int:
    """Launch the Triton kernels of every module that has a `pdl` switch (norms, activation, RoPE,
    GEMV-routed projections) with programmatic dependent launch (`kernels/pdl.py`); the caller
    checks that the device supports it. Returns how many modules were switched."""
    count = 0
    for module in model.modules():
        if hasattr(type(module), "pdl"):
            module.pdl = True
            count += 1
    return count


class ColumnParallelLinear(nn.Module):
    """y = x @ W.T + b with W's output rows split across ranks; y stays sharded ([.., out/tp]).

    `output_sizes` lists the sub-matrices fused into this one (e.g. [I, I] for gate_up): each is
    split separately, so rank r holds [gate_r; up_r], and its weight_loader takes
    shard_id = index into output_sizes. A single-matrix layer uses shard_id None.
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.in_features = in_features
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.output_sizes = list(output_sizes)
        self.shard_sizes = [_divide(n, tp_size, "output features") for n in self.output_sizes]
        self.out_features = sum(self.shard_sizes)
        self.weight = _set_loader(nn.Parameter(torch.empty(self.out_features, in_features),
                                               requires_grad=False), self.weight_loader)
        self.bias = None
        if bias:
            self.bias = _set_loader(nn.Parameter(torch.empty(self.out_features), requires_grad=False),
                                    self.weight_loader)

    def _shard_range(self, shard_id: Optional[int]) -> tuple[int, int, int]:
        """(offset in this rank's param, offset in the full tensor, size) of one fused part."""
        idx = 0 if shard_id is None else shard_id
        if not 0 <= idx < len(self.shard_sizes) or (shard_id is None and len(self.shard_sizes) > 1):
            raise ShardingError(f"bad shard id {shard_id!r} for a layer fusing {len(self.shard_sizes)} parts")
        size = self.shard_sizes[idx]
        return sum(self.shard_sizes[:idx]), self.tp_rank * size, size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[int] = None) -> None:
        dst_off, src_off, size = self._shard_range(shard_id)
        dst = param.narrow(0, dst_off, size)
        src = loaded.narrow(0, src_off, size)
        _check_shape(dst, src, "column-parallel weight")
        with torch.no_grad():
            dst.copy_(src)

    gemv = False  # batch-1 products through the Triton GEMV (`enable_gemv`)
    pdl = False  # ... launched with programmatic dependent launch (`enable_pdl`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.gemv, self.pdl)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection, split by heads.

    Rank r holds q heads [r*Hq/tp, (r+1)*Hq/tp) and the KV heads they use. When tp_size exceeds
    the number of KV heads, each KV head is replicated on tp_size / Hkv consecutive ranks (so
    rank r uses KV head r * Hkv // tp_size); shard ids are "q", "k", "v".
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        if tp_size >= num_kv_heads:
            _divide(tp_size, num_kv_heads, "tp_size over num_key_value_heads")
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank * num_kv_heads // tp_size
        else:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_head_start = tp_rank * self.num_kv_heads
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # Shard bookkeeping is done here per head, so build the parent as one unsplit output.
        super().__init__(hidden_size, [self.q_size + 2 * self.kv_size], bias=bias, tp_rank=0, tp_size=1)
        self.tp_rank, self.tp_size = tp_rank, tp_size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[str] = None) -> None:
        if shard_id == "q":
            dst_off, src_off, size = 0, self.tp_rank * self.q_size, self.q_size
        elif shard_id in ("k", "v"):
            dst_off = self.q_size + (0 if shard_id == "k" else self.kv_size)
            src_off, size = self.kv_head_start * self.head_dim, self.kv_size
        else:
            raise ShardingError(f"QKV shard id must be 'q', 'k' or 'v', not {shard_id!r}")
        dst = param.narrow(0, dst_off, size)
        src = loaded.narrow(0, src_off, size)
        _check_shape(dst, src, f"qkv weight ({shard_id})")
        with torch.no_grad():
            dst.copy_(src)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r @ W_r.T) + b with W's input columns split across ranks.

    The input is this rank's shard ([.., in/tp], the output of a column-parallel layer); the bias
    is added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0,
                 tp_size: int = 1, tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.in_features = _divide(in_features, tp_size, "input features")
        self.out_features = out_features
        self.weight = _set_loader(nn.Parameter(torch.empty(out_features, self.in_features),
                                               requires_grad=False), self.weight_loader)
        self.bias = None
        if bias:
            self.bias = _set_loader(nn.Parameter(torch.empty(out_features), requires_grad=False),
                                    default_weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        src = loaded.narrow(1, self.tp_rank * self.in_features, self.in_features)
        _check_shape(param, src, "row-parallel weight")
        with torch.no_grad():
            param.copy_(src)

    gemv = False  # batch-1 products through the Triton GEMV (`enable_gemv`)
    pdl = False  # ... launched with programmatic dependent launch (`enable_pdl`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, gemv=self.gemv, pdl=self.pdl)
        if self.tp_size > 1:
            dist.all_reduce(y, group=self.tp_group)
        if self.bias is not None:
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split into contiguous per-rank ranges.

    Each rank holds ceil(vocab / tp) rows (the last rank's tail is zero padding); ids outside the
    rank's range look up zeros, and an all-reduce assembles the full embedding.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.shard_size = -(-vocab_size // tp_size)
        self.vocab_start = tp_rank * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, vocab_size)
        self.weight = _set_loader(nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False),
                                  self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"embedding: checkpoint has shape {tuple(loaded.shape)}, expected "
                             f"{(self.vocab_size, self.hidden_size)}")
        n = self.vocab_end - self.vocab_start
        with torch.no_grad():
            param[:n].copy_(loaded[self.vocab_start:self.vocab_end])
            param[n:].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start)
        out = F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.tp_group)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary, split like VocabParallelEmbedding (same loader).

    `forward(hidden)` returns the FULL float32 logits [N, vocab] on every rank (an all-gather of
    the per-rank slices). With `tied_to`, the embedding's weight is shared instead of owned.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: Optional[dist.ProcessGroup] = None, tied_to: Optional[VocabParallelEmbedding] = None):
        if tied_to is None:
            super().__init__(vocab_size, hidden_size, tp_rank, tp_size, tp_group)
        else:
            # Skip the parent's allocation: a tied head owns no weight of its own.
            nn.Module.__init__(self)
            self.vocab_size, self.hidden_size = vocab_size, hidden_size
            self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
            self.shard_size, self.vocab_start, self.vocab_end = (
                tied_to.shard_size, tied_to.vocab_start, tied_to.vocab_end)
            self.weight = tied_to.weight
        self.tied = tied_to is not None

    gemv = False  # batch-1 products through the Triton GEMV (`enable_gemv`)
    pdl = False  # ... launched with programmatic dependent launch (`enable_pdl`)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, gemv=self.gemv, pdl=self.pdl)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits.contiguous(), group=self.tp_group)
            logits = torch.cat(parts, dim=-1)
        return logits[..., :self.vocab_size].float()


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, optionally fused with the residual add.

    `norm(x)` returns normed x; `norm(x, residual)` returns (normed(x + residual), x + residual),
    the pre-norm transformer's two streams (on CUDA the sum is written into `residual` in place,
    so callers must not reuse the residual they pass). The reduction runs in float32.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = _set_loader(nn.Parameter(torch.ones(dim), requires_grad=False), default_weight_loader)

    pdl = False  # CUDA kernel launched with programmatic dependent launch (`enable_pdl`)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        ops = cuda_fused_ops() if x.is_cuda else None
        if ops is not None:
            if residual is None:
                return ops.rmsnorm(x, self.weight, self.eps, self.pdl)
            # one kernel: residual += x in place (the caller hands its residual stream over)
            return ops.fused_add_rmsnorm(x, residual, self.weight, self.eps, self.pdl), residual
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class SiluAndMul(nn.Module):
    """silu(gate) * up for x = [gate | up] along the last dimension."""

    pdl = False  # CUDA kernel launched with programmatic dependent launch (`enable_pdl`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = cuda_fused_ops() if x.is_cuda else None
        if ops is not None:
            return ops.silu_and_mul(x, self.pdl)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


__all__ = [
    "ColumnParallelLinear", "QKVParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "ParallelLMHead", "RMSNorm", "SiluAndMul", "ShardingError", "default_weight_loader", "cuda_fused_ops",
    "enable_gemv", "enable_pdl",
]
