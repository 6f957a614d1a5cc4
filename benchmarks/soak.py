"""Soak test: minutes of mixed load with client aborts and malformed requests, then leak checks.

    python benchmarks/soak.py --duration-s 600 --concurrency 32 --output soak.json
    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --pids 12345 ...   # a running server

Without `--base-url` the script starts `python -m server` itself on a free loopback port (the
embedded SmolLM2-135M on the CPU, or whatever `--server-args` says) and stops it at the end.

Phases: warm-up (the same mix for `--warmup-s`), idle + `/flush_cache`, the RSS baseline of every
server process, the load (`--duration-s`), idle + `/flush_cache`, the final checks. Every request
ends in exactly one class:

    completed   a good request answered 200 with a finish_reason (streamed: and `[DONE]`)
    aborted     we disconnected mid-stream or gave up early on purpose (before it completed)
    rejected    a malformed request answered 4xx with OpenAI's `{"error": {...}}` shape
    failed      anything else: a 5xx, a 4xx for a good request, a 2xx for a malformed one, an
                error without the OpenAI shape, a hang past `--request-timeout`, a transport error

The run fails (exit 1) when any request failed, when the server is not idle with no KV in use and
an empty prefix cache after the flush, when a process's RSS grew more than `--rss-tolerance` over
its post-warm-up value, when the server's finished-request counters do not match ours, or (when
the script started the server) when it does not stop cleanly on SIGTERM.

Everything is bounded: the load stops at `--duration-s` or `--max-requests`, each request at
`--request-timeout`, and only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder is first on sys.path; the server it tests is the checkout it
# lives in (also the one `python -m server` starts from, with cwd=REPO).
sys.path.insert(0, str(REPO))
from server.procfs import child_pids, proc_name, rss_mib, terminate  # noqa: E402
CLASSES = ("completed", "aborted", "rejected", "failed")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Prompts of different lengths; the shared system prompt gives the prefix cache something to reuse.
_SYSTEM = ("You are a careful assistant. Answer in plain sentences, keep to the point, and say so "
           "when you do not know something. ") * 3
_TOPICS = ("the tides", "bread making", "a lighthouse keeper", "prime numbers", "the history of maps",
           "how bees dance", "a rainy city at night", "compilers", "mountain weather", "old clocks")


# ----------------------------------------------------------------------------- the request mix

@dataclass(frozen=True)
class Planned:
    """One request to send. `body` is a dict (sent as JSON) or raw bytes (sent as they are).

    kind: "good" must complete; "abort" is dropped by us after `abort_after_chunks` stream chunks
    or `give_up_s` seconds; "malformed" must be refused with a 4xx (`case` names which defect)."""

    kind: str
    path: str
    body: Union[dict, bytes]
    stream: bool
    case: str = ""
    abort_after_chunks: int = 0
    give_up_s: float = 0.0


def _good_body(rng: random.Random, model: str, chat: bool, stream: bool, max_tokens: int) -> dict:
    topic = rng.choice(_TOPICS)
    body: dict = {"model": model, "max_tokens": max_tokens, "stream": stream,
                  "temperature": rng.choice((0.0, 0.7, 1.0))}
    if rng.random() < 0.5:
        body["ignore_eos"] = True  # exact lengths: the long requests really are long
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "system", "content": _SYSTEM},
                            {"role": "user", "content": f"Tell me about {topic}." * rng.randint(1, 8)}]
    else:
        body["prompt"] = _SYSTEM * rng.randint(0, 2) + f"A short essay about {topic}:"
    return body


def _malformed(rng: random.Random, model: str) -> tuple[str, str, Union[dict, bytes]]:
    """(case, path, body) of a request every OpenAI-compatible server must refuse with a 4xx."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    comp = {"model": model, "prompt": "hi", "max_tokens": 4}
    cases: list[tuple[str, str, Union[dict, bytes]]] = [
        ("bad-json", "/v1/chat/completions", b'{"model": "x", "messages": [{"role": '),
        ("not-an-object", "/v1/completions", b"[1, 2, 3]"),
        ("empty-body", "/v1/chat/completions", b""),
        ("max-tokens-string", "/v1/completions", {**comp, "max_tokens": "ten"}),
        ("messages-string", "/v1/chat/completions", {**chat, "messages": "hello"}),
        ("temperature-string", "/v1/chat/completions", {**chat, "temperature": "hot"}),
        ("prompt-dict", "/v1/completions", {**comp, "prompt": {"text": "hi"}}),
        ("negative-temperature", "/v1/completions", {**comp, "temperature": -1.0}),
        ("zero-max-tokens", "/v1/chat/completions", {**chat, "max_tokens": 0}),
        ("top-p-above-1", "/v1/completions", {**comp, "top_p": 2.0}),
        ("n-zero", "/v1/chat/completions", {**chat, "n": 0}),
        ("penalty-out-of-range", "/v1/completions", {**comp, "presence_penalty": 5.0}),
        ("too-many-stops", "/v1/completions", {**comp, "stop": ["a", "b", "c", "d", "e"]}),
        ("logit-bias-out-of-range", "/v1/chat/completions", {**chat, "logit_bias": {"42": 500}}),
        ("unknown-role", "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("empty-messages", "/v1/chat/completions", {**chat, "messages": []}),
        ("missing-messages", "/v1/chat/completions", {"model": model, "max_tokens": 4}),
        ("unknown-model", "/v1/chat/completions", {**chat, "model": "no-such-model"}),
        ("unknown-field", "/v1/completions", {**comp, "frobnicate": True}),
        ("prompt-too-long", "/v1/completions", {**comp, "prompt": "word " * 20000}),
        ("max-tokens-past-context", "/v1/completions", {**comp, "max_tokens": 10_000_000}),
    ]
    return rng.choice(cases)


def plan_request(rng: random.Random, model: str, abort_share: float, malformed_share: float,
                 long_share: float, short_max_tokens: int, long_max_tokens: int) -> Planned:
    r = rng.random()
    if r < malformed_share:
        case, path, body = _malformed(rng, model)
        return Planned("malformed", path, body, stream=isinstance(body, dict) and rng.random() < 0.5, case=case)
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if r < malformed_share + abort_share:
        # Aborts target long requests so that they are still running when we leave.
        stream = rng.random() < 0.6
        body = _good_body(rng, model, chat, stream, long_max_tokens)
        body["ignore_eos"] = True
        if stream:
            return Planned("abort", path, body, True, case="disconnect", abort_after_chunks=rng.randint(1, 6))
        return Planned("abort", path, body, False, case="give-up", give_up_s=rng.uniform(0.05, 2.0))
    max_tokens = long_max_tokens if rng.random() < long_share else short_max_tokens
    stream = rng.random() < 0.5
    return Planned("good", path, _good_body(rng, model, chat, stream, max_tokens), stream)


# ----------------------------------------------------------------------------- one request

@dataclass
class Outcome:
    kind: str
    cls: str  # one of CLASSES
    detail: str = ""
    status: Optional[int] = None
    completion_tokens: int = 0
    latency_s: float = 0.0


def _is_openai_error(payload: object) -> bool:
    err = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err


def _judge_error(p: Planned, status: int, raw: bytes) -> Outcome:
    """A non-200 answer: the right one for a malformed request, a failure for anything else."""
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if p.kind == "malformed" and 400 <= status < 500:
        if _is_openai_error(payload):
            return Outcome(p.kind, "rejected", p.case, status)
        return Outcome(p.kind, "failed", f"{p.case}: {status} without the OpenAI error shape: {raw[:200]!r}", status)
    return Outcome(p.kind, "failed", f"{p.kind} {p.case}: HTTP {status}: {raw[:300]!r}", status)


async def _read_stream(resp: httpx.Response, p: Planned) -> Outcome:
    """Read SSE lines; drop the connection after `abort_after_chunks` chunks when told to."""
    chunks = finish = tokens = 0
    done = False
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            return Outcome(p.kind, "failed", f"error event mid-stream: {data[:300]}", 200)
        chunks += 1
        finish += sum(1 for c in event.get("choices", ()) if c.get("finish_reason"))
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if p.kind == "abort" and chunks >= p.abort_after_chunks and not finish:
            return Outcome(p.kind, "aborted", p.case, 200)  # leaving the `async with` drops the connection
    if done and finish:
        return Outcome(p.kind, "completed", status=200, completion_tokens=tokens)
    if p.kind == "abort" and done and not finish:
        return Outcome(p.kind, "failed", "stream ended with [DONE] but no finish_reason", 200)
    return Outcome(p.kind, "failed", f"stream ended early (done={done}, finish_reason chunks={finish})", 200)


async def _send(client: httpx.AsyncClient, p: Planned) -> Outcome:
    if isinstance(p.body, bytes):
        kw: dict = {"content": p.body, "headers": {"content-type": "application/json"}}
    else:
        kw = {"json": p.body}
    if p.stream:
        async with client.stream("POST", p.path, **kw) as resp:
            if resp.status_code != 200:
                return _judge_error(p, resp.status_code, await resp.aread())
            if p.kind == "malformed":
                return Outcome(p.kind, "failed", f"{p.case}: accepted with 200", 200)
            return await _read_stream(resp, p)
    resp = await client.post(p.path, **kw)
    if resp.status_code != 200:
        return _judge_error(p, resp.status_code, resp.content)
    if p.kind == "malformed":
        return Outcome(p.kind, "failed", f"{p.case}: accepted with 200", 200)
    body = resp.json()
    choices = body.get("choices") or []
    if choices and all(c.get("finish_reason") for c in choices):
        return Outcome(p.kind, "completed", status=200, completion_tokens=body["usage"]["completion_tokens"])
    return Outcome(p.kind, "failed", f"200 without a finish_reason: {resp.text[:300]}", 200)


async def run_one(client: httpx.AsyncClient, p: Planned, timeout_s: float) -> Outcome:
    """Send `p` and classify what happened; never raises (except on cancellation of the caller)."""
    t0 = time.monotonic()
    give_up = p.give_up_s if p.kind == "abort" and not p.stream else None
    try:
        out = await asyncio.wait_for(_send(client, p), give_up if give_up is not None else timeout_s)
    except asyncio.TimeoutError:
        out = (Outcome(p.kind, "aborted", p.case) if give_up is not None
               else Outcome(p.kind, "failed", f"{p.kind} {p.case}: no answer within {timeout_s:.0f} s (hang)"))
    except (httpx.HTTPError, OSError) as e:
        out = Outcome(p.kind, "failed", f"{p.kind} {p.case}: transport error {type(e).__name__}: {e}")
    except (ValueError, KeyError, TypeError) as e:  # unparseable JSON or a body missing its fields
        out = Outcome(p.kind, "failed", f"{p.kind} {p.case}: bad response body: {type(e).__name__}: {e}")
    out.latency_s = time.monotonic() - t0
    return out


# ----------------------------------------------------------------------------- load phases

@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0

    def counts(self) -> dict[str, int]:
        c = Counter(o.cls for o in self.outcomes)
        return {k: c.get(k, 0) for k in CLASSES}

    def completion_tokens(self) -> int:
        return sum(o.completion_tokens for o in self.outcomes if o.cls == "completed")


async def run_load(base_url: str, model: str, args: argparse.Namespace, duration_s: float, max_requests: int,
                   rng: random.Random) -> LoadResult:
    """`args.concurrency` closed-loop clients until `duration_s` passed or `max_requests` were sent."""
    result = LoadResult()
    sent = 0
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency)
    # No httpx timeout of its own: run_one bounds each request (a stream's total time included).
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                p = plan_request(rng, model, args.abort_share, args.malformed_share, args.long_share,
                                 args.short_max_tokens, args.long_max_tokens)
                result.outcomes.append(await run_one(client, p, args.request_timeout))

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        result.elapsed_s = time.monotonic() - t0
    return result


# ----------------------------------------------------------------------------- the server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    """`python -m server` on a free loopback port, its output kept for the report."""

    SERVING = re.compile(r"Skiff is serving .* on (http://\S+) \(processes: (.*)\)")

    def __init__(self, server_args: list[str], start_timeout_s: float):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *server_args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.ready = threading.Event()
        self.children: dict[int, str] = {}
        threading.Thread(target=self._pump, daemon=True).start()
        if not self.ready.wait(start_timeout_s) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-40:]))
        self.url = f"http://127.0.0.1:{self.port}"

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            m = self.SERVING.search(line)
            if m:
                for part in m.group(2).split(","):
                    name, pid = part.strip().rsplit(" ", 1)
                    self.children[int(pid)] = name
                self.ready.set()
        self.ready.set()  # exited: wake start-up

    def pids(self) -> dict[int, str]:
        return {self.proc.pid: "api-server", **self.children}

    def stop(self, timeout_s: float = 60.0) -> Optional[int]:
        """SIGTERM, then the exit code (None if it had to be killed)."""
        return terminate(self.proc, timeout_s)


def parse_metrics(text: str) -> dict[str, float]:
    """name{labels} -> value, with the `model_name` label dropped."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            name, _, labels = key.partition("{")
            kept = [kv for kv in re.findall(r'\w+="[^"]*"', labels) if not kv.startswith("model_name=")]
            out[name + ("{" + ",".join(kept) + "}" if kept else "")] = float(value)
    return out


def finished_by_reason(m: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in m.items():
        hit = re.fullmatch(r'skiff:requests_finished_total\{finish_reason="([^"]+)"\}', key)
        if hit:
            out[hit.group(1)] = value
    return out


async def settle(client: httpx.AsyncClient, timeout_s: float) -> tuple[dict[str, float], str]:
    """Wait for idle, flush the prefix cache, and return /metrics once the gauges show it
    (or the last /metrics and what went wrong, after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    problem = "not idle"
    m: dict[str, float] = {}
    while time.monotonic() < deadline:
        m = parse_metrics((await client.get("/metrics")).text)
        idle = m.get("skiff:num_running_requests") == 0 and m.get("skiff:num_waiting_requests") == 0
        if not idle:
            problem = "not idle"
        else:
            r = await client.post("/flush_cache")
            problem = f"/flush_cache answered {r.status_code}: {r.text[:200]}" if r.status_code != 200 else ""
            if not problem:
                await asyncio.sleep(0.6)  # the gauges come every 0.25 s from the scheduler
                m = parse_metrics((await client.get("/metrics")).text)
                if m.get("skiff:kv_cache_usage") == 0 and m.get("skiff:prefix_cache_tokens") == 0:
                    return m, ""
                problem = "KV or prefix cache not empty after the flush"
        await asyncio.sleep(0.25)
    return m, problem


# ----------------------------------------------------------------------------- the run

class RssSampler:
    """RSS of each process every `interval_s` (a thread, so a busy event loop does not skew it)."""

    def __init__(self, pids: dict[int, str], interval_s: float):
        self.pids, self.interval_s = pids, interval_s
        self.max: dict[int, float] = {}
        # (seconds since the first sample, {pid: MiB}): tells a leak (steady growth) from an
        # allocator settling at a new level.
        self.series: list[tuple[float, dict[int, Optional[float]]]] = []
        self._t0: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> dict[int, Optional[float]]:
        now = {pid: rss_mib(pid) for pid in self.pids}
        for pid, v in now.items():
            if v is not None:
                self.max[pid] = max(self.max.get(pid, 0.0), v)
        t = time.monotonic()
        self._t0 = self._t0 if self._t0 is not None else t
        self.series.append((t - self._t0, now))
        return now

    def at_fraction(self, pid: int, frac: float) -> Optional[float]:
        """The sample `frac` of the way through the series."""
        return self.series[round(frac * (len(self.series) - 1))][1].get(pid) if self.series else None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def soak(args: argparse.Namespace, base_url: str, pids: dict[int, str]) -> dict:
    rng = random.Random(args.seed)
    report: dict = {"config": {k: v for k, v in vars(args).items()}, "checks": {}, "failures": []}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as ctl:
        model = args.model or (await ctl.get("/v1/models")).json()["data"][0]["id"]
        finished_before = finished_by_reason(parse_metrics((await ctl.get("/metrics")).text))

        warm = await run_load(base_url, model, args, args.warmup_s, args.max_requests, rng)
        _, problem = await settle(ctl, args.settle_timeout)
        report["warmup"] = {"elapsed_s": round(warm.elapsed_s, 1), **warm.counts()}
        report["checks"]["idle and flushed after the warm-up"] = (not problem, problem or "yes")
        finished_after_warmup = finished_by_reason(parse_metrics((await ctl.get("/metrics")).text))

        sampler = RssSampler(pids, args.rss_interval)
        baseline = sampler.sample()
        with sampler:
            load = await run_load(base_url, model, args, args.duration_s, args.max_requests, rng)
            m, problem = await settle(ctl, args.settle_timeout)
        end = sampler.sample()
        health = (await ctl.get("/health")).status_code

    counts = load.counts()
    report["load"] = {"elapsed_s": round(load.elapsed_s, 1), "requests": len(load.outcomes), **counts,
                      "completion_tokens": load.completion_tokens(),
                      "output_tok_per_s": round(load.completion_tokens() / max(load.elapsed_s, 1e-9), 1),
                      "requests_per_s": round(len(load.outcomes) / max(load.elapsed_s, 1e-9), 2),
                      "by_kind": {f"{o_kind}/{o_cls}": n for (o_kind, o_cls), n in
                                  sorted(Counter((o.kind, o.cls) for o in load.outcomes).items())},
                      "rejected_status": dict(sorted(Counter(str(o.status) for o in load.outcomes
                                                             if o.cls == "rejected").items()))}
    fails = [o.detail for o in warm.outcomes + load.outcomes if o.cls == "failed"]
    report["failures"] += fails[:50]
    checks = report["checks"]
    checks["every request accounted for"] = (len(fails) == 0 and sum(counts.values()) == len(load.outcomes),
                                             f"{len(fails)} failed (warm-up included)")
    checks["idle, KV 0 and prefix cache 0 after /flush_cache"] = (
        not problem, problem or f"running {m['skiff:num_running_requests']:.0f}, waiting "
        f"{m['skiff:num_waiting_requests']:.0f}, kv_cache_usage {m['skiff:kv_cache_usage']}, "
        f"prefix_cache_tokens {m['skiff:prefix_cache_tokens']:.0f}")
    checks["/health answers 200 afterwards"] = (health == 200, f"{health}")
    # The server counts a request it finished; one we dropped may have finished first or not.
    finished_end = finished_by_reason(m) if m else {}
    served = {k: finished_end.get(k, 0) - finished_after_warmup.get(k, 0) for k in finished_end}
    n_served = sum(served.values())
    ok = counts["completed"] <= n_served <= counts["completed"] + counts["aborted"]
    checks["server's finished counters match"] = (
        ok, f"server finished {n_served:.0f} {({k: int(v) for k, v in served.items() if v})}; "
        f"we completed {counts['completed']} and aborted {counts['aborted']}")
    report["server_finished_during_warmup"] = {k: int(finished_after_warmup.get(k, 0) - finished_before.get(k, 0))
                                               for k in finished_after_warmup}

    rss = {}
    rss_ok = True
    for pid, name in pids.items():
        b, mx, e = baseline.get(pid), sampler.max.get(pid), end.get(pid)
        growth = (e - b) / b if b and e else None
        good = growth is not None and growth <= args.rss_tolerance
        rss_ok &= good
        q = {f: sampler.at_fraction(pid, f) for f in (0.25, 0.5, 0.75)}
        rss[f"{name} ({pid})"] = {"after_warmup_mib": b and round(b, 1),
                                  **{f"at_{int(f * 100)}pct_mib": v and round(v, 1) for f, v in q.items()},
                                  "max_mib": mx and round(mx, 1), "end_mib": e and round(e, 1),
                                  "growth": growth and round(growth, 4), "ok": good}
    report["rss"] = rss
    step = max(1, len(sampler.series) // 100)  # at most ~100 points in the JSON
    report["rss_series"] = [{"t_s": round(t, 1), **{pids[pid]: v and round(v, 1) for pid, v in row.items()}}
                            for t, row in sampler.series[::step]]
    checks[f"RSS within {args.rss_tolerance:.0%} of post-warm-up"] = (
        rss_ok, ", ".join(f"{k}: {v['growth']:+.1%}" if v["growth"] is not None else f"{k}: gone"
                          for k, v in rss.items()))
    return report


def print_summary(report: dict) -> None:
    load = report["load"]
    print(f"\nwarm-up: {report['warmup']}")
    print(f"load: {load['requests']} requests in {load['elapsed_s']} s ({load['requests_per_s']} req/s), "
          f"{load['completion_tokens']} completion tokens ({load['output_tok_per_s']} tok/s)")
    print(f"{'class':<12}{'requests':>10}")
    for cls in CLASSES:
        print(f"{cls:<12}{load[cls]:>10}")
    print("by kind: " + ", ".join(f"{k} {v}" for k, v in load["by_kind"].items()))
    print(f"rejected by status: {load['rejected_status']}")
    print(f"\n{'process':<28}{'after warm-up':>15}{'25%':>9}{'50%':>9}{'75%':>9}{'max':>9}{'end':>9}"
          f"{'growth':>9}  (RSS MiB; 25/50/75%: that far through the load)")
    for name, v in report["rss"].items():
        growth = f"{v['growth']:+.1%}" if v["growth"] is not None else "-"
        cols = "".join(f"{v[k] or '-':>9}" for k in ("at_25pct_mib", "at_50pct_mib", "at_75pct_mib", "max_mib",
                                                       "end_mib"))
        print(f"{name:<28}{v['after_warmup_mib'] or '-':>15}{cols}{growth:>9}")
    print()
    for name, (ok, detail) in report["checks"].items():
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    for line in report["failures"][:20]:
        print(f"  failure: {line}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", help="a running server (loopback only); default: start one")
    p.add_argument("--pids", help="with --base-url: comma-separated server PIDs to watch; one PID means "
                                  "the API server, whose child processes are added")
    p.add_argument("--server-args", default="", help="arguments of the `python -m server` we start")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds for our server to come up")
    p.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    p.add_argument("--duration-s", type=float, default=600.0, help="seconds of load after the warm-up")
    p.add_argument("--warmup-s", type=float, default=60.0, help="seconds of the same mix before the RSS baseline")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="per phase, a bound besides the time")
    p.add_argument("--abort-share", type=float, default=0.1, help="share of requests we drop early")
    p.add_argument("--malformed-share", type=float, default=0.1, help="share of malformed requests")
    p.add_argument("--long-share", type=float, default=0.2, help="share of good requests with the long max_tokens")
    p.add_argument("--short-max-tokens", type=int, default=16)
    p.add_argument("--long-max-tokens", type=int, default=128)
    p.add_argument("--request-timeout", type=float, default=300.0, help="a good request longer than this hangs")
    p.add_argument("--settle-timeout", type=float, default=60.0, help="seconds to get idle + flushed")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth per process")
    p.add_argument("--rss-interval", type=float, default=2.0, help="seconds between RSS samples (for the max)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.base_url:
        if urlparse(args.base_url).hostname not in _LOOPBACK:
            p.error("--base-url must be a loopback address")
        if not args.pids:
            p.error("--base-url needs --pids (the server's processes, for the RSS checks)")
    if args.concurrency < 1 or not (0 <= args.abort_share + args.malformed_share <= 1):
        p.error("need --concurrency >= 1 and abort + malformed shares within 0..1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    server: Optional[ManagedServer] = None
    if args.base_url:
        given = [int(x) for x in args.pids.split(",") if x.strip()]
        pids = {pid: proc_name(pid) or "?" for pid in given}
        if len(given) == 1:
            pids.update({c: proc_name(c) for c in child_pids(given[0]) if proc_name(c).startswith("skiff-")})
        base_url = args.base_url.rstrip("/").removesuffix("/v1")
    else:
        t0 = time.monotonic()
        server = ManagedServer(shlex.split(args.server_args), args.start_timeout)
        print(f"server up in {time.monotonic() - t0:.1f} s: {server.pids()}", flush=True)
        pids, base_url = server.pids(), server.url
    try:
        report = asyncio.run(soak(args, base_url, pids))
    finally:
        if server is not None:
            code = server.stop()
    if server is not None:
        deadline = time.monotonic() + 10  # children are reaped just after the API server exits
        while not (gone := all(rss_mib(pid) is None for pid in pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        report["checks"]["server stops cleanly on SIGTERM"] = (code == 0 and gone, f"exit code {code}, "
                                                               f"{'no process left' if gone else 'processes left'}")
    print_summary(report)
    ok = all(ok for ok, _ in report["checks"].values())
    report["passed"] = ok
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
