"""Fuzz the API with schemathesis, from the server's own /openapi.json.

    .venv/bin/python benchmarks/fuzz_api.py --cases 10000 [--seed 0] [--url http://host:port]

Without --url it starts a server on the tiny dummy model (configs/tiny-llama.json, --load-format
dummy, --max-model-len 256, CPU, float32), so generation is cheap. Cases are split evenly over the
four JSON routes (/v1/chat/completions, /v1/completions, /tokenize, /detokenize) and, within each,
over three kinds of bodies that schemathesis draws from the server's msgspec-generated request
schemas (server/openapi.py):
  positive  valid for the documented schema (most still fail the server's semantic checks: 400);
  negative  violating the documented schema (wrong types, unknown fields, missing ones);
  narrowed  valid for a copy of the schema narrowed to what the server accepts (`narrowed_document`:
            in-range sampling values, known roles, small max_tokens, `stream` always sent), so
            cases get past validation into tokenization, generation, grammars and streaming,
            and stay cheap.
Bodies with `stream: true` are part of all three, so SSE answers are part of the run.

A case fails when the server answers 5xx or not at all; when the answer does not conform to the
document (undocumented status or content type, an error body that is not OpenAI's
`{"error": {"message", "type", "param", "code"}}`); when a schema-violating body is not rejected
with a 4xx; or when a stream is not well-formed SSE (JSON `data:` events ending with [DONE]).
After the run the server must still answer /health with 200 and complete a normal request.
Prints a JSON report (counts, status histogram, failures) and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

REPO = Path(__file__).resolve().parent.parent
OPERATIONS = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
MODES = ("positive", "negative", "narrowed")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
TINY_SERVER_ARGS = ("--model", "configs/tiny-llama.json", "--load-format", "dummy", "--max-model-len", "256")
MAX_STREAM_EVENTS = 1_000_000
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class FuzzReport:
    """What a run did: cases sent, answers by status (overall and per route), what went wrong."""

    cases: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    by_operation: dict[str, Counter] = field(default_factory=dict)
    by_mode: dict[str, Counter] = field(default_factory=dict)
    streams: int = 0  # 200 answers that were SSE
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"cases": self.cases, "seconds": round(self.seconds, 1),
                "statuses": dict(sorted(self.statuses.items())), "streams": self.streams,
                "by_operation": {op: dict(sorted(c.items())) for op, c in self.by_operation.items()},
                "by_mode": {mode: dict(sorted(c.items())) for mode, c in self.by_mode.items()},
                "failures": self.failures}


def openai_error_problem(body: bytes) -> Optional[str]:
    """Why `body` is not an OpenAI error object, or None when it is one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return f"error body is not JSON: {body[:200]!r}"
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or set(error) != ERROR_KEYS or not isinstance(error["message"], str) \
            or not isinstance(error["type"], str):
        return f"error body is not OpenAI-shaped: {body[:300]!r}"
    return None


def sse_problem(body: bytes) -> Optional[str]:
    """Why `body` is not a well-formed stream (JSON `data:` events, the last one [DONE], error
    events OpenAI-shaped), or None when it is one."""
    events = [line[6:] for line in body.decode("utf-8", "replace").split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"stream does not end with [DONE]: {body[-200:]!r}"
    for event in events[:-1]:
        try:
            doc = json.loads(event)
        except ValueError:
            return f"stream event is not JSON: {event[:200]!r}"
        if "error" in doc:
            problem = openai_error_problem(event.encode())
            if problem:
                return "in a stream: " + problem
    return None


# ----------------------------------------------------------------------------- the narrowed schema

_TOKEN = {"type": "integer", "minimum": 0, "maximum": 999}  # inside any real vocabulary
_TOKENS = {"type": "array", "items": _TOKEN, "minItems": 1, "maxItems": 32}
_SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 16},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "maximum": 50},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
    "n": {"type": "integer", "minimum": 1, "maximum": 3},
    "seed": {"type": "integer", "minimum": -2 ** 63, "maximum": 2 ** 63 - 1},
    "stream": {"type": "boolean"},
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": 2},
    "stop": {"anyOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]},
    "stop_token_ids": {"type": "array", "items": _TOKEN, "maxItems": 4},
    "logit_bias": {"type": "object", "maxProperties": 3, "propertyNames": {"pattern": "^[1-9][0-9]{0,2}$"},
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
    "response_format": {"anyOf": [{"type": "null"}, {
        "type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}, "required": ["type"],
        "additionalProperties": False}]},
}
# Fields the server rejects whatever their value (unsupported, or only valid with a matching grammar /
# tool list / model name that random data never hits): left out of the narrowed bodies.
_DROPPED = ("model", "functions", "function_call", "tools", "tool_choice", "parallel_tool_calls", "regex", "ebnf")
_NARROWED = {
    "ChatMessageIn": ({
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
            "required": ["type", "text"], "additionalProperties": False}}]},
    }, ("name", "refusal", "tool_calls", "tool_call_id"), ["role", "content"]),
    "ChatCompletionRequest": ({
        **_SAMPLING,
        "messages": {"type": "array", "minItems": 1, "maxItems": 4,
                     "items": {"$ref": "#/components/schemas/ChatMessageIn"}},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
    }, _DROPPED + ("audio", "reasoning_effort", "web_search_options", "modalities", "max_completion_tokens"),
        ["messages", "stream"]),
    "CompletionRequest": ({
        **_SAMPLING,
        "prompt": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 200},
                             {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 100},
                              "minItems": 1, "maxItems": 3},
                             _TOKENS,
                             {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": 3}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
    }, _DROPPED + ("suffix", "best_of"), ["prompt", "stream"]),
    "TokenizeBody": ({}, ("model",), []),
    "DetokenizeBody": ({"tokens": {"type": "array", "items": _TOKEN, "maxItems": 64}}, ("model",), ["tokens"]),
}


def narrowed_document(doc: dict) -> dict:
    """A copy of the OpenAPI document whose request bodies stay (mostly) inside what the server
    accepts. Raises KeyError when the server's schemas lost a field named here, so the narrowing
    cannot silently drift from the Structs it narrows."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    for name, (properties, dropped, required) in _NARROWED.items():
        props = schemas[name]["properties"]
        for field_name in (*properties, *dropped):
            if field_name not in props:
                raise KeyError(f"{name} has no field {field_name!r} any more")
        props.update(copy.deepcopy(properties))
        for field_name in dropped:
            del props[field_name]
        schemas[name]["required"] = required
    return doc


# ----------------------------------------------------------------------------- the run


def _content_type(response: schemathesis.Response) -> str:
    return (response.headers.get("content-type") or [""])[0]


def _check(case, response: schemathesis.Response) -> list[str]:
    problems = []
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as e:
        problems += [f"{type(f).__name__}: {f.title}: {f.message}" for f in e.exceptions]
    if response.status_code >= 400:
        problem = openai_error_problem(response.content)
        if problem:
            problems.append(problem)
    elif _content_type(response).startswith("text/event-stream"):
        problem = "the stream was cut short" if response.stream_cut_short else sse_problem(response.content)
        if problem:
            problems.append(problem)
    return problems


def run_fuzz(url: str, cases: int, seed_value: int = 0, timeout_s: float = 120.0,
             log_every: int = 0) -> FuzzReport:
    """Send about `cases` generated requests (split evenly over OPERATIONS x MODES) to the server
    at `url`; every request waits for its whole answer (streams included) before the next."""
    document = httpx.get(url + "/openapi.json", timeout=30).raise_for_status().json()
    schemas = {"documented": schemathesis.openapi.from_dict(document),
               "narrowed": schemathesis.openapi.from_dict(narrowed_document(document))}
    for schema in schemas.values():
        schema.config.max_stream_events = MAX_STREAM_EVENTS  # read streams to the end, not the first 20 events
    report = FuzzReport()
    per_run = max(1, -(-cases // (len(OPERATIONS) * len(MODES))))  # at least `cases` in all
    session = requests.Session()
    start = time.monotonic()
    for path in OPERATIONS:
        statuses = report.by_operation.setdefault(path, Counter())
        for mode in MODES:
            operation = schemas["narrowed" if mode == "narrowed" else "documented"][path]["POST"]
            generation = GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE
            mode_statuses = report.by_mode.setdefault(mode, Counter())
            @seed(seed_value)
            @settings(max_examples=per_run, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), derandomize=False)
            @given(case=operation.as_strategy(generation_mode=generation))
            def one(case) -> None:
                report.cases += 1
                try:
                    response = case.call(base_url=url, session=session, timeout=timeout_s)
                except requests.RequestException as e:
                    report.failures.append(f"{path} ({mode}): no answer: {e!r}\n{case.as_curl_command()}")
                    return
                report.statuses[response.status_code] += 1
                statuses[response.status_code] += 1
                mode_statuses[response.status_code] += 1
                if response.status_code == 200 and _content_type(response).startswith("text/event-stream"):
                    report.streams += 1
                for problem in _check(case, response):
                    report.failures.append(f"{path} ({mode}) {response.status_code}: {problem}\n"
                                           f"{case.as_curl_command(base_url=url)}")
                if log_every and report.cases % log_every == 0:
                    print(f"{report.cases} cases, {time.monotonic() - start:.0f} s, "
                          f"{dict(sorted(report.statuses.items()))}, {len(report.failures)} failures",
                          file=sys.stderr, flush=True)

            one()
    report.seconds = time.monotonic() - start
    return report


def server_still_serves(url: str) -> Optional[str]:
    """Why the server is not healthy after the run (None when /health is 200 and a completion works)."""
    health = httpx.get(url + "/health", timeout=30)
    if health.status_code != 200:
        return f"/health answered {health.status_code}: {health.text}"
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
    if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 4:
        return f"a plain completion answered {r.status_code}: {r.text}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="a running server (default: start one on the tiny dummy model)")
    parser.add_argument("--max-failures-shown", type=int, default=20)
    args = parser.parse_args(argv)
    server = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import SkiffServer  # the tests' server harness: a free port, waits for /health
        server = SkiffServer(*TINY_SERVER_ARGS).start()
        url = server.url
    try:
        report = run_fuzz(url, args.cases, args.seed, log_every=500)
        after = server_still_serves(url)
    finally:
        if server is not None:
            server.stop()
    out = report.as_dict()
    out["failures"] = report.failures[:args.max_failures_shown]
    out["failure_count"] = len(report.failures)
    out["server_after_run"] = after or "healthy: /health 200, a 4-token completion works"
    print(json.dumps(out, indent=1))
    return 1 if report.failures or after else 0


if __name__ == "__main__":
    sys.exit(main())
