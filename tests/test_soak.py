"""The soak script (`benchmarks/soak.py`): its request classification against a fake server that
misbehaves on purpose, and a bounded soak of a real server (the tiny dummy model) that must pass
every check."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import soak  # noqa: E402

GOOD = {"model": "m", "prompt": "hi", "max_tokens": 4}


def _fake_app() -> FastAPI:
    """Answers by the `prompt` field: each value is one way a server can go wrong (or right)."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        how = body["prompt"]
        if how == "ok":
            return {"choices": [{"text": "x", "finish_reason": "length"}], "usage": {"completion_tokens": 4}}
        if how == "500":
            return JSONResponse({"error": {"message": "boom", "type": "internal"}}, status_code=500)
        if how == "400-openai":
            return JSONResponse({"error": {"message": "bad", "type": "invalid_request_error"}}, status_code=400)
        if how == "400-plain":
            return PlainTextResponse("bad", status_code=400)
        if how == "no-finish":
            return {"choices": [{"text": "x", "finish_reason": None}], "usage": {"completion_tokens": 1}}
        if how == "hang":
            await asyncio.sleep(30)
        if how in ("stream-ok", "stream-cut"):
            async def events():
                for i in range(8):
                    yield f'data: {json.dumps({"choices": [{"text": "x", "finish_reason": None}]})}\n\n'
                if how == "stream-ok":
                    last = {"choices": [{"text": "", "finish_reason": "stop"}], "usage": {"completion_tokens": 8}}
                    yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return PlainTextResponse("unknown case", status_code=500)

    return app


def _classify(p: soak.Planned, timeout_s: float = 5.0) -> soak.Outcome:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(_fake_app()), base_url="http://fake") as c:
            return await soak.run_one(c, p, timeout_s)
    return asyncio.run(go())


def _good(prompt: str, stream: bool = False) -> soak.Planned:
    return soak.Planned("good", "/v1/completions", {**GOOD, "prompt": prompt}, stream)


def _malformed(prompt: str) -> soak.Planned:
    return soak.Planned("malformed", "/v1/completions", {**GOOD, "prompt": prompt}, False, case="test")


@pytest.mark.parametrize("planned, cls", [
    (_good("ok"), "completed"),
    (_good("stream-ok", stream=True), "completed"),
    (_good("500"), "failed"),
    (_good("400-openai"), "failed"),            # a good request refused
    (_good("no-finish"), "failed"),
    (_good("stream-cut", stream=True), "failed"),  # ended without finish_reason / [DONE]
    (_malformed("400-openai"), "rejected"),
    (_malformed("400-plain"), "failed"),        # 4xx without the OpenAI error shape
    (_malformed("ok"), "failed"),               # a malformed request accepted
    (_malformed("500"), "failed"),
    (soak.Planned("abort", "/v1/completions", {**GOOD, "prompt": "stream-ok"}, True, abort_after_chunks=2), "aborted"),
    (soak.Planned("abort", "/v1/completions", {**GOOD, "prompt": "hang"}, False, give_up_s=0.2), "aborted"),
])
def test_every_outcome_is_classified(planned, cls):
    out = _classify(planned)
    assert out.cls == cls, out.detail


def test_a_hang_is_a_failure():
    out = _classify(_good("hang"), timeout_s=0.3)
    assert out.cls == "failed" and "hang" in out.detail


def test_malformed_mix_covers_each_family():
    """The malformed mix covers each family: bad JSON, wrong model, unknown field, out of range, too long."""
    rng = random.Random(0)
    seen = {soak._malformed(rng, "m")[0] for _ in range(2000)}
    assert {"bad-json", "unknown-model", "unknown-field", "negative-temperature", "prompt-too-long"} <= seen


def test_metrics_parsing_drops_the_model_label():
    text = ('# HELP x\nskiff:num_running_requests{model_name="m"} 0.0\n'
            'skiff:requests_finished_total{finish_reason="stop",model_name="m"} 3.0\n'
            'skiff:requests_finished_total{model_name="m",finish_reason="length"} 2.0\n')
    m = soak.parse_metrics(text)
    assert m["skiff:num_running_requests"] == 0.0
    assert soak.finished_by_reason(m) == {"stop": 3.0, "length": 2.0}


@pytest.mark.slow
def test_bounded_soak_of_the_tiny_model_passes_every_check(tmp_path):
    """About 45 s: the tiny dummy model under 8 clients with aborts and malformed requests."""
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--server-args", "--model configs/tiny-llama.json --load-format dummy",
         "--warmup-s", "8", "--duration-s", "20", "--concurrency", "8", "--long-max-tokens", "64",
         "--request-timeout", "60", "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and all(ok for ok, _ in report["checks"].values())
    load = report["load"]
    assert load["failed"] == 0
    assert load["completed"] > 50 and load["aborted"] > 0 and load["rejected"] > 0
    assert load["completed"] + load["aborted"] + load["rejected"] == load["requests"]
    assert set(report["rss"]) and all(v["ok"] for v in report["rss"].values())
    assert {name.split(" ")[0] for name in report["rss"]} == {"api-server", "scheduler-0", "tokenizer", "detokenizer"}
