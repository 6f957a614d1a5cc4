"""`python -m server --dp-size N`: N Skiff replicas behind sglang-router on one machine.

SGLang's --dp-size, built from existing parts: each replica is a whole `python -m server` (its own
supervisor, pipeline and prefix cache) on a private loopback port, with its own GPUs
(CUDA_VISIBLE_DEVICES) or, on CPU, its share of the cores (--num-threads); sglang-router (the Rust
router from PyPI, the `router` extra) listens on --host/--port and picks a replica for each request
by --router-policy. The replicas serve the worker routes the router reads (server/app.py).

Supervision keeps the single server's contract: if a replica or the router dies, everything is
stopped and the process exits 1. The router alone would route around a dead replica, but on one
machine a replica's death usually has a cause its siblings share (memory, a device fault, a request
pattern), and restarting it in place would hide a crash loop behind a half-sized server; whatever
restarts a single server (a process manager, a container restart policy) restarts this one whole.
For replicas that fail on their own, run them as separate services (docker/compose.yaml, profile dp).

SIGTERM/SIGINT drain in order: every replica drains its own requests while the router keeps carrying
their streams, then the router stops; exit 0. The children run in their own sessions (so a terminal's
Ctrl-C reaches only this process, which orders the stop) and get SIGTERM if this process dies.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import httpx

from server.config import ServerConfig, to_argv
from server.process_util import die_with_parent, usable_cores

logger = logging.getLogger("skiff.dp")
logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every health poll at info

POLL_S = 0.2
ROUTER_READY_TIMEOUT_S = 60.0
STOP_MARGIN_S = 10.0  # past a replica's own drain grace before it is killed
ROUTER_STOP_S = 5.0
# Skiff's log levels in the router's words; its info level logs every request.
_ROUTER_LOG_LEVEL = {"debug": "debug", "info": "warn", "warning": "warn", "error": "error"}


class DpError(RuntimeError):
    """The replicas or the router could not be planned or started."""


@dataclass(frozen=True)
class Replica:
    """One replica's launch plan: its config (a loopback port) and its environment additions."""

    config: ServerConfig
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, without importing torch: CUDA_VISIBLE_DEVICES when set,
    else what `nvidia-smi -L` lists, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def plan_replicas(cfg: ServerConfig, gpus: list[str], cores: int,
                  port_for: Callable[[], int] = free_port) -> list[Replica]:
    """Split the machine into `cfg.dp_size` replicas: tp_size GPUs each when the server runs on GPUs,
    else an equal share of the cores (each replica's API, tokenizer and detokenizer processes get
    one core between them, as the single server leaves one core to them)."""
    n, tp = cfg.dp_size, cfg.tp_size
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and bool(gpus))
    if on_gpu and len(gpus) < n * tp:
        raise DpError(f"--dp-size {n} x --tp-size {tp} needs {n * tp} GPUs; {len(gpus)} visible")
    threads = cfg.num_threads if cfg.num_threads is not None else max(1, (cores - n) // (n * tp))
    replicas = []
    for i in range(n):
        rcfg = cfg.replace(dp_size=1, host="127.0.0.1", port=port_for(),
                           num_threads=None if on_gpu else threads)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * tp:(i + 1) * tp])} if on_gpu else {}
        replicas.append(Replica(rcfg, env))
    return replicas


def router_command(cfg: ServerConfig, worker_urls: list[str], metrics_port: int) -> list[str]:
    """sglang-router's launcher on the public host/port. Its Prometheus exporter (always on) gets a
    free loopback port: its fixed default would clash between two servers on one machine."""
    return [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
            "--policy", cfg.router_policy, "--host", cfg.host, "--port", str(cfg.port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            "--log-level", _ROUTER_LOG_LEVEL[cfg.log_level],
            # the replicas have drained when the router is told to stop: nothing is left to wait for
            "--shutdown-grace-period-secs", "2"]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    die_with_parent(signal.SIGTERM)  # not Linux: the children outlive a killed supervisor


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen


class DataParallelServer:
    """Starts N replicas and the router, supervises them, and stops them in order."""

    def __init__(self, config: ServerConfig, gpus: Optional[list[str]] = None, cores: Optional[int] = None):
        if importlib.util.find_spec("sglang_router") is None:
            raise DpError("--dp-size > 1 runs the replicas behind sglang-router, which is not installed: "
                          "pip install 'skiff[router]' (or pip install sglang-router)")
        self.config = config
        self.replicas = plan_replicas(config, visible_gpus() if gpus is None else gpus,
                                      usable_cores() if cores is None else cores)
        self.children: list[_Child] = []
        self.stop_signal: Optional[int] = None

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> _Child:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        child = _Child(name, proc)
        self.children.append(child)
        logger.info("started %s (pid %d)", name, proc.pid)
        return child

    def _dead(self) -> Optional[_Child]:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def _wait(self, ready: Callable[[], bool], what: str, timeout_s: Optional[float] = None) -> None:
        """Poll `ready` until true; a child's death, a stop signal or the timeout ends the wait."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not ready():
            if self.stop_signal is not None:
                raise _Stop()
            dead = self._dead()
            if dead is not None:
                raise DpError(f"{dead.name} exited (exit code {dead.proc.returncode}) while waiting for {what}")
            if deadline is not None and time.monotonic() > deadline:
                raise DpError(f"timed out waiting for {what}")
            time.sleep(POLL_S)

    def _start_all(self, http: httpx.Client) -> None:
        for i, r in enumerate(self.replicas):
            self._start(f"replica-{i}", [sys.executable, "-m", "server", *to_argv(r.config)], r.env)

        def replicas_healthy() -> bool:
            return all(_get_ok(http, r.url + "/health") for r in self.replicas)

        # No timeout: a replica loading a large model takes its time, and one that fails exits.
        self._wait(replicas_healthy, "the replicas to load")
        cfg = self.config
        router = self._start("router", router_command(cfg, [r.url for r in self.replicas], free_port()), {})
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        workers_url = f"http://{host}:{cfg.port}/workers"

        def router_ready() -> bool:
            workers = _get_json(http, workers_url)
            return workers is not None and sum(w.get("is_healthy", False) for w in workers.get("workers", [])) \
                == len(self.replicas)

        self._wait(router_ready, f"the router (pid {router.proc.pid}) to take the replicas", ROUTER_READY_TIMEOUT_S)

    def run(self) -> int:
        def on_signal(signum, frame):
            self.stop_signal = signum

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        code = 0
        try:
            with httpx.Client(timeout=2.0) as http:
                self._start_all(http)
            cfg = self.config
            pids = ", ".join(f"{c.name} {c.proc.pid}" for c in self.children)
            print(f"Skiff is serving {cfg.model_name} on http://{cfg.host}:{cfg.port} with {len(self.replicas)} "
                  f"replicas behind sglang-router ({cfg.router_policy}; processes: {pids})", flush=True)
            self._wait(lambda: False, "requests")
        except _Stop:
            logger.info("stopping (signal %d): draining the replicas, then the router", self.stop_signal)
        except DpError as e:
            logger.error("%s; shutting down", e)
            code = 1
        finally:
            self.stop()
        return code

    def stop(self) -> None:
        """Drain the replicas (each within its grace period), then stop the router."""
        replicas = [c for c in self.children if c.name != "router"]
        _terminate(replicas, self.config.graceful_shutdown_timeout + STOP_MARGIN_S)
        _terminate([c for c in self.children if c.name == "router"], ROUTER_STOP_S)


class _Stop(Exception):
    """SIGTERM/SIGINT arrived."""


def _terminate(children: list[_Child], timeout_s: float) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.terminate()
    deadline = time.monotonic() + timeout_s
    for c in children:
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in time; killing it", c.name)
            c.proc.kill()
            c.proc.wait()


def _get_json(http: httpx.Client, url: str) -> Optional[dict]:
    try:
        r = http.get(url)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _get_ok(http: httpx.Client, url: str) -> bool:
    try:
        return http.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def main(config: ServerConfig) -> int:
    try:
        return DataParallelServer(config).run()
    except DpError as e:
        logger.error("%s", e)
        return 1
