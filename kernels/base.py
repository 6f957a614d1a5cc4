"""The attention backend contract.

KV layout (shared by every backend): per layer, one K and one V tensor of shape
`[num_pages, page_size, num_kv_heads, head_dim]` (FlashInfer's NHD paged layout). Viewed flat as
`[num_pages * page_size, num_kv_heads, head_dim]`, token position `i` of a sequence whose pages
are `pages` lives in slot `pages[i // page_size] * page_size + i % page_size`.

A forward step runs a batch of sequences. Sequence `b` brings `q_len[b]` new tokens (1 for a
decode; a prompt chunk for a prefill/extend) on top of `prefix_len[b]` tokens whose K/V are
already in the pool; `seq_len[b] = prefix_len[b] + q_len[b]`. New tokens are laid out
sequence after sequence (`qo_indptr`). The model runner builds one `AttentionBatch` per step;
the backend's `prepare` turns it into backend metadata once (FlashInfer: `plan`), and every
layer's `forward` reuses that metadata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class AttentionBatch:
    """Backend-independent description of one step's attention, all int32 on the model device.

    qo_indptr:   [B+1] offsets of each sequence's new tokens in the flat token dimension.
    kv_indptr:   [B+1] offsets of each sequence's pages in kv_indices.
    kv_indices:  [sum(num_pages)] page ids of every sequence (prefix and new tokens), in order.
    seq_lens:    [B] tokens of KV each sequence attends to after this step (prefix + new).
    prefix_lens: [B] tokens of KV already present before this step.
    out_cache_loc: [T] flat slot index where each new token's K/V is stored.
    positions:   [T] position of each new token (for RoPE).
    The *_cpu lists mirror the small per-sequence arrays on the host, so backends can plan without
    a device sync.
    """

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    seq_lens: torch.Tensor
    prefix_lens: torch.Tensor
    out_cache_loc: torch.Tensor
    positions: torch.Tensor
    q_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    page_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.out_cache_loc.shape[0])

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token (the CUDA-graph-able case)."""
        return all(q == 1 for q in self.q_lens_cpu)


class KVCache:
    """The preallocated paged K/V pool: one K and one V tensor per layer (layout above)."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.num_pages, self.page_size = num_pages, page_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as [num_slots, num_kv_heads, head_dim] views."""
        n = self.num_pages * self.page_size
        return (self.k[layer].view(n, self.num_kv_heads, self.head_dim),
                self.v[layer].view(n, self.num_kv_heads, self.head_dim))

    def store(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new tokens' K/V ([T, num_kv_heads, head_dim]) into flat slots `loc` ([T])."""
        kf, vf = self.flat(layer)
        kf[loc] = k
        vf[loc] = v

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class BaseAttentionBackend(ABC):
    """Paged attention over a `KVCache`.

    Contract:
    - `prepare(batch)` is called once per forward step, before any layer; it returns metadata that
      every layer's `forward` reuses (plan once per batch, never per layer).
    - `forward(q, k, v, layer, kv_cache, meta)` first stores the new tokens' k/v into
      `kv_cache` at `batch.out_cache_loc`, then returns causal attention of q over each sequence's
      full KV (prefix + new tokens). q: [T, num_q_heads, head_dim]; k, v: [T, num_kv_heads,
      head_dim]; returns [T, num_q_heads, head_dim]. Grouped-query attention is handled here.
      k and v may both be None: the caller has already written them at `out_cache_loc` (the fused
      RoPE + K/V-store kernel on CUDA).
    - Backends are stateless across steps except for reusable buffers (workspaces, graph inputs).
    - CUDA-graph hooks (decode batches only): `init_cuda_graph(max_bs, max_pages)` allocates
      static buffers once; `capture_metadata(bs)` returns metadata over those buffers for capture;
      `replay_metadata(batch, bs)` copies a real batch into them (padded to bs) before replay.
      Backends that cannot be captured leave `supports_cuda_graph` False.
    """

    supports_cuda_graph: bool = False

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: Optional[float] = None):
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5

    @abstractmethod
    def prepare(self, batch: AttentionBatch) -> Any: ...

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                kv_cache: KVCache, meta: Any) -> torch.Tensor: ...

    def init_cuda_graph(self, max_bs: int, max_pages: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def capture_metadata(self, bs: int) -> Any:
        raise NotImplementedError

    def replay_metadata(self, batch: AttentionBatch, bs: int) -> Any:
        raise NotImplementedError


@dataclass
class AttentionContext:
    """What a model's attention layers need for one forward step, passed down explicitly."""

    backend: BaseAttentionBackend
    meta: Any
    kv_cache: KVCache
    batch: AttentionBatch
