"""Small fused Triton kernels for the decode/prefill hot path, each with its torch reference.

Every op here replaces a chain of torch kernels (several launches and round trips through HBM)
with one launch. Each `*_ref` function is the exact torch definition the kernel is tested
against; callers on CPU (or without Triton) use the reference directly.

- `store_kv`: write new tokens' K and V into the paged pool at flat slots (one launch for both).
- `rotary_embedding`: neox-style RoPE on q and k in place, from a [max_pos, rot_dim] cos|sin cache;
  `rotary_embedding_and_store_kv` writes the rotated k (and v) into the KV pool instead.
- `rmsnorm` / `fused_add_rmsnorm`: RMSNorm, and residual add + RMSNorm in one pass.
- `gather_tokens`: next decode's input ids from the GPU token table (overlap scheduling).
- `gather_kv_indices`: a step's flat page list from the device page table (one row per request).
- `silu_and_mul`: the gated MLP activation, silu(gate) * up, in one pass.
- `argmax`: greedy sampling's row argmax over the vocabulary, in two passes over many programs
  (torch's reduction gives one row to few blocks: 27 us for one 128k-vocab row on an H200).

Tensors must be contiguous in their last dimension; the kernels take row strides so views of a
fused qkv projection work without a copy. The per-layer kernels of a decode step (RoPE, RMSNorm,
SiLU-and-mul) take `pdl=True` to launch with programmatic dependent launch (`kernels/pdl.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_enter


def _launch_warps(block: int) -> int:
    # One warp per 256 elements of a row keeps every lane busy without spilling registers.
    return max(1, min(8, block // 256))


# ---------------------------------------------------------------------------------------- store K/V


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, loc_ptr,
                     k_stride, v_stride, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(k_ptr + t * k_stride + offs, mask=mask)
    v = tl.load(v_ptr + t * v_stride + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def store_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> None:
    """k_cache/v_cache: [num_slots, H, D]; loc: [T]; k/v: [T, H, D]."""
    k_cache[loc] = k
    v_cache[loc] = v


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Same contract as `store_kv_ref`, one launch for K and V."""
    T = loc.shape[0]
    if T == 0:
        return
    row = k_cache.shape[1] * k_cache.shape[2]
    if k.stride(-1) != 1 or k.stride(-2) != k.shape[-1] or v.stride(-1) != 1 or v.stride(-2) != v.shape[-1]:
        k, v = k.contiguous(), v.contiguous()
    block = triton.next_power_of_2(row)
    _store_kv_kernel[(T,)](k, v, k_cache, v_cache, loc, k.stride(0), v.stride(0),
                           ROW=row, BLOCK=block, num_warps=_launch_warps(block))


# -------------------------------------------------------------------------------------------- RoPE


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cache_ptr, k_cache_ptr, v_cache_ptr, loc_ptr,
                 q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                 NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, STORE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cos = tl.load(cache_ptr + pos * (2 * HALF) + d, mask=dmask, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * (2 * HALF) + HALF + d, mask=dmask, other=0.0)[None, :]
    h = tl.arange(0, BLOCK_H)

    qmask = (h[:, None] < NUM_Q_HEADS) & dmask[None, :]
    q1p = q_ptr + t * q_stride_t + h[:, None] * q_stride_h + d[None, :]
    q1 = tl.load(q1p, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(q1p + HALF, mask=qmask, other=0.0).to(tl.float32)
    tl.store(q1p, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=qmask)
    tl.store(q1p + HALF, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=qmask)

    kmask = (h[:, None] < NUM_K_HEADS) & dmask[None, :]
    k1p = k_ptr + t * k_stride_t + h[:, None] * k_stride_h + d[None, :]
    k1 = tl.load(k1p, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(k1p + HALF, mask=kmask, other=0.0).to(tl.float32)
    if STORE:
        # rotated k and untouched v go straight to the token's slot of the KV pool ([slot, H, 2*HALF])
        slot = tl.load(loc_ptr + t).to(tl.int64)
        cache_off = slot * (NUM_K_HEADS * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
        tl.store(k_cache_ptr + cache_off, (k1 * cos - k2 * sin).to(k_cache_ptr.dtype.element_ty), mask=kmask)
        tl.store(k_cache_ptr + cache_off + HALF, (k2 * cos + k1 * sin).to(k_cache_ptr.dtype.element_ty),
                 mask=kmask)
        v1p = v_ptr + t * v_stride_t + h[:, None] * v_stride_h + d[None, :]
        tl.store(v_cache_ptr + cache_off, tl.load(v1p, mask=kmask, other=0.0), mask=kmask)
        tl.store(v_cache_ptr + cache_off + HALF, tl.load(v1p + HALF, mask=kmask, other=0.0), mask=kmask)
    else:
        tl.store(k1p, (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty), mask=kmask)
        tl.store(k1p + HALF, (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty), mask=kmask)


def rope_cos_sin_cache(max_pos: int, rot_dim: int, base: float, device=None,
                       inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """[max_pos, rot_dim] float32: cos(pos * f) in the first half, sin in the second.

    Pass `inv_freq` ([rot_dim // 2]) for scaled variants (Llama 3, YaRN); otherwise plain
    `base ** (-2i / rot_dim)`.
    """
    if inv_freq is None:
        inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64, device=device) / rot_dim)
    t = torch.arange(max_pos, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq.to(device=device, dtype=torch.float64))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> None:
    """In place, neox style on the first rot_dim channels. q: [T, Hq, D]; k: [T, Hk, D]."""
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (q, k):
        x1 = x[..., :half].float()
        x2 = x[..., half:2 * half].float()
        out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        x[..., :half] = out1.to(x.dtype)
        x[..., half:2 * half] = out2.to(x.dtype)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, pdl: bool = False) -> None:
    """Same contract as `rotary_embedding_ref`: one launch rotates q and k of a token together."""
    _rope(positions, q, k, None, cos_sin_cache, None, pdl)


def rotary_embedding_and_store_kv_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                      v: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                                      v_cache: torch.Tensor, loc: torch.Tensor) -> None:
    """Rotates q in place and writes rotated k and v ([T, Hk, D]) into the KV pool's flat slots
    `loc` (k itself is left as it was). The rotary dim must be the whole head."""
    k = k.clone()
    rotary_embedding_ref(positions, q, k, cos_sin_cache)
    store_kv_ref(k_cache, v_cache, loc, k, v)


def rotary_embedding_and_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  loc: torch.Tensor, pdl: bool = False) -> None:
    """Same contract as `rotary_embedding_and_store_kv_ref`, in one launch: the decode step's
    separate RoPE and K/V-store kernels become one per layer."""
    if cos_sin_cache.shape[-1] != k.shape[-1]:
        raise ValueError(f"rotary dim {cos_sin_cache.shape[-1]} is not the head dim {k.shape[-1]}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape[1:] != k.shape[1:]:
        raise ValueError("the KV pool views must be contiguous [num_slots, Hk, D]")
    if v.stride(-1) != 1:
        raise ValueError("v must be contiguous in the head dimension")
    _rope(positions, q, k, v, cos_sin_cache, (k_cache, v_cache, loc), pdl)


def _rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
          cos_sin_cache: torch.Tensor, store: tuple | None, pdl: bool) -> None:
    T = positions.shape[0]
    if T == 0:
        return
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_embedding needs q and k contiguous in the head dimension")
    half = cos_sin_cache.shape[-1] // 2
    if 2 * half > q.shape[-1]:
        raise ValueError(f"rotary dim {2 * half} exceeds head dim {q.shape[-1]}")
    bh = triton.next_power_of_2(max(q.shape[1], k.shape[1]))
    bhalf = triton.next_power_of_2(half)
    k_cache, v_cache, loc = store if store is not None else (k, k, positions)  # unused without STORE
    v_ = v if v is not None else k
    _rope_kernel[(T,)](q, k, v_, positions, cos_sin_cache, k_cache, v_cache, loc,
                       q.stride(0), q.stride(1), k.stride(0), k.stride(1), v_.stride(0), v_.stride(1),
                       NUM_Q_HEADS=q.shape[1], NUM_K_HEADS=k.shape[1], HALF=half,
                       BLOCK_H=bh, BLOCK_HALF=bhalf, STORE=store is not None,
                       num_warps=_launch_warps(bh * bhalf), USE_PDL=pdl, launch_pdl=pdl)


# ----------------------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, x_stride, res_stride, out_stride, eps,
                    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, USE_PDL: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)  # the gain: a weight, readable before the wait
    pdl_enter(USE_PDL)
    x = tl.load(x_ptr + r * x_stride + offs, mask=mask, other=0.0)
    if HAS_RES:
        # The residual stream is kept in the activation dtype (as HF does), so round the sum
        # before normalising it.
        x = x + tl.load(res_ptr + r * res_stride + offs, mask=mask, other=0.0)
        tl.store(res_ptr + r * res_stride + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty) * w
    tl.store(out_ptr + r * out_stride + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama RMSNorm over the last dim: normalise in float32, cast back, scale by weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """residual += x (in place); returns rmsnorm(residual)."""
    residual.add_(x)
    return rmsnorm_ref(residual, weight, eps)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.stride(-1) != 1:
        raise ValueError("rmsnorm needs rows contiguous in the last dimension")
    return x.reshape(-1, x.shape[-1])


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False) -> torch.Tensor:
    """Same contract as `rmsnorm_ref`; x: [..., N] (e.g. [T, H, D] for per-head QK-norm)."""
    x2 = _rows(x)
    out = torch.empty_like(x2)
    if x2.shape[0]:
        n = x2.shape[1]
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(x2.shape[0],)](x2, x2, weight, out, x2.stride(0), x2.stride(0), out.stride(0), eps,
                                        N=n, BLOCK=block, HAS_RES=False, num_warps=_launch_warps(block),
                                        USE_PDL=pdl, launch_pdl=pdl)
    return out.view(x.shape)


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float, pdl: bool = False) -> torch.Tensor:
    """Same contract as `fused_add_rmsnorm_ref`, one read of x and residual, one launch."""
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty_like(x2)
    if x2.shape[0]:
        n = x2.shape[1]
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, out, x2.stride(0), r2.stride(0), out.stride(0), eps,
                                        N=n, BLOCK=block, HAS_RES=True, num_warps=_launch_warps(block),
                                        USE_PDL=pdl, launch_pdl=pdl)
    return out.view(x.shape)


# ----------------------------------------------------------------------------------- gather tokens


@triton.jit
def _gather_tokens_kernel(table_ptr, slots_ptr, pos_ptr, out_ptr, n, table_stride, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    slot = tl.load(slots_ptr + offs, mask=mask, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + offs, mask=mask, other=0).to(tl.int64)
    tok = tl.load(table_ptr + slot * table_stride + pos, mask=mask, other=0)
    tl.store(out_ptr + offs, tok, mask=mask)


def gather_tokens_ref(token_table: torch.Tensor, req_slots: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """token_table: [num_slots, max_len]; returns token_table[req_slots[i], positions[i]]."""
    return token_table[req_slots.long(), positions.long()]


def gather_tokens(token_table: torch.Tensor, req_slots: torch.Tensor, positions: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `gather_tokens_ref`; writes into `out` ([n], table dtype) when given, so a
    CUDA graph's static input-id buffer can be filled without an extra copy."""
    n = req_slots.shape[0]
    if out is None:
        out = torch.empty(n, dtype=token_table.dtype, device=token_table.device)
    if n:
        block = 256
        _gather_tokens_kernel[(triton.cdiv(n, block),)](token_table, req_slots, positions, out, n,
                                                        token_table.stride(0), BLOCK=block)
    return out


# ------------------------------------------------------------------------------- gather KV indices


@triton.jit
def _gather_kv_indices_kernel(table_ptr, slots_ptr, indptr_ptr, out_ptr, table_stride, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    row = tl.load(slots_ptr + b).to(tl.int64) * table_stride
    start = tl.load(indptr_ptr + b)
    n = tl.load(indptr_ptr + b + 1) - start
    for off in range(0, n, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + start + offs, tl.load(table_ptr + row + offs, mask=mask), mask=mask)


def gather_kv_indices(page_table: torch.Tensor, slots: torch.Tensor, kv_indptr: torch.Tensor,
                      total: int) -> torch.Tensor:
    """page_table: [rows, max_pages]; sequence b's pages are page_table[slots[b], :n_b] with
    n_b = kv_indptr[b+1] - kv_indptr[b]; returns them concatenated ([total] = kv_indptr[-1]).
    One launch; `total` comes from the host, so there is no sync. The torch definition it is
    tested against is `scheduler_proc.page_table.gather_kv_indices_torch` (needed without Triton)."""
    out = torch.empty(total, dtype=page_table.dtype, device=page_table.device)
    if total:
        _gather_kv_indices_kernel[(slots.shape[0],)](page_table, slots, kv_indptr, out, page_table.stride(0),
                                                     BLOCK=1024)
    return out


# ------------------------------------------------------------------------------------ SiLU and mul


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, D, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(x_ptr + r * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + r * x_stride + D + offs, mask=mask, other=0.0)
    # silu in float32, rounded to the activation dtype before the product (as torch's F.silu does)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + r * out_stride + offs, act * up, mask=mask)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2d] = [gate | up]; returns silu(gate) * up ([..., d])."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def silu_and_mul(x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """Same contract as `silu_and_mul_ref`: one read of gate and up, one write (torch needs three
    kernels over strided halves)."""
    x2 = _rows(x)
    d = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = 1024
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d,
                                                                    BLOCK=block, num_warps=4,
                                                                    USE_PDL=pdl, launch_pdl=pdl)
    return out.view(*x.shape[:-1], d)


# ------------------------------------------------------------------------------------------ argmax


@triton.jit
def _argmax_chunks_kernel(x_ptr, max_ptr, idx_ptr, x_stride, V, NUM_CHUNKS, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r * x_stride + offs, mask=offs < V, other=float("-inf"))
    best, pos = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(max_ptr + r * NUM_CHUNKS + c, best)
    tl.store(idx_ptr + r * NUM_CHUNKS + c, (c * BLOCK + pos).to(tl.int64))


@triton.jit
def _argmax_merge_kernel(max_ptr, idx_ptr, out_ptr, NUM_CHUNKS, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    best = tl.load(max_ptr + r * NUM_CHUNKS + c, mask=c < NUM_CHUNKS, other=float("-inf"))
    _, chunk = tl.max(best, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + r, tl.load(idx_ptr + r * NUM_CHUNKS + chunk))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for a 2-D float tensor (ties: the first index, as torch)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("argmax takes a 2-D tensor contiguous in its last dimension")
    B, V = x.shape
    if B == 0 or V == 0:
        return x.argmax(dim=-1)
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    block = min(4096, triton.next_power_of_2(V))
    chunks = triton.cdiv(V, block)
    best = torch.empty((B, chunks), dtype=x.dtype, device=x.device)
    idx = torch.empty((B, chunks), dtype=torch.int64, device=x.device)
    _argmax_chunks_kernel[(B, chunks)](x, best, idx, x.stride(0), V, chunks, BLOCK=block, num_warps=8)
    _argmax_merge_kernel[(B,)](best, idx, out, chunks, BLOCK_C=triton.next_power_of_2(chunks), num_warps=1)
    return out
