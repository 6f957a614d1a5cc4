"""The message schema between Skiff's processes: the one contract every process imports.

All messages are msgspec Structs in one tagged union, encoded as msgpack (no pickle on the wire).
Data path:  server -> tokenizer -> scheduler(s) -> detokenizer -> server.
Control messages (abort, flush, stats) ride the same sockets as the requests they concern, so an
abort can never overtake the request it aborts.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec


class GrammarSpec(msgspec.Struct, frozen=True):
    """A structured-output constraint. kind: json_schema | json_object | regex | ebnf | structural_tag."""

    kind: str
    spec: str = ""


GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily


class SamplingParams(msgspec.Struct):
    """Per-request generation parameters, validated by the API server before they reach the engine.

    Engine semantics: temperature 0 (or below GREEDY_TEMPERATURE) is greedy; top_k <= 0 and top_p == 1 and min_p == 0 disable
    those filters; penalties at their neutral values (1.0 / 0.0) cost nothing.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[dict[int, float]] = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_new_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: bool = False  # return the sampled token's logprob
    top_logprobs: int = 0  # and this many alternatives
    prompt_logprobs: bool = False  # echo: logprobs of the prompt tokens too
    grammar: Optional[GrammarSpec] = None

    @property
    def greedy(self) -> bool:
        # Below GREEDY_TEMPERATURE the draw is the argmax anyway, and dividing float32 logits by
        # a tinier temperature overflows to inf (a NaN distribution).
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


# ----------------------------------------------------------------------------- requests (inbound)


class TokenizedRequest(msgspec.Struct, tag=True):
    """A request ready for the scheduler: prompt token ids plus sampling parameters."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    stream: bool = True


class AbortRequest(msgspec.Struct, tag=True):
    rid: str


class FlushCacheRequest(msgspec.Struct, tag=True):
    """Empty the radix cache; refused (ok=False) while requests are running."""

    req_id: str


class FlushCacheResult(msgspec.Struct, tag=True):
    req_id: str
    ok: bool
    message: str = ""


class Shutdown(msgspec.Struct, tag=True):
    pass


# ----------------------------------------------------------------------------- outputs (outbound)


class TopLogprobs(msgspec.Struct, array_like=True):
    token_ids: list[int]
    logprobs: list[float]


class TokenOutput(msgspec.Struct, array_like=True):
    """New tokens of one request in one scheduler step.

    finish_reason: None while running; "stop" | "length" | "abort" once finished.
    prompt_logprobs is set only on the first output of a request that asked for it
    (first prompt token: None).
    """

    rid: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[TopLogprobs]] = None
    prompt_logprobs: Optional[list[Optional[float]]] = None
    prompt_top_logprobs: Optional[list[Optional[TopLogprobs]]] = None
    matched_stop: Optional[Union[int, str]] = None


class BatchTokenOutput(msgspec.Struct, tag=True):
    """Everything one scheduler step produced (scheduler -> detokenizer)."""

    outputs: list[TokenOutput]


class SchedulerStats(msgspec.Struct, tag=True):
    """Scheduler rank 0's gauges and running totals: sent every 250 ms (the liveness heartbeat,
    also while idle) and once more the moment the engine goes idle."""

    num_running: int
    num_waiting: int
    kv_usage: float  # share of usable KV pages that requests hold (unreferenced cached prefixes are free)
    prefix_cache_tokens: int  # tokens of cached prefixes no request references: reusable, evictable
    cache_hit_rate: float
    kv_tokens: int = 0  # tokens of KV that requests hold (kv_usage in tokens: a load figure routers compare)
    # running totals since start (the API server turns them into Prometheus counters)
    num_retractions: int = 0
    num_evicted_pages: int = 0
    grammar_cache_hits: int = 0
    grammar_cache_misses: int = 0
    grammar_compile_failures: int = 0
    grammar_mask_fill_s: float = 0.0
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens verified
    spec_accepted_tokens: int = 0  # and the ones the target agreed with
    spec_verifications: int = 0  # verify-extends run (mean accepted length = accepted / this + 1)


# ----------------------------------------------------------------------------- server-side messages
# server -> tokenizer: GenerateRequest, TokenizeRequest, DetokenizeRequest, AbortRequest, FlushCacheRequest
# tokenizer -> server: TokenizeResult, DetokenizeResult, ErrorOutput
# scheduler -> detokenizer: RequestStarted, BatchTokenOutput, ErrorOutput, FlushCacheResult, SchedulerStats
# detokenizer -> server: BatchTextOutput, plus the scheduler's ErrorOutput / FlushCacheResult / SchedulerStats


class ChatToolCall(msgspec.Struct, frozen=True):
    """A tool call in an earlier assistant turn, for templates that render tool calls."""

    id: str
    name: str
    arguments: Any  # a dict; the client's string when it was not a JSON object


class ChatMessage(msgspec.Struct, frozen=True):
    """One chat turn, its content already flattened to text by the API server.

    `tool_calls` (assistant) and `tool_call_id` (tool results) are set only for chat templates that
    render tools themselves; for the others the API server renders them into `content`.
    """

    role: str
    content: str
    tool_calls: Optional[list[ChatToolCall]] = None
    tool_call_id: Optional[str] = None

    def to_template(self) -> dict:
        """The message as Hugging Face chat templates expect it (OpenAI's shape, dict arguments)."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


class ChatTool(msgspec.Struct, frozen=True):
    """A function the model may call, for chat templates that render the `tools` variable."""

    name: str
    parameters: dict[str, Any]  # JSON schema
    description: Optional[str] = None

    def to_template(self) -> dict:
        """OpenAI's tool object (what transformers' apply_chat_template(tools=...) passes on)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


class GenerateRequest(msgspec.Struct, tag=True):
    """A generation request from the API server, before tokenization.

    Exactly one of `messages` (chat: the tokenizer applies the chat template), `prompt_text` or
    `prompt_ids` is set. `max_tokens` None means "the rest of the context"; the tokenizer fills
    `params.max_new_tokens` from it after checking prompt + max_tokens against the context length.
    `tools` go to the chat template's `tools` variable (only for templates that render them).
    """

    rid: str
    params: SamplingParams
    stream: bool = True
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[ChatTool]] = None
    prompt_text: Optional[str] = None
    prompt_ids: Optional[list[int]] = None
    max_tokens: Optional[int] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TokenizeRequest(msgspec.Struct, tag=True):
    """/tokenize: text (with add_special_tokens) or chat messages (rendered with the template)."""

    req_id: str
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResult(msgspec.Struct, tag=True):
    req_id: str
    tokens: list[int]
    max_model_len: int
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(msgspec.Struct, tag=True):
    req_id: str
    tokens: list[int]


class DetokenizeResult(msgspec.Struct, tag=True):
    req_id: str
    prompt: str


class ErrorOutput(msgspec.Struct, tag=True):
    """A request (or control call) failed; `message` is shown to the client with `status`.

    abort_upstream: the request failed in the detokenizer while the scheduler may still run it;
    the server must send an AbortRequest to free its KV (as for TextOutput).
    """

    rid: str
    message: str
    status: int = 400
    param: Optional[str] = None
    abort_upstream: bool = False


class RequestStarted(msgspec.Struct, tag=True):
    """Scheduler rank 0 -> detokenizer, sent before the request's first TokenOutput on the same
    socket: what the detokenizer needs to turn its tokens into text."""

    rid: str
    params: SamplingParams
    prompt_tail: list[int]  # last few prompt ids: context for the first token's leading space
    prompt_ids: Optional[list[int]] = None  # the whole prompt, only with prompt_logprobs (its token texts)


class TextOutput(msgspec.Struct, array_like=True):
    """New text of one request (detokenizer -> server). `text` is the delta since the last output.

    abort_upstream: the detokenizer finished the request (a stop string matched) while the
    scheduler still runs it; the server must send an AbortRequest to free its KV.
    token_texts: the text of each new token (only when logprobs were requested), and
    top_token_texts the text of each alternative in top_logprobs, row by row; prompt_token_texts
    and prompt_top_token_texts are the same for the prompt (with prompt_logprobs, first output only).
    """

    rid: str
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    matched_stop: Optional[Union[int, str]] = None
    abort_upstream: bool = False
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[TopLogprobs]] = None
    token_texts: Optional[list[str]] = None
    top_token_texts: Optional[list[list[str]]] = None
    prompt_logprobs: Optional[list[Optional[float]]] = None
    prompt_top_logprobs: Optional[list[Optional[TopLogprobs]]] = None
    prompt_token_texts: Optional[list[str]] = None
    prompt_top_token_texts: Optional[list[Optional[list[str]]]] = None


class BatchTextOutput(msgspec.Struct, tag=True):
    outputs: list[TextOutput]


SchedulerInbound = Union[TokenizedRequest, AbortRequest, FlushCacheRequest, Shutdown]
SchedulerOutbound = Union[BatchTokenOutput, FlushCacheResult, SchedulerStats, RequestStarted, ErrorOutput]
TokenizerInbound = Union[GenerateRequest, TokenizeRequest, DetokenizeRequest, AbortRequest, FlushCacheRequest]
ServerInbound = Union[BatchTextOutput, ErrorOutput, FlushCacheResult, SchedulerStats, TokenizeResult,
                      DetokenizeResult]

Message = Union[
    TokenizedRequest, AbortRequest, FlushCacheRequest, FlushCacheResult, Shutdown,
    BatchTokenOutput, SchedulerStats, GenerateRequest, TokenizeRequest, TokenizeResult,
    DetokenizeRequest, DetokenizeResult, ErrorOutput, RequestStarted, BatchTextOutput,
]

_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def make_decoder(union=Message) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(union)
