"""Where a decode step's device time goes: CUDA kernels of steady-state engine steps, by kernel.

    python benchmarks/profile_gpu_step.py --tokenizer DIR [--model configs/llama-3.1-8b.json]
        [--batches 1 64] [--context 512] [--steps 20] [--disable-cuda-graph] [--attention-backend triton]
        [--page-size 16]

For each batch size, `--batches` requests of `--context` random tokens are prefilled (however many
steps that takes), then `--steps` warm-up decode steps run, then `--steps` decode steps under
torch.profiler (kernels inside CUDA graphs are traced too). Prints per-step device time of the top
kernels and the sum, next to the wall time per step.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from scheduler_proc.engine import Engine
from server.config import ServerConfig
from server.ipc import SamplingParams, TokenizedRequest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/llama-3.1-8b.json")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--disable-pdl", action="store_true")
    ap.add_argument("--page-size", type=int, default=ServerConfig.page_size)
    ap.add_argument("--phase", choices=["decode", "prefill"], default="decode",
                    help="prefill: profile the first --steps steps (the prompts' chunks) instead")
    args = ap.parse_args()
    cfg = ServerConfig(model=args.model, tokenizer=args.tokenizer, load_format="dummy", device="cuda",
                       max_running_requests=max(256, *args.batches), chunked_prefill_size=8192,
                       disable_cuda_graph=args.disable_cuda_graph, attention_backend=args.attention_backend,
                       disable_pdl=args.disable_pdl, page_size=args.page_size)
    engine = Engine(cfg)
    rng = random.Random(0)
    for bs in args.batches:
        # Enough output for the first requests to still be decoding after the last prompt's chunks.
        prompt_steps = -(-bs * args.context // cfg.chunked_prefill_size)
        params = SamplingParams(max_new_tokens=prompt_steps + args.steps * 2 + 16, temperature=0.0, ignore_eos=True)
        for i in range(bs):
            ids = [rng.randrange(100, engine.vocab_size - 100) for _ in range(args.context)]
            engine.add_request(TokenizedRequest(rid=f"b{bs}-{i}", input_ids=ids, params=params, stream=True))
        if args.phase == "decode":
            scheduler = engine.scheduler
            step_limit = prompt_steps + 8  # the prompts' steps, with room for partly filled ones
            for _ in range(step_limit):
                if not scheduler.waiting and all(r.is_decoding for r in scheduler.running):
                    break
                engine.step()
            else:
                raise SystemExit(f"batch {bs}: the prompts were not all prefilled after {step_limit} steps")
            for _ in range(args.steps):  # warm-up decode steps
                engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / args.steps
        while engine.has_work():
            engine.step()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        events.sort(key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.device_time_total for e in events) / args.steps / 1000
        print(f"\n{args.phase} batch {bs}: wall {wall * 1000:.3f} ms/step, kernels {total:.3f} ms/step "
              f"(graphs={engine.runner.graphs is not None})")
        print(f"{'kernel':90} {'calls/step':>10} {'ms/step':>8} {'%':>5}")
        for e in events[: args.top]:
            ms = e.device_time_total / args.steps / 1000
            print(f"{e.key[:90]:90} {e.count / args.steps:10.1f} {ms:8.3f} {100 * ms / total:5.1f}")


if __name__ == "__main__":
    main()
