"""Test helpers: random paged batches and a float32 paged-attention reference.

Shared by tests/test_gpu_kernels.py (on CUDA) and tests/test_triton_interpret.py (Triton
interpreter on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.base import AttentionBatch, KVCache


@dataclass
class PagedCase:
    batch: AttentionBatch
    kv_cache: KVCache
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hk, D] new tokens' keys
    v: torch.Tensor


def make_paged_case(q_lens: list[int], prefix_lens: list[int], *, num_q_heads: int, num_kv_heads: int,
                    head_dim: int, page_size: int, dtype: torch.dtype, device: str | torch.device,
                    num_layers: int = 1, seed: int = 0, spare_pages: int = 3) -> PagedCase:
    """A batch whose prefixes already hold random K/V in randomly permuted pages (page 0 unused).

    Returns the new tokens' q/k/v; the backend under test stores k/v and attends."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [p + q for p, q in zip(prefix_lens, q_lens)]
    pages_needed = sum(-(-s // page_size) for s in seq_lens)
    num_pages = pages_needed + spare_pages + 1
    kv = KVCache(num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype, device)
    # The pool can be large (benchmarks): fill it on its own device.
    gd = torch.Generator(device=device).manual_seed(seed)
    for layer in range(num_layers):
        kv.k[layer].copy_(torch.randn(kv.k[layer].shape, generator=gd, device=device))
        kv.v[layer].copy_(torch.randn(kv.v[layer].shape, generator=gd, device=device))
    perm = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
    kv_indptr, kv_indices, loc, pos, used = [0], [], [], [], 0
    for p, s in zip(prefix_lens, seq_lens):
        n = -(-s // page_size)
        pages = perm[used:used + n]
        used += n
        kv_indices += pages
        kv_indptr.append(len(kv_indices))
        for i in range(p, s):
            loc.append(pages[i // page_size] * page_size + i % page_size)
            pos.append(i)
    qo_indptr = [0]
    for q in q_lens:
        qo_indptr.append(qo_indptr[-1] + q)
    T = qo_indptr[-1]

    def i32(xs):
        return torch.tensor(xs, dtype=torch.int32, device=device)

    batch = AttentionBatch(
        qo_indptr=i32(qo_indptr), kv_indptr=i32(kv_indptr), kv_indices=i32(kv_indices),
        seq_lens=i32(seq_lens), prefix_lens=i32(prefix_lens),
        out_cache_loc=torch.tensor(loc, dtype=torch.int64, device=device),
        positions=torch.tensor(pos, dtype=torch.int64, device=device),
        q_lens_cpu=list(q_lens), seq_lens_cpu=seq_lens, page_size=page_size)

    def rnd(h):
        return torch.randn(T, h, head_dim, generator=g).to(device=device, dtype=dtype)

    return PagedCase(batch, kv, rnd(num_q_heads), rnd(num_kv_heads), rnd(num_kv_heads))


def reference_attention(case: PagedCase, layer: int = 0, scale: float | None = None) -> torch.Tensor:
    """float32 causal attention of case.q over prefix (from the pool) + new tokens (case.k/v),
    computed without touching the pool. Returns [T, Hq, D] float32 on the CPU."""
    b = case.batch
    kv = case.kv_cache
    ps = b.page_size
    kf, vf = (x.float().cpu() for x in kv.flat(layer))
    q, k_new, v_new = case.q.float().cpu(), case.k.float().cpu(), case.v.float().cpu()
    Hq, Hk, D = q.shape[1], kf.shape[1], q.shape[2]
    scale = scale if scale is not None else D ** -0.5
    indptr, indices = b.kv_indptr.cpu().tolist(), b.kv_indices.cpu().long()
    out = torch.empty(q.shape, dtype=torch.float32)
    t0 = 0
    for i, (ql, sl) in enumerate(zip(b.q_lens_cpu, b.seq_lens_cpu)):
        prefix = sl - ql
        pages = indices[indptr[i]:indptr[i + 1]]
        tok = torch.arange(prefix)
        slots = pages[tok // ps] * ps + tok % ps
        keys = torch.cat([kf[slots], k_new[t0:t0 + ql]]).repeat_interleave(Hq // Hk, 1)
        vals = torch.cat([vf[slots], v_new[t0:t0 + ql]]).repeat_interleave(Hq // Hk, 1)
        s = torch.einsum("qhd,khd->hqk", q[t0:t0 + ql], keys) * scale
        qpos = torch.arange(prefix, sl)
        s = s.masked_fill(torch.arange(sl)[None, None, :] > qpos[None, :, None], float("-inf"))
        out[t0:t0 + ql] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vals)
        t0 += ql
    return out


# Named batch shapes used by the agreement tests: (q_lens, prefix_lens).
SCENARIOS = {
    "prefill_with_prefix": ([37, 64, 5], [29, 0, 100]),
    "decode": ([1] * 7, [0, 1, 15, 16, 17, 200, 333]),
    "mixed": ([1, 23, 1, 70, 1], [40, 9, 0, 0, 129]),
}
