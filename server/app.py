"""The FastAPI app: OpenAI routes, SSE streaming, health, metrics and the control routes.

Runs in the API process, which stays light (no torch, no transformers): tokenization happens in
the tokenizer process and text comes back from the detokenizer. Bodies are decoded with msgspec
(server/protocol.py) and responses encoded with msgspec.json, which keeps the per-token path short.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib.metadata import version as _package_version
from typing import AsyncIterator, Awaitable, Callable, Optional, TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import ipc, openapi, playground, protocol
from server.config import ServerConfig
from server.engine_client import EngineClient, EngineDead, RequestGroup
from server.metrics import Metrics
from server.process_util import IpcPaths, ModelInfo
from server.protocol import ProtocolError, error_body
from server.tool_parser import ToolResponder
from server.tool_plan import detect_tool_format
from tokenizer_proc.tokenizer import read_chat_template, resolve_chat_template

logger = logging.getLogger(__name__)

HEALTH_STALE_S = 10.0  # no scheduler heartbeat for this long: unhealthy
_json = msgspec.json.Encoder()
T = TypeVar("T")


class ClientGone(Exception):
    pass


RETRY_AFTER_S = 1  # what a 503 (overloaded, stopping) tells clients to wait before retrying


def _error_response(status: int, message: str, type: str = "invalid_request_error",
                    param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _from_protocol_error(e: ProtocolError) -> JSONResponse:
    return _error_response(e.status, e.message, e.type, e.param, e.code)


def _error_type(status: int) -> str:
    """OpenAI's error type for a pipeline ErrorOutput's status (a 5xx is our fault, not the client's)."""
    if status == 503:
        return "service_unavailable"
    return "server_error" if status >= 500 else "invalid_request_error"


def _pipeline_error(err: ipc.ErrorOutput, param: Optional[str] = None) -> JSONResponse:
    return _error_response(err.status, err.message, _error_type(err.status), param or err.param)


def _sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _or_disconnect(aw: Awaitable[T], request: Request) -> T:
    """Await `aw`, raising ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()


class _ApiKeyMiddleware:
    """401 for /v1 requests without 'Authorization: Bearer <key>'. A plain ASGI middleware: the
    decorator kind (BaseHTTPMiddleware) would pipe every streamed chunk through an extra queue."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.expected):
                response = _error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                           code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Choice:
    """Accumulates one choice's outputs."""

    __slots__ = ("text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
                 "token_texts", "logprobs", "top_texts", "top_vals", "prompt", "error")

    def __init__(self):
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.token_texts: list[str] = []
        self.logprobs: list[float] = []
        self.top_texts: Optional[list[list[str]]] = None
        self.top_vals: Optional[list[list[float]]] = None
        self.prompt: Optional[protocol.TokenLogprobs] = None  # prompt logprobs (echo), when computed here
        self.error: Optional[ipc.ErrorOutput] = None

    def add(self, out: ipc.TextOutput) -> None:
        self.text += out.text
        self.prompt_tokens, self.cached_tokens = out.prompt_tokens, out.cached_tokens
        self.completion_tokens = out.completion_tokens
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.matched_stop
        if out.logprobs is not None and out.token_texts is not None:
            self.token_texts += out.token_texts
            self.logprobs += out.logprobs
            if out.top_logprobs is not None and out.top_token_texts is not None:
                self.top_texts = (self.top_texts or []) + out.top_token_texts
                self.top_vals = (self.top_vals or []) + [row.logprobs for row in out.top_logprobs]
        if out.prompt_logprobs is not None and out.prompt_token_texts is not None:
            rows = out.prompt_top_logprobs
            self.prompt = protocol.TokenLogprobs(
                out.prompt_token_texts, out.prompt_logprobs, out.prompt_top_token_texts,
                [None if row is None else row.logprobs for row in rows] if rows is not None else None)

    def take_logprobs(self) -> protocol.TokenLogprobs:
        """Logprobs gathered since the last take (streaming sends them chunk by chunk)."""
        got = protocol.TokenLogprobs(self.token_texts, self.logprobs, self.top_texts, self.top_vals)
        self.token_texts, self.logprobs, self.top_texts, self.top_vals = [], [], None, None
        return got


def _usage(choices: list[_Choice], n: int) -> dict:
    """Usage of a request whose prompts have n choices each: every prompt counts once (its choice
    0 stands for it: the other choices reuse its prefill), every completion counts."""
    firsts = choices[::n]
    return protocol.usage(sum(c.prompt_tokens for c in firsts), sum(c.completion_tokens for c in choices),
                          sum(c.cached_tokens for c in firsts))


def _choices_error(choices: list[_Choice]) -> Optional[JSONResponse]:
    bad = next((c.error for c in choices if c.error is not None), None)
    return None if bad is None else _pipeline_error(bad)


def create_app(config: ServerConfig, info: ModelInfo, paths: IpcPaths,
               children_alive: Callable[[], bool] = lambda: True) -> FastAPI:
    """The app for one server instance. `children_alive` is the supervisor's liveness check."""
    model_name = config.model_name
    metrics = Metrics(model_name)
    created_at = int(time.time())
    # Whether the chat template renders tools itself, and the model's tool-call syntax.
    chat_template = (resolve_chat_template(config.chat_template) if config.chat_template
                     else read_chat_template(info.tokenizer_path))
    tool_format = detect_tool_format(chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = EngineClient(paths, metrics)
        client.start()
        app.state.client = client
        yield
        await client.close()

    app = FastAPI(title="Skiff", lifespan=lifespan)
    openapi.install(app)  # the msgspec body schemas of the routes below go into /openapi.json

    # ------------------------------------------------------------------ errors

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, e: ProtocolError):
        return _from_protocol_error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(400, f"invalid request: {e.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return _error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(EngineDead)
    async def _engine_dead(request: Request, e: EngineDead):
        return _error_response(503, f"the server is shutting down: {e}", "service_unavailable")

    if config.api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=config.api_key)

    def _client(request: Request) -> EngineClient:
        return request.app.state.client

    def _check_model(model: Optional[str]) -> None:
        if model is not None and model != model_name:
            raise ProtocolError(f"The model `{model}` does not exist (this server serves `{model_name}`).",
                                "model", 404, "model_not_found")

    async def _body(request: Request, type_: type):
        return protocol.decode_body(await request.body(), type_)

    # ------------------------------------------------------------------ generation plumbing

    async def _first_items(group: RequestGroup, request: Request):
        """Wait for the first outputs; abort everything if the client leaves meanwhile."""
        try:
            return await _or_disconnect(group.next_items(), request)
        except (ClientGone, asyncio.CancelledError):
            group.abort()
            group.close()
            raise

    def _first_error(items) -> Optional[ipc.ErrorOutput]:
        return next((it for _, it in items if isinstance(it, ipc.ErrorOutput)), None)

    async def _start(group: RequestGroup, request: Request):
        """The group's first outputs, or instead the response to send (client gone, or an error
        before any token: nothing was streamed yet, so it is a plain JSON error)."""
        try:
            first = await _first_items(group, request)
        except ClientGone:
            return None, Response(status_code=499)
        error = _first_error(first)
        if error is not None:
            group.abort()  # the other prompts of a multi-prompt completion may be running
            group.close()
            return None, _pipeline_error(error)
        return first, None

    async def _collect(group: RequestGroup, first, request: Request, n: int):
        """All `n` choices of a non-streamed group (after its `first` outputs), or instead the
        response to send (client gone, or an error from one of the choices)."""
        group.items[:0] = first
        try:
            choices = await _gather(group, request, n)
        except ClientGone:
            return None, Response(status_code=499)
        return choices, _choices_error(choices)

    async def _gather(group: RequestGroup, request: Request, n: int) -> list[_Choice]:
        choices = [_Choice() for _ in range(n)]
        try:
            while True:
                for i, item in await _or_disconnect(group.next_items(), request):
                    if isinstance(item, ipc.ErrorOutput):
                        choices[i].error = item
                        group.abort()
                        return choices
                    choices[i].add(item)
                if group.done:
                    return choices
        except (ClientGone, asyncio.CancelledError):
            group.abort()
            raise
        finally:
            group.close()

    async def _stream(group: RequestGroup, first, choices: list[_Choice],
                      emit: Callable[[int, _Choice, str, bool], list[bytes]],
                      head: list[bytes], usage_chunk: Optional[Callable[[list[_Choice]], bytes]]) -> AsyncIterator[bytes]:
        items = first
        try:
            if head:
                yield b"".join(head)
            while True:
                deltas: dict[int, str] = {}
                finished: list[int] = []
                error: Optional[ipc.ErrorOutput] = None
                for i, item in items:
                    if isinstance(item, ipc.ErrorOutput):
                        error = item
                        break
                    c = choices[i]
                    c.add(item)
                    deltas[i] = deltas.get(i, "") + item.text
                    if item.finish_reason is not None:
                        finished.append(i)
                parts: list[bytes] = []
                for i, text in deltas.items():
                    parts += emit(i, choices[i], text, i in finished)
                if error is not None:
                    parts.append(_sse(error_body(error.message, _error_type(error.status), error.param)))
                    parts.append(_DONE)
                    yield b"".join(parts)
                    group.abort()
                    return
                if group.done and not group.items:  # items may have piled up since `first`
                    if usage_chunk is not None:
                        parts.append(usage_chunk(choices))
                    parts.append(_DONE)
                    yield b"".join(parts)
                    return
                if parts:
                    yield b"".join(parts)
                try:
                    items = await group.next_items()
                except EngineDead as e:
                    yield _sse(error_body(f"the server is shutting down: {e}", "service_unavailable")) + _DONE
                    return
        finally:
            if not group.done:  # the client disconnected (or the stream was cancelled)
                group.abort()
            group.close()

    # ------------------------------------------------------------------ chat

    @app.post("/v1/chat/completions",
              openapi_extra=openapi.json_operation(protocol.ChatCompletionRequest, streams=True))
    async def chat_completions(request: Request):
        req = await _body(request, protocol.ChatCompletionRequest)
        _check_model(req.model)
        plan = protocol.plan_chat(req, info, tool_format)
        client = _client(request)
        n = plan.n
        gens = [ipc.GenerateRequest(rid=client.new_id(), params=protocol.choice_params(plan.params, j),
                                    stream=plan.stream, messages=plan.messages, tools=plan.template_tools,
                                    max_tokens=plan.max_tokens, add_generation_prompt=req.add_generation_prompt,
                                    continue_final_message=req.continue_final_message)
                for j in range(n)]
        group = client.generate(gens)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        first, refusal = await _start(group, request)
        if refusal is not None:
            return refusal

        if not plan.stream:
            choices, error = await _collect(group, first, request, n)
            if error is not None:
                return error
            out = []
            for i, c in enumerate(choices):
                logprobs = {"content": protocol.chat_logprobs(c.take_logprobs())} if plan.params.logprobs else None
                tools = ToolResponder(plan.tools)
                out.append({"index": i, "message": {"role": "assistant", **tools.message(c.text), "refusal": None},
                            "logprobs": logprobs, "finish_reason": tools.finish_reason(c.finish_reason),
                            "stop_reason": c.stop_reason})
            body = {"id": response_id, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": out, "usage": _usage(choices, n), "system_fingerprint": None}
            return Response(_json.encode(body), media_type="application/json")

        extra = {"usage": None} if plan.include_usage else {}

        def chunk(choice: dict) -> bytes:
            return _sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                         "model": model_name, "system_fingerprint": None, "choices": [choice], **extra})

        tools = [ToolResponder(plan.tools) for _ in range(n)]

        def emit(i: int, c: _Choice, text: str, finished: bool) -> list[bytes]:
            parts = []
            logprobs = None
            if plan.params.logprobs:
                lp = c.take_logprobs()
                logprobs = {"content": protocol.chat_logprobs(lp)} if lp.texts else None
            t = tools[i]
            if t.active:  # content and tool-call deltas from the tool-call parser
                deltas = t.deltas(text) + (t.finish() if finished else [])
                for k, delta in enumerate(deltas):
                    parts.append(chunk({"index": i, "delta": delta, "logprobs": logprobs if k == 0 else None,
                                        "finish_reason": None}))
            elif text or logprobs is not None:
                parts.append(chunk({"index": i, "delta": {"content": text}, "logprobs": logprobs,
                                    "finish_reason": None}))
            if finished:
                parts.append(chunk({"index": i, "delta": {}, "logprobs": None,
                                    "finish_reason": t.finish_reason(c.finish_reason),
                                    "stop_reason": c.stop_reason}))
            return parts

        def usage_chunk(choices: list[_Choice]) -> bytes:
            return _sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                         "model": model_name, "system_fingerprint": None, "choices": [],
                         "usage": _usage(choices, n)})

        head = [chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}) for i in range(n)]
        return StreamingResponse(_stream(group, first, [_Choice() for _ in range(n)], emit, head,
                                         usage_chunk if plan.include_usage else None),
                                 media_type="text/event-stream")

    # ------------------------------------------------------------------ completions

    @app.post("/v1/completions", openapi_extra=openapi.json_operation(protocol.CompletionRequest, streams=True))
    async def completions(request: Request):
        req = await _body(request, protocol.CompletionRequest)
        _check_model(req.model)
        plan = protocol.plan_completion(req, info)
        client = _client(request)
        echo_texts: list[str] = []
        if plan.echo:
            for p in plan.prompts:
                if isinstance(p, str):
                    echo_texts.append(p)
                else:
                    res = await client.call(ipc.DetokenizeRequest(client.new_id(), p))
                    if isinstance(res, ipc.ErrorOutput):
                        return _pipeline_error(res, "prompt")
                    echo_texts.append(res.prompt)
        n = plan.n
        gens = []
        for p in plan.prompts:  # choice index = prompt index * n + j, as OpenAI numbers them
            text, ids = (p, None) if isinstance(p, str) else (None, p)
            gens += [ipc.GenerateRequest(rid=client.new_id(), params=protocol.choice_params(plan.params, j),
                                         stream=plan.stream, prompt_text=text, prompt_ids=ids,
                                         max_tokens=plan.max_tokens) for j in range(n)]
        group = client.generate(gens)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        first, refusal = await _start(group, request)
        if refusal is not None:
            return refusal
        echo_logprobs = plan.params.prompt_logprobs  # echo with logprobs: choice 0 of each prompt has them

        def logprobs_of(choices: list[_Choice], i: int, offset: int, with_prompt: bool):
            prompt = None
            if with_prompt and echo_logprobs:
                prompt = choices[i - i % n].prompt
                if prompt is None:
                    raise RuntimeError(f"choice {i}'s first output came before choice {i - i % n}'s prompt logprobs")
            return protocol.completion_logprobs(choices[i].take_logprobs(), offset, prompt)

        if not plan.stream:
            choices, error = await _collect(group, first, request, len(gens))
            if error is not None:
                return error
            out = []
            for i, c in enumerate(choices):
                prefix = echo_texts[i // n] if plan.echo else ""
                out.append({"index": i, "text": prefix + c.text,
                            "logprobs": logprobs_of(choices, i, len(prefix), True) if plan.params.logprobs else None,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            body = {"id": response_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": out, "usage": _usage(choices, n), "system_fingerprint": None}
            return Response(_json.encode(body), media_type="application/json")

        extra = {"usage": None} if plan.include_usage else {}
        choices = [_Choice() for _ in gens]
        sent_chars = [0] * len(gens)
        started = [False] * len(gens)

        def emit(i: int, c: _Choice, text: str, finished: bool) -> list[bytes]:
            # Each choice's first chunk carries the echoed prompt and, with logprobs, the prompt
            # logprobs that choice 0 computed: choice 0 is admitted before its siblings and its
            # first output carries them, so they are here by the time any sibling's first text is.
            first_chunk, prefix = not started[i], ""
            if first_chunk:
                started[i] = True
                prefix = echo_texts[i // n] if plan.echo else ""
            logprobs = None
            if plan.params.logprobs:
                logprobs = logprobs_of(choices, i, sent_chars[i] + len(prefix), first_chunk)
            text = prefix + text
            sent_chars[i] += len(text)
            if not (text or finished or (logprobs and logprobs["tokens"])):
                return []
            return [_sse({"id": response_id, "object": "text_completion", "created": created, "model": model_name,
                          "system_fingerprint": None,
                          "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                       "finish_reason": c.finish_reason if finished else None,
                                       "stop_reason": c.stop_reason if finished else None}], **extra})]

        def usage_chunk(choices: list[_Choice]) -> bytes:
            return _sse({"id": response_id, "object": "text_completion", "created": created, "model": model_name,
                         "system_fingerprint": None, "choices": [], "usage": _usage(choices, n)})

        return StreamingResponse(_stream(group, first, choices, emit, [], usage_chunk if plan.include_usage else None),
                                 media_type="text/event-stream")

    # ------------------------------------------------------------------ the rest

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created_at, "owned_by": "skiff",
            "root": config.model or model_name, "parent": None, "max_model_len": info.max_model_len}]}

    @app.get("/health")
    async def health(request: Request):
        client = _client(request)
        fresh = client.stats is not None and time.monotonic() - client.stats_at < HEALTH_STALE_S
        if client.dead is None and not client.draining and children_alive() and fresh:
            return {"status": "ok"}
        reason = (client.dead or ("shutting down" if client.draining else None)
                  or ("a process is not alive" if not children_alive() else "no heartbeat from the scheduler"))
        return _error_response(503, "not ready: " + reason, "service_unavailable")

    # ------------------------------------------------------------------ worker routes of sglang-router
    # What the router (the data-parallel front, server/dp.py) reads from each worker, in the shapes it
    # parses: the served name (its model id for routing), the model's paths, and the load it compares.

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return {"served_model_name": model_name, "model_path": config.model or model_name,
                "version": _package_version("skiff"), "dp_size": 1, "tp_size": config.tp_size,
                "max_model_len": info.max_model_len, "max_total_tokens": config.max_total_tokens,
                "max_running_requests": config.max_running_requests}

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": config.model or model_name, "tokenizer_path": info.tokenizer_path,
                "is_generation": True}

    @app.get("/get_load")
    async def get_load(request: Request):
        """One entry per data-parallel rank (Skiff has one): requests admitted and KV tokens held."""
        stats = _client(request).stats
        if stats is None:
            return _error_response(503, "not ready: no heartbeat from the scheduler yet", "service_unavailable")
        return [{"dp_rank": 0, "num_reqs": stats.num_running + stats.num_waiting,
                 "num_waiting_reqs": stats.num_waiting, "num_tokens": stats.kv_tokens}]

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/flush_cache")
    async def flush_cache(request: Request):
        client = _client(request)
        res = await client.call(ipc.FlushCacheRequest(client.new_id()))
        if not res.ok:
            return _error_response(400, res.message or "cannot flush the cache now")
        return {"success": True, "message": "the prefix cache was flushed"}

    @app.post("/tokenize", openapi_extra=openapi.json_operation(protocol.TokenizeBody))
    async def tokenize(request: Request):
        req = await _body(request, protocol.TokenizeBody)
        _check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ProtocolError("send exactly one of `prompt` and `messages`", "prompt")
        client = _client(request)
        msgs = protocol.chat_messages(req.messages, tool_format) if req.messages is not None else None
        add_special = req.add_special_tokens if req.add_special_tokens is not None else msgs is None
        res = await client.call(ipc.TokenizeRequest(client.new_id(), req.prompt, msgs, add_special,
                                                    req.add_generation_prompt, req.return_token_strs))
        if isinstance(res, ipc.ErrorOutput):
            return _pipeline_error(res)
        body = {"count": len(res.tokens), "max_model_len": res.max_model_len, "tokens": res.tokens}
        if res.token_strs is not None:
            body["token_strs"] = res.token_strs
        return body

    @app.post("/detokenize", openapi_extra=openapi.json_operation(protocol.DetokenizeBody))
    async def detokenize(request: Request):
        req = await _body(request, protocol.DetokenizeBody)
        _check_model(req.model)
        protocol.check_token_ids(req.tokens, info.vocab_size, "tokens")
        client = _client(request)
        res = await client.call(ipc.DetokenizeRequest(client.new_id(), req.tokens))
        if isinstance(res, ipc.ErrorOutput):
            return _pipeline_error(res)
        return {"prompt": res.prompt}

    if not config.disable_playground:
        playground.install(app)
    return app
