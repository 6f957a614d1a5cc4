"""The engine's side of structured outputs: a grammar queue, the batch bitmask, token acceptance.

Wiring in the engine (each call is one line at its hook):

    add_request:   if backend.on_add(req): return          # held until its grammar compiled
    abort_request: backend.remove(req)
    each step:     q = backend.pop_ready(); scheduler.add(r) for q.ready; finish q.failed with an error
    before sample: mask = backend.fill_mask(reqs)           # None when no row has a grammar
                   sampler.sample(logits, info, vocab_mask=mask)
    after sample:  for r, ev in zip(reqs, backend.accept(reqs, tokens)): "terminated" -> finish "stop"
    retraction that drops accepted tokens: backend.on_retract(req, n)
    request finished: backend.on_finish(req)

A request whose grammar is still compiling never blocks the step loop: it sits in the queue and
`pop_ready` (non-blocking) releases it once its compile is done. With tensor parallelism every
rank must release the same requests in the same step, so `pop_ready(agree=...)` takes a function
that reduces the per-entry status codes across ranks (MIN: pending < failed < ready).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from scheduler_proc.grammar import BatchMaskFiller, GrammarHandle, GrammarManager, GrammarStatus
from scheduler_proc.request import Req

logger = logging.getLogger(__name__)

# Per-token outcomes of `accept`.
TERMINATED = "terminated"  # the grammar is complete and accepted its stop token: finish "stop"
REJECTED = "rejected"  # the grammar refused the sampled token (it could not be masked): abort


@dataclass
class GrammarQueueResult:
    """Requests leaving the grammar queue this step."""

    ready: list[Req] = field(default_factory=list)  # their req.grammar is set; schedule them
    failed: list[tuple[Req, str]] = field(default_factory=list)  # (request, client-safe error)


@dataclass(frozen=True)
class MaskStats:
    fill_calls: int
    fill_seconds: float  # CPU time spent filling bitmasks (and starting their copy to the device)
    rows_filled: int


class GrammarBackend:
    """Grammar queue + per-request matchers + batch bitmask for one engine (one TP rank)."""

    def __init__(self, manager: GrammarManager, device: torch.device, mask_threads: int = 1):
        self.manager = manager
        self.device = torch.device(device)
        self._filler = BatchMaskFiller(mask_threads)
        self._queue: list[tuple[Req, GrammarHandle]] = []
        # Two host buffers used in turn: on GPU the copy of step k's mask may still be queued
        # while step k+1's mask is filled (overlap loop); by step k+2 step k has completed.
        self._host_masks: list[Optional[torch.Tensor]] = [None, None]
        self._turn = 0
        self._words = (manager.vocab_size + 31) // 32
        self._fill_calls = 0
        self._fill_seconds = 0.0
        self._rows_filled = 0

    # ------------------------------------------------------------------ the grammar queue

    def on_add(self, req: Req) -> bool:
        """Start compiling req's grammar; True when the request must wait in the grammar queue."""
        spec = req.params.grammar
        if spec is None:
            return False
        self._queue.append((req, self.manager.submit(spec)))
        return True

    def remove(self, req: Req) -> bool:
        """Drop a queued request (abort); True if it was queued."""
        for i, (r, _) in enumerate(self._queue):
            if r is req:
                del self._queue[i]
                return True
        return False

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    def has_waiting(self) -> bool:
        return bool(self._queue)

    def pop_ready(self, agree: Optional[Callable[[list[int]], list[int]]] = None) -> GrammarQueueResult:
        """Release every queued request whose compile finished (never blocks).

        agree: for TP, maps this rank's status codes (GrammarStatus ints, queue order) to the
        codes all ranks agree on; entries are released only when every rank has them done.
        """
        result = GrammarQueueResult()
        if not self._queue:
            return result
        polls = [self.manager.poll(h) for _, h in self._queue]
        codes = [int(p.status) for p in polls]
        if agree is not None:
            codes = list(agree(codes))
        keep = []
        for (req, handle), poll, code in zip(self._queue, polls, codes):
            if code == GrammarStatus.PENDING:
                keep.append((req, handle))
            elif code == GrammarStatus.READY:
                req.grammar = self.manager.new_matcher(poll.compiled)
                result.ready.append(req)
            else:
                result.failed.append((req, poll.error or "the grammar failed to compile on another rank"))
        self._queue = keep
        return result

    def wait(self, timeout_s: float) -> None:
        """Block up to timeout_s for any queued compile to finish (for an otherwise idle loop)."""
        if self._queue:
            wait_futures([h.future for _, h in self._queue], timeout=timeout_s, return_when=FIRST_COMPLETED)

    # ------------------------------------------------------------------ per step

    @property
    def mask_threads(self) -> int:
        return self._filler.max_threads

    def set_mask_threads(self, threads: int) -> None:
        """Fill the bitmask on this many threads from the next step on (benchmarks compare counts)."""
        self._filler = BatchMaskFiller(threads)

    def fill_mask(self, reqs: Sequence[Req]) -> Optional[torch.Tensor]:
        """The int32 bitmask [len(reqs), ceil(V/32)] on the engine's device, or None if no row has a grammar.

        Rows of requests without a grammar allow everything (the sampler skips them anyway), and
        so do rows of finished requests: under overlap a request can finish (its matcher may be
        terminated) while its row is in the next batch, whose token for it is then dropped.
        """
        grammars = [None if r.finished else r.grammar for r in reqs]
        n = sum(g is not None for g in grammars)
        if n == 0:
            return None
        t0 = time.perf_counter()
        host = self._host_buffer(len(reqs))
        self._filler.fill(host, grammars)
        mask = host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)
        self._fill_seconds += time.perf_counter() - t0
        self._fill_calls += 1
        self._rows_filled += n
        return mask

    def accept(self, reqs: Sequence[Req], tokens: Sequence[int]) -> list[Optional[str]]:
        """Advance each request's matcher by its sampled token: None, TERMINATED or REJECTED per row."""
        events: list[Optional[str]] = []
        for req, tok in zip(reqs, tokens):
            g = req.grammar
            if g is None:
                events.append(None)
            elif not g.accept_token(tok):
                logger.warning("request %s: grammar rejected sampled token %d", req.rid, tok)
                events.append(REJECTED)
            else:
                events.append(TERMINATED if g.is_terminated() else None)
        return events

    def on_retract(self, req: Req, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens of req (they were dropped from its output)."""
        if req.grammar is not None and num_tokens:
            req.grammar.rollback(num_tokens)

    def on_finish(self, req: Req) -> None:
        req.grammar = None  # the matcher holds C++ state; release it with the request

    # ------------------------------------------------------------------ stats

    @property
    def mask_stats(self) -> MaskStats:
        return MaskStats(self._fill_calls, self._fill_seconds, self._rows_filled)

    def shutdown(self) -> None:
        self.manager.shutdown()

    def _host_buffer(self, rows: int) -> torch.Tensor:
        if self.device.type == "cuda":
            self._turn ^= 1
        buf = self._host_masks[self._turn]
        if buf is None or buf.shape[0] < rows:
            size = max(rows, 2 * (buf.shape[0] if buf is not None else 8))
            # Pinned on GPU machines so the copy to the device can be asynchronous.
            pin = self.device.type == "cuda"
            buf = torch.full((size, self._words), -1, dtype=torch.int32, pin_memory=pin)
            self._host_masks[self._turn] = buf
        return buf[:rows]


__all__ = ["GrammarBackend", "GrammarQueueResult", "MaskStats", "TERMINATED", "REJECTED"]
