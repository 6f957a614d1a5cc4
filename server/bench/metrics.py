"""Benchmark metrics from per-request records, and server-side cache counters from /metrics.

Definitions (as SGLang's and vLLM's benchmarks print them):
- duration: from the first request sent to the last one finished.
- throughputs: successful requests, and their input/output tokens, per second of duration.
- concurrency: sum of successful requests' end-to-end latencies / duration (the mean number in flight).
- TTFT: request sent -> first content chunk. ITL: gaps between content chunks.
  TPOT: (E2E - TTFT) / (output tokens - 1) per request. E2E: request sent -> stream finished.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from server.bench.client import RequestRecord


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds; all zero when there were no samples."""

    mean: float
    median: float
    p90: float
    p99: float
    max: float
    count: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "LatencyStats":
        if len(seconds) == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(ms.mean()), float(p50), float(p90), float(p99), float(ms.max()), int(ms.size))


@dataclass(frozen=True)
class BenchMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    # Output lengths that differ from what was asked (expected 0 with ignore_eos).
    output_len_mismatches: int
    # From usage.prompt_tokens_details.cached_tokens, where the server reports it.
    cached_tokens: Optional[int]
    usage_cache_hit_rate: Optional[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_metrics(records: Sequence[RequestRecord], duration_s: float) -> BenchMetrics:
    ok = [r for r in records if r.success]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    cached_inputs = sum(r.input_len for r in ok if r.cached_tokens is not None)
    return BenchMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=per_s(len(ok)),
        input_throughput=per_s(total_in),
        output_throughput=per_s(total_out),
        total_throughput=per_s(total_in + total_out),
        concurrency=per_s(sum(r.e2e for r in ok)),
        ttft_ms=LatencyStats.of([r.ttft for r in ok]),
        tpot_ms=LatencyStats.of([t for r in ok if (t := r.tpot) is not None]),
        itl_ms=LatencyStats.of([gap for r in ok for gap in r.itl]),
        e2e_ms=LatencyStats.of([r.e2e for r in ok]),
        output_len_mismatches=sum(r.output_len != r.requested_output_len for r in ok),
        cached_tokens=sum(cached) if cached else None,
        usage_cache_hit_rate=(sum(cached) / cached_inputs) if cached and cached_inputs else None,
    )


# ----------------------------------------------------------------------------- server /metrics

# Gauges that already are a hit rate, and (hit tokens, queried tokens) counter pairs, by server.
_RATE_GAUGES = ("skiff:prefix_cache_hit_rate", "sglang:cache_hit_rate")
_COUNTER_PAIRS = (
    ("skiff:cached_tokens_total", "skiff:prompt_tokens_total"),
    ("skiff:prefix_cache_hit_tokens_total", "skiff:prompt_tokens_total"),
    ("skiff:cached_prompt_tokens_total", "skiff:prompt_tokens_total"),
    ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
    ("vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total"),
)


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (e.g. one series per model). Histogram
    buckets and `_created` timestamps are left out: summed over labels they mean nothing.
    Malformed text yields what parsed before the fault."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith(("_bucket", "_created")):
                    continue
                if math.isfinite(sample.value):
                    samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    except ValueError:
        pass
    return samples


# Speculative decoding's (accepted tokens, drafted tokens, verify steps) counters, by server.
_SPEC_COUNTERS = (
    ("skiff:spec_accepted_tokens_total", "skiff:spec_draft_tokens_total", "skiff:spec_verifications_total"),
    ("vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_draft_tokens_total",
     "vllm:spec_decode_num_drafts_total"),
)


def _relevant(samples: dict[str, float]) -> dict[str, float]:
    keys = (set(_RATE_GAUGES) | {name for pair in _COUNTER_PAIRS for name in pair}
            | {name for names in _SPEC_COUNTERS for name in names})
    return {k: v for k, v in samples.items() if k in keys or k.startswith("skiff:")}


@dataclass(frozen=True)
class ServerCacheStats:
    """Prefix-cache figures from the server's /metrics, scraped before and after the run.

    hit_rate: cached / prompt tokens over the run, from counter deltas where the server exports
    such counters, else its own hit-rate gauge after the run. None: the server exports neither.
    """

    hit_rate: Optional[float]
    hit_rate_source: Optional[str]
    before: dict[str, float]
    after: dict[str, float]
    # speculative decoding over the run, where the server reports it and drafted anything:
    # accepted / drafted tokens, and tokens gained per verify step (accepted / steps + 1)
    spec_acceptance: Optional[float] = None
    spec_tokens_per_step: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _spec_stats(before: dict[str, float], after: dict[str, float]) -> tuple[Optional[float], Optional[float]]:
    for accepted, drafted, steps in _SPEC_COUNTERS:
        if all(name in before and name in after for name in (accepted, drafted, steps)):
            delta = {name: after[name] - before[name] for name in (accepted, drafted, steps)}
            if delta[drafted] > 0 and delta[steps] > 0:
                return delta[accepted] / delta[drafted], delta[accepted] / delta[steps] + 1
    return None, None


def server_cache_stats(before: Optional[dict[str, float]], after: Optional[dict[str, float]]) -> ServerCacheStats:
    before, after = before or {}, after or {}
    spec = _spec_stats(before, after)
    hit_rate, source = None, None
    for hits, queries in _COUNTER_PAIRS:
        if all(name in before and name in after for name in (hits, queries)):
            asked = after[queries] - before[queries]
            if asked > 0:
                hit_rate, source = (after[hits] - before[hits]) / asked, f"{hits} / {queries}"
                break
    else:
        source = next((gauge for gauge in _RATE_GAUGES if gauge in after), None)
        hit_rate = after[source] if source is not None else None
    return ServerCacheStats(hit_rate, source, _relevant(before), _relevant(after), *spec)


# ----------------------------------------------------------------------------- the table

_WIDTH = 56


def _title(text: str, fill: str = "-") -> str:
    return f" {text} ".center(_WIDTH, fill)


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label + ':':<40}{value!s:>16}"


def format_table(
    metrics: BenchMetrics,
    info: Iterable[tuple[str, Any]],
    cache: Optional[ServerCacheStats] = None,
) -> str:
    """The human-readable result block printed at the end of a run."""
    lines = [_title("Serving Benchmark Result", "=")]
    lines += [_row(k, v) for k, v in info]
    lines += [
        _row("Successful requests", metrics.completed),
        _row("Failed requests", metrics.failed),
        _row("Benchmark duration (s)", metrics.duration_s),
        _row("Total input tokens", metrics.total_input_tokens),
        _row("Total generated tokens", metrics.total_output_tokens),
        _row("Request throughput (req/s)", metrics.request_throughput),
        _row("Input token throughput (tok/s)", metrics.input_throughput),
        _row("Output token throughput (tok/s)", metrics.output_throughput),
        _row("Total token throughput (tok/s)", metrics.total_throughput),
        _row("Concurrency", metrics.concurrency),
    ]
    if metrics.output_len_mismatches:
        lines.append(_row("Outputs not of requested length", metrics.output_len_mismatches))
    if metrics.usage_cache_hit_rate is not None:
        lines.append(_row("Cached prompt tokens (usage)", metrics.cached_tokens))
        lines.append(_row("Prefix cache hit rate (usage)", f"{metrics.usage_cache_hit_rate:.2%}"))
    if cache is not None and cache.hit_rate is not None:
        lines.append(_row("Prefix cache hit rate (/metrics)", f"{cache.hit_rate:.2%}"))
    if cache is not None and cache.spec_acceptance is not None:
        lines.append(_row("Speculative acceptance rate", f"{cache.spec_acceptance:.2%}"))
        lines.append(_row("Tokens per verify step", cache.spec_tokens_per_step))
    for name, short, stats in (
        ("End-to-End Latency", "E2E", metrics.e2e_ms),
        ("Time to First Token", "TTFT", metrics.ttft_ms),
        ("Time per Output Token (excl. 1st token)", "TPOT", metrics.tpot_ms),
        ("Inter-Token Latency", "ITL", metrics.itl_ms),
    ):
        lines.append(_title(name))
        lines += [
            _row(f"Mean {short} (ms)", stats.mean),
            _row(f"Median {short} (ms)", stats.median),
            _row(f"P90 {short} (ms)", stats.p90),
            _row(f"P99 {short} (ms)", stats.p99),
        ]
    lines.append("=" * _WIDTH)
    return "\n".join(lines)
