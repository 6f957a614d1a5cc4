"""The real multi-process server end to end: openai SDK + httpx against `python -m server`.

One shared server (embedded SmolLM2, float32 so text is exact, context 512) serves most tests;
the supervision tests (child death, SIGTERM, API key) start their own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from conftest import SERVER_MAX_MODEL_LEN, SkiffServer, all_exit, sse_events
from server.bench.tokenizer import chat_token_ids

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
SYSTEM = ("You are a meticulous assistant for a travel agency. You answer questions about European capitals, "
          "their museums, their food and their history in short, friendly sentences. ") * 3


@pytest.fixture(scope="module")
def engine():
    """The in-process Engine with the server's configuration (the reference for greedy output)."""
    from scheduler_proc.engine import Engine
    from server.config import ServerConfig

    import torch

    before = torch.get_num_threads()
    threads = max(1, len(os.sched_getaffinity(0)) - 1)  # as the server's scheduler runs
    yield Engine(ServerConfig(dtype="float32", device="cpu", max_model_len=SERVER_MAX_MODEL_LEN, num_threads=threads))
    torch.set_num_threads(before)  # the Engine set it process-wide


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- basics


def test_models_health_metrics(server, client, model):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"] == SERVER_MAX_MODEL_LEN
    assert httpx.get(server.url + "/health").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("skiff:num_running_requests", "skiff:num_waiting_requests", "skiff:kv_cache_usage",
                 "skiff:prefix_cache_hit_rate", "skiff:prompt_tokens_total", "skiff:generation_tokens_total",
                 "skiff:time_to_first_token_seconds_bucket", "skiff:inter_token_latency_seconds_bucket",
                 "skiff:e2e_request_latency_seconds_bucket"):
        assert name in text, name


def test_api_process_stays_light(server):
    """No torch in the API process (the tokenizer and detokenizer neither)."""
    def has_torch(pid):
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()

    assert not has_torch(server.proc.pid)
    kids = server.children()
    assert {"skiff-tokenizer", "skiff-detok", "skiff-sched-0"} <= set(kids)
    assert not has_torch(kids["skiff-tokenizer"]) and not has_torch(kids["skiff-detok"])
    assert has_torch(kids["skiff-sched-0"])


def test_greedy_chat_equals_in_process_engine(client, model, engine):
    from server.ipc import SamplingParams

    for question in (QUESTION, "Write a haiku about the sea."):
        res = client.chat.completions.create(model=model, messages=_chat(question), temperature=0, max_tokens=16)
        ids = chat_token_ids(engine.tokenizer, _chat(question), add_generation_prompt=True)
        ref = engine.generate([ids], SamplingParams(max_new_tokens=16, temperature=0.0))[0]
        ref_text = engine.tokenizer.decode(ref.output_ids, skip_special_tokens=True)
        assert res.choices[0].message.content == ref_text
        assert res.usage.prompt_tokens == len(ids)
        assert res.usage.completion_tokens == len(ref.output_ids)
        assert res.choices[0].finish_reason == ref.finish_reason
        if question == QUESTION:
            assert "Paris" in res.choices[0].message.content


def test_chat_nonstreaming_shape(client, model):
    res = client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=0, max_tokens=5)
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")
    assert res.model == model and res.choices[0].index == 0
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].finish_reason == "length"
    u = res.usage
    assert u.completion_tokens == 5 and u.total_tokens == u.prompt_tokens + 5
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_equals_nonstreaming(client, model):
    ref = client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=0,
                                                 max_tokens=30, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == ref.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == ref.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_include_usage_and_done(server, model):
    body = {"model": model, "messages": _chat(QUESTION), "temperature": 0, "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 7
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + 7
    assert "cached_tokens" in final["usage"]["prompt_tokens_details"]
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length" and events[-3]["choices"][0]["delta"] == {}


def test_completions_prompt_forms(client, model, engine):
    text = "The capital of France is"
    ids = engine.tokenizer.encode(text)
    a = client.completions.create(model=model, prompt=text, temperature=0, max_tokens=8)
    b = client.completions.create(model=model, prompt=ids, temperature=0, max_tokens=8)
    assert a.object == "text_completion" and a.id.startswith("cmpl-")
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == len(ids)
    ref = engine.generate([ids], __import__("server.ipc", fromlist=["x"]).SamplingParams(max_new_tokens=8,
                                                                                           temperature=0.0))[0]
    assert a.choices[0].text == engine.tokenizer.decode(ref.output_ids, skip_special_tokens=True)
    other = "One, two, three,"
    many = client.completions.create(model=model, prompt=[text, other], temperature=0, max_tokens=8)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == a.choices[0].text
    single_other = client.completions.create(model=model, prompt=other, temperature=0, max_tokens=8)
    assert many.choices[1].text == single_other.choices[0].text
    assert many.usage.prompt_tokens == a.usage.prompt_tokens + single_other.usage.prompt_tokens
    lists = client.completions.create(model=model, prompt=[ids, engine.tokenizer.encode(other)], temperature=0,
                                      max_tokens=8)
    assert [c.text for c in lists.choices] == [c.text for c in many.choices]
    echo = client.completions.create(model=model, prompt=ids, temperature=0, max_tokens=8, echo=True)
    assert echo.choices[0].text == text + a.choices[0].text


def test_completions_streaming(client, model):
    ref = client.completions.create(model=model, prompt=["Once upon a time", "The sea is"], temperature=0,
                                    max_tokens=12)
    chunks = list(client.completions.create(model=model, prompt=["Once upon a time", "The sea is"], temperature=0,
                                            max_tokens=12, stream=True, stream_options={"include_usage": True}))
    texts = ["", ""]
    finish = [None, None]
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.text
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert texts == [c.text for c in ref.choices]
    assert finish == [c.finish_reason for c in ref.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.usage.completion_tokens


def test_max_tokens_defaults_to_rest_of_context(client, model):
    prompt = list(range(1000, 1000 + SERVER_MAX_MODEL_LEN - 6))
    res = client.completions.create(model=model, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == 6 and res.choices[0].finish_reason == "length"


# ----------------------------------------------------------------------------- stop strings, cache


def test_stop_strings_across_token_boundaries(server, client, model, engine):
    from server.ipc import SamplingParams

    ids = chat_token_ids(engine.tokenizer, _chat(QUESTION), add_generation_prompt=True)
    out = engine.generate([ids], SamplingParams(max_new_tokens=20, temperature=0.0))[0].output_ids
    pieces = [engine.tokenizer.decode(out[: i + 1], skip_special_tokens=True) for i in range(len(out))]
    full = pieces[-1]
    # A stop string made of the end of token 3 and the start of token 4.
    boundary = len(pieces[2])
    stop = full[boundary - 2: boundary + 2]
    assert len(stop) == 4 and full.find(stop) == boundary - 2, (full, stop)
    expected = full[: boundary - 2]
    res = client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=0, max_tokens=20,
                                         stop=[stop, "never-appears"])
    assert res.choices[0].message.content == expected
    assert res.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=0,
                                                 max_tokens=20, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    comp = client.completions.create(model=model, prompt=ids, temperature=0, max_tokens=20, stop=stop)
    assert comp.choices[0].text == expected and comp.choices[0].finish_reason == "stop"
    server.wait_idle()  # the stop string freed the scheduler's request


def test_shared_system_prompt_reports_cached_tokens(client, model):
    def ask(q):
        return client.chat.completions.create(
            model=model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            temperature=0, max_tokens=2)

    first = ask("Tell me about Rome.")
    second = ask("Tell me about Vienna.")
    assert first.usage.prompt_tokens > 60
    assert second.usage.prompt_tokens_details.cached_tokens >= 60
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_32_concurrent_streams(server, model):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)

        async def one(i):
            stream = await aclient.chat.completions.create(
                model=model, messages=_chat(f"Count from {i} to {i + 5}."), temperature=0, max_tokens=16,
                stream=True)
            text, finish = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return text, finish

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(text and finish in ("stop", "length") for text, finish in results)
    server.wait_idle()


def test_disconnect_frees_kv(server, model):
    body = {"model": model, "prompt": "Tell me a very long story.", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break
        r.close()
    t0 = time.monotonic()
    server.wait_idle(timeout_s=1.5)
    assert time.monotonic() - t0 < 1.5
    # A non-streaming client that gives up is noticed too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=2.0)
    t0 = time.monotonic()
    server.wait_idle(timeout_s=1.5)
    assert time.monotonic() - t0 < 1.5
    res = httpx.post(server.url + "/flush_cache", timeout=30)
    assert res.status_code == 200, res.text
    time.sleep(0.6)  # next heartbeat
    assert server.metrics()["skiff:kv_cache_usage"] == 0.0


def test_flush_cache_refused_while_running(server, model):
    body = {"model": model, "prompt": "Tell me a very long story.", "max_tokens": 300, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # keep the generator: dropping it would close the connection
        next(line for line in lines if line.startswith("data: "))
        res = httpx.post(server.url + "/flush_cache", timeout=30)
        assert next(line for line in lines if line.startswith("data: "))  # still streaming
    assert res.status_code == 400 and "running" in res.json()["error"]["message"]
    server.wait_idle()


def test_tokenize_detokenize(server, model, engine):
    res = httpx.post(server.url + "/tokenize", json={"model": model, "prompt": "Hello world"}).json()
    assert res["tokens"] == engine.tokenizer.encode("Hello world")
    assert res["count"] == len(res["tokens"]) and res["max_model_len"] == SERVER_MAX_MODEL_LEN
    chat = httpx.post(server.url + "/tokenize", json={"messages": _chat(QUESTION)}).json()
    assert chat["tokens"] == chat_token_ids(engine.tokenizer, _chat(QUESTION), add_generation_prompt=True)
    back = httpx.post(server.url + "/detokenize", json={"tokens": res["tokens"]}).json()
    assert back == {"prompt": "Hello world"}
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 7]}).status_code == 400


# ----------------------------------------------------------------------------- errors


def _error(res: httpx.Response, status: int) -> dict:
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 129}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": True}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": SERVER_MAX_MODEL_LEN}, "max_tokens"),
])
def test_chat_validation_errors(server, model, body, param):
    err = _error(httpx.post(server.url + "/v1/chat/completions", json={"model": model, **body}), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_malformed_json_and_prompt_too_long(server, model, client):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"})
    assert "JSON" in _error(r, 400)["message"]
    long_prompt = list(range(100, 100 + SERVER_MAX_MODEL_LEN + 10))
    err = _error(httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": long_prompt}), 400)
    assert "context length" in err["message"]
    err = _error(httpx.post(server.url + "/v1/completions",
                            json={"model": model, "prompt": "x " * 2000, "stream": True}), 400)
    assert "context length" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=_chat("x " * 2000))
    _error(httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": [[1, 2], "a"]}), 400)
    _error(httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": [10 ** 6]}), 400)
    _error(httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "x", "suffix": "y"}), 400)


def test_unknown_model_and_route(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=_chat("hi"))
    err = _error(httpx.post(server.url + "/v1/completions", json={"model": "gpt-17", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    _error(httpx.get(server.url + "/v1/nothing-here"), 404)


# ----------------------------------------------------------------------------- supervision


def test_api_key_and_scheduler_death():
    """401 without the key; then killing the scheduler ends the server non-zero within 5 s, and a
    stream in flight gets an SSE error event followed by [DONE]."""
    srv = SkiffServer(api_key="sekret").start()
    try:
        url = srv.url + "/v1/chat/completions"
        body = {"messages": _chat(QUESTION), "max_tokens": 3}
        _error(httpx.post(url, json=body), 401)
        assert _error(httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}), 401)["code"] \
            == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = httpx.post(url, json=body, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200  # no key needed outside /v1

        kids = srv.children()
        events: list = []

        def stream():
            long = {"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=30,
                                  headers={"Authorization": "Bearer sekret"}) as r:
                    events.extend(sse_events(r.iter_lines()))
            except httpx.HTTPError:
                events.append("transport error")

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        os.kill(kids["skiff-sched-0"], signal.SIGKILL)
        code = srv.proc.wait(10)
        assert time.monotonic() - t0 < 5.0
        assert code != 0
        t.join(10)
        assert all_exit(kids.values())
        assert events and events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
    finally:
        srv.stop()


def test_sigterm_drains_and_exits_zero():
    """SIGTERM: a short in-flight request finishes normally, new requests get 503, one that outlives
    the grace period is aborted (finish_reason "abort", then [DONE]); exit code 0 and no process left."""
    srv = SkiffServer("--graceful-shutdown-timeout", "10").start()
    try:
        kids = srv.children()  # also multiprocessing's resource tracker
        assert {"skiff-tokenizer", "skiff-detok", "skiff-sched-0"} <= set(kids)
        results: dict[str, list] = {"short": [], "long": []}
        started = {"short": threading.Event(), "long": threading.Event()}

        def stream(name, max_tokens):
            body = {"prompt": "Tell me a story.", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    results[name] += sse_events([line])
                    if results[name]:
                        started[name].set()

        threads = [threading.Thread(target=stream, args=("short", 3)),
                   threading.Thread(target=stream, args=("long", 4000))]
        for t in threads:
            t.start()
        assert started["short"].wait(60) and started["long"].wait(60)
        srv.proc.send_signal(signal.SIGTERM)
        # While it drains, the listener stays open: new requests and /health get 503 + Retry-After.
        time.sleep(0.5)
        refused = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        for t in threads:
            t.join(40)
        assert srv.proc.wait(30) == 0
        short, long = results["short"], results["long"]
        assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
        assert long[-1] == "[DONE]" and long[-2]["choices"][0]["finish_reason"] == "abort"
        assert all_exit(kids.values())
    finally:
        srv.stop()


def test_tensor_parallel_two_ranks_and_parent_death():
    """tp_size 2: two scheduler processes (gloo on CPU), rank 0 broadcasting what it receives.
    Then SIGKILL the supervisor: every child notices its parent is gone and exits."""
    srv = SkiffServer("--tp", "2", "--model", "configs/tiny-llama.json", "--load-format", "dummy").start()
    try:
        kids = srv.children()
        assert {"skiff-sched-0", "skiff-sched-1"} <= set(kids)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        prompt = list(range(300, 316))
        res = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert res.usage.completion_tokens == 8
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text
        # The supervisor dies without any chance to clean up: its children must not outlive it.
        srv.proc.kill()
        srv.proc.wait(10)
        assert all_exit(kids.values())
    finally:
        srv.stop()
