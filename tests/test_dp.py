"""`python -m server --dp-size 2`: two replicas behind sglang-router (server/dp.py).

Both replicas serve (round robin splits requests evenly between them), a replica killed with
SIGKILL stops the whole server with exit 1 and no process left, and SIGTERM drains and exits 0.
Each test starts its own server on the tiny dummy model."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import SkiffServer, all_exit, child_pids

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None,
                       reason="sglang-router is not installed (pip install 'skiff[router]')"),
]

MODEL = "configs/tiny-llama.json"
# The replicas drain for 2 s at most (nothing runs when the tests stop them).
DP2 = ("--dp", "2", "--router-policy", "round_robin", "--model", MODEL, "--load-format", "dummy",
       "--graceful-shutdown-timeout", "2")
STOP_BOUND_S = 30.0  # 2 s drain + the supervisor's margins, with room for a slow shared machine


def _start(tmp_path: Path) -> tuple[SkiffServer, dict[str, int]]:
    """The server once it announced its replicas and router: ({name: pid} as announced)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    srv = SkiffServer(*DP2, env={"TMPDIR": str(tmp)}).start()
    deadline = time.monotonic() + 60
    while not any("replicas behind sglang-router" in line for line in srv.log):
        assert time.monotonic() < deadline and srv.proc.poll() is None, "".join(srv.log[-40:])
        time.sleep(0.1)
    line = next(line for line in srv.log if "replicas behind sglang-router" in line)
    pids = {name: int(pid) for name, pid in re.findall(r"(replica-\d|router) (\d+)", line)}
    assert set(pids) == {"replica-0", "replica-1", "router"}, line
    return srv, pids


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = child_pids(todo.pop())
        out += kids
        todo += kids
    return out


def _finished(url: str) -> float:
    """A replica's finished-request count, from its own /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("skiff:requests_finished_total"))


def test_both_replicas_serve_and_sigterm_exits_cleanly(tmp_path):
    srv, pids = _start(tmp_path)
    try:
        workers = httpx.get(srv.url + "/workers", timeout=10).json()["workers"]
        urls = sorted(w["url"] for w in workers)
        assert len(urls) == 2 and all(w["is_healthy"] and w["model_id"] == MODEL for w in workers)
        # The router's load probe parses each replica's /get_load (load -1 would mean it could not).
        loads = httpx.get(srv.url + "/get_loads", timeout=10).json()["workers"]
        assert sorted(entry["load"] for entry in loads) == [0, 0]

        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        for i in range(4):
            out = client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=3)
            assert out.usage.completion_tokens == 3
        chat = client.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].finish_reason == "length"
        counts = [_finished(u) for u in urls]
        assert sorted(counts) == [2, 3], counts  # round robin: 5 requests, 2 and 3 per replica

        tree = _descendants(srv.proc.pid)
        assert set(pids.values()) <= set(tree)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(STOP_BOUND_S) == 0
        assert all_exit(tree, 5.0), [p for p in tree if os.path.exists(f"/proc/{p}")]
        assert time.monotonic() - t0 < STOP_BOUND_S
    finally:
        srv.stop()


def test_killed_replica_stops_the_whole_server(tmp_path):
    """The documented contract (server/dp.py): a dead replica stops everything, exit 1."""
    srv, pids = _start(tmp_path)
    try:
        tree = _descendants(srv.proc.pid)
        t0 = time.monotonic()
        os.kill(pids["replica-0"], signal.SIGKILL)
        assert srv.proc.wait(STOP_BOUND_S) == 1
        elapsed = time.monotonic() - t0
        assert all_exit(tree, 5.0), [p for p in tree if os.path.exists(f"/proc/{p}")]
        log = "".join(srv.log)
        assert "replica-0 exited (exit code -9)" in log, log[-3000:]
        assert elapsed < STOP_BOUND_S
    finally:
        srv.stop()
