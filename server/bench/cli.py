"""`python -m server.bench`: the command line, flags named as in SGLang's bench_serving."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Any, Optional, Sequence

from server.bench.client import Endpoint
from server.bench.datasets import (
    BenchRequest,
    DatasetError,
    file_dataset,
    random_dataset,
    shared_prefix_dataset,
    sharegpt_dataset,
)
from server.bench.metrics import BenchMetrics, compute_metrics, format_table, server_cache_stats
from server.bench.runner import RunOptions, RunResult, ServerError, first_model, run_benchmark
from server.bench.tokenizer import TokenizerError, load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server.bench",
        description="Load-test any OpenAI-compatible server (Skiff, vLLM, SGLang, llama.cpp) with streaming requests.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (with or without /v1)")
    g.add_argument("--backend", choices=["chat", "completions"], default="chat",
                   help="endpoint: /v1/chat/completions or /v1/completions")
    g.add_argument("--model", default=None, help="model name to send (default: the first id of /v1/models)")
    g.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory or id (default: the model name, else the embedded SmolLM2 one)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default: $OPENAI_API_KEY)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it counts as failed")
    g.add_argument("--honor-eos", action="store_true",
                   help="let the model stop at EOS (default: send ignore_eos so output lengths are exact)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request")
    g.add_argument("--extra-request-body", default=None, metavar="JSON",
                   help='JSON object merged into every request body, e.g. \'{"top_p": 0.9}\'')

    g = p.add_argument_group("workload")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", default="random",
                   choices=["random", "shared-prefix", "sharegpt", "file"])
    g.add_argument("--dataset-path", default=None, help="ShareGPT JSON file, or JSONL prompt file for --dataset file")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="requests to send (default: 1000; shared-prefix: groups x prompts per group; file: every line)")
    g.add_argument("--seed", type=int, default=1, help="seed of prompts, lengths and arrival times")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=1024,
                   help="also the output length of file prompts that do not set their own")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are drawn from [len * ratio, len]; 1.0 = fixed lengths")
    g.add_argument("--shared-prefix-groups", type=int, default=64)
    g.add_argument("--shared-prefix-prompts-per-group", type=int, default=16)
    g.add_argument("--shared-prefix-system-len", type=int, default=2048)
    g.add_argument("--shared-prefix-question-len", type=int, default=128)
    g.add_argument("--shared-prefix-output-len", type=int, default=256)
    g.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="fixed output length (default: the length of the recorded reply)")
    g.add_argument("--sharegpt-context-len", type=int, default=None,
                   help="skip conversations longer than this (default: prompt > 1024 or total > 2048)")

    g = p.add_argument_group("traffic")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests/s of Poisson arrivals; inf sends all at once")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    g.add_argument("--warmup-requests", type=int, default=1, help="requests sent (and not measured) first")

    g = p.add_argument_group("output")
    g.add_argument("--output", "--output-file", dest="output", default=None, help="write full results as JSON here")
    g.add_argument("--plot", default=None, help="write latency CDFs and throughput over time here (e.g. out.png)")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return p


def build_workload(args: argparse.Namespace, tokenizer: Any) -> list[BenchRequest]:
    ids = args.backend == "completions"
    if args.dataset == "random":
        return random_dataset(tokenizer, args.num_prompts or 1000, args.random_input_len, args.random_output_len,
                              args.random_range_ratio, args.seed, as_token_ids=ids)
    if args.dataset == "shared-prefix":
        requests = shared_prefix_dataset(
            tokenizer, args.shared_prefix_groups, args.shared_prefix_prompts_per_group,
            args.shared_prefix_system_len, args.shared_prefix_question_len, args.shared_prefix_output_len,
            args.seed, as_token_ids=ids)
        return requests[: args.num_prompts] if args.num_prompts else requests
    if not args.dataset_path:
        raise DatasetError(f"--dataset {args.dataset} needs --dataset-path")
    # Text as-is: the server tokenizes it the way it tokenizes any real client's prompt.
    if args.dataset == "sharegpt":
        return sharegpt_dataset(tokenizer, args.dataset_path, args.num_prompts or 1000, args.seed,
                                output_len=args.sharegpt_output_len, context_len=args.sharegpt_context_len)
    return file_dataset(tokenizer, args.dataset_path, args.num_prompts, args.random_output_len)


def _record_dict(record) -> dict[str, Any]:
    d = asdict(record)
    d["tpot"] = record.tpot
    return d


def results_json(args: argparse.Namespace, endpoint: Endpoint, result: RunResult,
                 metrics: BenchMetrics, cache) -> dict[str, Any]:
    config = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()}
    config.pop("api_key", None)
    config["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "config": config,
        "model": endpoint.model,
        "endpoint": endpoint.url,
        "metrics": metrics.to_dict(),
        "server_cache": cache.to_dict(),
        "errors": sorted({r.error for r in result.records if r.error}),
        "warmup": [_record_dict(r) for r in result.warmup],
        "requests": [_record_dict(r) for r in result.records],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, value in (("--num-prompts", args.num_prompts), ("--max-concurrency", args.max_concurrency)):
        if value is not None and value < 1:
            print(f"error: {name} must be >= 1", file=sys.stderr)
            return 2
    if not args.request_rate > 0 or args.warmup_requests < 0 or args.timeout <= 0:
        print("error: --request-rate and --timeout must be > 0 and --warmup-requests >= 0", file=sys.stderr)
        return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("error: --plot needs matplotlib (pip install matplotlib, or the project's dev extra)", file=sys.stderr)
        return 2
    try:
        extra = json.loads(args.extra_request_body) if args.extra_request_body else None
        if extra is not None and not isinstance(extra, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"error: --extra-request-body: {exc}", file=sys.stderr)
        return 2
    try:
        model = args.model or first_model(args.base_url, args.api_key)
        tokenizer = load_tokenizer(args.tokenizer, model)
        requests = build_workload(args, tokenizer)
    except (ServerError, TokenizerError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    endpoint = Endpoint(base_url=args.base_url, backend=args.backend, model=model, api_key=args.api_key,
                        ignore_eos=not args.honor_eos, temperature=args.temperature, extra_body=extra)
    options = RunOptions(request_rate=args.request_rate, max_concurrency=args.max_concurrency, seed=args.seed,
                         timeout=args.timeout, warmup_requests=args.warmup_requests, progress=not args.disable_tqdm)
    result = asyncio.run(run_benchmark(endpoint, requests, options))
    for w in result.warmup:
        if not w.success:
            print(f"warning: warm-up request failed: {w.error}", file=sys.stderr)

    metrics = compute_metrics(result.records, result.duration_s)
    cache = server_cache_stats(result.metrics_before, result.metrics_after)
    info = [
        ("Backend", args.backend),
        ("Model", model),
        ("Dataset", args.dataset),
        ("Traffic request rate", "inf" if math.isinf(args.request_rate) else args.request_rate),
        ("Max request concurrency", args.max_concurrency or "not set"),
    ]
    print(format_table(metrics, info, cache))
    errors = Counter(r.error for r in result.records if r.error)
    for err, count in errors.most_common(5):
        print(f"failed x{count}: {err}")
    if len(errors) > 5:
        print(f"... and {len(errors) - 5} more distinct errors (all in --output)")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results_json(args, endpoint, result, metrics, cache), f, indent=1)
        print(f"results written to {args.output}")
    if args.plot:
        from server.bench.plot import plot_results

        plot_results(result.records, args.plot, title=f"{model} · {args.dataset} · {args.backend}")
        print(f"plot written to {args.plot}")
    return 0 if metrics.completed else 1
