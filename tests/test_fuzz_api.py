"""The OpenAPI document's request bodies, and a bounded schemathesis fuzz of the JSON routes.

The fast tests build the app in-process (no server) and read its /openapi.json document: each of
the four msgspec-decoded routes must document its request body with the Struct's own schema. The
slow test starts a server on the tiny dummy model and runs benchmarks/fuzz_api.py's fuzzer for
~300 cases (the 10,000-case run is recorded in docs/reliability.md): no 5xx, every error
OpenAI-shaped, every stream well-formed, and the server still healthy afterwards.
"""

from __future__ import annotations

import importlib.util
import sys

import httpx
import msgspec
import pytest

from conftest import REPO, SkiffServer
from server import protocol
from server.app import create_app
from server.config import ServerConfig
from server.process_util import IpcPaths, ModelInfo

BODIES = {
    "/v1/chat/completions": protocol.ChatCompletionRequest,
    "/v1/completions": protocol.CompletionRequest,
    "/tokenize": protocol.TokenizeBody,
    "/detokenize": protocol.DetokenizeBody,
}


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict:
    app = create_app(ServerConfig(chat_template="{{ messages }}"), ModelInfo(256, 1000, (2,), ""),
                     IpcPaths.in_dir(str(tmp_path_factory.mktemp("ipc"))))
    return app.openapi()


def _resolve(document: dict, schema: dict) -> dict:
    prefix = "#/components/schemas/"
    assert schema["$ref"].startswith(prefix)
    return document["components"]["schemas"][schema["$ref"][len(prefix):]]


@pytest.mark.parametrize("path", BODIES)
def test_request_body_is_the_structs_schema(document, path):
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    schema = _resolve(document, body["content"]["application/json"]["schema"])
    _, expected = msgspec.json.schema_components([BODIES[path]], ref_template="#/components/schemas/{name}")
    assert schema == expected[BODIES[path].__name__]
    assert schema["additionalProperties"] is False  # unknown fields are a 400
    assert set(schema["properties"]) == set(BODIES[path].__struct_fields__)


def test_required_fields_and_nested_schemas(document):
    schemas = document["components"]["schemas"]
    assert schemas["DetokenizeBody"]["required"] == ["tokens"]
    assert schemas["DetokenizeBody"]["properties"]["tokens"]["type"] == "array"
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["items"] == {"$ref": "#/components/schemas/ChatMessageIn"}
    assert schemas["ChatMessageIn"]["required"] == ["role"]
    assert "prompt" in schemas["CompletionRequest"]["properties"]
    assert {"prompt", "messages"} <= set(schemas["TokenizeBody"]["properties"])
    # every $ref in the document resolves (no msgspec "#/$defs/..." left over)
    refs = [part for part in msgspec.json.encode(document).decode().split('"$ref":"')[1:]]
    for ref in refs:
        target = ref.split('"', 1)[0]
        assert target.startswith("#/components/schemas/") and target.rsplit("/", 1)[1] in schemas, target


@pytest.mark.parametrize("path", BODIES)
def test_responses_document_streams_and_openai_errors(document, path):
    responses = document["paths"][path]["post"]["responses"]
    streams = path.startswith("/v1/")
    assert ("text/event-stream" in responses["200"]["content"]) == streams
    for status in ("400", "401", "404", "503"):
        schema = _resolve(document, responses[status]["content"]["application/json"]["schema"])
        assert schema["required"] == ["error"]
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}


def test_error_bodies_match_the_documented_error_schema():
    from server.openapi import ErrorResponse
    body = protocol.error_body("bad value", param="top_p", code="x")
    assert msgspec.to_builtins(msgspec.convert(body, ErrorResponse)) == body


def test_api_process_stays_light():
    """The OpenAPI module adds no heavy import to the API process."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", "import server.app, sys; print('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- the fuzz run

def _fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_api", REPO / "benchmarks" / "fuzz_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fuzz_the_json_routes(tmp_path):
    pytest.importorskip("schemathesis")
    fuzz = _fuzzer()
    server = SkiffServer(*fuzz.TINY_SERVER_ARGS, env={"TMPDIR": str(tmp_path)}).start()
    try:
        # what the first fuzz runs found: each of these ended the scheduler (and so the server)
        for extreme in ({"top_p": 1e-300}, {"temperature": 1e-300}, {"repetition_penalty": 1e-300, "top_p": 0.5}):
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "a b a b", "max_tokens": 4, **extreme},
                           timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, (extreme, r.text)
        report = fuzz.run_fuzz(server.url, cases=300, seed_value=0, timeout_s=60)
        after = fuzz.server_still_serves(server.url)
        assert report.failures == [], "\n\n".join(report.failures[:10])
        assert report.cases >= 290
        assert all(400 <= s < 500 or s == 200 for s in report.statuses), report.statuses
        assert report.statuses[200] >= 30, report.as_dict()  # the narrowed bodies get past validation
        assert report.streams > 0, report.as_dict()
        assert after is None, after
        assert server.proc.poll() is None
    finally:
        server.stop()
