"""Input checks that more than one layer runs, each implemented once.

Who checks what: the API server checks what it can see in a request body: shapes and ranges
(msgspec constraints on `server.protocol`'s Structs) and the token ids a client sends (prompt
ids, logit_bias, stop_token_ids, /detokenize tokens: refused before they cross IPC, where an id
wider than 64 bits cannot even be encoded). The tokenizer checks the prompt it built against the
vocabulary and the context. The engine trusts its inputs except for in-process callers
(`Engine.generate`, tests, benchmarks), which bypass both: `Engine.add_request` runs the same
functions defined here.
Light on purpose: the server and tokenizer processes import it (no torch).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from server.ipc import SamplingParams


class InvalidParam(ValueError):
    """Input that a layer rejects; `message` is safe to show to the client and `param` names the
    request field at fault (where there is one). Each layer's error type derives from it."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.message, self.param = message, param


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str) -> None:
    """Raise InvalidParam naming `param` for the first id outside [0, vocab_size)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidParam(f"token id {bad} in `{param}` is outside the vocabulary [0, {vocab_size})", param)


def check_sampling_params(p: SamplingParams, vocab_size: int) -> None:
    """Raise InvalidParam for a value the sampler cannot honour. The API server's bounds are
    narrower (OpenAI's); this is the engine's own contract, for callers that bypass the server."""
    if not (p.temperature >= 0.0 and math.isfinite(p.temperature)):
        raise InvalidParam(f"temperature must be a finite number >= 0, got {p.temperature}", "temperature")
    if not (0.0 < p.top_p <= 1.0):
        raise InvalidParam(f"top_p must be in (0, 1], got {p.top_p}", "top_p")
    if not (0.0 <= p.min_p <= 1.0):
        raise InvalidParam(f"min_p must be in [0, 1], got {p.min_p}", "min_p")
    if not (p.repetition_penalty > 0.0 and math.isfinite(p.repetition_penalty)):
        raise InvalidParam(f"repetition_penalty must be > 0, got {p.repetition_penalty}", "repetition_penalty")
    for name in ("frequency_penalty", "presence_penalty"):
        if not math.isfinite(getattr(p, name)):
            raise InvalidParam(f"{name} must be finite", name)
    if not 0 <= p.top_logprobs <= vocab_size:
        raise InvalidParam(f"top_logprobs must be in [0, {vocab_size}] (the vocabulary)", "top_logprobs")
    if p.min_new_tokens < 0:
        raise InvalidParam("min_tokens must be >= 0", "min_tokens")
    if p.max_new_tokens < 0:
        raise InvalidParam("max_tokens must be at least 0", "max_tokens")
    if not all(math.isfinite(v) for v in (p.logit_bias or {}).values()):
        raise InvalidParam("logit_bias values must be finite", "logit_bias")
    check_token_ids(p.logit_bias or (), vocab_size, "logit_bias")
    check_token_ids(p.stop_token_ids, vocab_size, "stop_token_ids")

