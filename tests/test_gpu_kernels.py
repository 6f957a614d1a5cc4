"""GPU kernels: the three attention backends against each other and a float32 reference, the
Triton ops against their torch references, and CUDA-graph replay against eager runs.

All tests need CUDA (marked `gpu`, skipped elsewhere); FlashInfer tests also skip without flashinfer.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from paged_attention_ref import SCENARIOS, make_paged_case, reference_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HAVE_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
# "flashinfer" sends decode batches of <= 64 sequences to the Triton kernel; "flashinfer-decode" is
# FlashInfer with its own decode kernel at every batch size.
BACKENDS = ["torch", "triton", "flashinfer", "flashinfer-decode"]
HEADS = [(32, 8, 128), (9, 3, 64)]


def make_backend(name: str, hq: int, hk: int, d: int, dtype=None, **kw):
    if name.startswith("flashinfer") and not HAVE_FLASHINFER:
        pytest.skip("flashinfer not installed")
    from kernels import create_attention_backend
    if name != "torch" and dtype is not None:
        kw["dtype"] = dtype
    if name == "flashinfer-decode":
        name, kw["small_decode_max_bs"] = "flashinfer", 0
    elif name == "flashinfer-upto4":  # graphs of 1-4 sequences on Triton, 8 and 16 on FlashInfer
        name, kw["small_decode_max_bs"] = "flashinfer", 4
    return create_attention_backend(name, hq, hk, d, device="cuda", **kw)


# ------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_backends_agree_with_fp32_reference(scenario, page_size, heads):
    hq, hk, d = heads
    q_lens, prefix = SCENARIOS[scenario]
    outs = {}
    ref = None
    for name in BACKENDS:
        if name.startswith("flashinfer") and not HAVE_FLASHINFER:
            continue
        case = make_paged_case(q_lens, prefix, num_q_heads=hq, num_kv_heads=hk, head_dim=d,
                               page_size=page_size, dtype=torch.bfloat16, device="cuda")
        if ref is None:
            ref = reference_attention(case)
        be = make_backend(name, hq, hk, d)
        out = be.forward(case.q, case.k, case.v, 0, case.kv_cache, be.prepare(case.batch))
        torch.cuda.synchronize()
        assert out.shape == case.q.shape and out.dtype == torch.bfloat16
        kf, vf = case.kv_cache.flat(0)
        assert torch.equal(kf[case.batch.out_cache_loc], case.k), f"{name} stored K wrong"
        assert torch.equal(vf[case.batch.out_cache_loc], case.v), f"{name} stored V wrong"
        outs[name] = out.float().cpu()
        # bf16 inputs, fp32 accumulation: errors of a few bf16 ulps of O(1) outputs.
        torch.testing.assert_close(outs[name], ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")
    names = list(outs)
    for a in names:
        for b in names:
            if a < b:
                torch.testing.assert_close(outs[a], outs[b], atol=2e-2, rtol=2e-2, msg=lambda m: f"{a} vs {b}: {m}")


@pytest.mark.parametrize("name", ["triton", "flashinfer"])
def test_plan_once_reused_across_layers(name):
    """One prepare serves several layers (each layer has its own K/V)."""
    hq, hk, d = 32, 8, 128
    q_lens, prefix = SCENARIOS["mixed"]
    case = make_paged_case(q_lens, prefix, num_q_heads=hq, num_kv_heads=hk, head_dim=d, page_size=16,
                           dtype=torch.bfloat16, device="cuda", num_layers=3)
    refs = [reference_attention(case, layer) for layer in range(3)]
    be = make_backend(name, hq, hk, d)
    meta = be.prepare(case.batch)
    for layer in range(3):
        out = be.forward(case.q, case.k, case.v, layer, case.kv_cache, meta)
        torch.testing.assert_close(out.float().cpu(), refs[layer], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["triton", "flashinfer"])
@pytest.mark.parametrize("split", [True, False])
def test_mixed_batch_split_and_unsplit(name, split):
    """Mixed batches run split (decode kernel + prefill kernel) or through the prefill kernel alone;
    both match the reference, also when decodes and prefills interleave."""
    q_lens, prefix = [1, 40, 1, 1, 7, 1], [100, 0, 3000, 1, 60, 17]
    case = make_paged_case(q_lens, prefix, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                           dtype=torch.bfloat16, device="cuda")
    be = make_backend(name, 32, 8, 128, dtype=torch.bfloat16, split_mixed=split)
    meta = be.prepare(case.batch)
    out = be.forward(case.q, case.k, case.v, 0, case.kv_cache, meta)
    torch.testing.assert_close(out.float().cpu(), reference_attention(case), atol=2e-2, rtol=2e-2)


def test_triton_decode_long_context_fp16():
    """Split-KV decode over thousands of tokens (every split non-empty), fp16."""
    from kernels.triton_backend import TritonAttentionBackend
    case = make_paged_case([1] * 4, [4000, 1, 2047, 513], num_q_heads=32, num_kv_heads=8, head_dim=128,
                           page_size=16, dtype=torch.float16, device="cuda")
    be = TritonAttentionBackend(32, 8, 128, device="cuda")
    out = be.forward(case.q, case.k, case.v, 0, case.kv_cache, be.prepare(case.batch))
    torch.testing.assert_close(out.float().cpu(), reference_attention(case), atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------- triton ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_ops_match_references(dtype):
    from kernels import triton_ops as ops
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    kc = torch.zeros(1000, 8, 128, dtype=dtype, device=dev)
    vc, kc2, vc2 = kc.clone(), kc.clone(), kc.clone()
    loc = torch.randperm(1000, device=dev)[:300]
    k = torch.randn(300, 8, 128, device=dev, generator=g).to(dtype)
    v = torch.randn(300, 8, 128, device=dev, generator=g).to(dtype)
    ops.store_kv(kc, vc, loc, k, v)
    ops.store_kv_ref(kc2, vc2, loc, k, v)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)

    for hq, hk, d in HEADS:
        cache = ops.rope_cos_sin_cache(8192, d, 500000.0, device=dev)
        qkv = torch.randn(77, (hq + 2 * hk) * d, device=dev, generator=g).to(dtype)
        q, kk = qkv[:, :hq * d].view(77, hq, d), qkv[:, hq * d:(hq + hk) * d].view(77, hk, d)
        q2, k2 = q.clone(), kk.clone()
        pos = torch.randint(0, 8192, (77,), device=dev, generator=g)
        ops.rotary_embedding(pos, q, kk, cache)
        ops.rotary_embedding_ref(pos, q2, k2, cache)
        # Same fp32 math, one rounding: at most one ulp apart (FMA contraction).
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(q, q2, **tol)
        torch.testing.assert_close(kk, k2, **tol)

    for n in (576, 4096):
        x = torch.randn(33, n, device=dev, generator=g).to(dtype)
        r = torch.randn(33, n, device=dev, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(n, device=dev, generator=g)).to(dtype)
        r1, r2 = r.clone(), r.clone()
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(ops.fused_add_rmsnorm(x, r1, w, 1e-5), ops.fused_add_rmsnorm_ref(x, r2, w, 1e-5), **tol)
        assert torch.equal(r1, r2)
        torch.testing.assert_close(ops.rmsnorm(x, w, 1e-6), ops.rmsnorm_ref(x, w, 1e-6), **tol)

    table = torch.randint(0, 128256, (300, 4096), device=dev, dtype=torch.int32, generator=g)
    slots = torch.randint(0, 300, (200,), device=dev, generator=g)
    positions = torch.randint(0, 4096, (200,), device=dev, generator=g)
    assert torch.equal(ops.gather_tokens(table, slots, positions), ops.gather_tokens_ref(table, slots, positions))

    from scheduler_proc.page_table import gather_kv_indices_torch
    counts = torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(1))
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).to(dev)
    slots = torch.randperm(300, device=dev, generator=g)[:64].to(torch.int32)
    total = int(counts.sum())
    assert torch.equal(ops.gather_kv_indices(table, slots, indptr, total),
                       gather_kv_indices_torch(table, slots, indptr, total))

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 2 * 14336, device=dev, generator=g).to(dtype)
        torch.testing.assert_close(ops.silu_and_mul(x), ops.silu_and_mul_ref(x), atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------ CUDA graphs


def _decode_batch(seqs: dict[int, list[int]], lengths: dict[int, int], page_size: int, device="cuda"):
    """AttentionBatch for one decode token per sequence; seqs: id -> pages, lengths: id -> tokens before."""
    from kernels.base import AttentionBatch
    ids = sorted(seqs)
    kv_indptr, kv_indices, loc, pos, seq_lens = [0], [], [], [], []
    for i in ids:
        n = lengths[i] + 1
        pages = seqs[i][:-(-n // page_size)]
        kv_indices += pages
        kv_indptr.append(len(kv_indices))
        p = lengths[i]
        loc.append(pages[p // page_size] * page_size + p % page_size)
        pos.append(p)
        seq_lens.append(n)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return AttentionBatch(
        qo_indptr=torch.arange(len(ids) + 1, dtype=torch.int32, device=device), kv_indptr=i32(kv_indptr),
        kv_indices=i32(kv_indices), seq_lens=i32(seq_lens), prefix_lens=i32([s - 1 for s in seq_lens]),
        out_cache_loc=torch.tensor(loc, device=device), positions=torch.tensor(pos, device=device),
        q_lens_cpu=[1] * len(ids), seq_lens_cpu=seq_lens, page_size=page_size)


@pytest.mark.parametrize("n,k", [(64, 512), (4096, 14336), (28672, 4096), (128256, 4096)])
def test_triton_gemv_matches_float32(n, k):
    """The batch-1 GEMV against a float32 product: as close as cuBLAS's bf16 result is."""
    import torch.nn.functional as F

    from kernels.triton_gemv import gemv, gemv_pays
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
    ref = x.float() @ w.float().T
    y = gemv(x, w)
    assert y.shape == (1, n) and y.dtype == torch.bfloat16
    err = (y.float() - ref).abs().max().item()
    cublas_err = (F.linear(x, w).float() - ref).abs().max().item()
    assert err <= max(2 * cublas_err, 1e-2), (err, cublas_err)
    assert gemv_pays(w) and not gemv_pays(w.float()) and not gemv_pays(w[:, :500])


def test_triton_argmax_equals_torch():
    from kernels.triton_ops import argmax
    g = torch.Generator(device="cuda").manual_seed(3)
    for rows in (1, 7, 64):
        x = torch.randn(rows, 128256, device="cuda", generator=g)
        x[0, 5] = x[0, 128000] = x[0].max() + 1  # tie: the first index, as torch
        assert torch.equal(argmax(x), x.argmax(dim=-1))
        assert torch.equal(argmax(x[:, :32000]), x[:, :32000].argmax(dim=-1))  # strided rows


@pytest.mark.parametrize("name", ["triton", "flashinfer", "flashinfer-decode", "flashinfer-upto4"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_cuda_graph_replay_matches_eager(name, page_size):
    """Greedy decode of 13 sequences (padded to graph size 16) and of 3 (padded to 4): graph
    replay and eager give the same logits (within bf16 noise) and the same tokens."""
    from kernels.base import AttentionContext, KVCache
    from scheduler_proc.cuda_graph import CudaGraphRunner, graph_batch_sizes
    from tiny_llama import TinyLlama

    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    model = TinyLlama(dtype=torch.bfloat16)
    hq, hk, d = model.hq, model.hk, model.d
    steps, max_len = 4, 200
    pages_per_seq = -(-(max_len + steps) // page_size)
    g = torch.Generator().manual_seed(1)
    for B in (13, 3):
        num_pages = B * pages_per_seq + 1
        caches = []
        for _ in range(2):
            kv = KVCache(len(model.qkv), num_pages, page_size, hk, d, torch.bfloat16, "cuda")
            caches.append(kv)
        for layer in range(len(model.qkv)):
            kv0 = torch.randn(caches[0].k[layer].shape, generator=g).to(torch.bfloat16)
            vv0 = torch.randn(caches[0].v[layer].shape, generator=g).to(torch.bfloat16)
            for kv in caches:
                kv.k[layer].copy_(kv0)
                kv.v[layer].copy_(vv0)
        perm = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
        seqs = {i: perm[i * pages_per_seq:(i + 1) * pages_per_seq] for i in range(B)}
        lengths0 = {i: int(torch.randint(1, max_len, (1,), generator=g)) for i in range(B)}
        tokens0 = torch.randint(0, 512, (B,), generator=g)

        eager_be = make_backend(name, hq, hk, d, dtype=torch.bfloat16)
        graph_be = make_backend(name, hq, hk, d, dtype=torch.bfloat16)
        runner = CudaGraphRunner(model, graph_be, caches[1], max_bs=16, dtype=torch.bfloat16, device="cuda",
                                 max_seq_len=max_len + steps)
        assert runner.sizes == [1, 2, 4, 8, 16]
        results = []
        for mode, kv in (("eager", caches[0]), ("graph", caches[1])):
            lengths, toks = dict(lengths0), tokens0.cuda()
            out_tokens, out_logits = [], []
            for _ in range(steps):
                batch = _decode_batch(seqs, lengths, page_size)
                if mode == "eager":
                    meta = eager_be.prepare(batch)
                    with torch.inference_mode():
                        logits = model.compute_logits(model(toks, batch.positions, AttentionContext(eager_be, meta, kv, batch)))
                else:
                    assert runner.can_run(batch)
                    logits = runner.replay(toks, batch.positions, batch).clone()
                toks = logits.argmax(-1)
                out_tokens.append(toks.cpu())
                out_logits.append(logits.cpu())
                lengths = {i: n + 1 for i, n in lengths.items()}
            results.append((torch.stack(out_tokens), torch.stack(out_logits)))
        (t_e, l_e), (t_g, l_g) = results
        # Logits are O(10) in bf16 (ulp 0.06); graph and eager may pick different GEMM tiles.
        torch.testing.assert_close(l_g, l_e, atol=0.25, rtol=0.02)
        assert torch.equal(t_g, t_e)
        # The graph wrote this step's K/V exactly where eager did.
        for layer in range(len(model.qkv)):
            torch.testing.assert_close(caches[1].k[layer][1:].float(), caches[0].k[layer][1:].float(), atol=3e-2, rtol=3e-2)



def _llama_8b_shape(layers: int, rope: str = "llama3"):
    """The project's Llama-3.1-8B config cut to `layers` layers, seeded dummy bf16 weights
    (rope="default" drops the Llama-3 RoPE scaling)."""
    import json
    import os
    from transformers import AutoConfig
    from scheduler_proc.models.loader import ModelSpec, load_model
    from server.config import ServerConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "llama-3.1-8b.json")) as f:
        d = json.load(f)
    d["num_hidden_layers"] = layers
    if rope == "default":
        d.pop("rope_scaling", None)
        d.pop("rope_parameters", None)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    spec = ModelSpec(hf_config=cfg, weights_dir=None, tokenizer_path="", max_model_len=4096,
                     eos_token_ids=(), vocab_size=cfg.vocab_size)
    return load_model(spec, ServerConfig(load_format="dummy"), "cuda", torch.bfloat16)


@pytest.mark.parametrize("rope", ["llama3", "default"])
def test_llama_model_backends_and_graphs(rope):
    """The real Llama implementation (8B layer shapes, 2 layers): a prefill batch through each
    backend gives matching last-token logits, and 3 greedy decode steps by graph replay match
    eager ones token for token (triton and flashinfer)."""
    from kernels.base import AttentionBatch, AttentionContext, KVCache
    from scheduler_proc.cuda_graph import CudaGraphRunner

    model = _llama_8b_shape(2, rope)
    hq, hk, d, L, ps = 32, 8, 128, 2, 16
    g = torch.Generator().manual_seed(5)
    prompt_lens = [int(x) for x in torch.randint(20, 300, (5,), generator=g)]
    B = len(prompt_lens)
    pages_per = -(-(max(prompt_lens) + 8) // ps)
    seqs = {i: list(range(1 + i * pages_per, 1 + (i + 1) * pages_per)) for i in range(B)}
    ids = torch.randint(0, model.config.vocab_size, (sum(prompt_lens),), generator=g).cuda()
    loc, pos, kv_indices, kv_indptr, qo = [], [], [], [0], [0]
    for i, n in enumerate(prompt_lens):
        pages = seqs[i][:-(-n // ps)]
        kv_indices += pages
        kv_indptr.append(len(kv_indices))
        qo.append(qo[-1] + n)
        loc += [pages[p // ps] * ps + p % ps for p in range(n)]
        pos += list(range(n))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    prefill = AttentionBatch(qo_indptr=i32(qo), kv_indptr=i32(kv_indptr), kv_indices=i32(kv_indices),
                             seq_lens=i32(prompt_lens), prefix_lens=i32([0] * B),
                             out_cache_loc=torch.tensor(loc, device="cuda"), positions=torch.tensor(pos, device="cuda"),
                             q_lens_cpu=prompt_lens, seq_lens_cpu=prompt_lens, page_size=ps)
    last_rows = torch.tensor(qo[1:], device="cuda") - 1
    first_logits = {}
    for name in BACKENDS:
        if name.startswith("flashinfer") and not HAVE_FLASHINFER:
            continue
        be = make_backend(name, hq, hk, d, dtype=torch.bfloat16)
        kv = KVCache(L, B * pages_per + 1, ps, hk, d, torch.bfloat16, "cuda")
        with torch.inference_mode():
            hidden = model(ids, prefill.positions, AttentionContext(be, be.prepare(prefill), kv, prefill))
            first_logits[name] = model.compute_logits(hidden[last_rows]).cpu()
        if name == "torch":
            continue
        gbe = make_backend(name, hq, hk, d, dtype=torch.bfloat16)
        kv_graph = KVCache(L, kv.num_pages, ps, hk, d, torch.bfloat16, "cuda")
        for layer in range(L):
            kv_graph.k[layer].copy_(kv.k[layer])
            kv_graph.v[layer].copy_(kv.v[layer])
        runner = CudaGraphRunner(model, gbe, kv_graph, max_bs=8, dtype=torch.bfloat16, device="cuda",
                                 max_seq_len=pages_per * ps)
        toks = {}
        for mode in ("eager", "graph"):
            cache = kv if mode == "eager" else kv_graph
            lengths = dict(enumerate(prompt_lens))
            t = first_logits[name].argmax(-1).cuda()
            out = []
            for _ in range(3):
                batch = _decode_batch(seqs, lengths, ps)
                if mode == "eager":
                    with torch.inference_mode():
                        logits = model.compute_logits(model(t, batch.positions,
                                                            AttentionContext(be, be.prepare(batch), cache, batch)))
                else:
                    logits = runner.replay(t, batch.positions, batch)
                t = logits.argmax(-1)
                out.append(t.cpu())
                lengths = {i: n + 1 for i, n in lengths.items()}
            toks[mode] = torch.stack(out)
        assert torch.equal(toks["graph"], toks["eager"]), name
    names = list(first_logits)
    scale = first_logits[names[0]].abs().max().item()
    for a in names[1:]:
        torch.testing.assert_close(first_logits[a], first_logits[names[0]], atol=0.05 * scale, rtol=0.05)
        assert torch.equal(first_logits[a].argmax(-1), first_logits[names[0]].argmax(-1)), a


def _one_prompt_prefill(n: int, ps: int):
    """One n-token prompt on pages 1, 2, ... with room for 8 more tokens: (the sequence's pages,
    the prefill batch of the prompt)."""
    from kernels.base import AttentionBatch

    pages = list(range(1, 2 + (n + 8) // ps))
    prompt_pages = pages[:-(-n // ps)]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    prefill = AttentionBatch(qo_indptr=i32([0, n]), kv_indptr=i32([0, len(prompt_pages)]),
                             kv_indices=i32(prompt_pages), seq_lens=i32([n]), prefix_lens=i32([0]),
                             out_cache_loc=torch.tensor([prompt_pages[p // ps] * ps + p % ps for p in range(n)],
                                                        device="cuda"),
                             positions=torch.arange(n, device="cuda"), q_lens_cpu=[n], seq_lens_cpu=[n], page_size=ps)
    return pages, prefill


def test_llama_batch1_gemv_path_matches_cublas():
    """Batch-1 decode on the 8B layer shapes through the Triton GEMVs against the same weights on
    cuBLAS: teacher-forced over 4 steps, logits agree within bf16 noise and the pools hold the
    same K/V (both write them with the fused RoPE + store kernel)."""
    from kernels.base import AttentionContext, KVCache
    from scheduler_proc.models.layers import enable_gemv

    model = _llama_8b_shape(2, "default")
    hq, hk, d, L, ps, n = 32, 8, 128, 2, 16, 100
    g = torch.Generator().manual_seed(9)
    pages, prefill = _one_prompt_prefill(n, ps)
    ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).cuda()
    forced = torch.randint(0, model.config.vocab_size, (4,), generator=g).cuda()
    runs = {}
    for gemv in (False, True):
        if gemv:
            assert enable_gemv(model) == 4 * L + 1  # qkv, o, gate_up, down per layer + lm_head
        be = make_backend("triton", hq, hk, d, dtype=torch.bfloat16)
        kv = KVCache(L, len(pages) + 1, ps, hk, d, torch.bfloat16, "cuda")
        logits = []
        with torch.inference_mode():
            model(ids, prefill.positions, AttentionContext(be, be.prepare(prefill), kv, prefill))
            for step in range(4):
                batch = _decode_batch({0: pages}, {0: n + step}, ps)
                ctx = AttentionContext(be, be.prepare(batch), kv, batch)
                logits.append(model.compute_logits(model(forced[step:step + 1], batch.positions, ctx)))
        runs[gemv] = (torch.cat(logits).float().cpu(), kv)
    scale = runs[False][0].abs().max().item()
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=0.03 * scale, rtol=0.03)
    for layer in range(L):
        torch.testing.assert_close(runs[True][1].k[layer], runs[False][1].k[layer], atol=0.05, rtol=0.05)
        torch.testing.assert_close(runs[True][1].v[layer], runs[False][1].v[layer], atol=0.05, rtol=0.05)


# ------------------------------------------------------------------- programmatic dependent launch

def _needs_pdl():
    from kernels.pdl import pdl_supported
    if not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")


def test_pdl_kernel_chain_equals_plain_launches():
    """The batch-1 layer's kernels launched back to back with PDL, eagerly and in a CUDA graph,
    write exactly what plain launches write: each waits for its producer (a chain of dependent
    kernels whose outputs are reused memory is where a missing wait would show)."""
    _needs_pdl()
    from kernels import triton_ops as ops
    from kernels.triton_attention import decode_attention
    from kernels.triton_gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(11)
    bf = torch.bfloat16
    h, inter, hq, hk, d, ps, ctx = 4096, 14336, 32, 8, 128, 16, 300
    w = lambda n, k: (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(bf)  # noqa: E731
    w_qkv, w_o, w_gu, w_down = w((hq + 2 * hk) * d, h), w(h, hq * d), w(2 * inter, h), w(h, inter)
    gain = (1 + 0.1 * torch.randn(h, device="cuda", generator=g)).to(bf)
    cache = ops.rope_cos_sin_cache(4096, d, 500000.0, device="cuda")
    pages = -(-(ctx + 1) // ps)
    kv_indices = torch.arange(1, pages + 1, dtype=torch.int32, device="cuda")
    kv_indptr = torch.tensor([0, pages], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([ctx + 1], dtype=torch.int32, device="cuda")
    positions = torch.tensor([ctx], device="cuda")
    loc = positions + ps  # page 1 holds positions 0..15
    x0 = torch.randn(1, h, device="cuda", generator=g).to(bf)
    res0 = torch.randn(1, h, device="cuda", generator=g).to(bf)
    kc0 = torch.randn((pages + 1) * ps, hk, d, device="cuda", generator=g).to(bf)
    vc0 = torch.randn_like(kc0)

    def layer(x, res, kc, vc, pdl):
        hid = ops.fused_add_rmsnorm(x, res, gain, 1e-5, pdl)
        qkv = gemv(hid, w_qkv, pdl)
        q, k, v = qkv.view(1, -1).split([hq * d, hk * d, hk * d], dim=-1)
        q = q.view(1, hq, d)
        ops.rotary_embedding_and_store_kv(positions, q, k.view(1, hk, d), v.view(1, hk, d), cache, kc, vc,
                                          loc, pdl)
        attn = decode_attention(q, kc, vc, kv_indptr, kv_indices, seq_lens, ps, d ** -0.5, 64, pdl=pdl)
        hid = ops.fused_add_rmsnorm(gemv(attn.view(1, -1), w_o, pdl), res, gain, 1e-5, pdl)
        return gemv(ops.silu_and_mul(gemv(hid, w_gu, pdl), pdl), w_down, pdl)

    def run(pdl, graph):
        res, kc, vc = res0.clone(), kc0.clone(), vc0.clone()
        if not graph:
            return layer(x0, res, kc, vc, pdl), res, kc
        layer(x0, res.clone(), kc.clone(), vc.clone(), pdl)  # compile and autotune outside the capture
        torch.cuda.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            out = layer(x0, res, kc, vc, pdl)
        res.copy_(res0)
        kc.copy_(kc0)
        vc.copy_(vc0)
        cuda_graph.replay()
        return out, res, kc

    plain = run(False, False)
    for graph in (False, True):
        got = run(True, graph)
        for a, b in zip(got, plain):
            assert torch.equal(a, b), graph


def test_llama_batch1_pdl_graph_equals_plain():
    """Batch-1 greedy decode on the 8B layer shapes (GEMV path, CUDA graphs): with programmatic
    dependent launch the logits are bit-identical to plain launches."""
    _needs_pdl()
    from kernels.base import AttentionContext, KVCache
    from scheduler_proc.cuda_graph import CudaGraphRunner
    from scheduler_proc.models.layers import enable_gemv, enable_pdl

    model = _llama_8b_shape(2, "llama3")
    assert enable_gemv(model) == 9
    hq, hk, d, L, ps, n = 32, 8, 128, 2, 16, 100
    g = torch.Generator().manual_seed(13)
    pages, prefill = _one_prompt_prefill(n, ps)
    ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).cuda()
    runs = {}
    for pdl in (False, True):
        if pdl:
            # 2 x (2 norms, qkv, o, gate_up, down, act) + final norm + lm_head + rotary
            assert enable_pdl(model) == 2 * 7 + 3
        be = make_backend("triton", hq, hk, d, dtype=torch.bfloat16, pdl=pdl)
        kv = KVCache(L, len(pages) + 1, ps, hk, d, torch.bfloat16, "cuda")
        with torch.inference_mode():
            hidden = model(ids, prefill.positions, AttentionContext(be, be.prepare(prefill), kv, prefill))
            t = model.compute_logits(hidden[-1:]).argmax(-1)
        runner = CudaGraphRunner(model, be, kv, max_bs=1, dtype=torch.bfloat16, device="cuda",
                                 max_seq_len=len(pages) * ps)
        logits = []
        for step in range(6):
            batch = _decode_batch({0: pages}, {0: n + step}, ps)
            out = runner.replay(t, batch.positions, batch).clone()
            logits.append(out)
            t = out.argmax(-1)
        runs[pdl] = torch.cat(logits).cpu()
    assert torch.equal(runs[True], runs[False])
