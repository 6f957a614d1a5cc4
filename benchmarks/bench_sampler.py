"""Cost of one Sampler step on a [B, V] logits block (default 64 x 49152, SmolLM2's vocab).

    .venv/bin/python benchmarks/bench_sampler.py [--batch 64] [--vocab 49152] [--iters 200]

Scenarios: (a) all greedy, (b) plain temperature + top-p, (c) mixed parameters (penalties over
a 256-token prompt + 64 outputs, logit bias, top-k, min-p, logprobs, seeds, some greedy rows).
Each is timed as build() (host-side parameter tensors), sample() and to_host(), median of
--iters runs after warm-up. Two baselines put the numbers in context: a bare argmax (what (a)
should cost) and a sort-based top-p draw (what rejection sampling avoids).

--clock thread (the default with --threads 1) reads this thread's CPU time, which is the cost
of the work itself and stays stable on a shared, busy machine; --clock wall reads wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler_proc.sampling import Sampler, SamplingBatch  # noqa: E402
from server.ipc import SamplingParams  # noqa: E402


def scenario_params(name: str, B: int, V: int, rng: np.random.Generator):
    prompts = [rng.integers(0, V, 256).tolist() for _ in range(B)]
    outputs = [rng.integers(0, V, 64).tolist() for _ in range(B)]
    if name == "a":
        return [SamplingParams(temperature=0.0) for _ in range(B)], prompts, outputs
    if name == "b":
        return [SamplingParams(temperature=0.7, top_p=0.9) for _ in range(B)], prompts, outputs
    params = []
    for i in range(B):
        kind = i % 4
        if kind == 0:
            p = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1,
                               seed=1000 + i, logprobs=True, top_logprobs=5)
        elif kind == 1:
            p = SamplingParams(temperature=1.0, min_p=0.05, frequency_penalty=0.3,
                               presence_penalty=0.2,
                               logit_bias={int(t): -100.0 for t in rng.integers(0, V, 10)})
        elif kind == 2:
            p = SamplingParams(temperature=0.0, repetition_penalty=1.2, logprobs=True,
                               min_new_tokens=100, stop_token_ids=[5, 6])
        else:
            p = SamplingParams(temperature=0.6, top_p=0.9, seed=i)
        params.append(p)
    return params, prompts, outputs


CLOCK = {"wall": time.perf_counter, "thread": time.thread_time}
clock = time.perf_counter


def timed(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def make_logits(B: int, V: int, seed: int) -> torch.Tensor:
    # Peaked like a language model's: a few strong candidates over a broad low tail.
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 2.0
    top = torch.randint(0, V, (B, 8), generator=g)
    logits.scatter_(1, top, torch.rand(B, 8, generator=g) * 6.0 + 8.0)
    return logits


def bench_scenario(name, B, V, iters, device):
    rng = np.random.default_rng(0)
    params, prompts, outputs = scenario_params(name, B, V, rng)
    sampler = Sampler(V, [2], device)
    template = make_logits(B, V, 1).to(device)
    pool = [template.clone() for _ in range(8)]

    build = lambda: SamplingBatch.build(params, prompts, outputs, V, device)  # noqa: E731
    info = build()
    state = {"k": 0}

    def sample():
        k = state["k"] = (state["k"] + 1) % len(pool)
        pool[k].copy_(template)
        t0 = clock()
        out = sampler.sample(pool[k], info)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - t0, out

    out = sample()[1]
    t_build = timed(build, iters)
    # sample() times exclude refilling the consumed logits
    for _ in range(5):
        sample()
    samples = [sample()[0] for _ in range(iters)]
    t_host = timed(out.to_host, iters)
    return t_build, statistics.median(samples) * 1e3, min(samples) * 1e3, t_host


def baselines(B, V, iters, device):
    logits = make_logits(B, V, 1).to(device)
    t_argmax = timed(lambda: logits.argmax(dim=-1), iters)

    def sort_top_p():
        probs = torch.softmax(logits / 0.7, dim=-1)
        sp, si = probs.sort(dim=-1, descending=True)
        cum = sp.cumsum(dim=-1)
        sp[(cum - sp) > 0.9] = 0.0
        return si.gather(1, torch.multinomial(sp, 1))

    t_sort = timed(sort_top_p, max(iters // 10, 10))
    return t_argmax, t_sort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=sorted(CLOCK), default=None,
                    help="thread CPU time or wall time (default: thread with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock_name = args.clock or ("thread" if torch.get_num_threads() == 1 else "wall")
    if clock_name == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread only measures the whole cost with --threads 1")
    clock = CLOCK[clock_name]
    device = torch.device(args.device)
    B, V = args.batch, args.vocab
    print(f"batch {B}, vocab {V}, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {clock_name} clock, median of {args.iters} runs (ms)")
    print(f"{'scenario':<48}{'build':>8}{'sample':>8}{'(min)':>8}{'to_host':>8}{'total':>8}")
    names = {"a": "(a) all greedy", "b": "(b) temperature 0.7 + top-p 0.9",
             "c": "(c) mixed: penalties/bias/top-k/min-p/lp/seed"}
    for key, label in names.items():
        b, s, s_min, h = bench_scenario(key, B, V, args.iters, device)
        print(f"{label:<48}{b:8.3f}{s:8.3f}{s_min:8.3f}{h:8.3f}{b + s + h:8.3f}")
    t_argmax, t_sort = baselines(B, V, args.iters, device)
    print(f"{'baseline: bare logits.argmax(-1)':<48}{'':>8}{t_argmax:8.3f}")
    print(f"{'baseline: sort-based top-p + multinomial':<48}{'':>8}{t_sort:8.3f}")


if __name__ == "__main__":
    main()
