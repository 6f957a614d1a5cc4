"""The bench client (`python -m server.bench`) against a fake OpenAI-compatible server.

The fake server runs in a thread (uvicorn on a free port) and misbehaves on request: HTTP 500 on
every k-th request, a dropped connection or an SSE error event mid-stream, a hang, no usage. The
tokenizer is a small byte-level BPE trained here, so these tests need neither the network nor the
embedded model; dataset tests also run on SmolLM2's tokenizer where it is on the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from server.bench.cli import main
from server.bench.client import Endpoint
from server.bench.datasets import (
    DatasetError,
    file_dataset,
    random_dataset,
    shared_prefix_dataset,
    sharegpt_dataset,
)
from server.bench.metrics import compute_metrics, parse_prometheus, server_cache_stats
from server.bench.runner import RunOptions, run_benchmark

MODEL = "fake-model"


# ----------------------------------------------------------------------------- fake server


@dataclass
class Behaviour:
    """How the fake server treats the n-th request it receives (n counts from 1)."""

    fail_every: int = 0  # HTTP 500 when n % fail_every == 0
    disconnect_at: set = field(default_factory=set)  # drop the connection mid-stream
    error_event_at: set = field(default_factory=set)  # SSE error event mid-stream
    hang_at: set = field(default_factory=set)  # never answer
    send_usage: bool = True
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    eos_after: int = 3  # tokens before EOS when the client does not send ignore_eos


@dataclass
class FakeState:
    behaviour: Behaviour = field(default_factory=Behaviour)
    count: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: list = field(default_factory=list)
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0

    def reset(self, behaviour: Behaviour) -> None:
        self.behaviour, self.count, self.in_flight, self.max_in_flight = behaviour, 0, 0, 0
        self.bodies = []


class Dropped(Exception):
    """Raised inside a streaming body: uvicorn then closes the connection mid-response."""


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        return sum(len(m["content"].split()) for m in body["messages"])
    prompt = body["prompt"]
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}, {"id": "other", "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            "# TYPE skiff:prompt_tokens counter\n"
            f'skiff:prompt_tokens_total{{model_name="{MODEL}"}} {state.prompt_tokens_total}\n'
            "# TYPE skiff:cached_tokens counter\n"
            f'skiff:cached_tokens_total{{model_name="{MODEL}"}} {state.cached_tokens_total}\n'
            "# TYPE skiff:prefix_cache_hit_rate gauge\n"
            "skiff:prefix_cache_hit_rate 0.125\n"
        )

    async def generate(request: Request, chat: bool):
        body = await request.json()
        state.count += 1
        n, b = state.count, state.behaviour
        state.bodies.append(body)
        if b.fail_every and n % b.fail_every == 0:
            return JSONResponse({"error": {"message": f"injected failure {n}", "type": "server_error"}}, 500)
        n_prompt = _prompt_tokens(body)
        n_out = body["max_tokens"] if body.get("ignore_eos") else min(b.eos_after, body["max_tokens"])
        cached = n_prompt // 2
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, usage=None):
            obj = {"id": f"r{n}", "object": kind, "created": 0, "model": MODEL, "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        def piece(text, finish=None):
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def stream():
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                if n in b.hang_at:
                    await asyncio.sleep(3600)
                if chat:
                    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                await asyncio.sleep(b.first_token_delay)
                for i in range(n_out):
                    if i == 2 and n in b.disconnect_at:
                        raise Dropped(f"request {n}")
                    if i == 2 and n in b.error_event_at:
                        yield f"data: {json.dumps({'error': {'message': 'engine exploded', 'code': 500}})}\n\n"
                        return
                    if i:
                        await asyncio.sleep(b.token_delay)
                    yield chunk([piece(f" t{i}")])
                yield chunk([piece("", "length" if body.get("ignore_eos") else "stop")])
                state.prompt_tokens_total += n_prompt
                state.cached_tokens_total += cached
                if b.send_usage and (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                             "total_tokens": n_prompt + n_out, "prompt_tokens_details": {"cached_tokens": cached}}
                    yield chunk([], usage)
                yield "data: [DONE]\n\n"
            finally:
                state.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake():
    state = FakeState()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.02)
    yield state, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


# ----------------------------------------------------------------------------- tokenizers


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    """A byte-level BPE whose vocabulary holds ~1500 whole words (enough for the word pool)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = _words(1500, seed=0)
    corpus = [" ".join(words[i:i + 30]) for i in range(0, len(words), 30)] * 3
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _smollm_dir() -> Optional[str]:
    if os.path.isdir("/tmp/smol/hf"):
        return "/tmp/smol/hf"
    try:
        from scheduler_proc.models.embedded import ensure_embedded_model
    except ImportError:
        return None
    return os.fspath(ensure_embedded_model())


@pytest.fixture(scope="module", params=["tiny", "smollm"])
def any_tok(request, tiny_tok):
    if request.param == "tiny":
        return tiny_tok
    path = _smollm_dir()
    if path is None:
        pytest.skip("SmolLM2 tokenizer not available")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------- datasets


def _n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_random_dataset_exact_lengths(any_tok, ratio):
    text = random_dataset(any_tok, 20, 64, 16, ratio, seed=3, as_token_ids=False)
    ids = random_dataset(any_tok, 20, 64, 16, ratio, seed=3, as_token_ids=True)
    for r in text:
        assert isinstance(r.prompt, str) and _n_tokens(any_tok, r.prompt) == r.prompt_len
        assert int(64 * ratio) <= r.prompt_len <= 64 and int(16 * ratio) <= r.output_len <= 16
    for r in ids:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len
        assert not set(r.prompt) & set(any_tok.all_special_ids)
    if ratio == 1.0:
        assert {r.prompt_len for r in text} == {64} and {r.output_len for r in ids} == {16}
    else:
        assert len({r.prompt_len for r in text}) > 1
    # Deterministic per seed, different across seeds.
    assert random_dataset(any_tok, 20, 64, 16, ratio, seed=3, as_token_ids=True) == ids
    assert random_dataset(any_tok, 20, 64, 16, ratio, seed=4, as_token_ids=True) != ids


def test_random_dataset_rejects_bad_options(tiny_tok):
    with pytest.raises(DatasetError):
        random_dataset(tiny_tok, 0, 8, 8, 1.0, 0, True)
    with pytest.raises(DatasetError):
        random_dataset(tiny_tok, 4, 8, 8, 1.5, 0, True)


def test_shared_prefix_dataset(any_tok):
    groups, per, sys_len, q_len = 3, 4, 40, 10
    ids = shared_prefix_dataset(any_tok, groups, per, sys_len, q_len, 7, seed=1, as_token_ids=True)
    assert len(ids) == groups * per
    assert all(len(r.prompt) == r.prompt_len == sys_len + q_len and r.output_len == 7 for r in ids)
    prefixes = {tuple(r.prompt[:sys_len]) for r in ids}
    assert len(prefixes) == groups
    for prefix in prefixes:
        group = [r for r in ids if tuple(r.prompt[:sys_len]) == prefix]
        assert len(group) == per and len({tuple(r.prompt[sys_len:]) for r in group}) == per
    # Shuffled: the groups are interleaved, not in blocks.
    assert [tuple(r.prompt[:sys_len]) for r in ids] != sorted((tuple(r.prompt[:sys_len]) for r in ids), key=str)

    text = shared_prefix_dataset(any_tok, groups, per, sys_len, q_len, 7, seed=1, as_token_ids=False)
    assert len({r.system for r in text}) == groups
    for r in text:
        assert _n_tokens(any_tok, r.system) == sys_len and _n_tokens(any_tok, r.prompt) == q_len
        assert _n_tokens(any_tok, r.system + r.prompt) == r.prompt_len == sys_len + q_len


def test_sharegpt_dataset(tiny_tok, tmp_path):
    words = _words(400, seed=5)
    convs = []
    for i in range(30):
        human = " ".join(words[i * 5:(i + 1) * 5 + i % 3])
        gpt = " ".join(words[200 + i * 4:200 + (i + 1) * 4 + i % 5])
        convs.append({"id": str(i), "conversations": [{"from": "human", "value": human},
                                                      {"from": "gpt", "value": gpt}]})
    convs.append({"id": "short", "conversations": [{"from": "human", "value": "hi"}]})  # one turn: skipped
    convs.append({"id": "long", "conversations": [{"from": "human", "value": " ".join(words * 4)},
                                                  {"from": "gpt", "value": "ok fine then"}]})  # > 1024: skipped
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    by_prompt = {c["conversations"][0]["value"]: c["conversations"][1]["value"] for c in convs[:30]}

    reqs = sharegpt_dataset(tiny_tok, path, num_prompts=100, seed=0)
    assert len(reqs) == 30
    for r in reqs:
        assert r.prompt in by_prompt
        assert r.prompt_len == _n_tokens(tiny_tok, r.prompt)
        assert r.output_len == _n_tokens(tiny_tok, by_prompt[r.prompt])
    fixed = sharegpt_dataset(tiny_tok, path, num_prompts=10, seed=0, output_len=9)
    assert len(fixed) == 10 and {r.output_len for r in fixed} == {9}
    assert [r.prompt for r in fixed] == [r.prompt for r in reqs[:10]]
    assert [r.prompt for r in sharegpt_dataset(tiny_tok, path, 10, seed=1)] != [r.prompt for r in fixed]

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError):
        sharegpt_dataset(tiny_tok, tmp_path / "bad.json", 5, 0)


def test_file_dataset(tiny_tok, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('"alpha beta gamma"\n\n{"prompt": "delta epsilon", "output_len": 5}\n{"text": "zeta", "max_tokens": 2}\n')
    reqs = file_dataset(tiny_tok, path, None, default_output_len=11)
    assert [r.prompt for r in reqs] == ["alpha beta gamma", "delta epsilon", "zeta"]
    assert [r.output_len for r in reqs] == [11, 5, 2]
    assert all(r.prompt_len == _n_tokens(tiny_tok, r.prompt) for r in reqs)
    cycled = file_dataset(tiny_tok, path, 7, default_output_len=11)
    assert [r.prompt for r in cycled] == [r.prompt for r in reqs] * 2 + [reqs[0].prompt]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(DatasetError, match="bad.jsonl:1"):
        file_dataset(tiny_tok, tmp_path / "bad.jsonl", None, 4)
    with pytest.raises(DatasetError):
        file_dataset(tiny_tok, tmp_path / "missing.jsonl", None, 4)


# ----------------------------------------------------------------------------- runs


def _run(endpoint, requests, **options):
    return asyncio.run(run_benchmark(endpoint, requests, RunOptions(progress=False, warmup_requests=0, **options)))


@pytest.mark.parametrize("backend", ["chat", "completions"])
def test_failures_are_counted_exactly(fake, tiny_tok, backend):
    state, url = fake
    # 20 requests: 500 on #5, #10, #15, #20; a dropped connection on #7; an SSE error on #12.
    state.reset(Behaviour(fail_every=5, disconnect_at={7}, error_event_at={12}, token_delay=0.001))
    reqs = random_dataset(tiny_tok, 20, 32, 12, 0.5, seed=2, as_token_ids=backend == "completions")
    endpoint = Endpoint(base_url=url, backend=backend, model=MODEL)
    result = _run(endpoint, reqs, max_concurrency=4)
    metrics = compute_metrics(result.records, result.duration_s)

    assert (metrics.completed, metrics.failed) == (14, 6)
    failed = [r for r in result.records if not r.success]
    assert sum("HTTP 500" in r.error and "injected failure" in r.error for r in failed) == 4
    assert sum("engine exploded" in r.error for r in failed) == 1
    assert sum("RemoteProtocolError" in r.error for r in failed) == 1
    ok = [r for r in result.records if r.success]
    assert metrics.total_output_tokens == sum(r.requested_output_len for r in ok)
    assert all(r.output_len == r.requested_output_len == r.chunks and r.usage_reported for r in ok)
    assert metrics.output_len_mismatches == 0
    assert [r.index for r in result.records] == list(range(20))
    assert 0 < metrics.ttft_ms.mean <= metrics.e2e_ms.mean < 5000
    assert state.max_in_flight <= 4

    body = state.bodies[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert body["model"] == MODEL and body["max_tokens"] == reqs[0].output_len
    if backend == "completions":
        assert body["prompt"] == reqs[0].prompt  # token ids
    else:
        assert body["messages"] == [{"role": "user", "content": reqs[0].prompt}]


def test_no_usage_falls_back_to_counting_chunks(fake, tiny_tok):
    state, url = fake
    state.reset(Behaviour(send_usage=False))
    reqs = random_dataset(tiny_tok, 6, 16, 9, 0.3, seed=1, as_token_ids=True)
    result = _run(Endpoint(base_url=url, backend="completions", model=MODEL), reqs)
    assert all(r.success and not r.usage_reported for r in result.records)
    assert [r.output_len for r in result.records] == [r.output_len for r in reqs]
    assert [r.input_len for r in result.records] == [r.prompt_len for r in reqs]
    assert compute_metrics(result.records, result.duration_s).cached_tokens is None


def test_honor_eos_omits_ignore_eos(fake, tiny_tok):
    state, url = fake
    state.reset(Behaviour(eos_after=3))
    reqs = random_dataset(tiny_tok, 4, 16, 10, 1.0, seed=1, as_token_ids=False)
    result = _run(Endpoint(base_url=url, backend="chat", model=MODEL, ignore_eos=False), reqs)
    assert "ignore_eos" not in state.bodies[0]
    assert all(r.success and r.output_len == 3 and r.finish_reason == "stop" for r in result.records)
    assert compute_metrics(result.records, result.duration_s).output_len_mismatches == 4


def test_latencies_follow_server_timing(fake, tiny_tok):
    state, url = fake
    state.reset(Behaviour(first_token_delay=0.05, token_delay=0.01))
    reqs = random_dataset(tiny_tok, 3, 8, 6, 1.0, seed=1, as_token_ids=True)
    result = _run(Endpoint(base_url=url, backend="completions", model=MODEL), reqs)
    m = compute_metrics(result.records, result.duration_s)
    assert m.completed == 3 and m.itl_ms.count == 3 * 5
    assert 50 <= m.ttft_ms.median < 500
    assert 9 <= m.itl_ms.median < 100 and 9 <= m.tpot_ms.mean < 100
    assert m.e2e_ms.mean >= m.ttft_ms.mean + 5 * 9
    # All at once: the three overlap almost entirely.
    assert 2.0 < m.concurrency <= 3.0


def test_timeout_and_poisson_arrivals(fake, tiny_tok):
    state, url = fake
    state.reset(Behaviour(hang_at={2}))
    reqs = random_dataset(tiny_tok, 8, 8, 4, 1.0, seed=1, as_token_ids=True)
    result = _run(Endpoint(base_url=url, backend="completions", model=MODEL), reqs, request_rate=40.0, timeout=1.0)
    failed = [r for r in result.records if not r.success]
    assert len(failed) == 1 and failed[0].error.startswith("timeout")
    starts = sorted(r.start for r in result.records)
    # 7 exponential gaps of mean 25 ms: spread out, but far from a second.
    assert 0.02 < starts[-1] - starts[0] < 1.0


def test_server_cache_stats():
    text = (
        "# TYPE skiff:prompt_tokens counter\n"
        'skiff:prompt_tokens_total{model_name="a"} 100\nskiff:prompt_tokens_total{model_name="b"} 50\n'
        "# TYPE skiff:cached_tokens counter\nskiff:cached_tokens_total 30\n"
        "# TYPE skiff:prefix_cache_hit_rate gauge\nskiff:prefix_cache_hit_rate 0.2\n"
        "# TYPE unrelated gauge\nunrelated 1\n"
        "# TYPE skiff:ttft_seconds histogram\n"
        'skiff:ttft_seconds_bucket{le="0.1"} 1\nskiff:ttft_seconds_bucket{le="+Inf"} 2\n'
        "skiff:ttft_seconds_count 2\nskiff:ttft_seconds_sum 0.3\n"
    )
    before = parse_prometheus(text)
    assert before["skiff:prompt_tokens_total"] == 150 and "unrelated" in before
    assert before["skiff:ttft_seconds_count"] == 2 and not any(k.endswith("_bucket") for k in before)
    after = dict(before, **{"skiff:prompt_tokens_total": 350.0, "skiff:cached_tokens_total": 130.0})
    stats = server_cache_stats(before, after)
    assert stats.hit_rate == pytest.approx(0.5) and "skiff:cached_tokens_total" in stats.hit_rate_source
    assert "unrelated" not in stats.after
    gauge_only = {"skiff:prefix_cache_hit_rate": 0.2}
    assert server_cache_stats(None, gauge_only).hit_rate == 0.2
    assert server_cache_stats(None, None).hit_rate is None
    assert parse_prometheus("garbage {{{") == {}
    assert stats.spec_acceptance is None  # no speculative counters: nothing to report


def test_server_speculative_acceptance():
    names = ("skiff:spec_accepted_tokens_total", "skiff:spec_draft_tokens_total", "skiff:spec_verifications_total")
    before = dict(zip(names, (10.0, 20.0, 5.0)))
    after = dict(zip(names, (40.0, 60.0, 15.0)))  # 30 of 40 drafts accepted over 10 verify steps
    stats = server_cache_stats(before, after)
    assert stats.spec_acceptance == pytest.approx(0.75) and stats.spec_tokens_per_step == pytest.approx(4.0)
    assert server_cache_stats(before, before).spec_acceptance is None  # nothing drafted during the run
    vllm = ("vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_draft_tokens_total",
            "vllm:spec_decode_num_drafts_total")
    stats = server_cache_stats(dict(zip(vllm, (0.0, 0.0, 0.0))), dict(zip(vllm, (5.0, 10.0, 5.0))))
    assert stats.spec_acceptance == pytest.approx(0.5) and stats.spec_tokens_per_step == pytest.approx(2.0)


# ----------------------------------------------------------------------------- the CLI


def test_cli_end_to_end(fake, tok_dir, tmp_path, capsys):
    state, url = fake
    state.reset(Behaviour(fail_every=4))
    out, png = tmp_path / "results.json", tmp_path / "plot.png"
    rc = main([
        "--base-url", url + "/v1", "--tokenizer", tok_dir, "--backend", "chat", "--dataset", "shared-prefix",
        "--shared-prefix-groups", "2", "--shared-prefix-prompts-per-group", "5", "--shared-prefix-system-len", "30",
        "--shared-prefix-question-len", "6", "--shared-prefix-output-len", "5", "--max-concurrency", "3",
        "--warmup-requests", "2", "--disable-tqdm", "--output", str(out), "--plot", str(png),
        "--extra-request-body", '{"top_p": 0.5}',
    ])
    assert rc == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Median TTFT (ms)" in table and "fake-model" in table
    assert "Prefix cache hit rate (/metrics)" in table

    results = json.loads(out.read_text())
    # 12 requests seen by the server: #4, #8, #12 fail; #4 and #8 are measured ones, #12 too.
    assert len(results["warmup"]) == 2 and len(results["requests"]) == 10
    m = results["metrics"]
    assert (m["completed"], m["failed"]) == (7, 3)
    assert m["total_output_tokens"] == 7 * 5
    assert results["model"] == MODEL and results["config"]["request_rate"] == "inf"
    assert "api_key" not in results["config"]
    assert results["server_cache"]["hit_rate"] is not None
    assert m["usage_cache_hit_rate"] == pytest.approx(
        sum(r["cached_tokens"] for r in results["requests"] if r["success"])
        / sum(r["input_len"] for r in results["requests"] if r["success"]))
    assert any("injected failure" in e for e in results["errors"])
    ok = [r for r in results["requests"] if r["success"]]
    assert all(len(r["itl"]) == 4 and r["tpot"] is not None for r in ok)
    body = state.bodies[-1]
    assert body["top_p"] == 0.5 and [m["role"] for m in body["messages"]] == ["system", "user"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_reports_unreachable_server(tok_dir, capsys):
    rc = main(["--base-url", f"http://127.0.0.1:{_free_port()}", "--tokenizer", tok_dir, "--disable-tqdm"])
    assert rc == 2 and "--model" in capsys.readouterr().err


def test_cli_all_requests_failing(fake, tok_dir, capsys):
    state, url = fake
    state.reset(Behaviour(fail_every=1))
    rc = main(["--base-url", url, "--model", MODEL, "--tokenizer", tok_dir, "--dataset", "random",
               "--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "4", "--disable-tqdm"])
    out = capsys.readouterr()
    assert rc == 1 and "Failed requests" in out.out and "injected failure" in out.out
    assert "warm-up request failed" in out.err


# ----------------------------------------------------------------------------- a real Skiff server


def _skiff_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("server.__main__") is not None


@pytest.fixture(scope="module")
def skiff(tmp_path_factory):
    """`python -m server` on the embedded model (CPU), started once for the real-server tests."""
    import subprocess
    import sys

    import httpx

    if not _skiff_available():
        pytest.skip("the Skiff server (python -m server) is not in this tree yet")
    port = _free_port()
    log = tmp_path_factory.mktemp("skiff") / "server.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port)], stdout=sink,
                                stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _skiff_bench(url: str, out: Path, *args: str) -> dict:
    rc = main(["--base-url", url, "--disable-tqdm", "--output", str(out), "--max-concurrency", "4", *args])
    results = json.loads(out.read_text())
    assert rc == 0, results["errors"]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("dataset, backend", [("random", "chat"), ("random", "completions"),
                                              ("shared-prefix", "chat"), ("sharegpt", "chat"), ("file", "completions")])
def test_bench_against_skiff(skiff, tmp_path, dataset, backend):
    args = ["--backend", backend]
    if dataset == "random":
        args += ["--dataset", "random", "--num-prompts", "4", "--random-input-len", "32",
                 "--random-output-len", "6", "--random-range-ratio", "0.5"]
    elif dataset == "shared-prefix":
        args += ["--dataset", "shared-prefix", "--shared-prefix-groups", "2", "--shared-prefix-prompts-per-group",
                 "3", "--shared-prefix-system-len", "64", "--shared-prefix-question-len", "6",
                 "--shared-prefix-output-len", "4"]
    elif dataset == "sharegpt":
        words = _words(200, seed=9)
        convs = [{"conversations": [{"from": "human", "value": " ".join(words[i * 10:i * 10 + 6 + i])},
                                    {"from": "gpt", "value": " ".join(words[100 + i * 8:100 + i * 8 + 3])}]}
                 for i in range(3)]
        (tmp_path / "sharegpt.json").write_text(json.dumps(convs))
        args += ["--dataset", "sharegpt", "--dataset-path", str(tmp_path / "sharegpt.json"), "--num-prompts", "3"]
    else:
        (tmp_path / "prompts.jsonl").write_text(
            '"What is the capital of France?"\n{"prompt": "Name three colors.", "output_len": 7}\n')
        args += ["--dataset", "file", "--dataset-path", str(tmp_path / "prompts.jsonl"), "--num-prompts", "4",
                 "--random-output-len", "5"]
    results = _skiff_bench(skiff, tmp_path / "out.json", *args)
    m, reqs = results["metrics"], results["requests"]
    assert m["failed"] == 0 and m["completed"] == len(reqs) > 0
    assert m["total_output_tokens"] == sum(r["requested_output_len"] for r in reqs)
    assert m["output_len_mismatches"] == 0 and all(r["usage_reported"] for r in reqs)
    assert 0 < m["ttft_ms"]["median"] <= m["e2e_ms"]["median"] < 60_000
    assert m["itl_ms"]["count"] > 0 and m["output_throughput"] > 0
    if backend == "completions" and dataset in ("random", "shared-prefix"):
        # Token-id prompts: the server counts exactly the tokens the dataset built.
        assert [r["input_len"] for r in reqs] == [r["prompt_len"] for r in reqs]
    if dataset == "shared-prefix":
        # The warm-up computed one group's system prompt; that group's 3 measured requests reuse it.
        assert m["cached_tokens"] >= 3 * 64
