"""Split a mixed batch (decodes + prefill chunks) into its decode part and its extend part.

Prefill kernels tile queries in blocks of 64-128 rows, so a one-token decode sequence run through
them wastes most of its tile and re-reads its KV once per query head; measured on H100 (Llama-3.1-8B
layer, 63 decodes x 2048 tokens + one 1024-token chunk) a mixed batch took 3.5x the time of the
same decodes alone. The GPU backends therefore run decode sequences through their decode kernel
and the rest through the prefill kernel. Everything here is host-side index work on the small
per-sequence lists (no device sync); the results are copied to the device once per step.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class SubBatch(NamedTuple):
    """A subset of a batch's sequences, with layout relative to the subset.

    On `device` (int64): seq_ids [n] (which sequences, batch order), rows [t] (their token rows in
    the full batch), page_idx [p] (positions of their pages in the full batch's kv_indices).
    On the host (int32, what a planner reads): qo_indptr, kv_indptr [n+1], last_page_len [n].
    `row_range` is (first, end) when the rows are one contiguous range (the scheduler puts decodes
    first, so that is the usual case): kernels then read and write row views instead of copies.
    """

    seq_ids: torch.Tensor
    rows: torch.Tensor
    page_idx: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    last_page_len: torch.Tensor
    q_lens: list[int]
    seq_lens: list[int]
    row_range: Optional[tuple[int, int]] = None


def _exclusive_cumsum(xs: list[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        out.append(acc)
        acc += x
    out.append(acc)
    return out


def subset(q_lens: list[int], seq_lens: list[int], page_size: int, ids: list[int],
           device: torch.device | str) -> SubBatch:
    """Layout of sequences `ids`. Per-sequence work is plain Python on at most a few hundred
    numbers (tiny torch CPU ops cost more, and pay thread-pool overhead on a busy host); the
    per-token and per-page index arrays are expanded on the device from one small copy."""
    pages = [(s + page_size - 1) // page_size for s in seq_lens]
    qo_start = _exclusive_cumsum(q_lens)
    kv_start = _exclusive_cumsum(pages)
    sub_q = [q_lens[i] for i in ids]
    sub_pages = [pages[i] for i in ids]
    sub_seq = [seq_lens[i] for i in ids]
    qo_indptr = _exclusive_cumsum(sub_q)
    kv_indptr = _exclusive_cumsum(sub_pages)
    n = len(ids)
    # One host->device copy: [ids | row shifts | row counts | page shifts | page counts]
    packed = torch.tensor(ids + [qo_start[i] - qo_indptr[j] for j, i in enumerate(ids)] + sub_q
                          + [kv_start[i] - kv_indptr[j] for j, i in enumerate(ids)] + sub_pages,
                          dtype=torch.int64).to(device, non_blocking=True)
    t, p = qo_indptr[-1], kv_indptr[-1]
    rows = torch.repeat_interleave(packed[n:2 * n], packed[2 * n:3 * n], output_size=t)
    rows += torch.arange(t, device=device)
    page_idx = torch.repeat_interleave(packed[3 * n:4 * n], packed[4 * n:], output_size=p)
    page_idx += torch.arange(p, device=device)
    i32 = torch.int32
    contiguous = ids[-1] - ids[0] == n - 1
    return SubBatch(packed[:n], rows, page_idx, torch.tensor(qo_indptr, dtype=i32),
                    torch.tensor(kv_indptr, dtype=i32),
                    torch.tensor([(s - 1) % page_size + 1 for s in sub_seq], dtype=i32), sub_q, sub_seq,
                    (qo_start[ids[0]], qo_start[ids[-1] + 1]) if contiguous else None)


def split_mixed(q_lens: list[int], seq_lens: list[int], page_size: int,
                device: torch.device | str = "cpu") -> tuple[SubBatch, SubBatch] | None:
    """(decode part, extend part) of a batch that has both kinds of sequences, else None."""
    dec = [i for i, n in enumerate(q_lens) if n == 1]
    if not dec or len(dec) == len(q_lens):
        return None
    ext = [i for i, n in enumerate(q_lens) if n != 1]
    return (subset(q_lens, seq_lens, page_size, dec, device),
            subset(q_lens, seq_lens, page_size, ext, device))
