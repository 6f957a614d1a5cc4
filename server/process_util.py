"""What every Skiff child process shares: socket addresses, supervision hooks and ZMQ helpers.

Light on purpose (stdlib + pyzmq): the API server and the tokenizer import it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import zmq

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class IpcPaths:
    """The ipc:// endpoints of one server instance; each named socket is bound by its reader."""

    tokenizer: str  # bound by the tokenizer (PULL); the API server pushes requests and aborts
    scheduler: str  # bound by scheduler rank 0 (PULL); the tokenizer pushes
    detokenizer: str  # bound by the detokenizer (PULL); scheduler rank 0 pushes
    server: str  # bound by the API server (PULL); the detokenizer and tokenizer push

    @classmethod
    def in_dir(cls, directory: str) -> "IpcPaths":
        return cls(*(f"ipc://{os.path.join(directory, name)}" for name in
                     ("tokenizer", "scheduler", "detokenizer", "server")))


@dataclass(frozen=True)
class ModelInfo:
    """What scheduler rank 0 reports when ready; the other processes are configured from it."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokenizer_path: str


def pull_socket(ctx: zmq.Context, addr: str, bind: bool = True) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)  # never drop: back-pressure is the sender's queue
    (sock.bind if bind else sock.connect)(addr)
    return sock


def push_socket(ctx: zmq.Context, addr: str, bind: bool = False) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    (sock.bind if bind else sock.connect)(addr)
    return sock


def setup_child(name: str, log_level: str = "info") -> None:
    """Run first in every child: name it, make it die with its parent, and leave SIGINT to the
    supervisor (Ctrl-C reaches the whole process group; the supervisor decides how to stop).

    SIGTERM raises SystemExit so `finally` blocks run. The parent-death watch has two layers:
    PR_SET_PDEATHSIG (Linux, immediate) and a thread polling getppid() (portable fallback).
    """
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(message)s")
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def _watch_parent(parent: int, interval_s: float = 0.5) -> None:
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent:
            os._exit(1)


def report_ready(conn, payload: Optional[object] = None) -> None:
    """Tell the supervisor this process is serving (over its multiprocessing ready pipe)."""
    conn.send(("ready", payload))
    conn.close()


def report_failure(conn, error: BaseException) -> None:
    try:
        conn.send(("error", f"{type(error).__name__}: {error}"))
        conn.close()
    except (OSError, ValueError):
        pass


class ChildStart(NamedTuple):
    """What `start_child` hands a child's main loop."""

    worker: Any  # what `build()` returned
    inbox: zmq.Socket  # PULL, bound
    outboxes: list[zmq.Socket]  # PUSH, connected, in the order their addresses were given


def start_child(name: str, log_level: str, ready_conn, build: Callable[[], Any], inbox: str,
                outboxes: Sequence[str]) -> ChildStart:
    """The start-up of a socket-driven child process (tokenizer, detokenizer).

    `setup_child`, then `build()` its worker, bind `inbox` and connect `outboxes`, then report
    ready to the supervisor. A failure in any of these is reported to the supervisor (which
    then stops the server with that message) and re-raised.
    """
    setup_child(name, log_level)
    try:
        worker = build()
        ctx = zmq.Context()
        pull = pull_socket(ctx, inbox)
        pushes = [push_socket(ctx, addr) for addr in outboxes]
    except BaseException as e:
        report_failure(ready_conn, e)
        raise
    report_ready(ready_conn)
    return ChildStart(worker, pull, pushes)
