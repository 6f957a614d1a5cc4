"""The step composition the scheduler produces for a load, run on the CPU with a tiny model.

    python benchmarks/simulate_schedule.py [--num-prompts 1000] [--input-len 1024] [--output-len 128]
        [--max-running-requests 1024] [--chunked-prefill-size 8192] [--max-total-tokens 828909]

The real engine (scheduler, prefix cache, page allocator) runs `configs/tiny-llama.json` with
dummy weights, so a GPU benchmark's schedule can be studied without a GPU: how many steps carry a
prompt chunk, how full they are, and how many steps only decode (and at what batch size). Which
steps run and what they hold depends on the scheduling settings and the KV capacity, not on the
model, so the counts match the GPU run of the same settings (up to overlap scheduling's one-step
delay in seeing finished requests). The engine runs without overlap on the CPU.
"""

from __future__ import annotations

import argparse
import collections
import random

from scheduler_proc.engine import Engine
from server.config import ServerConfig
from server.ipc import SamplingParams, TokenizedRequest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-running-requests", type=int, default=ServerConfig.max_running_requests)
    ap.add_argument("--chunked-prefill-size", type=int, default=8192)
    ap.add_argument("--max-total-tokens", type=int, default=828909,
                    help="KV capacity (default: the H200's pool for the Llama-3.1-8B shape)")
    ap.add_argument("--page-size", type=int, default=ServerConfig.page_size)
    args = ap.parse_args()
    cfg = ServerConfig(model="configs/tiny-llama.json", load_format="dummy", device="cpu", dtype="float32",
                       chunked_prefill_size=args.chunked_prefill_size, page_size=args.page_size,
                       max_running_requests=args.max_running_requests, max_total_tokens=args.max_total_tokens)
    engine = Engine(cfg)
    steps: list[tuple[int, int]] = []  # (decode rows, prompt tokens) per step
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        if batch is not None:
            # A decode is a one-token item of a request past its prompt (a retracted request's
            # recomputation is a longer item, counted with the prompt tokens).
            decodes = sum(1 for it in batch.items if it.q_len == 1 and it.start >= len(it.req.input_ids))
            steps.append((decodes, sum(it.q_len for it in batch.items) - decodes))
        return batch

    engine.scheduler.schedule = recording_schedule
    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i in range(args.num_prompts):
        ids = [rng.randrange(100, engine.vocab_size - 100) for _ in range(args.input_len)]
        engine.add_request(TokenizedRequest(rid=str(i), input_ids=ids, params=params, stream=False))
    while engine.has_work():
        engine.step()

    mixed = [(d, p) for d, p in steps if p]
    decode_only = collections.Counter(d for d, p in steps if not p)
    print(f"{len(steps)} steps, {engine.scheduler.num_retractions} retractions")
    if mixed:
        print(f"{len(mixed)} steps with prompt tokens: {sum(p for _, p in mixed) / len(mixed):.0f} prompt tokens "
              f"and {sum(d for d, _ in mixed) / len(mixed):.0f} decodes on average")
    print(f"{sum(decode_only.values())} decode-only steps; by batch size:")
    width = max(1, args.max_running_requests // 8)
    buckets = collections.Counter()
    for bs, n in decode_only.items():
        buckets[(bs - 1) // width * width] += n
    for lo in sorted(buckets):
        print(f"  {lo + 1:5d}-{lo + width:<5d} {buckets[lo]}")


if __name__ == "__main__":
    main()
