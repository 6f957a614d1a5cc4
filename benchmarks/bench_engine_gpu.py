"""GPU throughput of the in-process Engine on a dummy-weight model (default: Llama-3.1-8B shape, bf16).

    python benchmarks/bench_engine_gpu.py --tokenizer DIR [--scenarios b1 b64 1000x1024x128] [--variants ...]

Scenarios (random prompt token ids, EOS ignored so lengths are exact):
  b1:            1 request, 128 in / 256 out: decode ms per output token (after the first token)
  b64:           64 requests at once, 512 in / 256 out: output tokens/s
  NxIxO:         N requests at once, I in / O out: output tokens/s
Variants: default (overlap + CUDA graphs + Triton GEMV at batch 1), no-overlap, no-graph, no-gemv,
and the others in VARIANTS; `a+b` combines two (b's settings win where both set one).
Prints one table; also checks that greedy tokens are identical across variants for the first
requests of each scenario. `prefill s` runs until the last request has its first token (decodes
of earlier requests run inside it); `decode tok/s` is the output rate after that. `idle %` is the
device's idle time between steps over its busy + idle time (CUDA events around each step, see
scheduler_proc/step_timeline.py). `--cprofile N` prints the N host functions with the most
own time over an extra, profiled run of each default-variant scenario.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import random
import time

import torch

from scheduler_proc.engine import Engine
from scheduler_proc.step_timeline import StepTimeline
from server.config import ServerConfig
from server.ipc import SamplingParams, TokenizedRequest

VARIANTS = {
    "default": {},
    "no-overlap": {"disable_overlap": True},
    "no-graph": {"disable_cuda_graph": True},
    "no-gemv": {"disable_triton_gemv": True},
    "triton-attn": {"attention_backend": "triton"},
    "no-pdl": {"disable_pdl": True},
    "page-16": {"page_size": 16},
    "running-384": {"max_running_requests": 384},
    "running-256": {"max_running_requests": 256},
    "running-1024": {"max_running_requests": 1024},
    "chunk-16k": {"chunked_prefill_size": 16384},
    "reserve-prompt-only": {"schedule_conservativeness": 0.0},
}


def parse_scenario(name: str) -> tuple[int, int, int]:
    if name == "b1":
        return 1, 128, 256
    if name == "b64":
        return 64, 512, 256
    n, i, o = (int(x) for x in name.split("x"))
    return n, i, o


def run(engine: Engine, n: int, inp: int, out: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=out, temperature=0.0, ignore_eos=True)
    reqs = [[rng.randrange(100, engine.vocab_size - 100) for _ in range(inp)] for _ in range(n)]
    torch.cuda.synchronize()
    engine.timeline = StepTimeline(engine.device)
    t0 = time.perf_counter()
    for i, ids in enumerate(reqs):
        engine.add_request(TokenizedRequest(rid=f"r{seed}-{i}", input_ids=ids, params=params, stream=True))
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_work():
        outs = engine.step()
        steps += 1
        now = time.perf_counter()
        for o in outs:
            if o.token_ids and o.rid not in first:
                first[o.rid] = now
            tokens.setdefault(o.rid, []).extend(o.token_ids)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    timeline = engine.timeline.summary()
    engine.timeline = None
    total_out = sum(len(t) for t in tokens.values())
    last_first = max(first.values())
    return {
        "duration_s": t1 - t0,
        "output_tokens": total_out,
        "output_tok_s": total_out / (t1 - t0),
        "total_tok_s": (total_out + n * inp) / (t1 - t0),
        "prefill_phase_s": last_first - t0,
        "decode_phase_s": t1 - last_first,
        "decode_tok_s": (total_out - n) / (t1 - last_first) if t1 > last_first else None,
        "ms_per_output_token_b1": (t1 - first[f"r{seed}-0"]) * 1000 / max(1, out - 1) if n == 1 else None,
        "steps": steps,
        "gpu_idle_fraction": timeline.idle_fraction,
        "gpu_busy_s": timeline.busy_s,
        "first_tokens": tokens[f"r{seed}-0"][:32],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/llama-3.1-8b.json")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--scenarios", nargs="+", default=["b1", "b64"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--page-size", type=int, default=ServerConfig.page_size)
    ap.add_argument("--max-running-requests", type=int, default=ServerConfig.max_running_requests)
    ap.add_argument("--cuda-graph-max-bs", type=int, default=None)
    ap.add_argument("--blas", choices=["cublas", "cublaslt"], default=None,
                    help="torch's preferred BLAS library for the GEMMs (default: torch's choice)")
    ap.add_argument("--output", default=None)
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="print the N host functions with the most own time per default-variant scenario")
    args = ap.parse_args()
    unknown = {part for v in args.variants for part in v.split("+")} - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    results = {}
    for variant in args.variants:
        settings = {"attention_backend": args.attention_backend, "page_size": args.page_size,
                    "max_running_requests": args.max_running_requests, "chunked_prefill_size": 8192}
        for part in variant.split("+"):
            settings.update(VARIANTS[part])
        settings.setdefault("cuda_graph_max_bs",
                            args.cuda_graph_max_bs or min(settings["max_running_requests"], 512))
        cfg = ServerConfig(model=args.model, tokenizer=args.tokenizer, load_format="dummy", device="cuda",
                           **settings)
        t0 = time.perf_counter()
        engine = Engine(cfg)
        print(f"[{variant}] engine ready in {time.perf_counter() - t0:.1f} s, "
              f"KV {engine.runner.num_pages - 1} pages, overlap={engine.overlap}, "
              f"graphs={engine.runner.graphs is not None}", flush=True)
        run(engine, 4, 64, 16, seed=99)  # warm-up
        for sc in args.scenarios:
            n, i, o = parse_scenario(sc)
            r = run(engine, n, i, o)
            if args.cprofile and variant == "default":
                # A separate run: cProfile slows the host down, so it must not touch the figures.
                prof = cProfile.Profile()
                prof.runcall(run, engine, n, i, o, seed=1)
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.cprofile)
                print(f"[{variant}] {sc} host profile:\n{text.getvalue()}", flush=True)
            results[(variant, sc)] = r
            print(f"[{variant}] {sc}: {json.dumps({k: v for k, v in r.items() if k != 'first_tokens'})}",
                  flush=True)
        del engine
        gc.collect()  # the next variant sizes its KV pool from free memory
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()} | {args.model} | bf16 dummy weights")
    print(f"{'variant':12} {'scenario':16} {'out tok/s':>10} {'decode tok/s':>12} {'ms/tok b1':>10} {'prefill s':>10} "
          f"{'decode s':>9} {'steps':>6} {'idle %':>7}")
    for (variant, sc), r in results.items():
        b1 = f"{r['ms_per_output_token_b1']:.2f}" if r["ms_per_output_token_b1"] else "-"
        dec = f"{r['decode_tok_s']:.0f}" if r["decode_tok_s"] else "-"
        print(f"{variant:12} {sc:16} {r['output_tok_s']:10.0f} {dec:>12} {b1:>10} {r['prefill_phase_s']:10.2f} "
              f"{r['decode_phase_s']:9.2f} {r['steps']:6} {100 * r['gpu_idle_fraction']:7.1f}")
    for sc in args.scenarios:
        firsts = {v: results[(v, sc)]["first_tokens"] for v in args.variants if (v, sc) in results}
        same = len({tuple(t) for t in firsts.values()}) == 1
        print(f"greedy tokens identical across variants for {sc}: {same}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({f"{v}|{s}": r for (v, s), r in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
