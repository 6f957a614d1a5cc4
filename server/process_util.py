"""What every Skiff child process shares: socket addresses, supervision hooks and start-up.

Light on purpose (stdlib, pyzmq, msgspec): the API server and the tokenizer import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import zmq

from server.ipc_queue import PullQueue, PushQueue

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


def setup_child(name: str, log_level: str = "info") -> int:
    """Run first in every child: name it, make it die with its parent, and leave SIGINT to the
    supervisor (Ctrl-C reaches the whole process group; the supervisor decides how to stop).

    SIGTERM raises SystemExit so `finally` blocks run. The kernel may deliver it to any thread
    that does not block it; the Python handler still runs in the main thread, but only once that
    thread returns from C. So every signal also writes a byte to a wake-up pipe, whose read end
    (returned) the child's inbox polls: a child blocked waiting for messages stops at once.
    The parent-death watch has two layers: PR_SET_PDEATHSIG (Linux, immediate) and a thread
    polling getppid() (portable fallback).
    """
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(message)s")
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        except (OSError, AttributeError):
            pass
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()
    return wake_read


def die_with_parent(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux's PR_SET_PDEATHSIG;
    elsewhere nothing). Safe between fork and exec."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
    inbox: PullQueue
    outboxes: list[PushQueue]  # in the order their addresses were given


@contextlib.contextmanager
def start_child(name: str, log_level: str, ready_conn, build: Callable[[], Any], inbox: str,
                accepts: type, outboxes: Sequence[str]) -> Iterator[ChildStart]:
    """The start-up and tear-down of a socket-driven child process (tokenizer, detokenizer).

    `setup_child`, then `build()` its worker, bind `inbox` (for messages of the union type
    `accepts`) and connect `outboxes`, then report ready to the supervisor. A failure in any of
    these is reported to the supervisor (which then stops the server with that message) and
    re-raised. On the way out (SIGTERM included) the sockets are closed without lingering.
    """
    wake_fd = setup_child(name, log_level)
    ctx = zmq.Context()
    try:
        try:
            worker = build()
            pull = PullQueue(ctx, inbox, accepts, wake_fd=wake_fd)
            pushes = [PushQueue(ctx, addr) for addr in outboxes]
        except BaseException as e:
            report_failure(ready_conn, e)
            raise
        report_ready(ready_conn)
        yield ChildStart(worker, pull, pushes)
    finally:
        ctx.destroy(linger=0)
