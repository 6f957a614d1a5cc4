"""No request can take the server down (end to end, a real server on the CPU).

The server runs with a `--chat-template` that raises inside the tokenizer process for some input
and uses transformers' `{% generation %}` tag. Every route gets a request that fails in the
pipeline; each must get an OpenAI-shaped 4xx, and the server must stay healthy and keep serving.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import SkiffServer

TEMPLATE = (
    "{% for m in messages %}"
    "{% if 'boom' in m.content %}{{ raise_exception('this template refuses booms') }}{% endif %}"
    "<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_MODEL_LEN = 256
BOOM = [{"role": "user", "content": "boom"}]


@pytest.fixture(scope="module")
def server():
    srv = SkiffServer("--max-model-len", str(MAX_MODEL_LEN), "--chat-template", TEMPLATE).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def assert_openai_error(status: int, body: dict, expected_status: int, match: str) -> None:
    assert status == expected_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and match in err["message"]


def test_every_route_fails_cleanly_and_the_server_survives(server, client):
    model = client.models.list().data[0].id
    pids = server.children()

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=BOOM, max_tokens=4)
    assert_openai_error(e.value.status_code, e.value.response.json(), 400, "refuses booms")
    assert e.value.body["param"] == "messages"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=BOOM, max_tokens=4, stream=True)
    assert_openai_error(e.value.status_code, e.value.response.json(), 400, "refuses booms")

    too_long = "hello " * (MAX_MODEL_LEN + 10)  # rejected by the tokenizer process (context length)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt=too_long, max_tokens=4, stream=stream)
        assert_openai_error(e.value.status_code, e.value.response.json(), 400, "maximum context length")

    r = httpx.post(server.url + "/tokenize", json={"model": model, "messages": BOOM}, timeout=30)
    assert_openai_error(r.status_code, r.json(), 400, "refuses booms")
    r = httpx.post(server.url + "/detokenize", json={"model": model, "tokens": [1, -5, 10 ** 9]}, timeout=30)
    assert_openai_error(r.status_code, r.json(), 400, "")

    # Still the same processes, healthy, and serving every route normally.
    assert server.children() == pids and server.proc.poll() is None
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    done = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 4
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].finish_reason in ("length", "stop")
    r = httpx.post(server.url + "/tokenize", json={"model": model, "messages": [{"role": "user", "content": "Hi"}]},
                   timeout=30)
    assert r.status_code == 200
    # The custom template is the one in use (with its {% generation %} tag rendered as plain text).
    r2 = httpx.post(server.url + "/detokenize", json={"model": model, "tokens": r.json()["tokens"]}, timeout=30)
    assert r2.json()["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
