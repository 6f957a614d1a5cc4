"""Attention backend on our own Triton kernels (`kernels/triton_attention.py`).

The fallback where FlashInfer is missing, and a second independent implementation the tests
hold FlashInfer and torch against. One-token (decode) sequences use the split-KV decode kernel,
the others (prefill with or without cached prefix) the causal extend kernel; a mixed batch runs
both, each on its own rows.

CUDA graphs: the decode kernels read their metadata (kv_indptr, kv_indices, seq_lens) from
device tensors and their grid depends only on the batch size, so replay just copies a padded
batch into fixed buffers; padding rows are one-token sequences on the reserved page 0. Those
copies go to the current stream: call `replay_metadata` on the stream that replays the graph (the
previous replay reads the same buffers until it finishes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kernels.base import AttentionBatch, BaseAttentionBackend, KVCache
from kernels.mixed_split import split_mixed
from kernels.triton_attention import decode_attention, extend_attention
from kernels.triton_ops import store_kv

MAX_DECODE_SPLITS = 64


@dataclass
class _DecodeRows:
    """The one-token sequences of a mixed batch: their rows, KV page starts and lengths."""

    rows: torch.Tensor
    kv_start: torch.Tensor
    seq_lens: torch.Tensor
    num_splits: int


@dataclass
class TritonMeta:
    """Device metadata for one step (views of graph buffers when captured). For a mixed batch,
    `decode_rows` routes its one-token sequences to the decode kernel (see kernels/mixed_split.py)."""

    is_decode: bool
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    seq_lens: torch.Tensor
    out_cache_loc: torch.Tensor
    max_q_len: int
    num_splits: int
    decode_rows: Optional[_DecodeRows] = None


class TritonAttentionBackend(BaseAttentionBackend):
    """Paged attention in Triton; see the module docstring."""

    supports_cuda_graph = True

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: Optional[float] = None,
                 *, device: torch.device | str = "cuda", dtype: Optional[torch.dtype] = None,
                 split_mixed: bool = True, pdl: bool = False):
        super().__init__(num_q_heads, num_kv_heads, head_dim, scale)
        self.split_mixed = split_mixed
        self.pdl = pdl  # decode kernels launch with programmatic dependent launch (kernels/pdl.py)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
        self.device = torch.device(device)
        self.dtype = dtype
        if self.device.type == "cuda":
            self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:  # the Triton interpreter (tests on CPU)
            self._num_sms = 8
        self._page_size: Optional[int] = None

    def num_splits(self, bs: int) -> int:
        """KV splits per decode sequence: enough programs to fill the GPU about four times over
        (measured on H100: batch 1 x 4096 tokens runs 1.4x faster with 64 splits than with 16;
        at batch 64+ one or two splits are best).

        A function of the batch size alone, so eager and captured runs of one size agree."""
        want = -(-4 * self._num_sms // max(1, bs * self.num_kv_heads))
        return max(1, min(MAX_DECODE_SPLITS, want))

    def prepare(self, batch: AttentionBatch) -> TritonMeta:
        self._page_size = batch.page_size
        meta = TritonMeta(batch.is_decode, batch.qo_indptr, batch.kv_indptr, batch.kv_indices, batch.seq_lens,
                          batch.out_cache_loc, max(batch.q_lens_cpu, default=0), self.num_splits(batch.num_seqs))
        split = (split_mixed(batch.q_lens_cpu, batch.seq_lens_cpu, batch.page_size, batch.kv_indptr.device)
                 if self.split_mixed else None)
        if split is not None:
            dec, ext = split
            meta.decode_rows = _DecodeRows(dec.rows, batch.kv_indptr[dec.seq_ids], batch.seq_lens[dec.seq_ids],
                                           self.num_splits(len(dec.q_lens)))
            meta.max_q_len = max(ext.q_lens)
        return meta

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                kv_cache: KVCache, meta: TritonMeta) -> torch.Tensor:
        kf, vf = kv_cache.flat(layer)
        if k is not None:
            store_kv(kf, vf, meta.out_cache_loc, k, v)
        if meta.is_decode:
            return decode_attention(q, kf, vf, meta.kv_indptr, meta.kv_indices, meta.seq_lens,
                                    kv_cache.page_size, self.scale, meta.num_splits, pdl=self.pdl)
        dr = meta.decode_rows
        out = extend_attention(q, kf, vf, meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.seq_lens,
                               meta.max_q_len, kv_cache.page_size, self.scale, skip_decode=dr is not None)
        if dr is not None:
            out.index_copy_(0, dr.rows, decode_attention(q.index_select(0, dr.rows), kf, vf, dr.kv_start,
                                                         meta.kv_indices, dr.seq_lens, kv_cache.page_size,
                                                         self.scale, dr.num_splits, pdl=self.pdl))
        return out

    # ---------------------------------------------------------------------------- CUDA graphs

    def init_cuda_graph(self, max_bs: int, max_pages: int) -> None:
        dev = self.device
        self._g_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)
        self._g_indices = torch.zeros(max_pages, dtype=torch.int32, device=dev)
        self._g_seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self._g_loc = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._g_arange = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self._g_max_bs, self._g_max_pages = max_bs, max_pages

    def _graph_meta(self, bs: int) -> TritonMeta:
        return TritonMeta(True, self._g_arange[:bs + 1], self._g_indptr[:bs + 1], self._g_indices,
                          self._g_seq_lens[:bs], self._g_loc[:bs], 1, self.num_splits(bs))

    def capture_metadata(self, bs: int, page_size: int | None = None) -> TritonMeta:
        """`bs` one-token sequences on page 0: valid inputs for the capture's warm-up runs."""
        if bs > self._g_max_bs:
            raise ValueError(f"batch size {bs} exceeds the captured maximum {self._g_max_bs}")
        self._g_indptr[:bs + 1].copy_(self._g_arange[:bs + 1])
        self._g_indices[:bs].zero_()
        self._g_seq_lens[:bs].fill_(1)
        self._g_loc[:bs].zero_()
        return self._graph_meta(bs)

    def replay_metadata(self, batch: AttentionBatch, bs: int) -> TritonMeta:
        B = batch.num_seqs
        pad = bs - B
        if pad < 0:
            raise ValueError(f"batch of {B} sequences does not fit graph size {bs}")
        n = batch.kv_indices.shape[0]
        if n + pad > self._g_max_pages:
            raise ValueError(f"{n + pad} pages exceed the graph buffer of {self._g_max_pages}")
        self._g_indptr[:B + 1].copy_(batch.kv_indptr, non_blocking=True)
        self._g_indices[:n].copy_(batch.kv_indices, non_blocking=True)
        self._g_seq_lens[:B].copy_(batch.seq_lens, non_blocking=True)
        self._g_loc[:B].copy_(batch.out_cache_loc, non_blocking=True)
        if pad:
            # Padding row i gets one page (page 0) right after the real pages.
            torch.add(self._g_arange[1:pad + 1], n, out=self._g_indptr[B + 1:bs + 1])
            self._g_indices[n:n + pad].zero_()
            self._g_seq_lens[B:bs].fill_(1)
            self._g_loc[B:bs].zero_()
        return self._graph_meta(bs)
