"""The API process's side of the pipeline: send requests to the tokenizer, route results back.

One background task reads the server's PULL socket and hands each message to whoever waits for
it: a `RequestGroup` (the sub-requests of one HTTP request) or a pending control call (tokenize,
detokenize, flush). Timing metrics are taken here, when outputs arrive, not when clients read them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Optional, Union

import zmq
import zmq.asyncio

from server import ipc
from server.metrics import Metrics
from server.ipc_queue import AsyncPullQueue, PushQueue
from server.process_util import IpcPaths

logger = logging.getLogger(__name__)

Item = Union[ipc.TextOutput, ipc.ErrorOutput]


class EngineDead(RuntimeError):
    """The pipeline is gone (a child died or the server is shutting down)."""


class RequestGroup:
    """Outputs of the sub-requests of one HTTP request, in arrival order, as (index, item)."""

    def __init__(self, client: "EngineClient", rids: list[str]):
        self.client = client
        self.rids = rids
        self.index = {rid: i for i, rid in enumerate(rids)}
        self.items: list[tuple[int, Item]] = []
        self.event = asyncio.Event()
        self.unfinished = set(rids)
        self.start = time.monotonic()
        self.last = [0.0] * len(rids)
        self.error: Optional[BaseException] = None

    @property
    def done(self) -> bool:
        return not self.unfinished

    def _push(self, rid: str, item: Item) -> None:
        self.items.append((self.index[rid], item))
        self.event.set()

    async def next_items(self) -> list[tuple[int, Item]]:
        """Everything that arrived since the last call (waits while nothing has)."""
        while not self.items:
            if self.error is not None:
                raise self.error
            self.event.clear()
            await self.event.wait()
        items, self.items = self.items, []
        return items

    def abort(self) -> None:
        """Abort every unfinished sub-request (the client went away or the server is stopping)."""
        for rid in list(self.unfinished):
            self.client.abort(rid)

    def close(self) -> None:
        for rid in self.rids:
            self.client.groups.pop(rid, None)


class EngineClient:
    def __init__(self, paths: IpcPaths, metrics: Metrics):
        self.ctx = zmq.asyncio.Context()
        self.inbox: AsyncPullQueue[ipc.ServerInbound] = AsyncPullQueue(self.ctx, paths.server, ipc.ServerInbound)
        # A plain (blocking-API) socket: with no high-water mark a PUSH send never blocks, and a
        # synchronous send also works from code being cancelled (a disconnected client's cleanup).
        self.sync_ctx = zmq.Context()
        self.to_tokenizer = PushQueue(self.sync_ctx, paths.tokenizer)
        self.metrics = metrics
        self.groups: dict[str, RequestGroup] = {}
        self.calls: dict[str, asyncio.Future] = {}
        self.stats: Optional[ipc.SchedulerStats] = None
        self.stats_at = 0.0
        self.dead: Optional[str] = None
        self.draining = False  # SIGTERM: requests in flight finish, new ones are refused (503)
        self._ids = itertools.count()
        self._prefix = os.urandom(4).hex()
        self._task: Optional[asyncio.Task] = None

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._on_receiver_exit)

    def _on_receiver_exit(self, task: asyncio.Task) -> None:
        # A bug in the receive loop must not leave every request waiting forever.
        if not task.cancelled() and task.exception() is not None:
            logger.error("the output receiver failed", exc_info=task.exception())
            self.fail_all(f"the output receiver failed: {task.exception()!r}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.ctx.destroy(linger=0)
        self.sync_ctx.destroy(linger=0)

    # ------------------------------------------------------------------ requests

    @property
    def num_unfinished(self) -> int:
        """Sub-requests sent to the pipeline whose final output has not arrived."""
        return len(self.groups)

    def _check_accepting(self) -> None:
        if self.dead is not None:
            raise EngineDead(self.dead)
        if self.draining:
            raise EngineDead("it drains the requests in flight and accepts no new ones")

    def generate(self, requests: list[ipc.GenerateRequest]) -> RequestGroup:
        self._check_accepting()
        group = RequestGroup(self, [r.rid for r in requests])
        for r in requests:
            self.groups[r.rid] = group
        for r in requests:
            self.to_tokenizer.put(r)
        return group

    def abort(self, rid: str) -> None:
        group = self.groups.pop(rid, None)
        if group is not None:
            group.unfinished.discard(rid)
        if self.dead is None:
            self.to_tokenizer.put(ipc.AbortRequest(rid))

    async def call(self, msg: Union[ipc.TokenizeRequest, ipc.DetokenizeRequest, ipc.FlushCacheRequest],
                   timeout_s: float = 30.0):
        """Send a control request and wait for its result (or ErrorOutput) by `req_id`."""
        self._check_accepting()
        fut = asyncio.get_running_loop().create_future()
        self.calls[msg.req_id] = fut
        try:
            self.to_tokenizer.put(msg)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self.calls.pop(msg.req_id, None)

    def abort_all(self) -> None:
        """Shutdown grace is over: abort what still runs. Unlike `abort`, the groups stay
        registered so their clients still receive the final "abort" output."""
        for rid, group in list(self.groups.items()):
            if rid in group.unfinished and self.dead is None:
                self.to_tokenizer.put(ipc.AbortRequest(rid))

    def fail_all(self, reason: str) -> None:
        """The pipeline died: wake every waiter with an error instead of leaving it hanging."""
        self.dead = reason
        err = EngineDead(reason)
        for group in set(self.groups.values()):
            group.error = err
            group.event.set()
        self.groups.clear()
        for fut in self.calls.values():
            if not fut.done():
                fut.set_exception(err)

    # ------------------------------------------------------------------ the receive loop

    async def _run(self) -> None:
        while True:
            msg = await self.inbox.get()
            if isinstance(msg, ipc.BatchTextOutput):
                now = time.monotonic()
                for out in msg.outputs:
                    self._deliver_text(out, now)
            elif isinstance(msg, ipc.SchedulerStats):
                self.stats, self.stats_at = msg, time.monotonic()
                self.metrics.update_stats(msg)
            elif isinstance(msg, ipc.ErrorOutput):
                if msg.abort_upstream and self.dead is None:  # failed in the detokenizer: free its KV
                    self.to_tokenizer.put(ipc.AbortRequest(msg.rid))
                group = self.groups.pop(msg.rid, None)
                if group is not None:
                    group.unfinished.discard(msg.rid)
                    group._push(msg.rid, msg)
                else:
                    self._resolve(msg.rid, msg)
            else:  # TokenizeResult, DetokenizeResult, FlushCacheResult
                self._resolve(msg.req_id, msg)

    def _resolve(self, req_id: str, msg) -> None:
        fut = self.calls.get(req_id)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _deliver_text(self, out: ipc.TextOutput, now: float) -> None:
        group = self.groups.get(out.rid)
        if group is None:
            return  # aborted by us already; its final "abort" output needs no one
        i = group.index[out.rid]
        if out.token_ids:
            first = group.last[i] == 0.0
            self.metrics.observe_tokens(first, now - group.start, now - (group.last[i] or group.start),
                                        len(out.token_ids))
            group.last[i] = now
        if out.finish_reason is not None:
            self.groups.pop(out.rid, None)
            group.unfinished.discard(out.rid)
            self.metrics.observe_finished(out.finish_reason, now - group.start, out.prompt_tokens,
                                          out.completion_tokens, out.cached_tokens)
            if out.abort_upstream:  # finished by a stop string: free the scheduler's KV now
                self.to_tokenizer.put(ipc.AbortRequest(out.rid))
        group._push(out.rid, out)
