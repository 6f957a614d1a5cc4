"""Shared fixtures: a real Skiff server (all its processes) as a subprocess on a free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import openai
import pytest

from server.procfs import child_pids, pid_alive, proc_name, terminate  # noqa: F401 (tests import them from here)

REPO = Path(__file__).resolve().parent.parent
# The shared server's context length: small, so "prompt too long" and "max_tokens defaults to the
# rest of the context" are cheap to exercise on CPU.
SERVER_MAX_MODEL_LEN = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_exit(pids, timeout_s: float = 5.0) -> bool:
    """True once none of `pids` runs (multiprocessing's resource tracker leaves just after its parent)."""
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def sse_events(lines) -> list:
    """Parsed `data:` payloads of an SSE body ("[DONE]" kept as a string)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


class SkiffServer:
    """`python -m server ...` on a free port; `start()` returns once /health says 200.

    Runs on the CPU in float32 unless `device` / `dtype` say otherwise (the GPU tests)."""

    def __init__(self, *args: str, api_key: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
                 env: Optional[dict] = None):
        self.port = free_port()
        self.args = ["--dtype", dtype, "--device", device, "--port", str(self.port), *args]
        if api_key:
            self.args += ["--api-key", api_key]
        self.api_key = api_key
        self.env = env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log: list[str] = []

    def start(self, timeout_s: float = 600.0) -> "SkiffServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen([sys.executable, "-m", "server", *self.args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n" + "".join(self.log[-60:]))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError("server did not become healthy:\n" + "".join(self.log[-60:]))

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def children(self) -> dict[str, int]:
        """{process name: pid} of the server's child processes."""
        return {proc_name(p): p for p in child_pids(self.proc.pid)}

    def stop(self, timeout_s: float = 30.0) -> Optional[int]:
        if self.proc is None:
            return None
        terminate(self.proc, timeout_s)
        return self.proc.returncode

    def wait_idle(self, timeout_s: float = 5.0) -> dict[str, float]:
        """/metrics once nothing runs or waits."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            if m["skiff:num_running_requests"] == 0 and m["skiff:num_waiting_requests"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy: {m}")
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: metric name -> value (last sample wins)."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{", 1)[0]] = float(value)
        return out


@pytest.fixture(scope="session")
def model_dir() -> str:
    """The embedded SmolLM2's Hugging Face directory (converted once per machine)."""
    from scheduler_proc.models.embedded import ensure_embedded_model

    return str(ensure_embedded_model())


@pytest.fixture(scope="session")
def tok(model_dir):
    """The embedded model's tokenizer, as the tokenizer and detokenizer processes load it."""
    from tokenizer_proc.tokenizer import TextTokenizer

    return TextTokenizer(model_dir)


@pytest.fixture(scope="session")
def skiff_server():
    """One server with the embedded SmolLM2 in float32, shared by every test that needs it."""
    server = SkiffServer("--max-model-len", str(SERVER_MAX_MODEL_LEN)).start()
    yield server
    server.stop()


# The shared server as most end-to-end tests use it (a module may define its own `server`).
@pytest.fixture(scope="module")
def server(skiff_server):
    return skiff_server


@pytest.fixture(scope="module")
def client(server):
    """The official openai SDK against the shared server."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id
