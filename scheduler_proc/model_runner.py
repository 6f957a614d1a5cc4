"""Runs the model over one scheduled batch: builds the step's tensors, runs the forward, returns logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from kernels import create_attention_backend, resolve_backend_name
from kernels.base import AttentionBatch, AttentionContext, KVCache
from scheduler_proc.models.layers import enable_gemv, enable_pdl
from scheduler_proc.models.loader import ModelSpec, load_model
from scheduler_proc.page_table import PageTable
from scheduler_proc.scheduler import ScheduleBatch
from scheduler_proc.transfer import device_tensor
from server.config import ServerConfig

logger = logging.getLogger(__name__)

CPU_KV_BUDGET_BYTES = 2 << 30  # default KV pool on CPU when --max-total-tokens is not given


def _pdl_supported(device: torch.device) -> bool:
    try:
        from kernels.pdl import pdl_supported  # noqa: PLC0415 - needs triton
    except ImportError:
        return False
    return pdl_supported(device)


class FutureTokens:
    """Device ring buffer of sampled tokens that the host has not seen yet.

    Overlap scheduling launches step k+1 before step k's tokens reach the host: a request's
    pending token is written as the placeholder id `-1 - slot`, and `resolve` swaps placeholders
    for the buffer's contents on the device, in stream order, without a host sync.
    """

    def __init__(self, capacity: int, device: torch.device):
        self.buf = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.capacity, self.cursor = capacity, 0

    def put(self, token_ids: torch.Tensor) -> list[int]:
        n = token_ids.shape[0]
        if n > self.capacity // 2:
            raise ValueError(f"{n} sampled tokens exceed the future buffer ({self.capacity})")
        slots = [(self.cursor + i) % self.capacity for i in range(n)]
        self.cursor = (self.cursor + n) % self.capacity
        idx = device_tensor(slots, torch.int64, self.buf.device)
        self.buf.index_copy_(0, idx, token_ids.to(torch.int64))
        return slots

    def resolve(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.where(input_ids < 0, self.buf[(-1 - input_ids).clamp_min(0)], input_ids)


@dataclass
class HostResult:
    token_ids: list[int]
    logprobs: Optional[list[float]] = None
    top_ids: Optional[list[list[int]]] = None
    top_vals: Optional[list[list[float]]] = None


class HostCopy:
    """Sampling results on their way to the host: copied into pinned memory without blocking the
    CPU (CUDA), completed by `wait()`."""

    def __init__(self, tensors: list[Optional[torch.Tensor]]):
        self.event = None
        if tensors and tensors[0] is not None and tensors[0].is_cuda:
            tensors = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
            self.event = torch.cuda.Event()
            self.event.record()
        self.tensors = tensors

    def wait(self) -> HostResult:
        if self.event is not None:
            self.event.synchronize()
        if not self.tensors:
            return HostResult([])
        return HostResult(*[t.tolist() if t is not None else None for t in self.tensors])


@dataclass
class ForwardInput:
    input_ids: torch.Tensor  # [T]
    attn: AttentionBatch
    logit_rows: torch.Tensor  # rows of the hidden states whose logits are needed
    num_logit_rows: int


class ModelRunner:
    """Owns the model, the KV pool and the attention backend of one rank."""

    def __init__(self, config: ServerConfig, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                 tp_rank: int = 0, tp_size: int = 1, tp_group=None):
        self.config, self.spec, self.device, self.dtype = config, spec, device, dtype
        self.page_size = config.page_size
        self.model = load_model(spec, config, device, dtype, tp_rank=tp_rank, tp_size=tp_size,
                                tp_group=tp_group)
        if device.type == "cuda" and not config.disable_triton_gemv:
            logger.info("Triton GEMV for batch-1 products of %d projections", enable_gemv(self.model))
        backend_name = resolve_backend_name(config.attention_backend, device)
        backend_kw = {}
        if device.type == "cuda" and not config.disable_pdl and _pdl_supported(device):
            logger.info("programmatic dependent launch for the Triton kernels of %d modules", enable_pdl(self.model))
            if backend_name != "torch":
                backend_kw["pdl"] = True
        hf = spec.hf_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        num_q_heads = hf.num_attention_heads // tp_size
        num_kv_heads = max(1, hf.num_key_value_heads // tp_size)
        self.backend = create_attention_backend(backend_name, num_q_heads, num_kv_heads,
                                                head_dim, device=device, dtype=dtype, **backend_kw)
        # Allocated before the KV pool is sized from what memory is left.
        self.page_table = PageTable(config.max_running_requests + 32, -(-spec.max_model_len // self.page_size) + 1,
                                    device)
        num_pages = self._num_pages(hf.num_hidden_layers, num_kv_heads, head_dim, tp_group)
        self.kv_cache = KVCache(hf.num_hidden_layers, num_pages, self.page_size, num_kv_heads, head_dim,
                                dtype, device)
        self.graphs = None
        if device.type == "cuda" and not config.disable_cuda_graph and self.backend.supports_cuda_graph:
            from scheduler_proc.cuda_graph import CudaGraphRunner
            self.graphs = CudaGraphRunner(self.model, self.backend, self.kv_cache, config.cuda_graph_max_bs,
                                          dtype, device, max_seq_len=spec.max_model_len)
        self.futures = FutureTokens(4 * config.max_running_requests + 64, device)
        logger.info("KV pool: %d pages x %d tokens = %d tokens of capacity", num_pages, self.page_size,
                    (num_pages - 1) * self.page_size)

    @property
    def num_pages(self) -> int:
        return self.kv_cache.num_pages

    def _num_pages(self, num_layers: int, num_kv_heads: int, head_dim: int, tp_group=None) -> int:
        per_token = KVCache.bytes_per_token(num_layers, num_kv_heads, head_dim, self.dtype)
        if self.config.max_total_tokens:
            tokens = self.config.max_total_tokens
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1.0 - self.config.mem_fraction_static)
            tokens = int(max(budget, 0) // per_token)
            if tp_group is not None:
                # Every rank must hold the same pool: the ranks schedule in lockstep, and free memory
                # differs a little between GPUs (NCCL buffers, another process's context).
                t = torch.tensor([tokens], dtype=torch.int64, device=self.device)
                dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp_group)
                tokens = int(t.item())
        else:
            tokens = CPU_KV_BUDGET_BYTES // per_token
        if tokens < self.page_size * 2:
            raise ValueError(f"KV pool of {tokens} tokens is too small; raise --mem-fraction-static "
                             "or --max-total-tokens")
        return tokens // self.page_size + 1  # + the reserved page 0

    # ------------------------------------------------------------------ one step

    def prepare(self, batch: ScheduleBatch, extra_logit_rows: Optional[set] = None) -> ForwardInput:
        """Flatten the batch into token-level tensors.

        Host work is O(new tokens + sequences): the page list (O(context)) is gathered on the
        device from the page table. Logits are computed for each sampled item's last token, plus,
        for items listed in `extra_logit_rows` (prompt logprobs, verify-extends), every token of
        the item in order.
        """
        ps = self.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        out_loc: list[int] = []
        qo_indptr, kv_indptr = [0], [0]
        seq_lens, prefix_lens, q_lens, page_counts = [], [], [], []
        logit_rows: list[int] = []
        for item in batch.items:
            req, start, q = item.req, item.start, item.q_len
            end = start + q
            row0 = len(input_ids)
            input_ids += req.token_ids(start, end)
            if extra_logit_rows and req.rid in extra_logit_rows:
                # Every row's logits (prompt logprobs, speculative verification); a verify-extend's
                # drafts follow the newest token, which is where `token_ids` stops.
                input_ids += item.draft_ids
                logit_rows += range(row0, row0 + q)
            elif item.sample:
                logit_rows.append(row0 + q - 1)
            positions += range(start, end)
            pages = req.pages
            out_loc += [pages[p // ps] * ps + p % ps for p in range(start, end)]
            n_pages = -(-end // ps)
            page_counts.append(n_pages)
            kv_indptr.append(kv_indptr[-1] + n_pages)
            qo_indptr.append(len(input_ids))
            seq_lens.append(end)
            prefix_lens.append(start)
            q_lens.append(q)

        slots = self.page_table.sync([it.req for it in batch.items], page_counts)
        t = self._to_device
        kv_indptr_dev = t(kv_indptr)
        attn = AttentionBatch(
            qo_indptr=t(qo_indptr), kv_indptr=kv_indptr_dev,
            kv_indices=self.page_table.kv_indices(t(slots), kv_indptr_dev, kv_indptr[-1]),
            seq_lens=t(seq_lens), prefix_lens=t(prefix_lens), out_cache_loc=t(out_loc, torch.int64),
            positions=t(positions, torch.int64), q_lens_cpu=q_lens, seq_lens_cpu=seq_lens, page_size=ps,
        )
        ids = t(input_ids, torch.int64)
        if min(input_ids) < 0:
            ids = self.futures.resolve(ids)
        return ForwardInput(ids, attn, t(logit_rows, torch.int64), len(logit_rows))

    def _to_device(self, xs: list, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return device_tensor(xs, dtype, self.device)

    @torch.inference_mode()
    def forward(self, fwd: ForwardInput) -> torch.Tensor:
        """Logits [num_logit_rows, vocab] (float32) for the rows `prepare` selected.

        Decode batches replay a captured CUDA graph; the logits are then a view of the graph's
        static output, valid until the next replay (the sampler consumes them first, in stream order).
        """
        attn = fwd.attn
        if self.graphs is not None and fwd.num_logit_rows == attn.num_seqs and self.graphs.can_run(attn):
            return self.graphs.replay(fwd.input_ids, attn.positions, attn)
        meta = self.backend.prepare(fwd.attn)
        ctx = AttentionContext(self.backend, meta, self.kv_cache, fwd.attn)
        hidden = self.model(fwd.input_ids, fwd.attn.positions, ctx)
        return self.model.compute_logits(hidden.index_select(0, fwd.logit_rows))

    def to_host(self, out) -> HostCopy:
        if out is None:
            return HostCopy([])
        return HostCopy([out.token_ids, out.logprobs, out.top_logprob_ids, out.top_logprob_vals])
