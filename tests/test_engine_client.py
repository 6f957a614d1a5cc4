"""The API process's pipeline client against real ipc:// sockets, with this test as the pipeline."""

from __future__ import annotations

import asyncio

import zmq

from server import ipc
from server.engine_client import EngineClient
from server.ipc_queue import PullQueue, PushQueue
from server.metrics import Metrics
from server.process_util import IpcPaths


def test_detokenizer_failure_aborts_upstream_and_reaches_the_client(tmp_path):
    """An ErrorOutput with abort_upstream (a request the detokenizer failed) goes to the client and
    sends an AbortRequest to the tokenizer, so the scheduler frees the request's KV."""
    paths = IpcPaths.in_dir(str(tmp_path))
    ctx = zmq.Context()
    tokenizer_inbox = PullQueue(ctx, paths.tokenizer, ipc.TokenizerInbound)

    async def run():
        client = EngineClient(paths, Metrics("m"))
        client.start()
        try:
            group = client.generate([ipc.GenerateRequest(rid="r1", params=ipc.SamplingParams(), prompt_text="hi")])
            detokenizer = PushQueue(ctx, paths.server)
            detokenizer.put(ipc.ErrorOutput("r1", "internal error while detokenizing", 500, abort_upstream=True))
            items = await asyncio.wait_for(group.next_items(), 10)
            return items, group.done
        finally:
            await client.close()

    try:
        items, done = asyncio.run(run())
        assert [(i, type(item).__name__, item.status) for i, item in items] == [(0, "ErrorOutput", 500)]
        assert done
        sent = []
        while len(sent) < 2:  # both were sent before the client saw the error; allow for delivery
            got = tokenizer_inbox.drain(5000)
            assert got, f"the tokenizer received only {sent}"
            sent += got
        assert [type(m).__name__ for m in sent] == ["GenerateRequest", "AbortRequest"]
        assert sent[1].rid == "r1"
    finally:
        ctx.destroy(linger=0)
