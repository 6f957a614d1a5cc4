"""OpenAI request models (msgspec) and their translation into Skiff's SamplingParams.

Requests are decoded strictly: unknown fields are a 400, and known OpenAI fields that would change
generation but that Skiff does not implement yet are declared here only to be rejected with a clear
"not supported" 400, so nothing that matters is ever silently ignored (bookkeeping fields such as
`user` or `metadata` are accepted). Fixed ranges are msgspec constraints on the Structs (a
violation is a 400 naming the field, see `decode_body`); checks that need the model's limits live
in `sampling_params` and the `plan_*` functions. Responses are plain dicts encoded with msgspec.json.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, Optional, Protocol, Union

import msgspec
from msgspec import Meta

from server.ipc import ChatMessage, ChatTool, SamplingParams
from server import validation
from server.grammar_spec import StructuredOutputError, grammar_from_request
from server.structured_chat import prepare_tool_messages, structured_chat
from server.tool_plan import TEXT_TOOLS, ToolFormat, ToolPlan


class ProtocolError(validation.InvalidParam):
    """A request the API rejects; `status` is the HTTP status, `param` the offending field."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, type: str = "invalid_request_error"):
        super().__init__(message, param)
        self.status, self.code, self.type = status, code, type


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ModelLimits(Protocol):
    """What validation needs to know about the model (server.process_util.ModelInfo has it)."""

    vocab_size: int
    max_model_len: int


MAX_N = 128  # choices per prompt
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_TOP_LOGPROBS = 20  # chat top_logprobs and completions logprobs (OpenAI caps the latter at 5, vLLM at 20)

# OpenAI's ranges (and vLLM's for its extensions), checked while the body is decoded.
Choices = Annotated[int, Meta(ge=1, le=MAX_N)]
Temperature = Annotated[float, Meta(ge=0)]
TopP = Annotated[float, Meta(gt=0, le=1)]
TopK = Annotated[int, Meta(ge=-1)]  # -1 or 0: disabled
MinP = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]  # frequency and presence
RepetitionPenalty = Annotated[float, Meta(gt=0)]
LogitBias = Annotated[float, Meta(ge=-100, le=100)]
StopString = Annotated[str, Meta(min_length=1)]
Seed = Annotated[int, Meta(ge=-2 ** 63, le=2 ** 63 - 1)]
NumLogprobs = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]
NonNegative = Annotated[int, Meta(ge=0)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: Optional[bool] = False


class ChatMessageIn(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[Any]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None


class _SamplingFields(msgspec.Struct, forbid_unknown_fields=True):
    """Fields shared by chat and completions: OpenAI's plus the vLLM/SGLang sampling extensions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    n: Optional[Choices] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[StopString, Annotated[list[StopString], Meta(max_length=MAX_STOP)], None] = None
    seed: Optional[Seed] = None
    frequency_penalty: Optional[Penalty] = None
    presence_penalty: Optional[Penalty] = None
    logit_bias: Optional[dict[str, LogitBias]] = None
    # extensions
    top_k: Optional[TopK] = None
    min_p: Optional[MinP] = None
    repetition_penalty: Optional[RepetitionPenalty] = None
    ignore_eos: Optional[bool] = None
    min_tokens: Optional[NonNegative] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None
    # structured outputs (regex / ebnf: SGLang's extensions)
    response_format: Optional[Any] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    # tools are chat-only (completions refuse them)
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[Any] = None
    functions: Optional[Any] = None
    function_call: Optional[Any] = None
    # accepted, with no effect on what is generated (bookkeeping fields of OpenAI's platform)
    user: Optional[str] = None
    service_tier: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    # SGLang extensions that sglang-router (the data-parallel front, server/dp.py) writes into every
    # request it forwards, at their defaults: only `false`, which is what Skiff does (stop strings are
    # trimmed from the text; no hidden states are returned); `true` is a 400.
    no_stop_trim: Optional[bool] = None
    return_hidden_states: Optional[bool] = None


class ChatCompletionRequest(_SamplingFields, forbid_unknown_fields=True):
    messages: list[ChatMessageIn] = []
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[NumLogprobs] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    modalities: Optional[list[str]] = None  # only ["text"]
    audio: Optional[Any] = None
    prediction: Optional[Any] = None  # a latency hint: accepted, the output is the same without it
    reasoning_effort: Optional[Any] = None
    web_search_options: Optional[Any] = None
    # Also written by sglang-router. Accepted either way with no effect, as in SGLang without a
    # reasoning parser: Skiff has none, so there is no reasoning content to separate or stream apart.
    separate_reasoning: Optional[bool] = None
    stream_reasoning: Optional[bool] = None


class CompletionRequest(_SamplingFields, forbid_unknown_fields=True):
    prompt: Union[str, list[Any], None] = None
    echo: Optional[bool] = None
    logprobs: Optional[NumLogprobs] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TokenizeBody(msgspec.Struct, forbid_unknown_fields=True):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessageIn]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[int]
    model: Optional[str] = None


def decode_body(body: bytes, type_: type) -> Any:
    """Parse a JSON body into `type_`; malformed JSON and schema violations are ProtocolErrors."""
    if not body.strip():
        raise ProtocolError("the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        text = str(e)
        param = None
        if "`$." in text:
            # `$.logit_bias[...]` (a dict value) and `$.stop[2]` (a list item) name the field itself
            param = re.sub(r"\[(\d+|\.\.\.)\]$", "", text.rsplit("`$.", 1)[-1].rstrip("`"))
        elif "unknown field `" in text:
            param = text.split("unknown field `", 1)[1].split("`", 1)[0]
        raise ProtocolError(f"invalid request: {text}", param) from e
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed JSON body: {e}") from e


# ----------------------------------------------------------------------------- validation

# Fields that would change what is generated and that Skiff does not implement: a 400, never ignored.
_UNSUPPORTED_CHAT = ("audio", "reasoning_effort", "web_search_options")
_UNSUPPORTED = ("functions", "function_call")
_CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls")
_ONLY_FALSE = ("no_stop_trim", "return_hidden_states")


def _not_supported(field: str) -> ProtocolError:
    return ProtocolError(f"`{field}` is not supported yet", field)


def _check_unsupported(req: _SamplingFields, extra: tuple[str, ...] = ()) -> None:
    for name in _UNSUPPORTED + extra:
        if getattr(req, name) is not None:
            raise _not_supported(name)
    for name in _ONLY_FALSE:
        if getattr(req, name):
            raise ProtocolError(f"`{name}: true` is not supported (only false)", name)


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Token ids a client sent, checked here so that none leaves the server unchecked (an id
    wider than 64 bits could not even cross IPC); see `server.validation.check_token_ids`."""
    try:
        validation.check_token_ids(ids, vocab_size, param)
    except validation.InvalidParam as e:
        raise ProtocolError(e.message, e.param) from None


def _int_in(value: int, name: str, lo: int, hi: int, what: str = "") -> int:
    if not lo <= value <= hi:
        raise ProtocolError(f"`{name}` must be {what or f'in [{lo}, {hi}]'}", name)
    return value


def sampling_params(req: _SamplingFields, limits: ModelLimits, max_tokens: Optional[int],
                    logprobs: bool = False, top_logprobs: int = 0) -> SamplingParams:
    """Build SamplingParams from the sampling fields (their fixed ranges were checked by the
    decoder) and check what depends on the model: token ids and min_tokens. max_new_tokens is
    set later, by the tokenizer, from `max_tokens` and the prompt."""
    p = SamplingParams(logprobs=logprobs, top_logprobs=top_logprobs, stop=_stop_list(req.stop))
    for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "seed", "ignore_eos", "skip_special_tokens"):
        if getattr(req, name) is not None:
            setattr(p, name, getattr(req, name))
    V = limits.vocab_size
    if req.top_k is not None:
        p.top_k = req.top_k if req.top_k < V else -1  # keeping the whole vocabulary is no filter
    if req.logit_bias:
        try:
            p.logit_bias = {int(key): value for key, value in req.logit_bias.items()}
        except ValueError:
            raise ProtocolError("logit_bias keys must be token ids", "logit_bias") from None
        check_token_ids(list(p.logit_bias), V, "logit_bias")
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, V, "stop_token_ids")
        p.stop_token_ids = list(req.stop_token_ids)
    if req.min_tokens is not None:
        limit = max_tokens if max_tokens is not None else limits.max_model_len
        _int_in(req.min_tokens, "min_tokens", 0, limit,
                f"in [0, {limit}] (at most max_tokens)" if max_tokens is not None else "")
        p.min_new_tokens = req.min_tokens
    if req.stream_options is not None and not req.stream:
        raise ProtocolError("`stream_options` is only allowed when `stream` is true", "stream_options")
    return p


def _stop_list(stop: Union[str, list[str], None]) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """The parameters of choice j of a prompt (n > 1). A seeded request's choice j draws with
    seed + j (mod 2**64), so the n samples differ and each is still reproducible. Prompt
    logprobs (echo) are computed by choice 0 alone: the others then reuse its cached prefill."""
    if j == 0:
        return params
    seed = (params.seed + j) % 2 ** 64 if params.seed is not None else None
    return msgspec.structs.replace(params, seed=seed, prompt_logprobs=False)


def _max_tokens(value: Optional[int], name: str, minimum: int, limits: ModelLimits) -> Optional[int]:
    if value is not None:
        _int_in(value, name, minimum, limits.max_model_len,
                f"in [{minimum}, {limits.max_model_len}] (the context length)")
    return value


def flatten_content(content: Union[str, list[dict[str, Any]], None], index: int) -> Optional[str]:
    """Text of a message: a string, or text parts joined by newlines (other part types: 400)."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ProtocolError(f"message content parts of type {kind!r} are not supported (only 'text' "
                                f"parts with a string `text`)", f"messages[{index}].content")
        texts.append(part["text"])
    return "\n".join(texts)


_ROLES = ("system", "developer", "user", "assistant", "tool")


def chat_message_dicts(messages: list[ChatMessageIn]) -> list[dict]:
    """Validated messages as dicts (role, text content, assistant tool_calls, tool_call_id)."""
    if not messages:
        raise ProtocolError("`messages` must contain at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise ProtocolError(f"unknown role {m.role!r}; expected one of {', '.join(_ROLES)}",
                                f"messages[{i}].role")
        for name in ("name", "refusal"):
            if getattr(m, name) is not None:
                raise ProtocolError(f"`{name}` in messages is not supported yet", f"messages[{i}].{name}")
        if m.tool_calls is not None and m.role != "assistant":
            raise ProtocolError("only assistant messages carry `tool_calls`", f"messages[{i}].tool_calls")
        if m.role == "tool" and not isinstance(m.tool_call_id, str):
            raise ProtocolError("a tool message needs `tool_call_id`", f"messages[{i}].tool_call_id")
        text = flatten_content(m.content, i)
        if text is None and not m.tool_calls:
            raise ProtocolError(f"message {i} has no content", f"messages[{i}].content")
        d: dict = {"role": m.role, "content": text}
        if m.tool_calls:
            d["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def chat_messages(messages: list[ChatMessageIn], tool_format: ToolFormat = TEXT_TOOLS) -> list[ChatMessage]:
    """Messages for the chat template (tool calls and results as the template takes them)."""
    try:
        return prepare_tool_messages(chat_message_dicts(messages), None, tool_format.native)
    except StructuredOutputError as e:
        raise ProtocolError(e.message, e.param) from e


@dataclass
class ChatPlan:
    messages: list[ChatMessage]
    params: SamplingParams
    max_tokens: Optional[int]
    n: int
    stream: bool
    include_usage: bool
    tools: Optional[ToolPlan] = None  # set when the request has tools (see server.tool_plan)
    template_tools: Optional[list[ChatTool]] = None  # the chat template's `tools` (native templates)


def _include_usage(req: _SamplingFields) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def plan_chat(req: ChatCompletionRequest, limits: ModelLimits, tool_format: ToolFormat = TEXT_TOOLS) -> ChatPlan:
    """Validate a chat request; tool_format is the model's (`server.tool_plan.detect_tool_format`)."""
    _check_unsupported(req, _UNSUPPORTED_CHAT)
    if req.modalities is not None and req.modalities != ["text"]:
        raise ProtocolError("only `modalities: [\"text\"]` is supported", "modalities")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise ProtocolError("`top_logprobs` requires `logprobs` to be true", "top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise ProtocolError("set only one of `max_tokens` and `max_completion_tokens`", "max_tokens")
    max_tokens = _max_tokens(req.max_completion_tokens, "max_completion_tokens", 1, limits)
    if max_tokens is None:
        max_tokens = _max_tokens(req.max_tokens, "max_tokens", 1, limits)
    params = sampling_params(req, limits, max_tokens, bool(req.logprobs), req.top_logprobs or 0)
    try:
        sc = structured_chat(chat_message_dicts(req.messages), req.response_format, req.regex, req.ebnf,
                             req.tools, req.tool_choice, req.parallel_tool_calls, tool_format)
    except StructuredOutputError as e:
        raise ProtocolError(e.message, e.param) from e
    params.grammar = sc.grammar
    return ChatPlan(sc.messages, params, max_tokens, req.n or 1, bool(req.stream), _include_usage(req), sc.tools,
                    sc.template_tools)


@dataclass
class CompletionPlan:
    prompts: list[Union[str, list[int]]]
    params: SamplingParams
    max_tokens: Optional[int]
    n: int  # choices per prompt: choice index = prompt index * n + j
    stream: bool
    include_usage: bool
    echo: bool


def completion_prompts(prompt: Union[str, list[Any], None]) -> list[Union[str, list[int]]]:
    """A string, a list of strings, a list of token ids or a list of token-id lists."""
    if prompt is None:
        raise ProtocolError("`prompt` is required", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ProtocolError("`prompt` must not be empty", "prompt")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        return [list(prompt)]
    if all(isinstance(x, str) for x in prompt):
        return list(prompt)
    if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
           for x in prompt):
        return [list(x) for x in prompt]
    raise ProtocolError("`prompt` must be a string, a list of strings, a list of token ids or a list of "
                        "non-empty token-id lists", "prompt")


def plan_completion(req: CompletionRequest, limits: ModelLimits) -> CompletionPlan:
    _check_unsupported(req, _CHAT_ONLY)
    if req.suffix is not None:
        raise _not_supported("suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ProtocolError("`best_of` other than `n` is not supported yet", "best_of")
    max_tokens = _max_tokens(req.max_tokens, "max_tokens", 0, limits)
    logprobs = req.logprobs is not None
    params = sampling_params(req, limits, max_tokens, logprobs, req.logprobs or 0)
    params.prompt_logprobs = bool(req.echo) and logprobs
    try:
        params.grammar = grammar_from_request(req.response_format, req.regex, req.ebnf)
    except StructuredOutputError as e:
        raise ProtocolError(e.message, e.param) from e
    prompts = completion_prompts(req.prompt)
    for p in prompts:
        if not isinstance(p, str):
            check_token_ids(p, limits.vocab_size, "prompt")
    return CompletionPlan(prompts, params, max_tokens, req.n or 1, bool(req.stream), _include_usage(req),
                          bool(req.echo))


# ----------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenLogprobs(NamedTuple):
    """Logprobs of a run of tokens: each token's text and raw logprob (None for the first prompt
    token, which has no context) and, when alternatives were asked for, each token's alternatives
    as texts and logprobs (a None row where a token has none)."""

    texts: list[str]
    logprobs: list[Optional[float]]
    top_texts: Optional[list[Optional[list[str]]]] = None
    top_vals: Optional[list[Optional[list[float]]]] = None

    def tops(self) -> list[Optional[tuple[list[str], list[float]]]]:
        if self.top_texts is None or self.top_vals is None:
            return [None] * len(self.texts)
        return [None if t is None or v is None else (t, v) for t, v in zip(self.top_texts, self.top_vals)]


def chat_logprobs(lp: TokenLogprobs) -> list[dict]:
    """OpenAI's chat `logprobs.content`: token, logprob, bytes and top_logprobs per token."""
    def entry(text: str, value: float) -> dict:
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return [{**entry(text, value), "top_logprobs": [entry(t, v) for t, v in zip(*top)] if top else []}
            for text, value, top in zip(lp.texts, lp.logprobs, lp.tops())]


def completion_logprobs(lp: TokenLogprobs, text_offset: int, prompt: Optional[TokenLogprobs] = None) -> dict:
    """OpenAI's legacy completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset).
    With echo, `prompt`'s tokens come first, at offsets from 0; the completion's start at `text_offset`."""
    tokens: list[str] = []
    values: list[Optional[float]] = []
    tops: list[Optional[dict[str, float]]] = []
    offsets: list[int] = []
    for part, offset in ((prompt, 0), (lp, text_offset)):
        if part is None:
            continue
        for text, value, top in zip(part.texts, part.logprobs, part.tops()):
            tokens.append(text)
            values.append(value)
            tops.append(dict(zip(*top)) if top else None)
            offsets.append(offset)
            offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
