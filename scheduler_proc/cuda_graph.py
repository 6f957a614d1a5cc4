"""CUDA graphs for decode steps.

A decode step of a small model is a few hundred short kernels; launching them one by one from
Python costs more than running them. `CudaGraphRunner` records the whole step (embedding, every
layer with its attention, final norm, LM head) once per batch size in `graph_batch_sizes` and
replays it: one launch per step.

How a replay works: the batch of B sequences is padded to the next captured size bs. Input ids
and positions are copied into static buffers (padding rows: token 0 at position 0), the attention
backend copies the batch's metadata into its own static buffers (`replay_metadata`; padding rows
are one-token sequences on the reserved page 0, so their K/V writes land in page 0 and their
outputs are discarded), then the graph is launched. All graphs share one memory pool, captured
largest first so smaller graphs fit into what the largest one already reserved.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Optional, Protocol

import torch

from kernels.base import AttentionBatch, AttentionContext, BaseAttentionBackend, KVCache

logger = logging.getLogger(__name__)


class DecodeModel(Protocol):
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class CudaGraphUnsupportedError(RuntimeError):
    """The backend or device cannot run CUDA graphs."""


def graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to max_bs (max_bs itself is always included)."""
    if max_bs < 1:
        raise ValueError(f"cuda graph max batch size must be >= 1, got {max_bs}")
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs]
    sizes += list(range(16, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def default_cuda_graph_max_bs(device: torch.device | str) -> int:
    """Sized to the GPU: 512 on 80+ GB cards (H100/H200), less where memory is scarcer."""
    total_gib = torch.cuda.get_device_properties(torch.device(device)).total_memory / (1 << 30)
    if total_gib >= 70:
        return 512
    if total_gib >= 35:
        return 160
    return 64


class CudaGraphRunner:
    """Captured decode steps for batch sizes `graph_batch_sizes(max_bs)`.

    model(input_ids[T], positions[T], ctx) -> hidden[T, H]; with `compute_logits` the graph also
    runs `model.compute_logits` and `replay` returns logits [B, vocab], else hidden [B, H].
    `max_seq_len` bounds each sequence's pages (sizes the static page-index buffer).
    The tensor `replay` returns is a view of a static output buffer: read it (or copy it) before
    the next replay.
    """

    def __init__(self, model: DecodeModel, backend: BaseAttentionBackend, kv_cache: KVCache,
                 max_bs: Optional[int], dtype: torch.dtype, device: torch.device | str,
                 max_seq_len: int = 8192, compute_logits: bool = True):
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise CudaGraphUnsupportedError("CUDA graphs need a CUDA device")
        if not backend.supports_cuda_graph:
            raise CudaGraphUnsupportedError(f"{type(backend).__name__} cannot be captured in a CUDA graph")
        self.model, self.backend, self.kv_cache, self.dtype = model, backend, kv_cache, dtype
        self.max_bs = max_bs or default_cuda_graph_max_bs(self.device)
        self.sizes = graph_batch_sizes(self.max_bs)
        self.compute_logits = compute_logits
        page_size = kv_cache.page_size
        # Shared prefixes make the sum of pages over a batch exceed the pool, so bound it per sequence.
        self.max_pages = self.max_bs * (-(-max_seq_len // page_size) + 1)
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        backend.init_cuda_graph(self.max_bs, self.max_pages)
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        self._capture_all()
        logger.info("captured %d CUDA graphs (bs %d..%d) in %.1f s using %.0f MiB", len(self.sizes),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - t0,
                    (free_before - torch.cuda.mem_get_info(self.device)[0]) / (1 << 20))

    # --------------------------------------------------------------------------------- capture

    def _static_batch(self, bs: int, meta) -> AttentionBatch:
        i32 = dict(dtype=torch.int32, device=self.device)
        loc = getattr(meta, "out_cache_loc", None)
        if loc is None:
            loc = torch.zeros(bs, dtype=torch.int64, device=self.device)
        return AttentionBatch(
            qo_indptr=torch.arange(bs + 1, **i32), kv_indptr=torch.arange(bs + 1, **i32),
            kv_indices=torch.zeros(bs, **i32), seq_lens=torch.ones(bs, **i32),
            prefix_lens=torch.zeros(bs, **i32), out_cache_loc=loc, positions=self.positions[:bs],
            q_lens_cpu=[1] * bs, seq_lens_cpu=[1] * bs, page_size=self.kv_cache.page_size)

    def _step(self, bs: int, ctx: AttentionContext) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], ctx)
        return self.model.compute_logits(hidden) if self.compute_logits else hidden

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        self.input_ids.zero_()
        self.positions.zero_()
        for bs in reversed(self.sizes):
            meta = self.backend.capture_metadata(bs, page_size=self.kv_cache.page_size)
            ctx = AttentionContext(self.backend, meta, self.kv_cache, self._static_batch(bs, meta))
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                # Warm-up outside the graph: compiles Triton kernels, creates cuBLAS handles.
                for _ in range(2):
                    self._step(bs, ctx)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self._step(bs, ctx)
            self._graphs[bs], self._outputs[bs] = graph, out
        torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------------------------- replay

    def graph_size(self, num_seqs: int) -> int:
        """The smallest captured size that holds num_seqs (num_seqs <= max_bs)."""
        return self.sizes[bisect.bisect_left(self.sizes, num_seqs)]

    def can_run(self, batch: AttentionBatch) -> bool:
        if not batch.is_decode or not 0 < batch.num_seqs <= self.max_bs:
            return False
        pad = self.graph_size(batch.num_seqs) - batch.num_seqs
        return batch.kv_indices.shape[0] + pad <= self.max_pages

    @torch.inference_mode()
    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Run one decode step of `batch` (check `can_run` first); returns rows [:B] of the output."""
        B = batch.num_seqs
        bs = self.graph_size(B)
        self.input_ids[:B].copy_(input_ids, non_blocking=True)
        self.positions[:B].copy_(positions, non_blocking=True)
        if bs > B:
            self.input_ids[B:bs].zero_()
            self.positions[B:bs].zero_()
        self.backend.replay_metadata(batch, bs)
        self._graphs[bs].replay()
        return self._outputs[bs][:B]
