"""The bench client: load-tests any OpenAI-compatible server with streaming requests.

`python -m server.bench --base-url http://127.0.0.1:8000 --dataset random --num-prompts 100` prints
SGLang/vLLM-style serving metrics (throughputs, TTFT / TPOT / ITL / E2E percentiles, prefix cache
hit rate) and can write every request's record as JSON (`--output`) and plots (`--plot`).

Library use: build `BenchRequest`s with `server.bench.datasets`, send them with
`server.bench.runner.run_benchmark(Endpoint(...), requests, RunOptions(...))`, and summarize the
returned records with `server.bench.metrics.compute_metrics`.
"""
