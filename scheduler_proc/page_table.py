"""The device-resident request -> KV page table.

Building each step's page list on the host costs O(total context) Python work per step (280k
entries at 256 requests of 1.1k tokens, page size 1: more than the GPU step itself). Instead every
running request owns a row of a device table that mirrors `req.pages`; a step uploads only the
entries the host has not mirrored yet (a decode adds at most one page), and the flat page list
is gathered on the device (`kernels.triton_ops.gather_kv_indices`).

Ownership: a request takes a row the first time it is scheduled and keeps it until `release`
(request finished or aborted). Rows of requests that currently hold no pages (retracted, waiting
to resume) are reclaimed when rows run out, so `max_running_requests` rows always suffice.
"""

from __future__ import annotations

from typing import Sequence

import torch

from scheduler_proc.request import Req
from scheduler_proc.transfer import device_tensor


class PageTable:
    """Rows of page ids on the device; `sync` makes the rows of a step's requests match `req.pages`.

    Invariant after `sync(reqs, lens)`: for each request, row `req.table_slot` holds
    `req.pages[:n]` in columns `[0, n)` for every n <= `req.table_len`, and `req.table_len` >=
    the `lens` asked for. The upload is stream-ordered, so steps already launched keep reading the
    table as it was when they were launched.
    """

    def __init__(self, num_rows: int, max_pages: int, device: torch.device):
        self.table = torch.zeros((num_rows, max_pages), dtype=torch.int32, device=device)
        self.device = device
        self.max_pages = max_pages
        self._free = list(range(num_rows - 1, -1, -1))
        self._owners: dict[int, Req] = {}
        self._gather = gather_kv_indices_torch
        if device.type == "cuda":
            try:
                from kernels.triton_ops import gather_kv_indices
                self._gather = gather_kv_indices
            except ImportError:  # no Triton: the torch version (a few more launches)
                pass

    def kv_indices(self, slots: torch.Tensor, kv_indptr: torch.Tensor, total: int) -> torch.Tensor:
        """The flat page list of a step: rows `slots` cut at the lengths in `kv_indptr` (device)."""
        return self._gather(self.table, slots, kv_indptr, total)

    def sync(self, reqs: Sequence[Req], num_pages: Sequence[int]) -> list[int]:
        """Upload what is missing so row `req.table_slot` covers `req.pages[:n]`; returns the slots."""
        flat_idx: list[int] = []
        values: list[int] = []
        cols = self.max_pages
        for req, n in zip(reqs, num_pages):
            if req.table_slot < 0:
                self._assign(req, reqs)
            if req.table_len < n:
                if n > cols:
                    raise ValueError(f"request {req.rid!r} needs {n} pages; the page table holds {cols}")
                base = req.table_slot * cols
                flat_idx += range(base + req.table_len, base + n)
                values += req.pages[req.table_len:n]
                req.table_len = n
        if flat_idx:
            idx = device_tensor(flat_idx, torch.int64, self.device)
            self.table.view(-1).index_copy_(0, idx, device_tensor(values, torch.int32, self.device))
        return [r.table_slot for r in reqs]

    def release(self, req: Req) -> None:
        if req.table_slot >= 0:
            del self._owners[req.table_slot]
            self._free.append(req.table_slot)
            req.table_slot, req.table_len = -1, 0

    def _assign(self, req: Req, busy: Sequence[Req]) -> None:
        if not self._free:
            in_step = {id(r) for r in busy}
            for owner in [r for r in self._owners.values() if not r.pages and id(r) not in in_step]:
                self.release(owner)
            if not self._free:
                raise RuntimeError(f"page table has no free row for {req.rid!r}: all "
                                   f"{len(self._owners)} rows belong to requests holding KV")
        req.table_slot, req.table_len = self._free.pop(), 0
        self._owners[req.table_slot] = req


def gather_kv_indices_torch(page_table: torch.Tensor, slots: torch.Tensor, kv_indptr: torch.Tensor,
                            total: int) -> torch.Tensor:
    """Sequence b's pages are page_table[slots[b], :n_b] with n_b = kv_indptr[b+1] - kv_indptr[b];
    returns them concatenated ([total] = kv_indptr[-1]). On CUDA the Triton kernel
    `kernels.triton_ops.gather_kv_indices` does this in one launch."""
    counts = (kv_indptr[1:] - kv_indptr[:-1]).long()
    rows = torch.repeat_interleave(slots.long(), counts, output_size=total)
    starts = torch.repeat_interleave(kv_indptr[:-1].long(), counts, output_size=total)
    cols = torch.arange(total, device=page_table.device) - starts
    return page_table[rows, cols]
