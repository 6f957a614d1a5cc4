"""The torch attention backend against a plain float64 reference on random paged inputs."""

from __future__ import annotations

import random

import pytest
import torch

from kernels import BackendUnavailableError, create_attention_backend, resolve_backend_name
from kernels.base import AttentionBatch, KVCache
from kernels.torch_backend import TorchAttentionBackend

HQ, HKV, D = 6, 2, 16


def make_case(seqs: list[tuple[int, int]], page_size: int, seed: int, dtype=torch.float32, num_layers: int = 2):
    """Random paged batch: seqs = [(prefix_len, q_len)]; pages scattered randomly over the pool;
    the prefix KV already sits in the pool (random values), new q/k/v are returned separately."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pages_needed = [-(-(p + q) // page_size) for p, q in seqs]
    num_pages = sum(pages_needed) + 5
    free = list(range(1, num_pages))  # page 0 is reserved
    rng.shuffle(free)
    kv = KVCache(num_layers, num_pages, page_size, HKV, D, dtype, "cpu")
    for layer in range(num_layers):
        kv.k[layer].copy_(torch.randn(kv.k[layer].shape, generator=gen))
        kv.v[layer].copy_(torch.randn(kv.v[layer].shape, generator=gen))
    qo, kvp, kvi, out_loc, positions, page_lists = [0], [0], [], [], [], []
    for (prefix, q), n in zip(seqs, pages_needed):
        pages = [free.pop() for _ in range(n)]
        page_lists.append(pages)
        kvi += pages
        kvp.append(len(kvi))
        qo.append(qo[-1] + q)
        for pos in range(prefix, prefix + q):
            out_loc.append(pages[pos // page_size] * page_size + pos % page_size)
            positions.append(pos)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    batch = AttentionBatch(
        qo_indptr=i32(qo), kv_indptr=i32(kvp), kv_indices=i32(kvi),
        seq_lens=i32([p + q for p, q in seqs]), prefix_lens=i32([p for p, _ in seqs]),
        out_cache_loc=torch.tensor(out_loc, dtype=torch.int64), positions=torch.tensor(positions),
        q_lens_cpu=[q for _, q in seqs], seq_lens_cpu=[p + q for p, q in seqs], page_size=page_size)
    T = qo[-1]
    q = torch.randn(T, HQ, D, generator=gen).to(dtype)
    k = torch.randn(T, HKV, D, generator=gen).to(dtype)
    v = torch.randn(T, HKV, D, generator=gen).to(dtype)
    return kv, batch, q, k, v, page_lists


def reference(kv_before: KVCache, layer: int, seqs, page_lists, page_size, q, k, v) -> torch.Tensor:
    """Causal attention in float64, one sequence and one head at a time, from first principles."""
    kf, vf = kv_before.flat(layer)
    out = torch.empty(q.shape, dtype=torch.float64)
    row, group = 0, HQ // HKV
    for (prefix, qn), pages in zip(seqs, page_lists):
        slots = [pages[i // page_size] * page_size + i % page_size for i in range(prefix)]
        keys = torch.cat([kf[slots].double(), k[row:row + qn].double()])  # [prefix + qn, HKV, D]
        vals = torch.cat([vf[slots].double(), v[row:row + qn].double()])
        for i in range(qn):
            visible = prefix + i + 1
            for h in range(HQ):
                kh = keys[:visible, h // group]
                scores = (kh @ q[row + i, h].double()) * D ** -0.5
                out[row + i, h] = torch.softmax(scores, 0) @ vals[:visible, h // group]
        row += qn
    return out


CASES = {
    "prefill": [(0, 7), (0, 1), (0, 19)],
    "prefill_with_prefix": [(5, 4), (16, 9), (33, 2), (1, 17)],
    "decode": [(0, 1), (12, 1), (31, 1), (47, 1), (3, 1)],
    "mixed": [(20, 1), (0, 11), (7, 1), (9, 6), (40, 1), (16, 16)],
}


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(case, page_size):
    seqs = CASES[case]
    kv, batch, q, k, v, page_lists = make_case(seqs, page_size, seed=sorted(CASES).index(case) * 100 + page_size)
    before = KVCache(2, kv.num_pages, page_size, HKV, D, torch.float32, "cpu")
    for layer in range(2):
        before.k[layer].copy_(kv.k[layer])
        before.v[layer].copy_(kv.v[layer])
    backend = TorchAttentionBackend(HQ, HKV, D)
    meta = backend.prepare(batch)
    for layer in range(2):  # the same metadata serves every layer
        out = backend.forward(q, k, v, layer, kv, meta)
        ref = reference(before, layer, seqs, page_lists, page_size, q, k, v)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        kf, vf = kv.flat(layer)
        torch.testing.assert_close(kf[batch.out_cache_loc], k)
        torch.testing.assert_close(vf[batch.out_cache_loc], v)
    # slots outside the new tokens are untouched
    untouched = torch.ones(kv.num_pages * page_size, dtype=torch.bool)
    untouched[batch.out_cache_loc] = False
    torch.testing.assert_close(kv.flat(0)[0][untouched], before.flat(0)[0][untouched])


@pytest.mark.parametrize("case", ["prefill_with_prefix", "mixed"])
def test_kv_already_stored_by_the_caller(case):
    """k = v = None: the new tokens' K/V are already in the pool (the fused RoPE + store kernel);
    the result equals passing them in."""
    seqs = CASES[case]
    kv, batch, q, k, v, _ = make_case(seqs, 4, seed=11, num_layers=1)
    kv2 = KVCache(1, kv.num_pages, 4, HKV, D, torch.float32, "cpu")
    kv2.k[0].copy_(kv.k[0])
    kv2.v[0].copy_(kv.v[0])
    backend = TorchAttentionBackend(HQ, HKV, D)
    meta = backend.prepare(batch)
    expected = backend.forward(q, k, v, 0, kv, meta)
    kv2.store(0, batch.out_cache_loc, k, v)
    torch.testing.assert_close(backend.forward(q, None, None, 0, kv2, meta), expected, rtol=0, atol=0)


def test_bfloat16_close_to_reference():
    seqs = CASES["mixed"]
    kv, batch, q, k, v, page_lists = make_case(seqs, 4, seed=3, dtype=torch.bfloat16, num_layers=1)
    before = KVCache(1, kv.num_pages, 4, HKV, D, torch.bfloat16, "cpu")
    before.k[0].copy_(kv.k[0])
    before.v[0].copy_(kv.v[0])
    backend = TorchAttentionBackend(HQ, HKV, D)
    out = backend.forward(q, k, v, 0, kv, backend.prepare(batch))
    ref = reference(before, 0, seqs, page_lists, 4, q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=0.03, atol=0.03)


def test_custom_scale_and_no_gqa():
    seqs = [(3, 1), (0, 5)]
    kv, batch, q, k, v, _ = make_case(seqs, 2, seed=5, num_layers=1)
    q2 = q[:, :HKV].contiguous()  # one q head per kv head
    b1 = TorchAttentionBackend(HKV, HKV, D, scale=0.5)
    b2 = TorchAttentionBackend(HKV, HKV, D)
    out = b1.forward(q2, k, v, 0, kv, b1.prepare(batch))
    # scale 0.5 == the default scale on q multiplied by 0.5 * sqrt(D)
    kv2, batch2, _, _, _, _ = make_case(seqs, 2, seed=5, num_layers=1)
    out2 = b2.forward(q2 * (0.5 * D ** 0.5), k, v, 0, kv2, b2.prepare(batch2))
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)


def test_rejects_bad_heads_and_token_mismatch():
    with pytest.raises(ValueError):
        TorchAttentionBackend(5, 2, D)
    kv, batch, q, k, v, _ = make_case([(0, 3)], 1, seed=1, num_layers=1)
    backend = TorchAttentionBackend(HQ, HKV, D)
    with pytest.raises(ValueError):
        backend.forward(q[:2], k[:2], v[:2], 0, kv, backend.prepare(batch))


def test_factory():
    assert resolve_backend_name("auto", "cpu") == "torch"
    backend = create_attention_backend("auto", HQ, HKV, D, device="cpu")
    assert isinstance(backend, TorchAttentionBackend) and backend.scale == D ** -0.5
    assert create_attention_backend("torch", HQ, HKV, D, device="cpu", scale=0.3).scale == 0.3
    with pytest.raises(ValueError):
        create_attention_backend("nope", HQ, HKV, D, device="cpu")
    for name in ("triton", "flashinfer"):
        with pytest.raises(BackendUnavailableError):
            create_attention_backend(name, HQ, HKV, D, device="cpu")
