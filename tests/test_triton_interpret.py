"""Our Triton kernels on the CPU, in Triton's interpreter (TRITON_INTERPRET=1), on tiny shapes.

Triton picks interpreter mode when a kernel is defined, so the checks run in a child pytest
process started with the variable set; in the parent only the driver test runs. float32 only:
the interpreter's bfloat16 arithmetic is not faithful.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")

HAVE_TRITON = importlib.util.find_spec("triton") is not None
# Triton 3.6's interpreter turns loop bounds into 1-element arrays and calls int() on them, which
# numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars").
NUMPY_TOO_NEW = tuple(int(p) for p in __import__("numpy").__version__.split(".")[:2]) >= (2, 4)


@pytest.mark.skipif(INTERPRETED or not HAVE_TRITON, reason="driver runs only in the parent, needs triton")
@pytest.mark.skipif(NUMPY_TOO_NEW, reason="Triton 3.6's interpreter fails with numpy >= 2.4 (int() of 1-element arrays)")
def test_triton_kernels_in_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                       env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


# ------------------------------------------------------------------------------ child checks


@in_child
@pytest.mark.parametrize("scenario", ["prefill_with_prefix", "decode", "mixed", "mixed_unsplit"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_attention_kernels_match_reference(scenario, page_size):
    from paged_attention_ref import make_paged_case, reference_attention
    from kernels.triton_backend import TritonAttentionBackend

    shapes = {"prefill_with_prefix": ([9, 17], [5, 0]), "decode": ([1] * 4, [0, 3, 8, 21]),
              "mixed": ([1, 12, 1, 5, 1], [6, 3, 0, 9, 30]), "mixed_unsplit": ([1, 12, 1], [6, 3, 0])}
    q_lens, prefix = shapes[scenario]
    case = make_paged_case(q_lens, prefix, num_q_heads=6, num_kv_heads=2, head_dim=16, page_size=page_size,
                           dtype=torch.float32, device="cpu")
    ref = reference_attention(case)
    be = TritonAttentionBackend(6, 2, 16, device="cpu", split_mixed=scenario != "mixed_unsplit")
    out = be.forward(case.q, case.k, case.v, 0, case.kv_cache, be.prepare(case.batch))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    kf, vf = case.kv_cache.flat(0)
    assert torch.equal(kf[case.batch.out_cache_loc], case.k)
    assert torch.equal(vf[case.batch.out_cache_loc], case.v)


@in_child
def test_triton_backend_with_kv_already_stored():
    from paged_attention_ref import make_paged_case, reference_attention
    from kernels.triton_backend import TritonAttentionBackend

    case = make_paged_case([1, 12, 1], [6, 3, 0], num_q_heads=6, num_kv_heads=2, head_dim=16, page_size=4,
                           dtype=torch.float32, device="cpu")
    ref = reference_attention(case)
    case.kv_cache.store(0, case.batch.out_cache_loc, case.k, case.v)
    be = TritonAttentionBackend(6, 2, 16, device="cpu")
    out = be.forward(case.q, None, None, 0, case.kv_cache, be.prepare(case.batch))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@in_child
def test_decode_graph_buffers_with_padding():
    """replay_metadata pads to a larger size with page-0 rows; real rows are unaffected."""
    from paged_attention_ref import make_paged_case, reference_attention
    from kernels.triton_backend import TritonAttentionBackend

    case = make_paged_case([1, 1, 1], [4, 9, 0], num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=2,
                           dtype=torch.float32, device="cpu")
    ref = reference_attention(case)
    be = TritonAttentionBackend(4, 2, 16, device="cpu")
    be.init_cuda_graph(max_bs=8, max_pages=64)
    be.capture_metadata(8)
    meta = be.replay_metadata(case.batch, 8)
    pad = lambda x: torch.cat([x, torch.zeros((5,) + x.shape[1:], dtype=x.dtype)])  # noqa: E731
    out = be.forward(pad(case.q), pad(case.k), pad(case.v), 0, case.kv_cache, meta)
    torch.testing.assert_close(out[:3], ref, atol=1e-5, rtol=1e-5)
    assert meta.seq_lens.tolist() == [5, 10, 1, 1, 1, 1, 1, 1]
    n = case.batch.kv_indices.shape[0]
    assert meta.kv_indptr.tolist()[3:] == [n + i for i in range(0, 6)]


@in_child
def test_ops_match_references():
    from kernels import triton_ops as ops

    g = torch.Generator().manual_seed(0)
    kc, vc = torch.zeros(40, 3, 8), torch.zeros(40, 3, 8)
    kc2, vc2 = kc.clone(), vc.clone()
    loc = torch.tensor([7, 3, 39, 0])
    k, v = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    ops.store_kv(kc, vc, loc, k, v)
    ops.store_kv_ref(kc2, vc2, loc, k, v)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)

    cache = ops.rope_cos_sin_cache(64, 16, 10000.0)
    qkv = torch.randn(5, (4 + 2 + 2) * 16, generator=g)  # q, k as strided views of a fused projection
    q, kk = qkv[:, :64].view(5, 4, 16), qkv[:, 64:96].view(5, 2, 16)
    q2, k2 = q.clone(), kk.clone()
    pos = torch.tensor([0, 3, 63, 5, 6])
    ops.rotary_embedding(pos, q, kk, cache)
    ops.rotary_embedding_ref(pos, q2, k2, cache)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(kk, k2)

    # RoPE with the K/V store fused: q rotated in place, rotated k and v in the pool, k untouched
    qkv = torch.randn(5, (4 + 2 + 2) * 16, generator=g)
    q, kk, vv = qkv[:, :64].view(5, 4, 16), qkv[:, 64:96].view(5, 2, 16), qkv[:, 96:].view(5, 2, 16)
    q2, k_before = q.clone(), kk.clone()
    pools = [(torch.zeros(40, 2, 16), torch.zeros(40, 2, 16)) for _ in range(2)]
    loc = torch.tensor([1, 39, 7, 0, 22])
    ops.rotary_embedding_and_store_kv(pos, q, kk, vv, cache, *pools[0], loc)
    ops.rotary_embedding_and_store_kv_ref(pos, q2, kk.clone(), vv, cache, *pools[1], loc)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(pools[0][0], pools[1][0])
    assert torch.equal(pools[0][1], pools[1][1]) and torch.equal(kk, k_before)
    with pytest.raises(ValueError):  # the rotary dim must cover the head
        ops.rotary_embedding_and_store_kv(pos, q, kk, vv, ops.rope_cos_sin_cache(64, 8, 1e4), *pools[0], loc)

    x, r, w = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g), torch.randn(40, generator=g)
    r1, r2 = r.clone(), r.clone()
    torch.testing.assert_close(ops.fused_add_rmsnorm(x, r1, w, 1e-5), ops.fused_add_rmsnorm_ref(x, r2, w, 1e-5))
    torch.testing.assert_close(r1, r2)
    torch.testing.assert_close(ops.rmsnorm(x.view(2, 3, 40), w, 1e-6), ops.rmsnorm_ref(x.view(2, 3, 40), w, 1e-6))

    from scheduler_proc.page_table import gather_kv_indices_torch

    table = torch.randint(0, 1000, (10, 20), generator=g)
    slots, positions = torch.tensor([3, 0, 9]), torch.tensor([19, 0, 5])
    assert torch.equal(ops.gather_tokens(table, slots, positions), ops.gather_tokens_ref(table, slots, positions))

    page_table = torch.randint(1, 5000, (6, 3000), dtype=torch.int32, generator=g)
    slots, counts = torch.tensor([4, 0, 5], dtype=torch.int32), [2500, 1, 0]
    indptr = torch.tensor([0, 2500, 2501, 2501], dtype=torch.int32)
    got = ops.gather_kv_indices(page_table, slots, indptr, sum(counts))
    assert torch.equal(got, gather_kv_indices_torch(page_table, slots, indptr, sum(counts)))
    assert torch.equal(got, torch.cat([page_table[4, :2500], page_table[0, :1]]))

    x = torch.randn(3, 2, 2 * 1500, generator=g)
    torch.testing.assert_close(ops.silu_and_mul(x), ops.silu_and_mul_ref(x))

    logits = torch.randn(4, 9000, generator=g)
    logits[1, 100] = logits[1, 8999] = logits[1].max() + 1  # a tie across chunks: the first wins
    logits[2] = float("-inf")
    assert torch.equal(ops.argmax(logits), logits.argmax(dim=-1))
    assert ops.argmax(logits).tolist()[1:3] == [100, 0]


@in_child
def test_gemv_matches_matmul():
    """The batch-1 GEMV (float32; one configuration of the autotuned kernel, as the interpreter
    does not time)."""
    from kernels import triton_gemv

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 1024, generator=g)
    x = torch.randn(1, 1024, generator=g)
    y = torch.empty(1, 64)
    triton_gemv._gemv_kernel.fn[(64 // 16,)](x, w, y, 64, 1024, w.stride(0), BLOCK_N=16, BLOCK_K=256,
                                             USE_PDL=False)
    torch.testing.assert_close(y, x @ w.T, atol=1e-3, rtol=1e-4)


@in_child
def test_tiny_model_triton_backend_matches_torch_backend():
    """A 1-layer model built from the fused ops: prefill then 2 greedy decode steps, Triton
    attention vs the torch backend on the same paged pool."""
    from kernels.base import AttentionContext, KVCache
    from kernels.torch_backend import TorchAttentionBackend
    from kernels.triton_backend import TritonAttentionBackend
    from paged_attention_ref import make_paged_case
    from test_gpu_kernels import _decode_batch
    from tiny_llama import TinyLlama

    model = TinyLlama(dtype=torch.float32, device="cpu", layers=1, hidden=64, inter=128, vocab=97)
    ps = 4
    prompt = make_paged_case([6, 10], [0, 0], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=ps,
                             dtype=torch.float32, device="cpu", num_layers=1, spare_pages=4)
    pb = prompt.batch
    indptr = pb.kv_indptr.tolist()
    pages = {i: pb.kv_indices[indptr[i]:indptr[i + 1]].tolist() + [prompt.kv_cache.num_pages - 1 - i]
             for i in range(2)}
    ids = torch.randint(0, 97, (16,), generator=torch.Generator().manual_seed(3))
    runs = []
    for be in (TritonAttentionBackend(4, 2, 64, device="cpu"), TorchAttentionBackend(4, 2, 64, device="cpu")):
        kv = KVCache(1, prompt.kv_cache.num_pages, ps, 2, 64, torch.float32, "cpu")
        logits = model.compute_logits(model(ids, pb.positions, AttentionContext(be, be.prepare(pb), kv, pb)))
        toks = logits[[5, 15]].argmax(-1)
        lengths, out = {0: 6, 1: 10}, [logits]
        for _ in range(2):
            b = _decode_batch(pages, lengths, ps, device="cpu")
            logits = model.compute_logits(model(toks, b.positions, AttentionContext(be, be.prepare(b), kv, b)))
            toks = logits.argmax(-1)
            out.append(logits)
            lengths = {i: n + 1 for i, n in lengths.items()}
        runs.append(torch.cat(out))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-3, rtol=1e-4)
