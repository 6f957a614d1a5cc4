"""Prometheus metrics of one server instance (its own registry: no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.ipc import SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        self.num_running = gauge("skiff:num_running_requests", "Requests in the running batch.")
        self.num_waiting = gauge("skiff:num_waiting_requests", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("skiff:kv_cache_usage", "Fraction of KV cache pages in use (0..1).")
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
        self.grammar_hits = Counter("skiff:grammar_cache_hits", "Grammar compile cache hits.", labels,
                                    registry=r).labels(model_name)
        self.grammar_misses = Counter("skiff:grammar_cache_misses", "Grammar compiles (cache misses).", labels,
                                      registry=r).labels(model_name)
        self.grammar_failures = Counter("skiff:grammar_compile_failures", "Grammars that failed to compile.",
                                        labels, registry=r).labels(model_name)
        self.grammar_mask_s = Counter("skiff:grammar_mask_fill_seconds", "CPU time spent filling grammar bitmasks.",
                                      labels, registry=r).labels(model_name)
        self._grammar_last = (0, 0, 0, 0.0)  # the scheduler reports running totals; counters take deltas
        self.e2e = Histogram("skiff:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)

    def update_stats(self, stats: SchedulerStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.hit_rate.set(stats.cache_hit_rate)
        now = (stats.grammar_cache_hits, stats.grammar_cache_misses, stats.grammar_compile_failures,
               stats.grammar_mask_fill_s)
        for counter, new, old in zip((self.grammar_hits, self.grammar_misses, self.grammar_failures,
                                      self.grammar_mask_s), now, self._grammar_last):
            if new > old:
                counter.inc(new - old)
        self._grammar_last = now

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
