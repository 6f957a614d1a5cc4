"""The supervisor: starts the pipeline's processes, runs the HTTP server, and stops it all cleanly.

Startup: a private 0700 directory for the ipc:// sockets; scheduler ranks first (rank 0 reports
the model's context length, vocabulary and tokenizer), then tokenizer and detokenizer; each child
reports on its own ready pipe. Then uvicorn serves the app in this process.

Shutdown: SIGTERM/SIGINT drain: requests in flight get a grace period while new ones get 503,
then what is left is aborted (clients get finish_reason "abort"); the children are stopped and the
process exits 0. If any child dies, everything is stopped and the process exits 1 within seconds.
Children are started with the spawn method and die with this process (see process_util.setup_child).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import uvicorn

from server.config import ServerConfig
from server.process_util import IpcPaths, ModelInfo, usable_cores

logger = logging.getLogger("skiff")

STOP_TIMEOUT_S = 3.0


class StartupError(RuntimeError):
    pass


class _StopRequested(Exception):
    """SIGTERM/SIGINT arrived while no HTTP server runs (during start-up, or on a follower node)."""


def _child_main(module: str, func: str, *args) -> None:
    # Importing the entry point here, in the child, keeps torch out of the supervisor.
    code = 1
    try:
        getattr(importlib.import_module(module), func)(*args)
        code = 0
    except SystemExit as e:  # SIGTERM (setup_child turns it into SystemExit(0))
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        # The entry point has closed its sockets by now. Skip the interpreter's teardown: its final
        # garbage collection over a large engine's objects takes seconds, past the supervisor's
        # patience, and nothing else is left to flush but the logs.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class _Child:
    name: str
    proc: mp.Process


class _HttpServer(uvicorn.Server):
    """uvicorn with a ready announcement and a draining stop.

    On SIGTERM/SIGINT the listener stays open for the grace period: requests in flight run on,
    new ones get 503 with Retry-After (`begin_drain`), and /health says 503 so load balancers
    move away. Once nothing is in flight, or the grace period is over (the stragglers are then
    aborted and get finish_reason "abort"), uvicorn's own shutdown closes the connections.
    """

    def __init__(self, config: uvicorn.Config, grace_s: float, on_ready, begin_drain, num_in_flight, abort_all):
        super().__init__(config)
        self.grace_s, self.on_ready = grace_s, on_ready
        self.begin_drain, self.num_in_flight, self.abort_all = begin_drain, num_in_flight, abort_all

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            port = self.config.port
            for server in self.servers:
                for sock in server.sockets:
                    port = sock.getsockname()[1]
            self.on_ready(port)

    async def shutdown(self, sockets=None) -> None:
        self.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        while self.num_in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.num_in_flight():
            logger.warning("grace period over: aborting the %d requests still running", self.num_in_flight())
            self.abort_all()
        await super().shutdown(sockets)


SCHEDULER_ENTRY = ("scheduler_proc.process", "run_scheduler")


class Supervisor:
    """Owns the child processes and the HTTP server of one Skiff instance.

    `scheduler_entry` (module, function) is the scheduler process's entry point; only benchmarks
    that measure the serving path without a model replace it.
    """

    def __init__(self, config: ServerConfig, scheduler_entry: tuple[str, str] = SCHEDULER_ENTRY):
        self.config = config
        self.scheduler_entry = scheduler_entry
        self.ctx = mp.get_context("spawn")
        self.children: list[_Child] = []
        self.ipc_dir = tempfile.mkdtemp(prefix="skiff-")  # mode 0700
        self.paths = IpcPaths.in_dir(self.ipc_dir)
        self.exit_code = 0
        self.stopping = False

    # ------------------------------------------------------------------ children

    def _spawn(self, name: str, module: str, func: str, *args) -> tuple[_Child, mpc.Connection]:
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child_main, args=(module, func, *args, writer), name=name, daemon=False)
        proc.start()
        writer.close()
        child = _Child(name, proc)
        self.children.append(child)
        logger.info("started %s (pid %d)", name, proc.pid)
        return child, reader

    def _wait_ready(self, pending: list[tuple[_Child, mpc.Connection]]) -> list[object]:
        """Block until every child reported ready; return their payloads in order."""
        payloads: dict[int, object] = {}
        waiting = {id(conn): (i, child, conn) for i, (child, conn) in enumerate(pending)}
        while waiting:
            conns = [conn for _, _, conn in waiting.values()]
            sentinels = {child.proc.sentinel: child for _, child, _ in waiting.values()}
            for obj in mpc.wait(conns + list(sentinels)):
                if obj in sentinels:
                    child = sentinels[obj]
                    child.proc.join(0.5)
                    raise StartupError(f"the {child.name} process exited during startup "
                                       f"(exit code {child.proc.exitcode})")
                i, child, conn = waiting.pop(id(obj))
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    raise StartupError(f"the {child.name} process exited during startup") from None
                if kind != "ready":
                    raise StartupError(f"the {child.name} process failed to start: {payload}")
                payloads[i] = payload
        return [payloads[i] for i in range(len(pending))]

    def _scheduler_config(self) -> ServerConfig:
        """The schedulers' config: on CPU, torch threads default to the cores the other processes
        leave free, split across ranks. Oversubscribed OpenMP threads stall at every barrier when a
        neighbour process takes a core: on 2 cores, 2 threads stream ~3.5x fewer tokens/s than 1."""
        if self.config.num_threads is not None:
            return self.config
        return self.config.replace(num_threads=max(1, (usable_cores() - 1) // len(self.config.local_tp_ranks)))

    def start_children(self) -> Optional[ModelInfo]:
        """Start this node's processes; the model's info on node 0, None on the other nodes (they
        run scheduler ranks only)."""
        cfg, paths = self.config, self.paths
        sched_cfg = self._scheduler_config()
        ranks = [self._spawn(f"scheduler-{r}", *self.scheduler_entry, sched_cfg, paths, self.ipc_dir, r)
                 for r in cfg.local_tp_ranks]
        payloads = self._wait_ready(ranks)
        if cfg.node_rank > 0:
            return None
        info = payloads[0]
        if not isinstance(info, ModelInfo):
            raise StartupError("scheduler rank 0 did not report the model's info")
        if cfg.max_model_len is not None and cfg.max_model_len > info.max_model_len:
            logger.warning("--max-model-len %d exceeds what the engine supports (%d)", cfg.max_model_len,
                           info.max_model_len)
        others = [self._spawn("tokenizer", "tokenizer_proc.process", "run_tokenizer", cfg, paths, info),
                  self._spawn("detokenizer", "detokenizer_proc.process", "run_detokenizer", cfg, paths, info)]
        self._wait_ready(others)
        return info

    def stop_children(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.proc.is_alive():
                child.proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children:
            child.proc.join(max(0.0, deadline - time.monotonic()))
        for child in self.children:
            if child.proc.is_alive():
                logger.warning("%s did not stop in time; killing it", child.name)
                child.proc.kill()
                child.proc.join(1.0)

    def children_alive(self) -> bool:
        return all(c.proc.is_alive() for c in self.children)

    # ------------------------------------------------------------------ the whole lifecycle

    def run(self) -> int:
        def stop_startup(signum, frame):
            raise _StopRequested()

        signal.signal(signal.SIGTERM, stop_startup)
        signal.signal(signal.SIGINT, stop_startup)
        try:
            info = self.start_children()
            if info is None:
                self._follow()
                return self.exit_code
            # uvicorn installs its own handlers while serving and re-raises the signal after a
            # graceful stop; these no-op handlers absorb that so a requested stop exits 0.
            signal.signal(signal.SIGTERM, lambda s, f: None)
            signal.signal(signal.SIGINT, lambda s, f: None)
            self._serve(info)
        except _StopRequested:
            logger.info("stopped by a signal")
        except StartupError as e:
            logger.error("%s", e)
            self.exit_code = 1
        finally:
            self.stop_children()
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
        return self.exit_code

    def _follow(self) -> None:
        """A node other than 0: its scheduler ranks follow rank 0's schedule until rank 0 tells
        them to leave (exit 0) or one of them fails (exit 1). SIGTERM here stops this node only."""
        cfg = self.config
        pids = ", ".join(f"{c.name} {c.proc.pid}" for c in self.children)
        print(f"Skiff node {cfg.node_rank} of {cfg.nnodes}: TP ranks {cfg.local_tp_ranks.start}-"
              f"{cfg.local_tp_ranks.stop - 1} follow rank 0 at {cfg.dist_init_addr} (processes: {pids})", flush=True)
        running = list(self.children)
        while running:
            for sentinel in mpc.wait([c.proc.sentinel for c in running]):
                child = next(c for c in running if c.proc.sentinel == sentinel)
                child.proc.join()
                running.remove(child)
                if child.proc.exitcode != 0:
                    logger.error("the %s process died (exit code %s); stopping this node", child.name,
                                 child.proc.exitcode)
                    self.exit_code = 1
                    return
        logger.info("rank 0 stopped the TP group; this node stops too")

    def _serve(self, info: ModelInfo) -> None:
        from server.app import create_app

        cfg = self.config
        app = create_app(cfg, info, self.paths, self.children_alive)

        def on_ready(port: int) -> None:
            pids = ", ".join(f"{c.name} {c.proc.pid}" for c in self.children)
            print(f"Skiff is serving {cfg.model_name} on http://{cfg.host}:{port} (processes: {pids})", flush=True)

        def client():  # None until the app's lifespan started it
            return getattr(app.state, "client", None)

        def begin_drain() -> None:
            if client() is not None:
                client().draining = True

        def num_in_flight() -> int:
            return client().num_unfinished if client() is not None else 0

        def abort_all() -> None:
            if client() is not None:
                client().abort_all()

        # uvicorn's own grace (after ours) only lets the aborted streams send their last chunks.
        uv_config = uvicorn.Config(app, host=cfg.host, port=cfg.port, loop="uvloop", http="httptools",
                                   log_level=cfg.log_level, access_log=False, lifespan="on",
                                   timeout_graceful_shutdown=3.0)
        server = _HttpServer(uv_config, cfg.graceful_shutdown_timeout, on_ready, begin_drain, num_in_flight,
                             abort_all)
        # uvicorn's loop choice (uvloop) applies to the loop we create here, not to asyncio.run's.
        loop = (uv_config.get_loop_factory() or asyncio.new_event_loop)()

        def on_child_exit(child: _Child) -> None:
            loop.remove_reader(child.proc.sentinel)
            if self.stopping:
                return
            child.proc.join(0.1)
            logger.error("the %s process died (exit code %s); shutting down", child.name, child.proc.exitcode)
            self.exit_code = 1
            if client() is not None:
                client().fail_all(f"the {child.name} process died")
            server.should_exit = server.force_exit = True

        for child in self.children:
            loop.add_reader(child.proc.sentinel, on_child_exit, child)
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.serve())
        finally:
            self.stopping = True
            for child in self.children:
                loop.remove_reader(child.proc.sentinel)
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
        if not server.started and self.exit_code == 0:
            self.exit_code = 1  # e.g. the port was taken


def main(argv: Optional[list[str]] = None) -> int:
    from server.config import parse_args

    config = parse_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s skiff %(levelname)s %(message)s")
    if config.dp_size > 1:
        from server import dp

        return dp.main(config)
    return Supervisor(config).run()


if __name__ == "__main__":
    sys.exit(main())
