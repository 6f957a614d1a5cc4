"""Prometheus metrics of one server instance (its own registry: no global state)."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.ipc import SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


# The scheduler's running totals and the counters that follow them.
_TOTALS = (("num_retractions", "skiff:num_retractions", "Running requests retracted to the queue when KV ran out."),
           ("num_evicted_pages", "skiff:evicted_pages", "KV pages evicted from the prefix cache."),
           ("grammar_cache_hits", "skiff:grammar_cache_hits", "Grammar compile cache hits."),
           ("grammar_cache_misses", "skiff:grammar_cache_misses", "Grammar compiles (cache misses)."),
           ("grammar_compile_failures", "skiff:grammar_compile_failures", "Grammars that failed to compile."),
           ("grammar_mask_fill_s", "skiff:grammar_mask_fill_seconds", "CPU time spent filling grammar bitmasks."),
           ("spec_draft_tokens", "skiff:spec_draft_tokens", "Speculative decoding: draft tokens verified."),
           ("spec_accepted_tokens", "skiff:spec_accepted_tokens",
            "Speculative decoding: draft tokens the model accepted."),
           ("spec_verifications", "skiff:spec_verifications",
            "Speculative decoding: verify steps of a request (mean accepted length = accepted / this + 1)."))


class Metrics:
    def __init__(self, model_name: str):
        # `*_created` series next to every counter are noise to dashboards; a process-wide switch
        # of prometheus-client, and this process exports only Skiff's registry.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        self.num_running = gauge("skiff:num_running_requests", "Requests in the running batch.")
        self.num_waiting = gauge("skiff:num_waiting_requests", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("skiff:kv_cache_usage", "Fraction of KV cache pages that requests hold (0..1); "
                              "cached prefixes no request references count as free.")
        self.prefix_cache_tokens = gauge("skiff:prefix_cache_tokens",
                                         "Tokens of cached prefixes no request references (reusable, evictable).")
        self.hit_rate = gauge("skiff:prefix_cache_hit_rate", "Prefix cache hit rate over prompt tokens (0..1).")
        self.prompt_tokens = Counter("skiff:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("skiff:generation_tokens", "Generated tokens of finished requests.",
                                         labels, registry=r).labels(model_name)
        self.cached_tokens = Counter("skiff:cached_prompt_tokens", "Prompt tokens served from the prefix cache.",
                                     labels, registry=r).labels(model_name)
        self.requests = Counter("skiff:requests_finished", "Finished requests by finish reason.",
                                labels + ["finish_reason"], registry=r)
        self.model_name = model_name
        self.ttft = Histogram("skiff:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("skiff:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.totals = {field: Counter(name, doc, labels, registry=r).labels(model_name) for field, name, doc in _TOTALS}
        self._last_totals = {field: 0 for field, _, _ in _TOTALS}
        self.e2e = Histogram("skiff:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)

    def update_stats(self, stats: SchedulerStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.prefix_cache_tokens.set(stats.prefix_cache_tokens)
        self.hit_rate.set(stats.cache_hit_rate)
        for field, counter in self.totals.items():  # counters take the growth of the running totals
            total = getattr(stats, field)
            if total > self._last_totals[field]:
                counter.inc(total - self._last_totals[field])
            self._last_totals[field] = total

    def observe_tokens(self, first: bool, elapsed_s: float, gap_s: float, num_tokens: int) -> None:
        """One output arrived with `num_tokens` new tokens; `gap_s` since the previous one."""
        if first:
            self.ttft.observe(elapsed_s)
            num_tokens -= 1
        if num_tokens > 0:
            per_token = gap_s / num_tokens
            for _ in range(num_tokens):
                self.itl.observe(per_token)

    def observe_finished(self, finish_reason: str, e2e_s: float, prompt_tokens: int, completion_tokens: int,
                         cached_tokens: int) -> None:
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.requests.labels(self.model_name, finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
