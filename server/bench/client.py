"""One streaming request against an OpenAI-compatible server, timed chunk by chunk.

Contract: `send_request` never raises for anything the server or the network does (HTTP errors,
timeouts, disconnects, malformed SSE, error events): it returns a `RequestRecord` with
`success=False` and the error text. Only cancellation propagates.

The SSE stream is parsed by hand so each chunk's arrival is stamped with `time.perf_counter()`
the moment its line is read, without an SDK's object construction in between.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx

from server.bench.datasets import BenchRequest

_ERROR_BODY_CHARS = 500


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds; `start` is relative to the benchmark start.

    output_len is the server's usage.completion_tokens, or the number of content chunks when the
    server sends no usage (`usage_reported` says which). input_len is usage.prompt_tokens when
    reported (it includes any chat template), else the dataset's prompt_len.
    """

    index: int
    prompt_len: int
    requested_output_len: int
    success: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    input_len: int = 0
    output_len: int = 0
    cached_tokens: Optional[int] = None
    usage_reported: bool = False
    chunks: int = 0
    finish_reason: Optional[str] = None
    status_code: Optional[int] = None

    @property
    def tpot(self) -> Optional[float]:
        """Mean time per output token after the first (None for one-token outputs)."""
        if not self.success or self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send: backend is "chat" or "completions"."""

    base_url: str
    backend: str
    model: str
    api_key: Optional[str] = None
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: Optional[dict[str, Any]] = None

    @property
    def url(self) -> str:
        path = "/chat/completions" if self.backend == "chat" else "/completions"
        return _v1(self.base_url) + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _v1(base_url: str) -> str:
    """Accept both http://host:port and http://host:port/v1 as --base-url."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def build_payload(endpoint: Endpoint, request: BenchRequest) -> dict[str, Any]:
    """The JSON body of a streaming request for `request`."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "max_tokens": request.output_len,
        "temperature": endpoint.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint.ignore_eos:
        body["ignore_eos"] = True
    if endpoint.backend == "chat":
        if isinstance(request.prompt, list):
            raise TypeError("the chat backend needs text prompts")
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages.append({"role": "user", "content": request.prompt})
        body["messages"] = messages
    else:
        prompt = request.prompt
        if request.system and isinstance(prompt, str):
            prompt = request.system + prompt
        body["prompt"] = prompt
    body.update(endpoint.extra_body or {})
    return body


class _StreamError(Exception):
    """The server reported an error inside the stream, or the stream was malformed."""


def _content(choice: dict[str, Any], backend: str) -> str:
    if backend == "chat":
        delta = choice.get("delta") or {}
        # Reasoning models stream thinking tokens separately; they are output tokens all the same.
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def _stream(
    client: httpx.AsyncClient, endpoint: Endpoint, request: BenchRequest, record: RequestRecord, t0: float
) -> None:
    payload = build_payload(endpoint, request)
    sent = time.perf_counter()
    record.start = sent - t0
    last = sent
    done = False
    usage: Optional[dict[str, Any]] = None
    async with client.stream("POST", endpoint.url, json=payload, headers=endpoint.headers) as resp:
        record.status_code = resp.status_code
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            raise _StreamError(f"HTTP {resp.status_code}: {body[:_ERROR_BODY_CHARS]}")
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue  # blank separators, ": keep-alive" comments, "event:" names
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError as exc:
                raise _StreamError(f"malformed SSE data: {data[:_ERROR_BODY_CHARS]!r}") from exc
            if not isinstance(chunk, dict):
                raise _StreamError(f"malformed SSE data: {data[:_ERROR_BODY_CHARS]!r}")
            if "error" in chunk:
                err = chunk["error"]
                message = err.get("message", err) if isinstance(err, dict) else err
                raise _StreamError(f"error event: {message}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if _content(choice, endpoint.backend):
                    if record.chunks == 0:
                        record.ttft = now - sent
                    else:
                        record.itl.append(now - last)
                    last = now
                    record.chunks += 1
                if choice.get("finish_reason"):
                    record.finish_reason = choice["finish_reason"]
    record.e2e = time.perf_counter() - sent
    if not done and record.finish_reason is None:
        raise _StreamError("stream ended without a finish_reason or [DONE]")
    record.output_len = record.chunks
    record.input_len = request.prompt_len
    if usage:
        record.usage_reported = True
        record.output_len = int(usage.get("completion_tokens") or 0)
        record.input_len = int(usage.get("prompt_tokens") or request.prompt_len)
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            record.cached_tokens = int(details["cached_tokens"])
    if record.chunks == 0 and record.output_len > 0:
        # Tokens that decoded to nothing visible: the end of the stream is the only timestamp.
        record.ttft = record.e2e
    record.success = True


async def send_request(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    request: BenchRequest,
    index: int,
    t0: float,
    timeout: Optional[float] = None,
) -> RequestRecord:
    """Send `request` streaming and time it; `timeout` bounds the whole request (seconds)."""
    record = RequestRecord(index=index, prompt_len=request.prompt_len, requested_output_len=request.output_len)
    try:
        await asyncio.wait_for(_stream(client, endpoint, request, record, t0), timeout)
    except asyncio.TimeoutError:
        record.error = f"timeout after {timeout}s"
    except _StreamError as exc:
        record.error = str(exc)
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    if record.error:
        record.success = False
        record.e2e = record.e2e or (time.perf_counter() - t0 - record.start)
    return record
