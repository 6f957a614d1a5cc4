"""Structured outputs and tool calling end to end: the real server, the real model, the openai SDK.

One server (SmolLM2-135M, float32, CPU) for the module. Every constrained output must parse and
validate whatever the sampler does, so the schema tests sample at temperature 1 with 20 seeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.slow

SEEDS = range(20)
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {"type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 20},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"]},
        },
        "required": ["name", "address"],
    },
    "bounded_array": {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "minItems": 1, "maxItems": 3}},
        "required": ["colors"],
    },
    "enums": {
        "type": "object",
        "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                       "confidence": {"type": "string", "enum": ["low", "high"]}},
        "required": ["sentiment", "confidence"],
    },
    "int_ranges": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "floor": {"type": "integer", "minimum": -3, "maximum": 40}},
        "required": ["age", "floor"],
    },
    "optional_closed": {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 30},
                       "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
        "required": ["title"],
        "additionalProperties": False,
    },
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a timezone",
    "parameters": {"type": "object", "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
                   "required": ["utc_offset"]}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def _model_dir() -> str:
    try:
        from scheduler_proc.models.embedded import ensure_embedded_model
    except ImportError:
        return "/tmp/smol/hf"
    return str(ensure_embedded_model())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    cmd = [sys.executable, "-m", "server", "--model", _model_dir(), "--served-model-name", "smol",
           "--port", str(port), "--dtype", "float32", "--device", "cpu", "--max-running-requests", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace")
                pytest.fail(f"the server exited with {proc.returncode}:\n{out[-4000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become healthy in time")
            time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def _gather(coros):
    async def run():
        return await asyncio.gather(*coros)
    return asyncio.run(run())


def _chat_many(server: str, requests: list[dict]):
    """Send chat requests concurrently (so the server batches them); responses in order."""
    async def run():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=600) as c:
            return await asyncio.gather(*(c.chat.completions.create(model="smol", **kw) for kw in requests))
    return asyncio.run(run())


def _schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_json_schema_20_seeds_temperature_1(server):
    # All schemas x seeds at once: 100 concurrent constrained requests.
    jobs = [(name, seed) for name in sorted(SCHEMAS) for seed in SEEDS]
    responses = _chat_many(server, [dict(messages=ASK, response_format=_schema_format(name), temperature=1.0,
                                         seed=seed, max_tokens=200) for name, seed in jobs])
    for (name, seed), r in zip(jobs, responses):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (name, seed, choice)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_schema_streaming(server):
    async def one(seed: int):
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
        stream = await c.chat.completions.create(model="smol", messages=ASK, stream=True, temperature=1.0, seed=seed,
                                                 response_format=_schema_format("nested"), max_tokens=200)
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        await c.close()
        return text, finish

    for text, finish in _gather([one(s) for s in range(4)]):
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMAS["nested"])


def test_json_object_mode(server):
    responses = _chat_many(server, [dict(messages=ASK, response_format={"type": "json_object"}, temperature=1.0,
                                         seed=seed, max_tokens=80) for seed in range(3)])
    for r in responses:
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:  # an object that ran out of tokens is still a JSON object's prefix
            assert r.choices[0].message.content.lstrip().startswith("{")


def test_regex_chat_and_completions(server, client):
    pattern = r"(Paris|London|Rome), [A-Z][a-z]{2,10}"
    responses = _chat_many(server, [dict(messages=[{"role": "user", "content": "A capital?"}], temperature=1.0,
                                         seed=seed, max_tokens=30, extra_body={"regex": pattern})
                                    for seed in range(4)])
    for r in responses:
        assert re.fullmatch(pattern, r.choices[0].message.content), r.choices[0].message.content
    c = client.completions.create(model="smol", prompt=["The capital of France is", "A city:"], temperature=1.0,
                                  seed=1, max_tokens=30, extra_body={"regex": pattern})
    for choice in c.choices:
        assert re.fullmatch(pattern, choice.text), choice.text


def test_ebnf(client):
    grammar = 'root ::= ("yes" | "no") ", because " [a-z ]{1,20} "."'
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       temperature=1.0, seed=1, max_tokens=40, extra_body={"ebnf": grammar})
    assert re.fullmatch(r"(yes|no), because [a-z ]{1,20}\.", r.choices[0].message.content)


def _check_calls(calls, names):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_tool_choice_required_and_named(server):
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    kinds = [("required", True), ("required", False), (named, True)]
    jobs = [(choice, parallel, seed) for choice, parallel in kinds for seed in range(3)]
    responses = _chat_many(server, [dict(messages=ask, tools=[WEATHER, TIME], tool_choice=choice,
                                         parallel_tool_calls=parallel, temperature=1.0, seed=seed, max_tokens=160)
                                    for choice, parallel, seed in jobs])
    for (choice, parallel, seed), r in zip(jobs, responses):
        c = r.choices[0]
        names = {"get_time"} if isinstance(choice, dict) else {"get_weather", "get_time"}
        _check_calls(c.message.tool_calls, names)
        single = not parallel or isinstance(choice, dict)  # a named choice is one call
        if not single and c.finish_reason == "length":
            continue  # parallel calls are unbounded; the complete ones were checked
        assert c.finish_reason == "tool_calls" and not c.message.content, (choice, parallel, seed, c)
        if single:
            assert len(c.message.tool_calls) == 1


def _stream_calls(client, **kwargs) -> tuple[dict[int, dict], str]:
    """The streamed tool calls by index ({"id", "name", "arguments"}) and the finish_reason."""
    stream = client.chat.completions.create(model="smol", stream=True, **kwargs)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return calls, finish


def test_tool_calls_streaming(client):
    calls, finish = _stream_calls(
        client, messages=[{"role": "user", "content": "Weather in Oslo and the time in Tokyo?"}],
        tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=3,
        max_tokens=200)
    assert finish == "tool_calls" and list(calls) == [0], calls
    for entry in calls.values():
        assert entry["id"].startswith("call_")
        jsonschema.validate(json.loads(entry["arguments"]), PARAMS[entry["name"]])


def test_tool_results_round_trip(client):
    first = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'},
    ]
    r = client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=16)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_tool_choice_auto_and_none(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hi."}],
                                           tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=30)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length", "tool_calls")
        if c.message.tool_calls:  # auto may call; then the call is valid
            _check_calls(c.message.tool_calls, {"get_weather"})
        else:
            assert c.message.content


def test_mixed_batch_unconstrained_outputs_unchanged(server):
    plain = [{"role": "user", "content": f"Tell me a fact about the number {i}."} for i in range(3)]

    async def ask(msg, max_tokens=24, **kw):
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
        r = await c.chat.completions.create(model="smol", messages=[msg], temperature=0, max_tokens=max_tokens, **kw)
        await c.close()
        return r.choices[0].message.content

    alone = _gather([ask(m) for m in plain])
    constrained = [ask({"role": "user", "content": "A person?"}, max_tokens=200, response_format=_schema_format(n))
                   for n in SCHEMAS]
    mixed = _gather([ask(m) for m in plain] + constrained)
    assert mixed[:3] == alone
    for text, name in zip(mixed[3:], SCHEMAS):
        jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize("kwargs,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
     "unknown type"),
    ({"extra_body": {"regex": ""}}, "regex"),
    ({"extra_body": {"ebnf": ""}}, "ebnf"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "unknown function"),
    # These pass the API's light checks; the scheduler's compiler rejects them (still a 400).
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/definitions/missing"}}}}, "missing"),
    ({"extra_body": {"regex": "(?<=a)b"}}, "Lookbehind"),
])
def test_bad_specs_are_400(client, kwargs, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=ASK, max_tokens=10, **kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize("field,spec,needle", [
    ("regex", "(?<=a)b", "Lookbehind is not supported"),
    ("regex", "a{2,1}", "Lower bound is larger than upper bound"),
    ("regex", r"\p{L}+", "Unicode character class escape"),
    ("regex", "(unclosed", "parenthesis is not closed"),
    ("ebnf", 'start ::= "x"', 'root rule with name "root" is not found'),
    ("ebnf", "root ::= ", "Expect element"),
])
@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_specs_xgrammar_rejects_are_400_from_the_compiler(server, field, spec, needle, route):
    # Nothing checks these on the API side: the scheduler's compile answers, the server lives on.
    body = {"model": "smol", "max_tokens": 5, field: spec}
    body.update({"messages": ASK} if route == "chat/completions" else {"prompt": "Hi"})
    r = httpx.post(f"{server}/v1/{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == field
    assert error["message"].startswith(f"invalid {field} grammar: ") and needle in error["message"], error
    assert httpx.get(server + "/health", timeout=5).status_code == 200


def test_grammar_cache_hits_in_metrics(client, server):
    def hits() -> float:
        text = httpx.get(server + "/metrics").text
        m = re.search(r'^skiff:grammar_cache_hits_total\{[^}]*\} ([0-9.e+]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": {
        "type": "object", "properties": {"cache_probe": {"type": "boolean"}}, "required": ["cache_probe"]}}}
    before = hits()
    for _ in range(3):
        client.chat.completions.create(model="smol", messages=ASK, response_format=fmt, temperature=0, max_tokens=20)
    deadline = time.monotonic() + 5
    while hits() < before + 2 and time.monotonic() < deadline:  # stats arrive with the scheduler heartbeat
        time.sleep(0.1)
    assert hits() >= before + 2


NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("parallel", [None, True, False])
def test_named_tool_choice_is_exactly_one_call(client, parallel):
    # A named tool_choice means one call of that function (as vLLM serves it): the grammar ends
    # after the call, so the request finishes "tool_calls" instead of repeating it until "length".
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    r = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER, TIME], tool_choice=NAMED_WEATHER, temperature=0, max_tokens=200, **extra)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert len(c.message.tool_calls) == 1, c.message.tool_calls
    assert c.message.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), PARAMS["get_weather"])


def test_named_tool_choice_streams_one_call_index(client):
    calls, finish = _stream_calls(
        client, messages=[{"role": "user", "content": "What's the weather in Paris?"}], tools=[WEATHER, TIME],
        tool_choice=NAMED_WEATHER, temperature=0, max_tokens=200)
    assert finish == "tool_calls" and list(calls) == [0], calls
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMS["get_weather"])


@pytest.mark.parametrize("choice", ["auto", "required", NAMED_WEATHER])
def test_parallel_tool_calls_false_allows_one_call(client, choice):
    ask = [{"role": "user", "content": "Weather in Oslo and in Rome, please. Call get_weather for each."}]
    for seed in range(3):
        r = client.chat.completions.create(model="smol", messages=ask, tools=[WEATHER, TIME], tool_choice=choice,
                                           parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=200)
        c = r.choices[0]
        assert len(c.message.tool_calls or []) <= 1, (choice, seed, c)
        if choice != "auto":
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, (choice, seed, c)
