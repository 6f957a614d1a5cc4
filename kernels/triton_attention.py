"""Paged attention kernels in Triton over the shared KV layout of `kernels/base.py`.

Token `i` of a sequence lives in flat slot `kv_indices[kv_indptr[b] + i // PAGE] * PAGE + i % PAGE`.

- Decode (one query token per sequence), flash-decoding style: stage 1 splits each sequence's
  KV into `num_splits` chunks and runs one program per (sequence, kv head, chunk); the program
  handles every query head of that kv head's group at once (one K/V read serves the whole group,
  tensor cores via tl.dot). Stage 2 merges the chunks' partial outputs with their log-sum-exps.
  The grid depends only on (batch size, num_splits), so it can be captured in a CUDA graph.
- Extend (prefill with cached prefix, and mixed batches): one program per (sequence, query head,
  block of new tokens) runs causal online-softmax attention over the prefix plus the new tokens;
  query token j of a sequence sits at position prefix_len + j.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_enter

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, kv_indptr_ptr, kv_indices_ptr, seq_lens_ptr,
                         part_o_ptr, part_lse_ptr, sm_scale_log2,
                         q_stride_t, q_stride_h, kv_stride_slot, kv_stride_h, NUM_SPLITS,
                         GROUP: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    page_start = tl.load(kv_indptr_ptr + b)
    # Chunks are multiples of BLOCK_N so every block but the sequence's last is full.
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask = h < GROUP
    dmask = d < HEAD_DIM
    qh = kvh * GROUP + h
    q = tl.load(q_ptr + b * q_stride_t + qh[:, None] * q_stride_h + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        tok = start + n
        nmask = tok < hi
        page = tl.load(kv_indices_ptr + page_start + tok // PAGE, mask=nmask, other=0).to(tl.int64)
        slot = page * PAGE + tok % PAGE
        kv_off = slot[:, None] * kv_stride_slot + kvh * kv_stride_h + d[None, :]
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty chunk (short sequence) leaves l_i == 0: its lse is -inf and stage 2 ignores it.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    row = (b * NUM_Q_HEADS + qh).to(tl.int64) * NUM_SPLITS + split
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=hmask[:, None] & dmask[None, :])
    tl.store(part_lse_ptr + row, lse, mask=hmask)


@triton.jit
def _decode_merge_kernel(part_o_ptr, part_lse_ptr, o_ptr, o_stride_t, o_stride_h, NUM_SPLITS,
                         NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    dmask = d < HEAD_DIM
    row0 = (b * NUM_Q_HEADS + h).to(tl.int64) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row0 + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - m)
    w = w / tl.sum(w, axis=0)
    o = tl.load(part_o_ptr + (row0 + s)[:, None] * HEAD_DIM + d[None, :],
                mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0)
    tl.store(o_ptr + b * o_stride_t + h * o_stride_h + d, out.to(o_ptr.dtype.element_ty), mask=dmask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kv_indptr: torch.Tensor, kv_indices: torch.Tensor, seq_lens: torch.Tensor,
                     page_size: int, sm_scale: float, num_splits: int,
                     out: torch.Tensor | None = None, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int = 2, pdl: bool = False) -> torch.Tensor:
    """q: [B, Hq, D]; k_cache/v_cache: [num_slots, Hk, D] flat views; returns [B, Hq, D].

    Only kv_indptr[b] (the first page of row b's pages in kv_indices) is read, so a gathered
    [B] tensor of starts works as well as a full [B+1] indptr.
    Rows whose seq_len is 0 are not allowed (every decode attends at least to itself).
    block_n / num_warps / num_stages are tuning knobs (defaults measured on H100); `pdl` launches
    both kernels with programmatic dependent launch (`kernels/pdl.py`)."""
    B, Hq, D = q.shape
    Hk = k_cache.shape[1]
    group = Hq // Hk
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    part_o = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(D)
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    if block_n is None:
        block_n = 32 if D > 64 else 64
    _decode_split_kernel[(B, Hk, num_splits)](
        q, k_cache, v_cache, kv_indptr, kv_indices, seq_lens, part_o, part_lse, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), num_splits,
        GROUP=group, NUM_Q_HEADS=Hq, HEAD_DIM=D, PAGE=page_size,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
        USE_PDL=pdl, launch_pdl=pdl)
    _decode_merge_kernel[(B, Hq)](
        part_o, part_lse, out, out.stride(0), out.stride(1), num_splits,
        NUM_Q_HEADS=Hq, HEAD_DIM=D,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=1 if D <= 64 else 2,
        USE_PDL=pdl, launch_pdl=pdl)
    return out


@triton.jit
def _extend_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr,
                   seq_lens_ptr, sm_scale_log2,
                   q_stride_t, q_stride_h, o_stride_t, o_stride_h, kv_stride_slot, kv_stride_h,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   SKIP_DECODE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mblk = tl.program_id(2)
    q_start = tl.load(qo_indptr_ptr + b)
    q_len = tl.load(qo_indptr_ptr + b + 1) - q_start
    if mblk * BLOCK_M >= q_len:
        return
    if SKIP_DECODE and q_len == 1:  # the decode kernel handles these rows
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len
    page_start = tl.load(kv_indptr_ptr + b)
    kvh = h // GROUP

    m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mmask = m < q_len
    dmask = d < HEAD_DIM
    rows = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * q_stride_t + h * q_stride_h + d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    q_pos = prefix + m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Causal: this block's last query sits at prefix + min(q_len, (mblk+1)*BLOCK_M) - 1.
    kv_end = prefix + tl.minimum(q_len, (mblk + 1) * BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    for start in range(0, kv_end, BLOCK_N):
        tok = start + n
        nmask = tok < kv_end
        page = tl.load(kv_indices_ptr + page_start + tok // PAGE, mask=nmask, other=0).to(tl.int64)
        slot = page * PAGE + tok % PAGE
        kv_off = slot[:, None] * kv_stride_slot + kvh * kv_stride_h + d[None, :]
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        s = tl.where((tok[None, :] <= q_pos[:, None]) & nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows past q_len see only -inf; keep their arithmetic finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + rows[:, None] * o_stride_t + h * o_stride_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                     seq_lens: torch.Tensor, max_q_len: int, page_size: int, sm_scale: float,
                     out: torch.Tensor | None = None, skip_decode: bool = False) -> torch.Tensor:
    """q: [T, Hq, D] (sequences' new tokens back to back); returns [T, Hq, D].

    The new tokens' K/V must already be in the pool (the backend stores them first). With
    `skip_decode`, rows of one-token sequences are left untouched in `out` (the caller runs them
    through `decode_attention`)."""
    T, Hq, D = q.shape
    Hk = k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    B = qo_indptr.shape[0] - 1
    if T == 0 or B == 0:
        return out
    block_m = 64 if max_q_len > 32 else 16
    block_d = triton.next_power_of_2(D)
    block_n = 64 if D <= 64 else 32
    grid = (B, Hq, triton.cdiv(max_q_len, block_m))
    _extend_kernel[grid](
        q, k_cache, v_cache, out, qo_indptr, kv_indptr, kv_indices, seq_lens, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        GROUP=Hq // Hk, HEAD_DIM=D, PAGE=page_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        SKIP_DECODE=skip_decode, num_warps=4, num_stages=2)
    return out
