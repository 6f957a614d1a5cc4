"""The scheduler process: one per TP rank, driving an `Engine` in a loop.

Rank 0 owns the sockets: it drains its inbox (without blocking while there is work, with a short
poll when idle), and for tp_size > 1 broadcasts the raw messages so every rank applies the same
adds/aborts in the same order before the same step. Only rank 0 sends outputs. An `EngineError`
(bad request) becomes an `ErrorOutput` for the client; anything else crashes the process, and the
supervisor takes the whole server down.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import msgspec
import torch
import torch.distributed as dist
import zmq

from scheduler_proc.engine import Engine, EngineError
from server import ipc
from server.config import ServerConfig
from server.ipc_queue import PullQueue, PushQueue
from server.process_util import IpcPaths, ModelInfo, report_failure, report_ready, setup_child

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 250  # also the heartbeat period while idle
STATS_INTERVAL_S = 0.25


def _init_tp(config: ServerConfig, rank: int, ipc_dir: str):
    """Join the TP group and return (model group or None, gloo group for the control broadcast or
    None). On one node the rendezvous is a file in the private dir (no TCP port to collide on);
    across nodes, node 0's --dist-init-addr."""
    if config.tp_size == 1:
        return None, None
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(rank - config.local_tp_ranks.start)
    init = (f"tcp://{config.dist_init_addr}" if config.nnodes > 1
            else f"file://{os.path.join(ipc_dir, 'tp_rendezvous')}")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=config.tp_size)
    control = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return dist.group.WORLD, control


def _broadcast_frames(frames: list[bytes], group) -> list[bytes]:
    """Rank 0's frames to every rank (msgpack bytes in a uint8 tensor; no pickle)."""
    payload = msgspec.msgpack.encode(frames) if dist.get_rank() == 0 else b""
    size = torch.tensor([len(payload)], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    if size.item() == 0:
        return []
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(size.item(), dtype=torch.uint8)
    dist.broadcast(buf, src=0, group=group)
    return msgspec.msgpack.decode(buf.numpy().tobytes(), type=list[bytes])


class SchedulerLoop:
    """Applies inbound messages to the engine and steps it; `outbox` is None on ranks > 0."""

    def __init__(self, engine: Engine, outbox: Optional[PushQueue] = None):
        self.engine = engine
        self.outbox = outbox
        self.decoder = ipc.make_decoder(ipc.SchedulerInbound)
        self.last_stats = 0.0
        self.busy = False

    def _emit(self, msg) -> None:
        if self.outbox is not None:
            self.outbox.put(msg)

    def handle(self, frame: bytes) -> bool:
        """Apply one message; False on Shutdown."""
        msg = self.decoder.decode(frame)
        if isinstance(msg, ipc.TokenizedRequest):
            try:
                self.engine.add_request(msg)
            except EngineError as e:
                self._emit(ipc.ErrorOutput(msg.rid, e.message, e.status, e.param))
            else:
                self._emit(ipc.RequestStarted(msg.rid, msg.params, msg.input_ids[-5:],
                                              msg.input_ids if msg.params.prompt_logprobs else None))
        elif isinstance(msg, ipc.AbortRequest):
            self.engine.abort_request(msg.rid)
        elif isinstance(msg, ipc.FlushCacheRequest):
            ok = self.engine.flush_cache()
            self._emit(ipc.FlushCacheResult(msg.req_id, ok, "" if ok else
                                            "cannot flush the cache while requests are running"))
        elif isinstance(msg, ipc.Shutdown):
            return False
        return True

    def step(self) -> None:
        if self.engine.has_work():
            outputs = self.engine.step()
            for error in self.engine.take_errors():  # e.g. a grammar that failed to compile
                self._emit(error)
            if outputs:
                self._emit(ipc.BatchTokenOutput(outputs))

    def publish_stats(self) -> None:
        """Gauges every STATS_INTERVAL_S (also the heartbeat), and at once when the engine goes
        idle, so /metrics never shows the last request running after it finished."""
        if self.outbox is None:
            return
        busy, now = self.engine.has_work(), time.monotonic()
        if now - self.last_stats >= STATS_INTERVAL_S or (self.busy and not busy):
            self._emit(self.engine.stats())
            self.last_stats = now
        self.busy = busy


def run_scheduler(config: ServerConfig, paths: IpcPaths, ipc_dir: str, tp_rank: int, ready_conn) -> None:
    """Process entry point for one TP rank."""
    wake_fd = setup_child(f"skiff-sched-{tp_rank}", config.log_level)
    ctx = zmq.Context()
    try:
        try:
            tp_group, control = _init_tp(config, tp_rank, ipc_dir)
            engine = Engine(config, tp_rank=tp_rank, tp_group=tp_group)
            inbox = PullQueue(ctx, paths.scheduler, ipc.SchedulerInbound, wake_fd=wake_fd) if tp_rank == 0 else None
            outbox = PushQueue(ctx, paths.detokenizer) if tp_rank == 0 else None
        except BaseException as e:
            report_failure(ready_conn, e)
            raise
        report_ready(ready_conn, ModelInfo(engine.max_model_len, engine.vocab_size, tuple(engine.eos_token_ids),
                                           engine.tokenizer_path) if tp_rank == 0 else None)
        loop = SchedulerLoop(engine, outbox)
        running = True
        try:
            while running:
                frames = inbox.drain_frames(0 if engine.has_work() else IDLE_POLL_MS) if inbox is not None else []
                if control is not None:
                    frames = _broadcast_frames(frames, control)
                for frame in frames:
                    running = loop.handle(frame) and running
                loop.step()
                loop.publish_stats()
        except SystemExit:
            if tp_rank == 0 and config.nnodes > 1:
                # Ranks on other nodes have no supervisor here to stop them: tell them to leave.
                _broadcast_frames([ipc.encode(ipc.Shutdown())], control)
            raise
    finally:
        ctx.destroy(linger=0)
