"""Driving a workload against a server: warm-up, Poisson arrivals, a concurrency cap, progress.

Contract: `run_benchmark` sends every request exactly once and returns one record per request in
workload order, whatever the server does; server-side cache counters are scraped from /metrics
before and after when the server has that endpoint (any failure there just means no numbers).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import httpx

from server.bench.client import Endpoint, RequestRecord, send_request
from server.bench.datasets import BenchRequest


class ServerError(RuntimeError):
    """The server could not be asked what it serves (unreachable, or no usable /v1/models)."""


@dataclass(frozen=True)
class RunOptions:
    """request_rate: mean requests per second of Poisson arrivals (inf: all at once).
    max_concurrency: most requests in flight (None: no cap). timeout: seconds per request."""

    request_rate: float = math.inf
    max_concurrency: Optional[int] = None
    seed: int = 0
    timeout: Optional[float] = None
    warmup_requests: int = 1
    progress: bool = True


@dataclass
class RunResult:
    records: list[RequestRecord]
    warmup: list[RequestRecord]
    duration_s: float
    metrics_before: Optional[dict[str, float]]
    metrics_after: Optional[dict[str, float]]


def _root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def first_model(base_url: str, api_key: Optional[str] = None, timeout: float = 30.0) -> str:
    """The first model id that GET /v1/models lists."""
    url = _root(base_url) + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout)
        resp.raise_for_status()
        models = resp.json().get("data") or []
        return str(models[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ServerError(f"cannot read the served model from {url}: {exc}; pass --model") from exc


async def scrape_metrics(client: httpx.AsyncClient, base_url: str) -> Optional[dict[str, float]]:
    """Samples of GET /metrics, or None where the server has no Prometheus endpoint."""
    from server.bench.metrics import parse_prometheus

    try:
        resp = await client.get(_root(base_url) + "/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return parse_prometheus(resp.text)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="requests", unit="req")


async def run_benchmark(endpoint: Endpoint, requests: Sequence[BenchRequest], options: RunOptions) -> RunResult:
    if options.max_concurrency is not None and options.max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    if not options.request_rate > 0:
        raise ValueError("request_rate must be > 0 (inf: all at once)")
    # Connection pooling must never be the bottleneck: a pool limit would queue requests inside
    # the client and show up as server TTFT.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(options.timeout, connect=options.timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        warmup = []
        for i in range(min(options.warmup_requests, len(requests))):
            warmup.append(await send_request(client, endpoint, requests[i], i, time.perf_counter(), options.timeout))

        before = await scrape_metrics(client, endpoint.base_url)
        rng = random.Random(options.seed)
        gate = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else None
        records: list[Optional[RequestRecord]] = [None] * len(requests)

        with _progress_bar(len(requests), options.progress) as bar:

            async def one(i: int, t0: float) -> None:
                if gate is None:
                    records[i] = await send_request(client, endpoint, requests[i], i, t0, options.timeout)
                else:
                    async with gate:
                        records[i] = await send_request(client, endpoint, requests[i], i, t0, options.timeout)
                if bar is not None:
                    bar.update(1)

            t0 = time.perf_counter()
            tasks = []
            for i in range(len(requests)):
                tasks.append(asyncio.create_task(one(i, t0)))
                if math.isfinite(options.request_rate) and i + 1 < len(requests):
                    await asyncio.sleep(rng.expovariate(options.request_rate))
            await asyncio.gather(*tasks)
            end = max((r.start + r.e2e for r in records if r is not None), default=0.0)
            first = min((r.start for r in records if r is not None), default=0.0)

        after = await scrape_metrics(client, endpoint.base_url)
    done = [r for r in records if r is not None]
    return RunResult(done, warmup, max(end - first, 0.0), before, after)
