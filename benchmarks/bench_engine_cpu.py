"""CPU decode throughput of the in-process Engine vs Hugging Face `generate`, same run, same weights.

    .venv/bin/python benchmarks/bench_engine_cpu.py [--batches 1 8 32] [--new-tokens 64]

For each dtype and batch size: N distinct short chat prompts, N x new-tokens generated (EOS
ignored), wall time from submission to the last token. Prints one table (tokens/s).
"""

from __future__ import annotations

import argparse
import time

import torch

from scheduler_proc.engine import Engine
from scheduler_proc.models.embedded import ensure_embedded_model
from server.bench.tokenizer import chat_token_ids
from server.config import ServerConfig
from server.ipc import SamplingParams

TOPICS = ["the sea", "a mountain", "coffee", "the moon", "trains", "a library", "winter", "music"]


def prompts(tok, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msg = f"Tell me a story about {TOPICS[i % len(TOPICS)]} number {i}."
        out.append(chat_token_ids(tok, [{"role": "user", "content": msg}], add_generation_prompt=True))
    return out


def bench_skiff(dtype: str, batches: list[int], new_tokens: int) -> dict[int, float]:
    eng = Engine(ServerConfig(dtype=dtype, device="cpu", disable_radix_cache=True))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    eng.generate(prompts(eng.tokenizer, 2), SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    results = {}
    for n in batches:
        ps = prompts(eng.tokenizer, n)
        t0 = time.perf_counter()
        outs = eng.generate(ps, params)
        dt = time.perf_counter() - t0
        results[n] = sum(len(o.output_ids) for o in outs) / dt
    return results


def bench_hf(dtype: str, batches: list[int], new_tokens: int) -> dict[int, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_embedded_model()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    results = {}
    with torch.inference_mode():
        for n in batches:
            ps = prompts(tok, n)
            width = max(map(len, ps))
            ids = torch.tensor([[tok.pad_token_id or 2] * (width - len(p)) + p for p in ps])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
            model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False)
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
            dt = time.perf_counter() - t0
            results[n] = (out.shape[1] - width) * n / dt
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    rows = []
    for dtype in ("bfloat16", "float32"):
        rows.append((f"skiff {dtype}", bench_skiff(dtype, args.batches, args.new_tokens)))
        if not args.skip_hf:
            rows.append((f"HF generate {dtype}", bench_hf(dtype, args.batches, args.new_tokens)))
    print(f"\nCPU decode throughput, tokens/s ({torch.get_num_threads()} threads, "
          f"{args.new_tokens} new tokens per sequence)")
    print(f"{'':22}" + "".join(f"{'batch ' + str(n):>12}" for n in args.batches))
    for name, res in rows:
        print(f"{name:22}" + "".join(f"{res[n]:12.1f}" for n in args.batches))


if __name__ == "__main__":
    main()
