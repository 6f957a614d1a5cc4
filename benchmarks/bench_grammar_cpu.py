"""Cost of grammar-constrained decoding on CPU: N concurrent JSON-schema requests vs N unconstrained.

    .venv/bin/python benchmarks/bench_grammar_cpu.py [--batch 16] [--new-tokens 128] [--dtype bfloat16]

Both runs generate exactly batch x new-tokens tokens: the schema (a long array of records) cannot
close within new-tokens, and the unconstrained run ignores EOS. Sampling at temperature 1 with a
seed per request. Reports tokens/s of each, their ratio, and the mask-fill time per step (the CPU
time the grammar backend spent filling bitmasks, divided by the constrained run's decode steps).
"""

from __future__ import annotations

import argparse
import json
import time

from scheduler_proc.engine import Engine
from server.bench.tokenizer import chat_token_ids
from server.config import ServerConfig
from server.ipc import GrammarSpec, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 1000, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "role": {"enum": ["engineer", "artist", "doctor", "farmer"]},
                       "email": {"type": "string", "maxLength": 40}},
        "required": ["name", "age", "role", "email"], "additionalProperties": False}}},
    "required": ["people"],
}


def prompts(tok, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msg = f"List people number {i} as JSON with name, age, role and email."
        out.append(chat_token_ids(tok, [{"role": "user", "content": msg}], add_generation_prompt=True))
    return out


def run(eng: Engine, ps, params: list[SamplingParams]) -> tuple[float, int, int]:
    steps0 = eng.num_steps
    t0 = time.perf_counter()
    outs = eng.generate(ps, params)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.output_ids) for o in outs)
    return tokens / dt, tokens, eng.num_steps - steps0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    eng = Engine(ServerConfig(dtype=args.dtype, device="cpu", disable_radix_cache=True))
    backend = eng.grammar_backend
    ps = prompts(eng.tokenizer, args.batch)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    free = [SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=i, ignore_eos=True)
            for i in range(args.batch)]
    constrained = [SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=i, grammar=spec)
                   for i in range(args.batch)]
    eng.generate(ps[:2], [SamplingParams(max_new_tokens=8, ignore_eos=True)] * 2)  # warm-up
    eng.generate(ps[:1], constrained[:1])  # compiles the grammar (then cached)

    best_free = best_con = 0.0
    fill_per_step = []
    for _ in range(args.repeats):
        tps, tokens, _ = run(eng, ps, free)
        assert tokens == args.batch * args.new_tokens, tokens
        best_free = max(best_free, tps)
        before = backend.mask_stats
        tps, tokens, steps = run(eng, ps, constrained)
        assert tokens == args.batch * args.new_tokens, f"a constrained request ended early ({tokens} tokens)"
        after = backend.mask_stats
        best_con = max(best_con, tps)
        fill_per_step.append((after.fill_seconds - before.fill_seconds) / max(1, after.fill_calls - before.fill_calls))

    stats = backend.manager.stats
    print(f"batch {args.batch} x {args.new_tokens} new tokens, {args.dtype}, temperature 1")
    print(f"unconstrained : {best_free:8.1f} tok/s")
    print(f"json_schema   : {best_con:8.1f} tok/s   ratio {best_con / best_free:.3f}")
    print(f"mask fill     : {1e3 * min(fill_per_step):.3f} ms per step ({args.batch} rows), "
          f"{1e6 * min(fill_per_step) / args.batch:.1f} us per row")
    print(f"grammar cache : hits {stats.hits}, misses {stats.misses}, compile {stats.compile_seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
