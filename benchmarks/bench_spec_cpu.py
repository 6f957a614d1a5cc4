"""Speculative decoding on CPU: output tokens/s with and without n-gram drafting, batch 1, greedy.

    .venv/bin/python benchmarks/bench_spec_cpu.py [--dtype float32] [--new-tokens 128] [--threads 2]

Two workloads on the embedded SmolLM2-135M-Instruct: copy-heavy (rewrite a paragraph changing
only the names, apply a small code edit) and free chat (open questions). Each prompt runs alone
(batch 1) on a plain engine and on an `--speculative-algorithm ngram` engine, prefix cache off so
every run computes its prompt; time is submission to the last token (prefill included, same in
both). Checks that the greedy outputs are token-identical and prints tokens/s, the speed-up and
the acceptance (accepted / drafted tokens; mean tokens per verify-extend).
"""

from __future__ import annotations

import argparse
import time

import torch

from scheduler_proc.engine import Engine
from server.bench.tokenizer import chat_token_ids
from server.config import ServerConfig
from server.ipc import SamplingParams

_BIO = ("Maria Lopez grew up in a small fishing town on the northern coast. Every morning Maria walked to the "
        "harbour with her brother Tomas to watch the boats come in. When she was sixteen, Maria won a "
        "scholarship to study marine biology, and Tomas took over the family boat. Years later Maria "
        "returned as a professor and wrote a book about the town, which Tomas still reads to his children.")
_CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def format_receipt(items, tax_rate):
    lines = []
    for item in items:
        lines.append(f"{item.name}: {item.price * item.quantity:.2f}")
    lines.append(f"total: {total_price(items, tax_rate):.2f}")
    return "\\n".join(lines)
'''
WORKLOADS = {
    "copy-heavy": [
        "Rewrite this paragraph, changing only the names: Maria becomes Anna and Tomas becomes Peter. "
        "Keep every other word the same.\n\n" + _BIO,
        "Rename the variable `subtotal` to `net` in this code and output the whole code:\n\n" + _CODE,
        "Repeat the following text exactly:\n\n" + _BIO,
    ],
    "free chat": [
        "What are some good ways to stay focused while studying?",
        "Explain why the sky is blue to a ten-year-old.",
        "Write a short poem about autumn leaves.",
    ],
}


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams):
    outputs, seconds = [], 0.0
    for ids in prompts:  # batch 1
        t0 = time.perf_counter()
        (out,) = engine.generate([ids], params)
        seconds += time.perf_counter() - t0
        outputs.append(out.output_ids)
    return outputs, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    args = ap.parse_args()
    base = ServerConfig(dtype=args.dtype, device="cpu", disable_radix_cache=True, num_threads=args.threads)
    plain = Engine(base)
    spec = Engine(base.replace(speculative_algorithm="ngram", speculative_num_draft_tokens=args.num_draft_tokens))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    tok = plain.tokenizer
    warm = chat_token_ids(tok, [{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    for e in (plain, spec):
        e.generate([warm], SamplingParams(max_new_tokens=8, temperature=0.0))
    print(f"dtype {args.dtype}, torch threads {torch.get_num_threads()}, batch 1, greedy, "
          f"max {args.new_tokens} new tokens, k = {args.num_draft_tokens}")
    print(f"{'workload':<12} {'tokens':>6} {'plain tok/s':>11} {'ngram tok/s':>11} {'speed-up':>8} "
          f"{'accepted':>9} {'tok/verify':>10} identical")
    for name, texts in WORKLOADS.items():
        prompts = [chat_token_ids(tok, [{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
        ref, t_plain = run(plain, prompts, params)
        d0, a0, v0 = spec.spec_draft_tokens, spec.spec_accepted_tokens, spec.spec_verifications
        got, t_spec = run(spec, prompts, params)
        drafted, accepted = spec.spec_draft_tokens - d0, spec.spec_accepted_tokens - a0
        verifies = spec.spec_verifications - v0
        n = sum(map(len, ref))
        rate = accepted / drafted if drafted else 0.0
        per_verify = (accepted + verifies) / verifies if verifies else 0.0
        print(f"{name:<12} {n:>6} {n / t_plain:>11.1f} {sum(map(len, got)) / t_spec:>11.1f} "
              f"{t_plain / t_spec:>7.2f}x {rate:>8.0%} {per_verify:>10.2f} {got == ref}")


if __name__ == "__main__":
    main()
