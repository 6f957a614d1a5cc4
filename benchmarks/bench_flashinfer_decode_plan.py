"""FlashInfer's tensor-core decode for one large batch under different plans and KV layouts.

    python benchmarks/bench_flashinfer_decode_plan.py [--batch 408] [--context 1546] [--pool 900000]

One layer of the Llama-3.1-8B shape (32 q / 8 kv heads, dim 128, bf16) as the engine's CUDA graphs
run it (`use_cuda_graph=True` wrapper, timed as a CUDA graph of four calls by
`bench_gemm_gpu.time_ms`): page size 1 and 16, the sequences' pages contiguous or scattered over a
pool the size of the real one, and the plan FlashInfer picks
(in CUDA-graph mode always its split-KV path: float32 partial outputs and a merge kernel) against
`disable_split_kv=True` and `fixed_split_size`. Prints ms per call and K/V read bandwidth (an H200
copies at 4.28 TB/s, shared/gpu/README.md).
"""

from __future__ import annotations

import argparse

import torch

from bench_gemm_gpu import time_ms

HQ, HKV, D = 32, 8, 128


def bench(args, ws, q, page: int, layout: str, scatter: bool, plan: str) -> None:
    import flashinfer

    B, ctx = args.batch, args.context
    npages = args.pool // page
    shape = (npages, page, HKV, D) if layout == "NHD" else (npages, HKV, page, D)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    per = -(-ctx // page)
    pages = (torch.randperm(npages - 1, device="cuda")[: B * per] + 1 if scatter
             else torch.arange(1, B * per + 1, device="cuda")).int()
    indptr = torch.arange(0, (B + 1) * per, per, dtype=torch.int32, device="cuda")[: B + 1]
    last = torch.full((B,), (ctx - 1) % page + 1, dtype=torch.int32, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, layout, use_cuda_graph=True, use_tensor_cores=True,
                                                      paged_kv_indptr_buffer=indptr.clone(),
                                                      paged_kv_indices_buffer=pages.clone(),
                                                      paged_kv_last_page_len_buffer=last.clone())
    extra = {}
    if plan == "nosplit":
        extra["disable_split_kv"] = True
    elif plan.startswith("fixed"):
        extra["fixed_split_size"] = int(plan[len("fixed"):])  # in pages
    label = f"page {page:2} {layout} {'scattered ' if scatter else 'contiguous'} {plan:9}"
    try:
        w.plan(indptr.cpu(), pages, last.cpu(), HQ, HKV, D, page, q_data_type=torch.bfloat16,
               kv_data_type=torch.bfloat16, **extra)
    except RuntimeError as e:  # e.g. a fixed split with more chunks than the graph's padded batch
        print(f"{label} plan failed: {str(e).splitlines()[0][:120]}")
        return
    out = torch.empty_like(q)
    ms = time_ms(lambda _: w.run(q, (k, v), out=out), calls=4)
    kv_bytes = B * ctx * HKV * D * 2 * 2
    print(f"{label} {ms:.4f} ms {kv_bytes / ms / 1e9:.2f} TB/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=408)
    ap.add_argument("--context", type=int, default=1546)
    ap.add_argument("--pool", type=int, default=900_000, help="KV tokens of the one layer's pool")
    args = ap.parse_args()
    torch.manual_seed(0)
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    q = torch.randn(args.batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    print(torch.cuda.get_device_name(), f"batch {args.batch} x context {args.context}")
    for page in (1, 16):
        for scatter in (False, True):
            for plan in ("default", "nosplit", "fixed512", "fixed256"):
                bench(args, ws, q, page, "NHD", scatter, plan)
                torch.cuda.empty_cache()
    for plan in ("default", "nosplit"):
        bench(args, ws, q, 16, "HND", True, plan)


if __name__ == "__main__":
    main()
