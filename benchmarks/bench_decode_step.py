"""Time one decode step of the model (prepare + forward + logits) at several batch sizes and dtypes.

    .venv/bin/python benchmarks/bench_decode_step.py [--model configs/smollm2-135m.json --load-format dummy]
        [--dtypes float32 bfloat16] [--batches 1 8 32] [--context 128] [--iters 30] [--threads N]
        [--device cuda --backend flashinfer]

Every sequence of the batch has `--context` tokens of KV already in the pool (random pages) and
decodes one more. Prints min and median milliseconds per step; the min is the figure to compare on a
shared machine (other load only ever adds time).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from kernels import create_attention_backend
from kernels.base import AttentionBatch, AttentionContext, KVCache
from scheduler_proc.models.llama import head_dim_of
from scheduler_proc.models.loader import load_model, load_model_config, resolve_dtype
from server.config import ServerConfig


def decode_batch(batch_size: int, context: int, num_pages: int, rng: random.Random,
                 device: torch.device) -> AttentionBatch:
    pages = rng.sample(range(1, num_pages), batch_size * (context + 1))
    kv_indices = pages
    seq_len = context + 1
    kv_indptr = [i * seq_len for i in range(batch_size + 1)]
    out_loc = [pages[b * seq_len + context] for b in range(batch_size)]  # page size 1
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return AttentionBatch(
        qo_indptr=i32(list(range(batch_size + 1))), kv_indptr=i32(kv_indptr), kv_indices=i32(kv_indices),
        seq_lens=i32([seq_len] * batch_size), prefix_lens=i32([context] * batch_size),
        out_cache_loc=torch.tensor(out_loc, dtype=torch.int64, device=device),
        positions=torch.full((batch_size,), context, dtype=torch.int64, device=device),
        q_lens_cpu=[1] * batch_size, seq_lens_cpu=[seq_len] * batch_size, page_size=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--tokenizer", default=None,
                    help="unused by the timing; any value skips fetching the embedded tokenizer for dummy configs")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch", help="attention backend: auto, torch, triton, flashinfer")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServerConfig(model=args.model, tokenizer=args.tokenizer, load_format=args.load_format,
                          device=args.device)
    spec = load_model_config(config)
    hf = spec.hf_config
    device = torch.device(args.device)
    print(f"threads={torch.get_num_threads()} context={args.context} device={device} backend={args.backend}")
    print(f"{'dtype':>9} {'batch':>5} {'min ms':>8} {'median ms':>9}")
    for dtype_name in args.dtypes:
        dtype = resolve_dtype(dtype_name, device)
        model = load_model(spec, config, device, dtype)
        hq, hkv, d = hf.num_attention_heads, hf.num_key_value_heads, head_dim_of(hf)
        backend = create_attention_backend(args.backend, hq, hkv, d, device=device)
        for bs in args.batches:
            num_pages = bs * (args.context + 1) + 1
            kv = KVCache(hf.num_hidden_layers, num_pages, 1, hkv, d, dtype, device)
            batch = decode_batch(bs, args.context, num_pages, random.Random(bs), device)
            ids = torch.randint(0, spec.vocab_size, (bs,), device=device)
            times = []
            with torch.inference_mode():
                for _ in range(args.iters + 3):
                    t0 = time.perf_counter()
                    meta = backend.prepare(batch)
                    hidden = model(ids, batch.positions, AttentionContext(backend, meta, kv, batch))
                    logits = model.compute_logits(hidden)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    assert logits.shape == (bs, spec.vocab_size)
            times = times[3:]
            print(f"{dtype_name:>9} {bs:>5} {min(times) * 1e3:8.1f} {statistics.median(times) * 1e3:9.1f}",
                  flush=True)
        del model


if __name__ == "__main__":
    main()
