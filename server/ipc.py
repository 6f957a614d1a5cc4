"""The message schema between Skiff's processes: the one contract every process imports.

All messages are msgspec Structs in one tagged union, encoded as msgpack (no pickle on the wire).
Data path:  server -> tokenizer -> scheduler(s) -> detokenizer -> server.
Control messages (abort, flush, stats) ride the same sockets as the requests they concern, so an
abort can never overtake the request it aborts.
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec


class GrammarSpec(msgspec.Struct, frozen=True):
    """A structured-output constraint. kind: json_schema | json_object | regex | ebnf | structural_tag."""

    kind: str
    spec: str = ""


class SamplingParams(msgspec.Struct):
    """Per-request generation parameters, validated by the API server before they reach the engine.

    Engine semantics: temperature 0 is greedy; top_k <= 0 and top_p == 1 and min_p == 0 disable
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
        return self.temperature == 0.0 or self.top_k == 1


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
    """Periodic gauges from scheduler rank 0 (also the liveness heartbeat)."""

    num_running: int
    num_waiting: int
    kv_usage: float
    cache_hit_rate: float
    num_cached_tokens: int = 0
    step_time_s: float = 0.0
    timestamp: float = 0.0


SchedulerInbound = Union[TokenizedRequest, AbortRequest, FlushCacheRequest, Shutdown]
SchedulerOutbound = Union[BatchTokenOutput, FlushCacheResult, SchedulerStats]

Message = Union[
    TokenizedRequest, AbortRequest, FlushCacheRequest, FlushCacheResult, Shutdown,
    BatchTokenOutput, SchedulerStats,
]

_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def make_decoder(union=Message) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(union)
