"""What the serving layer (HTTP + API/tokenizer/scheduler/detokenizer processes + ZMQ) adds.

    .venv/bin/python benchmarks/bench_serving_overhead.py [--iters 200] [--streams 256] [--tokens 200]

1. Latency of a 1-token request (16-token prompt, greedy, max_tokens=1): the in-process Engine
   (add_request + step until finished) versus POST /v1/completions through the real server on a
   kept-alive connection. The difference of the medians is the serving overhead.
2. Streamed tokens/s the API, IPC and detokenizer path carries: N concurrent SSE streams of
   --tokens tokens each (ignore_eos), counted from each stream's final usage chunk.
Both use the tiny dummy model (configs/tiny-llama.json, float32) so the model is not the bottleneck;
`--vocab-size N` runs a copy of it with a smaller vocabulary (its LM head and sampling over 49152
logits per row dominate a 256-row CPU step). The same stream workload is also run on the
in-process Engine, so the serving path's share is visible. The server is stopped before the
in-process throughput run, so the two never compete for the CPU; latency requests alternate
between the two paths so both see the same machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

def make_prompt(vocab: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(100, vocab) for _ in range(16)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _engine(model: str):
    from scheduler_proc.engine import Engine
    from server.config import ServerConfig

    return Engine(ServerConfig(model=model, load_format="dummy", dtype="float32", device="cpu"))


def one_engine_request(eng, rid: str, prompt: list[int]) -> float:
    from server.ipc import SamplingParams, TokenizedRequest

    t0 = time.perf_counter()
    eng.add_request(TokenizedRequest(rid=rid, input_ids=prompt, params=SamplingParams(max_new_tokens=1,
                                                                                      temperature=0.0)))
    while not any(o.rid == rid and o.finish_reason for o in eng.step()):
        pass
    return time.perf_counter() - t0


def engine_throughput(eng, streams: int, tokens: int, vocab: int) -> float:
    from server.ipc import SamplingParams, TokenizedRequest

    rng = random.Random(1)
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i in range(streams):
        eng.add_request(TokenizedRequest(rid=f"t{i}", input_ids=[rng.randrange(100, vocab) for _ in range(16)],
                                         params=params))
    t0, total = time.perf_counter(), 0
    while eng.has_work():
        total += sum(len(o.token_ids) for o in eng.step())
    return total / (time.perf_counter() - t0)


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", model, "--load-format", "dummy",
                             "--dtype", "float32", "--device", "cpu", "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not start")


def latencies(eng, url: str, model_name: str, iters: int, prompt: list[int]) -> tuple[list[float], list[float]]:
    """Alternate in-process and HTTP requests so both see the same machine load."""
    body = {"model": model_name, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    local, http = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(iters + 10):
            dt_local = one_engine_request(eng, f"r{i}", prompt)
            t0 = time.perf_counter()
            r = client.post("/v1/completions", json=body)
            dt_http = time.perf_counter() - t0
            if r.status_code != 200:
                raise SystemExit(r.text)
            if i >= 10:  # warm-up
                local.append(dt_local)
                http.append(dt_http)
    return local, http


async def stream_throughput(url: str, model_name: str, streams: int, tokens: int, vocab: int) -> dict:
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    rng = random.Random(1)

    async def one(client: httpx.AsyncClient) -> tuple[int, int, float]:
        body = {"model": model_name, "prompt": [rng.randrange(100, vocab) for _ in range(16)], "max_tokens": tokens,
                "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        chunks, last, t0, ttft = 0, "", time.perf_counter(), 0.0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    if not chunks:
                        ttft = time.perf_counter() - t0
                    chunks += 1
                    if line != "data: [DONE]":
                        last = line
        return json.loads(last[6:])["usage"]["completion_tokens"], chunks, ttft

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one(client)  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client) for _ in range(streams)))
        wall = time.perf_counter() - t0
    total = sum(r[0] for r in results)
    chunks = sum(r[1] for r in results)
    return {"wall_s": wall, "tokens": total, "tok_per_s": total / wall, "chunks": chunks,
            "tokens_per_chunk": total / chunks, "ttft_p50_s": pct([r[2] for r in results], 0.5)}


# ----------------------------------------------------------------------------- --path-only


def synthetic_scheduler(config, paths, ipc_dir: str, tp_rank: int, ready_conn) -> None:
    """A stand-in scheduler process for --path-only: no model, it answers every request with
    ordinary word tokens, one per request per step, a step every SKIFF_BENCH_STEP_MS ms (like an
    engine whose batch step takes that long), so what is measured is the API, IPC and
    detokenizer path alone. Same sockets and messages as the real one."""
    import zmq

    from scheduler_proc.models.embedded import ensure_embedded_model
    from server import ipc
    from server.ipc_queue import PullQueue, PushQueue
    from server.process_util import ModelInfo, report_ready, setup_child

    wake_fd = setup_child("skiff-synthetic", config.log_level)
    ctx = zmq.Context()
    inbox = PullQueue(ctx, paths.scheduler, ipc.SchedulerInbound, wake_fd=wake_fd)
    out = PushQueue(ctx, paths.detokenizer)
    report_ready(ready_conn, ModelInfo(4096, 49152, (2,), str(ensure_embedded_model())))
    words = list(range(1000, 1400))  # plain BPE word pieces of the SmolLM2 vocabulary
    running: dict[str, list] = {}  # rid -> [request, tokens generated]
    last_stats = 0.0
    step_s = float(os.environ.get("SKIFF_BENCH_STEP_MS", "0")) / 1e3
    next_step = time.monotonic()
    while True:
        if running:
            time.sleep(max(0.0, next_step - time.monotonic()))
            next_step = max(next_step + step_s, time.monotonic() - step_s)
        for msg in inbox.drain(0 if running else 250):
            if isinstance(msg, ipc.TokenizedRequest):
                running[msg.rid] = [msg, 0]
                out.put(ipc.RequestStarted(msg.rid, msg.params, msg.input_ids[-5:]))
            elif isinstance(msg, ipc.AbortRequest) and msg.rid in running:
                req, n = running.pop(msg.rid)
                out.put(ipc.BatchTokenOutput([ipc.TokenOutput(msg.rid, [], "abort", len(req.input_ids), 0, n)]))
            elif isinstance(msg, ipc.FlushCacheRequest):
                out.put(ipc.FlushCacheResult(msg.req_id, not running))
        outputs = []
        for rid, state in list(running.items()):
            req, n = state
            state[1] = n = n + 1
            done = n >= req.params.max_new_tokens
            outputs.append(ipc.TokenOutput(rid, [words[n % len(words)]], "length" if done else None,
                                           len(req.input_ids), 0, n))
            if done:
                del running[rid]
        if outputs:
            out.put(ipc.BatchTokenOutput(outputs))
        if time.monotonic() - last_stats > 0.25:
            out.put(ipc.SchedulerStats(len(running), 0, 0.0, 0, 0.0))
            last_stats = time.monotonic()


def _serve_path_only(port: int) -> None:
    """Run the real server (API, tokenizer, detokenizer) around `synthetic_scheduler`."""
    from server.config import parse_args
    from server.launcher import Supervisor

    config = parse_args(["--port", str(port), "--log-level", "warning"])
    sys.exit(Supervisor(config, scheduler_entry=("bench_serving_overhead", "synthetic_scheduler")).run())


def path_only(args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "benchmarks")]),
               SKIFF_BENCH_STEP_MS=str(args.step_ms))
    proc = subprocess.Popen([sys.executable, "-c", f"import bench_serving_overhead as b; b._serve_path_only({port})"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        model_name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        tput = asyncio.run(stream_throughput(url, model_name, args.streams, args.tokens, 40000))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    offered = args.streams / (args.step_ms / 1e3) if args.step_ms else float("inf")
    print(f"serving path only (synthetic token source instead of the engine: one token per stream every "
          f"{args.step_ms} ms, {offered:,.0f} tokens/s offered), {os.cpu_count()} CPU cores:")
    print(f"{args.streams} concurrent streams x {args.tokens} tokens: {tput['tok_per_s']:,.0f} tokens/s "
          f"({tput['tokens']} tokens in {tput['wall_s']:.2f} s, {tput['chunks']} SSE chunks, "
          f"{tput['tokens_per_chunk']:.2f} tokens/chunk, TTFT p50 {tput['ttft_p50_s'] * 1e3:.0f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "configs" / "tiny-llama.json"), help="dummy model config")
    ap.add_argument("--vocab-size", type=int, default=None, help="run a copy of the config with this vocabulary")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--path-only", action="store_true",
                    help="measure only the streaming path, with a synthetic token source instead of the engine")
    ap.add_argument("--step-ms", type=float, default=10.0, help="--path-only: the synthetic source's step time")
    args = ap.parse_args()
    if args.path_only:
        path_only(args)
        return

    model = args.model
    config = json.loads(Path(model).read_text())
    if args.vocab_size:
        config["vocab_size"] = args.vocab_size
        model = os.path.join(tempfile.mkdtemp(prefix="skiff-bench-"), "config.json")
        Path(model).write_text(json.dumps(config))
    vocab = min(config["vocab_size"], 40000)

    proc, url = start_server(model)
    try:
        eng = _engine(model)
        model_name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        local, http = latencies(eng, url, model_name, args.iters, make_prompt(vocab))
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        tput = asyncio.run(stream_throughput(url, model_name, args.streams, args.tokens, vocab))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    local_tput = engine_throughput(eng, args.streams, args.tokens, vocab)  # with the server stopped

    e50, h50 = statistics.median(local), statistics.median(http)
    print(f"model: {args.model} (vocab {config['vocab_size']}), {os.cpu_count()} CPU cores")
    print(f"1-token request latency over {args.iters} requests (ms):")
    print(f"  in-process engine   p50 {e50 * 1e3:7.2f}   p90 {pct(local, 0.9) * 1e3:7.2f}")
    print(f"  HTTP + 4 processes  p50 {h50 * 1e3:7.2f}   p90 {pct(http, 0.9) * 1e3:7.2f}")
    print(f"  added by serving    p50 {(h50 - e50) * 1e3:7.2f}")
    print(f"{args.streams} concurrent streams x {args.tokens} tokens:")
    print(f"  through the server  {tput['tok_per_s']:9,.0f} tokens/s ({tput['tokens']} tokens in {tput['wall_s']:.2f} s, "
          f"{tput['chunks']} SSE chunks, {tput['tokens_per_chunk']:.2f} tokens/chunk, "
          f"TTFT p50 {tput['ttft_p50_s'] * 1e3:.0f} ms)")
    print(f"  in-process engine   {local_tput:9,.0f} tokens/s (same requests, no serving layer)")


if __name__ == "__main__":
    main()
