"""FlashInfer attention over the shared paged KV layout (NHD pages, see `kernels/base.py`).

- Decode sequences run `BatchDecodeWithPagedKVCacheWrapper` with tensor cores (GQA groups of
  4-8 query heads per kv head make the tensor-core path the fast one); prefill sequences (with or
  without a cached prefix) run `BatchPrefillWithPagedKVCacheWrapper` with a causal mask, which
  FlashInfer aligns to the end of each sequence's KV (query j of a sequence with prefix p sits at
  position p + j), exactly our contract. A mixed batch is split into both (`kernels/mixed_split.py`
  says why), each wrapper planned once per step.
- `prepare` plans once per step from host-side lengths (no device sync); every layer reuses the
  plan. One float workspace is allocated once and shared by all wrappers: only one of them runs
  at a time on the stream.
- Small decode batches (up to `small_decode_max_bs` sequences, default 64) run our Triton
  split-KV decode kernel instead (`kernels/triton_backend.py`), eager and in CUDA graphs: on an
  H200 at batch 1 and 256 tokens of context FlashInfer's CUDA-graph decode plus its split merge
  took 11.8 us a layer against 6.0 for the Triton pair, and batch 64 decoded 1.4% faster
  (docs/benchmarks.md). Larger decode batches, prefills and mixed batches stay on FlashInfer.
  With `pdl` the Triton decode kernels launch with programmatic dependent launch (`kernels/pdl.py`).
- K/V of new tokens are written by our Triton `store_kv` (one launch for K and V, any
  `out_cache_loc`; FlashInfer's append kernel needs per-token batch indices and positions that
  we would first have to build).
- CUDA graphs: one decode wrapper per captured batch size in FlashInfer's `use_cuda_graph` mode,
  over fixed indptr / indices / last-page-len buffers. Replay re-plans (host work plus small
  copies into those buffers) before the graph launches.
- Streams: `prepare` / `replay_metadata` enqueue their copies on the current stream. Call them on
  the stream that runs the forward (or make that stream wait): the graph buffers they overwrite
  are read by the previous step's kernels until those finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from kernels.base import AttentionBatch, BaseAttentionBackend, KVCache
from kernels.mixed_split import SubBatch, split_mixed
from kernels.triton_backend import TritonAttentionBackend, TritonMeta
from kernels.triton_ops import store_kv

DEFAULT_WORKSPACE_BYTES = 256 << 20
SMALL_DECODE_MAX_BS = 64


class FlashInferUnavailableError(RuntimeError):
    """FlashInfer is not installed or there is no CUDA device."""


def _import_flashinfer():
    try:
        import flashinfer  # noqa: F401  (heavy: imported only when this backend is built)
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise FlashInferUnavailableError(f"flashinfer is not importable: {e}") from e
    return flashinfer


@dataclass
class _Part:
    """One planned wrapper and the token rows it covers (None: every row, in order; a slice:
    a contiguous range; a tensor: those rows)."""

    wrapper: object
    is_decode: bool
    plan_args: tuple
    rows: Union[None, slice, torch.Tensor] = None


def _rows(part: SubBatch) -> Union[slice, torch.Tensor]:
    return slice(*part.row_range) if part.row_range is not None else part.rows


@dataclass
class FlashInferMeta:
    """One step's plan: a single part, or a decode part plus an extend part for mixed batches.
    Planned once (in prepare, or at layer 0 when the backend was built without a dtype) and run
    by every layer."""

    parts: list[_Part]
    out_cache_loc: torch.Tensor
    planned: bool = False


def _host_layout(q_lens: list[int], seq_lens: list[int], page_size: int):
    """qo_indptr, kv_indptr, last_page_len as int32 CPU tensors (from host lists: no sync)."""
    qo, kv, last = [0], [0], []
    for q, s in zip(q_lens, seq_lens):
        qo.append(qo[-1] + q)
        kv.append(kv[-1] + (s + page_size - 1) // page_size)
        last.append((s - 1) % page_size + 1)
    i32 = torch.int32
    return torch.tensor(qo, dtype=i32), torch.tensor(kv, dtype=i32), torch.tensor(last, dtype=i32)


class FlashInferAttentionBackend(BaseAttentionBackend):
    """The default CUDA backend. See the module docstring for how each batch kind runs."""

    supports_cuda_graph = True

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: Optional[float] = None,
                 *, device: torch.device | str = "cuda", dtype: Optional[torch.dtype] = None,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, prefill_backend: str = "auto",
                 split_mixed: bool = True, small_decode_max_bs: int = SMALL_DECODE_MAX_BS, pdl: bool = False):
        super().__init__(num_q_heads, num_kv_heads, head_dim, scale)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
        self._fi = _import_flashinfer()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise FlashInferUnavailableError(f"FlashInfer needs a CUDA device, got {self.device}")
        self.dtype = dtype
        self.split_mixed = split_mixed
        self._workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._prefill = self._fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD",
                                                                     backend=prefill_backend)
        self._decode = self._fi.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD",
                                                                   use_tensor_cores=True)
        self._graph_wrappers: dict[int, object] = {}
        # decode batches of up to this many sequences go to the Triton kernel (0: never)
        self.small_decode_max_bs = small_decode_max_bs
        self._small_decode = (TritonAttentionBackend(num_q_heads, num_kv_heads, head_dim, scale, device=device,
                                                     dtype=dtype, pdl=pdl) if small_decode_max_bs > 0 else None)
        self._page_size: Optional[int] = None  # of the last planned batch; graphs reuse it
        # per wrapper: an event after its last plan's host->device copy
        self._staged: dict[int, torch.cuda.Event] = {}

    # ------------------------------------------------------------------------------ planning

    def _plan(self, meta: FlashInferMeta, dtype: torch.dtype) -> None:
        common = dict(q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale)
        for part in meta.parts:
            # plan() fills the wrapper's pinned host buffer and enqueues its copy to the device on
            # the current stream. With overlap scheduling the previous plan's copy may still be
            # queued behind the running step, so wait for it before the buffer is rewritten (the
            # overlap loop already waits for step k-1, so this costs nothing there).
            staged = self._staged.get(id(part.wrapper))
            if staged is not None:
                staged.synchronize()
            if part.is_decode:
                kv_indptr, kv_indices, last = part.plan_args
                part.wrapper.plan(kv_indptr, kv_indices, last, self.num_q_heads, self.num_kv_heads,
                                  self.head_dim, self._page_size, **common)
            else:
                qo_indptr, kv_indptr, kv_indices, last = part.plan_args
                part.wrapper.plan(qo_indptr, kv_indptr, kv_indices, last, self.num_q_heads, self.num_kv_heads,
                                  self.head_dim, self._page_size, causal=True, **common)
            if staged is None:
                staged = self._staged[id(part.wrapper)] = torch.cuda.Event()
            staged.record()
        meta.planned = True
        self.dtype = dtype

    def _is_small_decode(self, num_seqs: int) -> bool:
        return self._small_decode is not None and num_seqs <= self.small_decode_max_bs

    def prepare(self, batch: AttentionBatch) -> Union[FlashInferMeta, TritonMeta]:
        self._page_size = batch.page_size
        if batch.is_decode and self._is_small_decode(batch.num_seqs):
            return self._small_decode.prepare(batch)
        split = (split_mixed(batch.q_lens_cpu, batch.seq_lens_cpu, batch.page_size, batch.kv_indices.device)
                 if self.split_mixed else None)
        if batch.is_decode:
            _, kv, last = _host_layout(batch.q_lens_cpu, batch.seq_lens_cpu, batch.page_size)
            parts = [_Part(self._decode, True, (kv, batch.kv_indices, last))]
        elif split is None:
            qo, kv, last = _host_layout(batch.q_lens_cpu, batch.seq_lens_cpu, batch.page_size)
            parts = [_Part(self._prefill, False, (qo, kv, batch.kv_indices, last))]
        else:
            dec, ext = split
            dec_pages = batch.kv_indices[dec.page_idx]
            ext_pages = batch.kv_indices[ext.page_idx]
            parts = [_Part(self._decode, True, (dec.kv_indptr, dec_pages, dec.last_page_len), _rows(dec)),
                     _Part(self._prefill, False, (ext.qo_indptr, ext.kv_indptr, ext_pages, ext.last_page_len),
                           _rows(ext))]
        meta = FlashInferMeta(parts, batch.out_cache_loc)
        if self.dtype is not None:
            self._plan(meta, self.dtype)
        return meta

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                kv_cache: KVCache, meta: Union[FlashInferMeta, TritonMeta]) -> torch.Tensor:
        if isinstance(meta, TritonMeta):
            return self._small_decode.forward(q, k, v, layer, kv_cache, meta)
        if not meta.planned:
            self._plan(meta, q.dtype)
        if k is not None:
            kf, vf = kv_cache.flat(layer)
            store_kv(kf, vf, meta.out_cache_loc, k, v)
        paged = (kv_cache.k[layer], kv_cache.v[layer])
        if len(meta.parts) == 1:
            return meta.parts[0].wrapper.run(q.contiguous(), paged)
        q = q.contiguous()
        out = torch.empty_like(q)
        for part in meta.parts:
            if isinstance(part.rows, slice):  # contiguous rows: views, no gather / scatter copies
                part.wrapper.run(q[part.rows], paged, out=out[part.rows])
            else:
                out.index_copy_(0, part.rows, part.wrapper.run(q.index_select(0, part.rows), paged))
        return out

    # ---------------------------------------------------------------------------- CUDA graphs

    def init_cuda_graph(self, max_bs: int, max_pages: int) -> None:
        dev = self.device
        self._g_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)
        self._g_indices = torch.zeros(max_pages, dtype=torch.int32, device=dev)
        self._g_last = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self._g_loc = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._g_max_bs, self._g_max_pages = max_bs, max_pages
        self._graph_wrappers = {}
        if self._small_decode is not None:
            self._small_decode.init_cuda_graph(min(max_bs, self.small_decode_max_bs), max_pages)

    def _graph_wrapper(self, bs: int):
        w = self._graph_wrappers.get(bs)
        if w is None:
            w = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=self._g_indptr[:bs + 1], paged_kv_indices_buffer=self._g_indices,
                paged_kv_last_page_len_buffer=self._g_last[:bs])
            self._graph_wrappers[bs] = w
        return w

    def _check_graph_dtype(self) -> torch.dtype:
        if self.dtype is None:
            raise ValueError("FlashInferAttentionBackend needs dtype= (or one eager step) before CUDA graphs")
        return self.dtype

    def capture_metadata(self, bs: int, page_size: int | None = None) -> Union[FlashInferMeta, TritonMeta]:
        """Plan `bs` one-token sequences over the reserved page 0 (the shapes the graph records)."""
        if self._is_small_decode(bs):
            return self._small_decode.capture_metadata(bs, page_size)
        if page_size is not None:
            self._page_size = page_size
        if self._page_size is None:
            raise ValueError("capture_metadata needs page_size= before any batch was prepared")
        if bs > self._g_max_bs:
            raise ValueError(f"batch size {bs} exceeds the captured maximum {self._g_max_bs}")
        indptr = torch.arange(bs + 1, dtype=torch.int32)
        meta = FlashInferMeta([_Part(self._graph_wrapper(bs), True,
                                     (indptr, torch.zeros(bs, dtype=torch.int32, device=self.device),
                                      torch.ones(bs, dtype=torch.int32)))], self._g_loc[:bs])
        self._plan(meta, self._check_graph_dtype())
        return meta

    def replay_metadata(self, batch: AttentionBatch, bs: int) -> Union[FlashInferMeta, TritonMeta]:
        """Re-plan the bs-wrapper for `batch` padded with one-token rows on page 0."""
        if self._is_small_decode(bs):
            return self._small_decode.replay_metadata(batch, bs)
        B = batch.num_seqs
        pad = bs - B
        if pad < 0:
            raise ValueError(f"batch of {B} sequences does not fit graph size {bs}")
        self._page_size = batch.page_size
        _, kv, last = _host_layout([1] * bs, batch.seq_lens_cpu + [1] * pad, batch.page_size)
        indices = batch.kv_indices
        if pad:
            indices = torch.cat([indices, torch.zeros(pad, dtype=indices.dtype, device=indices.device)])
        if indices.shape[0] > self._g_max_pages:
            raise ValueError(f"{indices.shape[0]} pages exceed the graph buffer of {self._g_max_pages}")
        self._g_loc[:B].copy_(batch.out_cache_loc, non_blocking=True)
        if pad:
            self._g_loc[B:bs].zero_()
        meta = FlashInferMeta([_Part(self._graph_wrapper(bs), True, (kv, indices, last))], self._g_loc[:bs])
        self._plan(meta, self._check_graph_dtype())
        return meta
