"""GPU kernel micro-benchmarks: attention backends, fused Triton ops vs torch, CUDA graph gain.

    python benchmarks/bench_kernels.py [--json out.json] [--quick] [--decode-shapes 384x1536 ...]

Attention runs one layer of the Llama-3.1-8B shape (32 q heads, 8 kv heads, head dim 128, bf16)
over the paged pool; decode reports achieved KV bandwidth (bytes of K and V read / time),
prefill reports attention TFLOP/s (causal work only). Times are medians of CUDA-event-timed
repetitions after warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import create_attention_backend  # noqa: E402
from kernels import triton_ops as ops  # noqa: E402
from paged_attention_ref import make_paged_case  # noqa: E402


def time_ms(fn, iters: int = 20, reps: int = 5) -> float:
    """ms per call: `iters` back-to-back calls between two CUDA events, median of `reps`.

    Back-to-back calls keep the GPU queue full whenever a call's GPU work outlasts its launch,
    so large kernels are timed at their GPU cost; tiny ones show their launch cost."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / iters)
    times.sort()
    return times[len(times) // 2]


def graph_time_us(fn, calls: int = 20, reps: int = 10) -> float:
    """GPU us per call with launch overhead removed: `calls` calls captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    times.sort()
    return times[len(times) // 2]


def attention_rows(backends: list[str], quick: bool, decode_shapes: list[tuple[int, int]]) -> list[dict]:
    hq, hk, d, dt = 32, 8, 128, torch.bfloat16
    kv_bytes_per_token = 2 * hk * d * 2
    cases = [("decode", 16, [1] * 1, [4096]), ("decode", 16, [1] * 64, [2048] * 64),
             ("decode", 16, [1] * 128, [4096] * 128), ("decode", 1, [1] * 64, [2048] * 64),
             ("prefill", 16, [4096], [0]), ("prefill", 16, [1024] * 4, [1024] * 4),
             ("mixed", 16, [1] * 63 + [1024], [2048] * 63 + [1024])]
    if quick:
        cases = cases[:2] + cases[4:5]
    if decode_shapes:
        cases = [("decode", ps, [1] * B, [ctx] * B) for B, ctx in decode_shapes for ps in (1, 16)]
    rows = []
    for kind, ps, q_lens, prefix in cases:
        case = make_paged_case(q_lens, prefix, num_q_heads=hq, num_kv_heads=hk, head_dim=d, page_size=ps,
                               dtype=dt, device="cuda", spare_pages=1)
        seq = case.batch.seq_lens_cpu
        kv_bytes = sum(seq) * kv_bytes_per_token
        # causal attention FLOPs: 4*d per (query, key) pair per q head
        pairs = sum(sum(s - q + j + 1 for j in range(q)) for q, s in zip(q_lens, seq))
        flops = 4 * d * hq * pairs
        for name in backends:
            be = create_attention_backend(name, hq, hk, d, device="cuda", **({} if name == "torch" else {"dtype": dt}))
            meta = be.prepare(case.batch)
            t0 = time.perf_counter()
            for _ in range(10):
                be.prepare(case.batch)
            prep_ms = (time.perf_counter() - t0) * 100
            fwd = lambda: be.forward(case.q, case.k, case.v, 0, case.kv_cache, meta)  # noqa: E731
            ms = time_ms(fwd, iters=5 if name == "torch" else 20)
            # GPU time without launch overhead (how decode runs inside a CUDA graph)
            gms = graph_time_us(fwd, calls=5, reps=5) / 1e3 if be.supports_cuda_graph else None
            best = min(ms, gms) if gms else ms
            rows.append(dict(kind=kind, page_size=ps, batch=len(q_lens), new_tokens=sum(q_lens),
                             kv_tokens=sum(seq), backend=name, ms=round(ms, 4),
                             graph_ms=round(gms, 4) if gms else None, prepare_ms=round(prep_ms, 3),
                             kv_GBps=round(kv_bytes / best / 1e6, 1), TFLOPs=round(flops / best / 1e9, 1)))
            print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def triton_decode_sweep() -> list[dict]:
    """Tuning of the Triton split-KV decode kernel on the Llama-3.1-8B layer shape."""
    from kernels.triton_attention import decode_attention
    rows = []
    for B, ctx in ((1, 4096), (64, 2048), (128, 4096)):
        case = make_paged_case([1] * B, [ctx] * B, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                               dtype=torch.bfloat16, device="cuda", spare_pages=1)
        kf, vf = case.kv_cache.flat(0)
        b = case.batch
        base = max(1, min(16, -(-2 * torch.cuda.get_device_properties(0).multi_processor_count // (B * 8))))
        kv_bytes = sum(b.seq_lens_cpu) * 2 * 8 * 128 * 2
        best = None
        for splits in sorted({base, min(64, base * 2), min(64, base * 4)}):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3):
                        try:
                            ms = time_ms(lambda: decode_attention(case.q, kf, vf, b.kv_indptr, b.kv_indices, b.seq_lens,
                                                                  16, 128 ** -0.5, splits, block_n=block_n,
                                                                  num_warps=warps, num_stages=stages), iters=10, reps=3)
                        except Exception as e:  # out of shared memory etc.
                            print("skip", splits, block_n, warps, stages, type(e).__name__, flush=True)
                            continue
                        r = dict(batch=B, ctx=ctx, splits=splits, block_n=block_n, warps=warps, stages=stages,
                                 ms=round(ms, 4), kv_GBps=round(kv_bytes / ms / 1e6, 1))
                        rows.append(r)
                        if best is None or ms < best["ms"]:
                            best = r
        print("best", best, flush=True)
        torch.cuda.empty_cache()
    return rows


def flashinfer_decode_variants(decode_shapes: list[tuple[int, int]]) -> list[dict]:
    """FlashInfer decode run() alone: tensor-core vs CUDA-core kernels."""
    import flashinfer
    rows = []
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    cases = [(B, ctx, ps) for B, ctx in decode_shapes for ps in (1, 16)] if decode_shapes else \
        [(1, 4096, 16), (64, 2048, 16), (128, 4096, 16)]
    for B, ctx, ps in cases:
        case = make_paged_case([1] * B, [ctx] * B, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=ps,
                               dtype=torch.bfloat16, device="cuda", spare_pages=1)
        b = case.batch
        kv_bytes = sum(b.seq_lens_cpu) * 2 * 8 * 128 * 2
        last = torch.tensor([(s - 1) % ps + 1 for s in b.seq_lens_cpu], dtype=torch.int32)
        for tc in (True, False):
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            w.plan(b.kv_indptr.cpu(), b.kv_indices, last, 32, 8, 128, ps, q_data_type=torch.bfloat16,
                   kv_data_type=torch.bfloat16)
            kvc = (case.kv_cache.k[0], case.kv_cache.v[0])
            ms = time_ms(lambda: w.run(case.q, kvc))
            us = graph_time_us(lambda: w.run(case.q, kvc), calls=10, reps=5)
            rows.append(dict(batch=B, ctx=ctx, page_size=ps, tensor_cores=tc, eager_ms=round(ms, 4),
                             graph_us=round(us, 1), kv_GBps=round(kv_bytes / us / 1e3, 1)))
            print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def op_rows() -> list[dict]:
    dev, dt = "cuda", torch.bfloat16
    rows = []

    def add(op, shape, fast, ref):
        # In-graph GPU time (how decode runs them) and eager wall time per call (launch included).
        tf, tr = graph_time_us(fast), graph_time_us(ref)
        ef, er = time_ms(fast, 50) * 1e3, time_ms(ref, 50) * 1e3
        rows.append(dict(op=op, shape=shape, triton_graph_us=round(tf, 2), torch_graph_us=round(tr, 2),
                         speedup=round(tr / tf, 2), triton_eager_us=round(ef, 1), torch_eager_us=round(er, 1)))
        print(rows[-1], flush=True)

    kc = torch.zeros(200_000, 8, 128, dtype=dt, device=dev)
    vc = torch.zeros_like(kc)
    for T in (64, 8192):
        loc = torch.randperm(200_000, device=dev)[:T]
        k, v = torch.randn(T, 8, 128, device=dev, dtype=dt), torch.randn(T, 8, 128, device=dev, dtype=dt)
        add("store_kv", f"T={T} 8x128", lambda: ops.store_kv(kc, vc, loc, k, v),
            lambda: ops.store_kv_ref(kc, vc, loc, k, v))
    cache = ops.rope_cos_sin_cache(131072, 128, 500000.0, device=dev)
    for T in (64, 8192):
        qkv = torch.randn(T, 48 * 128, device=dev, dtype=dt)
        q, k = qkv[:, :4096].view(T, 32, 128), qkv[:, 4096:5120].view(T, 8, 128)
        pos = torch.randint(0, 131072, (T,), device=dev)
        add("rope", f"T={T} 32/8x128", lambda: ops.rotary_embedding(pos, q, k, cache),
            lambda: ops.rotary_embedding_ref(pos, q, k, cache))
    for T in (64, 8192):
        x = torch.randn(T, 4096, device=dev, dtype=dt)
        r = torch.randn(T, 4096, device=dev, dtype=dt)
        w = torch.ones(4096, device=dev, dtype=dt)
        add("add_rmsnorm", f"T={T} 4096", lambda: ops.fused_add_rmsnorm(x, r, w, 1e-5),
            lambda: ops.fused_add_rmsnorm_ref(x, r, w, 1e-5))
    table = torch.randint(0, 128256, (1024, 8192), device=dev, dtype=torch.int32)
    slots = torch.randperm(1024, device=dev)[:256]
    pos = torch.randint(0, 8192, (256,), device=dev)
    out = torch.empty(256, dtype=torch.int32, device=dev)
    add("gather_tokens", "B=256", lambda: ops.gather_tokens(table, slots, pos, out),
        lambda: out.copy_(ops.gather_tokens_ref(table, slots, pos)))
    return rows


def graph_rows(backends: list[str]) -> list[dict]:
    """Decode step wall time (CPU launch included) of a 16-layer model, eager vs graph replay."""
    from kernels.base import AttentionContext, KVCache
    from scheduler_proc.cuda_graph import CudaGraphRunner
    from test_gpu_kernels import _decode_batch
    from tiny_llama import TinyLlama

    model = TinyLlama(vocab=32000, hidden=1024, layers=16, num_q_heads=16, num_kv_heads=4, head_dim=64,
                      inter=2816, dtype=torch.bfloat16)
    rows = []
    ps, ctx = 16, 1024
    for name in backends:
        for B in (1, 32):
            pages_per = ctx // ps + 1
            kv = KVCache(16, B * pages_per + 1, ps, 4, 64, torch.bfloat16, "cuda")
            seqs = {i: list(range(1 + i * pages_per, 1 + (i + 1) * pages_per)) for i in range(B)}
            batch = _decode_batch(seqs, {i: ctx - 1 for i in range(B)}, ps)
            toks = torch.zeros(B, dtype=torch.int64, device="cuda")
            be = create_attention_backend(name, 16, 4, 64, device="cuda", dtype=torch.bfloat16)

            @torch.inference_mode()
            def eager():
                meta = be.prepare(batch)
                return model.compute_logits(model(toks, batch.positions, AttentionContext(be, meta, kv, batch)))

            gbe = create_attention_backend(name, 16, 4, 64, device="cuda", dtype=torch.bfloat16)
            runner = CudaGraphRunner(model, gbe, kv, max_bs=32, dtype=torch.bfloat16, device="cuda", max_seq_len=ctx + 16)

            def graph():
                return runner.replay(toks, batch.positions, batch)

            res = {}
            for mode, fn in (("eager", eager), ("graph", graph)):
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                n = 50
                for _ in range(n):
                    fn()
                torch.cuda.synchronize()
                res[mode] = (time.perf_counter() - t0) / n * 1e3
            rows.append(dict(backend=name, batch=B, ctx=ctx, eager_ms=round(res["eager"], 3),
                             graph_ms=round(res["graph"], 3), speedup=round(res["eager"] / res["graph"], 2)))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of: attention,sweep,fi,ops,graph")
    ap.add_argument("--decode-shapes", nargs="*", default=[], metavar="BxCTX",
                    help="attention and FlashInfer decode only at these batch x context shapes, page sizes 1 and 16")
    args = ap.parse_args()
    decode_shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.decode_shapes]
    skip = set(filter(None, args.skip.split(",")))
    backends = ["torch", "triton"] + (["flashinfer"] if importlib.util.find_spec("flashinfer") else [])
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if "flashinfer" in backends:
        info["flashinfer"] = __import__("flashinfer").__version__
    print(info, flush=True)
    result = dict(info=info)
    if "attention" not in skip:
        result["attention"] = attention_rows(backends, args.quick, decode_shapes)
    if "sweep" not in skip:
        result["triton_decode_sweep"] = triton_decode_sweep()
    if "fi" not in skip and "flashinfer" in backends:
        result["flashinfer_decode"] = flashinfer_decode_variants(decode_shapes)
    if "ops" not in skip:
        result["ops"] = op_rows()
    if "graph" not in skip:
        result["graph"] = graph_rows([b for b in backends if b != "torch"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
