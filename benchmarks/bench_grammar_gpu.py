"""Cost of grammar-constrained decoding on the GPU: batch 64 JSON-schema vs unconstrained (target >= 0.9x).

    python benchmarks/bench_grammar_gpu.py --tokenizer DIR [--model configs/llama-3.1-8b.json]
        [--batch 64] [--new-tokens 256] [--variants default no-overlap] [--mask-threads 1 0]

Dummy (random) weights, so what the model "wants" to write means nothing; the comparison is made
fair by giving both runs exactly the same work:
  - every request of both runs generates exactly new-tokens tokens: the schema is an array of at
    least 1000 records whose strings are bounded (maxLength), so the grammar can always continue
    and cannot close (EOS stays masked) within new-tokens, whatever the weights; the
    unconstrained run ignores EOS. The script fails if a run produces any other token count.
  - hence every step decodes the same batch of 64 rows in both runs (same CUDA graph, same
    attention shapes); the same chat-templated prompts (radix cache off, so neither run reuses the
    other's prefill), the same seeds and temperature 1 (the same sampling kernels).
What differs is exactly the grammar's cost: filling the bitmask on the host (and advancing the
matchers), copying it, applying it to the logits, and, with overlap, sampling waiting for the
mask while the next forward runs. Reported: output tokens/s over the whole run (prefill
included, identical in both), the ratio, wall ms per step, mask-fill ms per step, and the device's
idle share between stretches of work (CUDA events; see scheduler_proc/step_timeline.py).

It also runs on CPU for a smoke test, e.g. --model configs/tiny-llama.json --device cpu --batch 4.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats

import torch

from bench_grammar_cpu import compare, prompts, request_params, run
from scheduler_proc.engine import Engine
from server.config import ServerConfig

VARIANTS = {"default": {}, "no-overlap": {"disable_overlap": True}}


def profile_runs(eng: Engine, batch: int, new_tokens: int, top: int) -> None:
    """Host profile of one unconstrained and one constrained run (not part of the figures:
    cProfile slows the host down)."""
    ps = prompts(eng.tokenizer, batch)
    for name, params in zip(("unconstrained", "json_schema"), request_params(batch, new_tokens)):
        prof = cProfile.Profile()
        prof.runcall(run, eng, ps, params)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
        print(f"host profile, {name}:\n{text.getvalue()}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/llama-3.1-8b.json")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="after the measured runs, profile one run of each kind and print the N host "
                    "functions with the most own time")
    ap.add_argument("--mask-threads", type=int, nargs="+", default=[0],
                    help="threads filling the bitmask, one run each (0: the engine's default, 1)")
    args = ap.parse_args()

    rows = []
    for variant in args.variants:
        cfg = ServerConfig(model=args.model, tokenizer=args.tokenizer, load_format=args.load_format,
                           device=args.device, dtype=args.dtype, disable_radix_cache=True,
                           max_running_requests=max(256, args.batch), chunked_prefill_size=8192,
                           **VARIANTS[variant])
        eng = Engine(cfg)
        eng.overlap = not cfg.disable_overlap  # on CPU too, so a smoke test takes the same path
        default_threads = eng.grammar_backend.mask_threads
        for threads in args.mask_threads:
            eng.grammar_backend.set_mask_threads(threads or default_threads)
            free, con = compare(eng, args.batch, args.new_tokens, args.repeats)
            name = f"{variant}/{threads or default_threads}"
            rows += [(name, "unconstrained", free, None), (name, "json_schema", con, con.tok_s / free.tok_s)]
        if args.cprofile:
            profile_runs(eng, args.batch, args.new_tokens, args.cprofile)
        device = torch.cuda.get_device_name() if eng.device.type == "cuda" else "CPU"
        del eng
        gc.collect()  # the next variant sizes its KV pool from free memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    print(f"\n{device} | {args.model} ({args.load_format}) | batch {args.batch} x {args.new_tokens} "
          f"new tokens, temperature 1, best of {args.repeats}")
    print(f"{'variant/mask threads':20} {'run':14} {'tok/s':>9} {'ratio':>6} {'ms/step':>8} {'mask ms/step':>13} {'idle %':>7}")
    for variant, name, r, ratio in rows:
        idle = f"{100 * r.idle_fraction:.1f}" if r.idle_fraction is not None else "-"
        print(f"{variant:20} {name:14} {r.tok_s:9.1f} {f'{ratio:.3f}' if ratio else '':>6} "
              f"{r.ms_per_step:8.2f} {r.fill_ms_per_step:13.3f} {idle:>7}")


if __name__ == "__main__":
    main()
