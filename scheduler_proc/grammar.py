"""Grammar-constrained decoding with xgrammar: compile off the step loop, match per request.

`GrammarManager` turns a `GrammarSpec` into an xgrammar `CompiledGrammar` in a small thread pool,
so the scheduler's step loop never waits for a compile: it `submit`s a spec, keeps the request in
a grammar queue and `poll`s the handle each step. Results (failures too: they are deterministic)
are cached by (kind, spec) and counted as hits / misses for /metrics.

`RequestGrammar` is one request's matcher: it accepts the sampled tokens, fills its row of the
batch's packed token bitmask (int32, bit j of word i allows token 32*i + j) and rolls back when the
engine drops tokens it had already accepted.

This module imports torch and xgrammar: it belongs to the scheduler process only.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import xgrammar as xgr

from server.ipc import GrammarSpec

logger = logging.getLogger(__name__)

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes
# "Check failed: (...) is false: "; neither means anything to an API client.
_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")
_CHECK_PREFIX = re.compile(r"^Check failed: \(.*?\) is false:\s*")


class GrammarError(ValueError):
    """A grammar spec that cannot be compiled; `message` is safe to show to the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def clean_error(exc: BaseException) -> str:
    """A one-paragraph, client-safe message from an xgrammar / pydantic exception."""
    text = str(exc).strip()
    text = _CHECK_PREFIX.sub("", _CPP_PREFIX.sub("", text)).strip()
    return text or type(exc).__name__


class GrammarStatus(enum.IntEnum):
    # The order matters: TP ranks agree on a queue entry's status with a MIN all-reduce, so any
    # rank still compiling holds the request back and any rank that failed fails it everywhere.
    PENDING = 0
    FAILED = 1
    READY = 2


@dataclass(frozen=True)
class GrammarPoll:
    """What `GrammarManager.poll` reports: READY carries `compiled`, FAILED carries `error`."""

    status: GrammarStatus
    compiled: Optional[xgr.CompiledGrammar] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class GrammarHandle:
    """A submitted compile: its cache key, the shared future and when it was submitted."""

    key: tuple[str, str]
    future: "Future[xgr.CompiledGrammar]"
    submitted: float


@dataclass(frozen=True)
class GrammarStats:
    hits: int
    misses: int
    failures: int
    compile_seconds: float  # total time spent inside the compiler (worker threads)
    cached: int


class RequestGrammar:
    """One request's grammar state: an xgrammar `GrammarMatcher` plus the count of accepted tokens.

    Contract: call `fill_next_token_bitmask` before sampling, then `accept_token` with the sampled
    token. `rollback(k)` undoes the last k accepted tokens (k <= num_accepted).
    """

    def __init__(self, compiled: xgr.CompiledGrammar):
        self._matcher = xgr.GrammarMatcher(compiled)
        self.num_accepted = 0

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) when the grammar rejects it."""
        ok = self._matcher.accept_token(int(token_id))
        if ok:
            self.num_accepted += 1
        return ok

    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted: nothing may follow."""
        return self._matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens < 0 or num_tokens > self.num_accepted:
            raise GrammarError(f"cannot roll back {num_tokens} tokens: only {self.num_accepted} accepted")
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (a CPU int32 tensor)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        return self._matcher


def _resolve_tokenizer_info(tokenizer_or_info: Any, vocab_size: int,
                            stop_token_ids: Optional[Sequence[int]]) -> xgr.TokenizerInfo:
    if isinstance(tokenizer_or_info, xgr.TokenizerInfo):
        return tokenizer_or_info
    tokenizer = tokenizer_or_info
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    stops = list(stop_token_ids) if stop_token_ids else None
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)


class GrammarManager:
    """Compiles grammars in a thread pool, caches them, and makes per-request matchers.

    tokenizer_or_info: a Hugging Face tokenizer, a tokenizer directory, or an xgrammar TokenizerInfo.
    vocab_size: the model's logits width (may exceed the tokenizer's; the extra ids are never allowed).
    stop_token_ids: the model's end-of-sequence ids; a grammar ends by accepting one of them.
    compile_timeout_s: a compile still running after this long is reported FAILED, so a
    pathological spec fails its request instead of holding it forever.
    """

    def __init__(self, tokenizer_or_info: Any, vocab_size: int, max_threads: int = 2, *,
                 stop_token_ids: Optional[Sequence[int]] = None, cache_size: int = 512,
                 compile_timeout_s: float = 60.0):
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.vocab_size = vocab_size
        self.tokenizer_info = _resolve_tokenizer_info(tokenizer_or_info, vocab_size, stop_token_ids)
        # Our own cache (below) knows about failures and counts hits; xgrammar's would double the memory.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grammar")
        self._cache: "OrderedDict[tuple[str, str], Future]" = OrderedDict()
        self._cache_size = cache_size
        self._timeout = compile_timeout_s
        self._lock = threading.Lock()  # guards the counters the worker threads update
        self.hits = 0
        self.misses = 0
        self.failures = 0
        self._compile_seconds = 0.0

    # ------------------------------------------------------------------ compiling

    def submit(self, spec: GrammarSpec) -> GrammarHandle:
        """Start compiling `spec` (or reuse the cached / in-flight compile). Never blocks."""
        key = (spec.kind, spec.spec)
        fut = self._cache.get(key)
        if fut is not None:
            self._cache.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
            fut = self._pool.submit(self._compile, spec.kind, spec.spec)
            self._cache[key] = fut
            self._evict()
        return GrammarHandle(key, fut, time.monotonic())

    def poll(self, handle: GrammarHandle) -> GrammarPoll:
        """READY / FAILED (with a client-safe message) / PENDING. Never blocks."""
        fut = handle.future
        if not fut.done():
            if time.monotonic() - handle.submitted > self._timeout:
                return GrammarPoll(GrammarStatus.FAILED,
                                   error=f"grammar compilation took longer than {self._timeout:.0f} s")
            return GrammarPoll(GrammarStatus.PENDING)
        exc = fut.exception()
        if exc is not None:
            return GrammarPoll(GrammarStatus.FAILED, error=str(getattr(exc, "message", exc)))
        return GrammarPoll(GrammarStatus.READY, compiled=fut.result())

    def compile(self, spec: GrammarSpec, timeout: Optional[float] = None) -> xgr.CompiledGrammar:
        """Blocking convenience for tests and tools: submit, wait, raise GrammarError on failure."""
        handle = self.submit(spec)
        try:
            return handle.future.result(timeout=timeout if timeout is not None else self._timeout)
        except GrammarError:
            raise
        except TimeoutError as e:
            raise GrammarError("grammar compilation timed out") from e

    def _compile(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        t0 = time.perf_counter()
        try:
            return self._compile_now(kind, spec)
        except GrammarError:
            with self._lock:
                self.failures += 1
            raise
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / pydantic errors
            with self._lock:
                self.failures += 1
            raise GrammarError(f"invalid {kind} grammar: {clean_error(e)}") from e
        finally:
            with self._lock:
                self._compile_seconds += time.perf_counter() - t0

    def _compile_now(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        c = self._compiler
        if kind == "json_schema":
            try:
                json.loads(spec)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from e
            # Compact separators: with free whitespace, sampling at temperature 1 can wander
            # into endless blank space and never close the document.
            return c.compile_json_schema(spec, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            # Any JSON object (OpenAI's json_object mode); a spec, if given, is ignored.
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "ebnf":
            return c.compile_grammar(spec)
        if kind == "structural_tag":
            return c.compile_structural_tag(spec)
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}")

    def _evict(self) -> None:
        # Drop the least recently used finished entries; in-flight ones stay (their waiters need them).
        while len(self._cache) > self._cache_size:
            for key, fut in self._cache.items():
                if fut.done():
                    del self._cache[key]
                    break
            else:
                return

    @property
    def stats(self) -> GrammarStats:
        with self._lock:
            return GrammarStats(self.hits, self.misses, self.failures, self._compile_seconds, len(self._cache))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ matching

    def new_matcher(self, compiled: xgr.CompiledGrammar) -> RequestGrammar:
        return RequestGrammar(compiled)

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        """A CPU int32 bitmask of shape (batch_size, ceil(vocab_size / 32)), all tokens allowed."""
        return xgr.allocate_token_bitmask(batch_size, self.vocab_size)


class BatchMaskFiller:
    """Fills a batch's token bitmask, row by row on the calling thread or with the rows split
    across `max_threads` threads (xgrammar's BatchGrammarMatcher, C++ threads without the GIL).

    The engine uses one thread: with xgrammar 0.2.9 a row costs ~8 us (64 rows over the 128k
    Llama-3 vocabulary: 0.5 ms), and 8 threads measured slower (0.67 ms) on the H200 host, as
    did 2 threads on a 2-core CPU, where torch's spinning intra-op threads starve them. The
    benchmarks take --mask-threads to measure other counts.
    """

    def __init__(self, max_threads: int = 1):
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.max_threads = max_threads
        self._batch = xgr.BatchGrammarMatcher(max_threads)

    def fill(self, bitmask: torch.Tensor, grammars: Sequence[Optional[RequestGrammar]]) -> bool:
        """Fill row i of `bitmask` from grammars[i]; rows without a grammar allow every token.

        Returns whether any row is constrained (when none is, the caller can skip the mask entirely).
        """
        if bitmask.shape[0] < len(grammars):
            raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(grammars)} requests")
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if len(rows) < len(grammars):
            for row, g in enumerate(grammars):
                if g is None:
                    bitmask[row].fill_(-1)  # all 32 bits set
        if not rows:
            return False
        if len(rows) == 1 or self.max_threads == 1:
            for row in rows:
                grammars[row].fill_next_token_bitmask(bitmask, row)
        else:
            self._batch.batch_fill_next_token_bitmask([grammars[r].matcher for r in rows], bitmask, rows)
        return True


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf in place (logits: (batch, vocab), CPU or CUDA)."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))

__all__ = [
    "GRAMMAR_KINDS", "GrammarError", "GrammarStatus", "GrammarPoll", "GrammarHandle", "GrammarStats",
    "RequestGrammar", "GrammarManager", "BatchMaskFiller",
    "apply_token_bitmask", "clean_error",
]
