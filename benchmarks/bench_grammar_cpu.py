"""Cost of grammar-constrained decoding on CPU: N concurrent JSON-schema requests vs N unconstrained.

    .venv/bin/python benchmarks/bench_grammar_cpu.py [--batch 16] [--new-tokens 128] [--dtype bfloat16] [--overlap]

Both runs generate exactly batch x new-tokens tokens: the schema (a long array of records) cannot
close within new-tokens, and the unconstrained run ignores EOS. Sampling at temperature 1 with a
seed per request. Reports tokens/s of each, their ratio, and the mask-fill time per step (the CPU
time the grammar backend spent filling bitmasks, divided by the constrained run's decode steps).
`--overlap` runs the engine's overlap loop (on CPU it takes the same code path, synchronously).

The measuring code is shared with benchmarks/bench_grammar_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Optional

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


def request_params(batch: int, new_tokens: int) -> tuple[list[SamplingParams], list[SamplingParams]]:
    """(unconstrained, json_schema) params: same seeds, temperature and exact output length."""
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    free = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i, ignore_eos=True)
            for i in range(batch)]
    constrained = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i, grammar=spec)
                   for i in range(batch)]
    return free, constrained


@dataclass
class RunStats:
    seconds: float
    tokens: int
    steps: int
    mask_fill_s: float  # host time filling bitmasks during the run
    mask_fills: int  # steps that filled a mask
    idle_fraction: Optional[float] = None  # device idle between stretches of work (CUDA only)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps

    @property
    def fill_ms_per_step(self) -> float:
        return 1e3 * self.mask_fill_s / self.mask_fills if self.mask_fills else 0.0


def check_grammar(eng: Engine, outs, spec: GrammarSpec) -> None:
    """Every constrained output must be accepted token by token by a fresh matcher: the mask was
    honoured (on the device, under overlap) for every row and step."""
    manager = eng.grammar_backend.manager
    compiled = manager.compile(spec)
    for o in outs:
        matcher = manager.new_matcher(compiled)
        bad = next((i for i, t in enumerate(o.output_ids) if not matcher.accept_token(t)), None)
        if bad is not None:
            raise RuntimeError(f"{o.rid}: output token {bad} ({o.output_ids[bad]}) breaks the grammar")


def run(eng: Engine, ps: list[list[int]], params: list[SamplingParams]) -> RunStats:
    """Generate all prompts together; every request must produce exactly its max_new_tokens, and
    a constrained one only what its grammar allows."""
    cuda = eng.device.type == "cuda"
    if cuda:
        import torch
        from scheduler_proc.step_timeline import StepTimeline
        torch.cuda.synchronize()
        eng.timeline = StepTimeline(eng.device)
    fill0 = eng.grammar_backend.mask_stats
    steps0 = eng.num_steps
    t0 = time.perf_counter()
    outs = eng.generate(ps, params)  # returns once every token reached the host
    seconds = time.perf_counter() - t0
    fill1 = eng.grammar_backend.mask_stats
    idle = None
    if cuda:
        idle = eng.timeline.summary().idle_fraction
        eng.timeline = None
    tokens = sum(len(o.output_ids) for o in outs)
    expected = sum(p.max_new_tokens for p in params)
    if tokens != expected:
        raise RuntimeError(f"the runs are not comparable: {tokens} tokens generated, {expected} expected "
                           f"(finish reasons {sorted({o.finish_reason for o in outs})})")
    if params[0].grammar is not None:
        check_grammar(eng, outs, params[0].grammar)
    return RunStats(seconds, tokens, eng.num_steps - steps0, fill1.fill_seconds - fill0.fill_seconds,
                    fill1.fill_calls - fill0.fill_calls, idle)


def compare(eng: Engine, batch: int, new_tokens: int, repeats: int) -> tuple[RunStats, RunStats]:
    """Best-of-`repeats` (unconstrained, json_schema) runs, interleaved; the grammar is compiled
    (and cached) by a warm-up so neither run pays for a compile."""
    ps = prompts(eng.tokenizer, batch)
    free, constrained = request_params(batch, new_tokens)
    eng.generate(ps[:2], [SamplingParams(max_new_tokens=8, ignore_eos=True)] * 2)  # warm-up
    eng.generate(ps[:1], [SamplingParams(max_new_tokens=8, grammar=constrained[0].grammar)])
    best_free = best_con = None
    for _ in range(repeats):
        f = run(eng, ps, free)
        c = run(eng, ps, constrained)
        best_free = f if best_free is None or f.tok_s > best_free.tok_s else best_free
        best_con = c if best_con is None or c.tok_s > best_con.tok_s else best_con
    return best_free, best_con


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--overlap", action="store_true", help="run the overlap loop")
    ap.add_argument("--mask-threads", type=int, default=None,
                    help="threads filling the bitmask (default: the engine's, 1)")
    args = ap.parse_args()

    eng = Engine(ServerConfig(dtype=args.dtype, device="cpu", disable_radix_cache=True))
    eng.overlap = args.overlap
    if args.mask_threads:
        eng.grammar_backend.set_mask_threads(args.mask_threads)
    free, con = compare(eng, args.batch, args.new_tokens, args.repeats)
    stats = eng.grammar_backend.manager.stats
    print(f"batch {args.batch} x {args.new_tokens} new tokens, {args.dtype}, temperature 1, "
          f"overlap {eng.overlap}, {eng.grammar_backend.mask_threads} mask threads")
    print(f"unconstrained : {free.tok_s:8.1f} tok/s")
    print(f"json_schema   : {con.tok_s:8.1f} tok/s   ratio {con.tok_s / free.tok_s:.3f}")
    print(f"mask fill     : {con.fill_ms_per_step:.3f} ms per step ({args.batch} rows), "
          f"{1e3 * con.fill_ms_per_step / args.batch:.1f} us per row")
    print(f"grammar cache : hits {stats.hits}, misses {stats.misses}, compile {stats.compile_seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
