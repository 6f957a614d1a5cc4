"""Typed message queues over ZMQ: a socket bundled with the schema's encoder or decoder.

Every process talks to its neighbours through these, so no call site encodes, decodes or drains
by hand. PUSH/PULL over ipc:// with no high-water mark: a put never blocks and never drops (the
reader's queue is the back-pressure), and an abort sent after its request arrives after it.

Light on purpose (stdlib + pyzmq + msgspec): the API server and the tokenizer import it.
"""

from __future__ import annotations

import logging
import os
from typing import Generic, Optional, TypeVar

import msgspec
import zmq
import zmq.asyncio

from server import ipc

M = TypeVar("M")
logger = logging.getLogger(__name__)


class PushQueue:
    """Sends schema messages to one ipc:// endpoint (connects by default: the reader binds)."""

    def __init__(self, ctx: zmq.Context, addr: str, *, bind: bool = False):
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        (self.sock.bind if bind else self.sock.connect)(addr)

    def put(self, msg: msgspec.Struct) -> None:
        self.sock.send(ipc.encode(msg))


def _pull_socket(ctx: zmq.Context, addr: str, bind: bool) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    (sock.bind if bind else sock.connect)(addr)
    return sock


class PullQueue(Generic[M]):
    """Receives messages of the union type `accepts` on one ipc:// endpoint it binds.

    `wake_fd` (from `process_util.setup_child`) is polled next to the socket: a signal that arrives
    while the process waits here wakes it, so its Python handler (SIGTERM: exit) runs at once even
    when the kernel delivered the signal to another thread.
    """

    def __init__(self, ctx: zmq.Context, addr: str, accepts: type, *, bind: bool = True,
                 wake_fd: Optional[int] = None):
        self.sock = _pull_socket(ctx, addr, bind)
        self.decoder = ipc.make_decoder(accepts)
        self.wake_fd = wake_fd
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        if wake_fd is not None:
            self.poller.register(wake_fd, zmq.POLLIN)

    def decode(self, frame: bytes) -> M:
        return self.decoder.decode(frame)

    def wait(self, timeout_ms: Optional[int] = None) -> bool:
        """Block until a message is queued (True) or `timeout_ms` passed (False; None: forever)."""
        while True:
            events = dict(self.poller.poll(timeout_ms))
            if self.sock in events:
                return True
            if self.wake_fd is not None and self.wake_fd in events:
                os.read(self.wake_fd, 512)  # the signal's handler runs as soon as this returns
                continue
            return False

    def drain_frames(self, timeout_ms: Optional[int] = None) -> list[bytes]:
        """Wait up to `timeout_ms` (0: not at all; None: forever) for a first message, then take
        everything queued, still encoded (scheduler rank 0 broadcasts the frames to its peers)."""
        frames: list[bytes] = []
        if timeout_ms != 0 and not self.wait(timeout_ms):
            return frames
        while True:
            try:
                frames.append(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return frames

    def drain(self, timeout_ms: Optional[int] = None) -> list[M]:
        """`drain_frames`, decoded. A frame that does not decode means two processes disagree on
        the schema (our bug, not a client's): it is logged and dropped, and the process goes on."""
        msgs = []
        for frame in self.drain_frames(timeout_ms):
            try:
                msgs.append(self.decoder.decode(frame))
            except msgspec.DecodeError:
                logger.exception("dropped an undecodable message (%d bytes)", len(frame))
        return msgs


class AsyncPullQueue(Generic[M]):
    """The asyncio side of a PullQueue, for the API server's event loop."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str, accepts: type):
        self.sock = _pull_socket(ctx, addr, bind=True)
        self.decoder = ipc.make_decoder(accepts)

    async def get(self) -> M:
        return self.decoder.decode(await self.sock.recv())


__all__ = ["PushQueue", "PullQueue", "AsyncPullQueue"]
