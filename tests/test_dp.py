"""`python -m server --dp-size 2`: two replicas behind sglang-router (server/dp.py).

Fast: how the machine is split, the flags each replica gets, and the bodies the router forwards.
Slow (real servers on the tiny dummy model): both replicas serve (round robin splits requests evenly between them), a replica killed with
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
from server import protocol
from server.config import parse_args, to_argv
from server.dp import DpError, plan_replicas, router_command

needs_router = pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None,
                                  reason="sglang-router is not installed (pip install 'skiff[router]')")

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


# --- fast ---------------------------------------------------------------------------------------


def _ports():
    return iter(range(20001, 20100)).__next__


def test_cpu_replicas_split_the_cores_and_listen_on_loopback():
    cfg = parse_args(["--dp", "2", "--host", "0.0.0.0", "--port", "9000", "--device", "cpu"])
    replicas = plan_replicas(cfg, gpus=["0", "1"], cores=8, port_for=_ports())
    assert [r.config.port for r in replicas] == [20001, 20002]
    for r in replicas:
        assert (r.config.host, r.config.dp_size, r.config.num_threads) == ("127.0.0.1", 1, 3)  # (8 - 2) // 2
        assert r.env == {}
    assert plan_replicas(cfg, [], cores=2, port_for=_ports())[0].config.num_threads == 1
    explicit = parse_args(["--dp", "2", "--num-threads", "4"])
    assert plan_replicas(explicit, [], cores=2, port_for=_ports())[1].config.num_threads == 4


def test_gpu_replicas_get_disjoint_gpu_sets():
    cfg = parse_args(["--dp", "2", "--tp", "2"])
    replicas = plan_replicas(cfg, gpus=["0", "1", "2", "3"], cores=64, port_for=_ports())
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in replicas] == ["0,1", "2,3"]
    assert all(r.config.num_threads is None and r.config.tp_size == 2 for r in replicas)
    with pytest.raises(DpError, match="needs 4 GPUs; 3 visible"):
        plan_replicas(cfg, gpus=["0", "1", "2"], cores=64, port_for=_ports())
    with pytest.raises(DpError, match="needs 2 GPUs; 0 visible"):
        plan_replicas(parse_args(["--dp", "2", "--device", "cuda"]), gpus=[], cores=8, port_for=_ports())


def test_replica_flags_round_trip_through_the_parser():
    cfg = parse_args(["--dp", "3", "--model", MODEL, "--load-format", "dummy", "--disable-overlap",
                      "--api-key", "a key", "--router-policy", "random", "--max-total-tokens", "1536"])
    replica = plan_replicas(cfg, [], cores=4, port_for=_ports())[0].config
    assert parse_args(to_argv(replica)) == replica
    assert parse_args(to_argv(cfg)) == cfg


def test_router_command_uses_the_public_address_and_the_policy():
    cfg = parse_args(["--dp", "2", "--host", "0.0.0.0", "--port", "9000", "--router-policy", "power_of_two"])
    argv = router_command(cfg, ["http://127.0.0.1:1", "http://127.0.0.1:2"], metrics_port=3)
    assert argv[1:3] == ["-m", "sglang_router.launch_router"]
    pairs = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert pairs["--host"] == "0.0.0.0" and pairs["--port"] == "9000" and pairs["--policy"] == "power_of_two"
    assert pairs["--prometheus-host"] == "127.0.0.1" and pairs["--prometheus-port"] == "3"
    assert argv[argv.index("--worker-urls") + 1:argv.index("--worker-urls") + 3] == ["http://127.0.0.1:1",
                                                                                     "http://127.0.0.1:2"]


class _Limits:
    vocab_size = 1000
    max_model_len = 512


# What sglang-router 0.3.2 forwarded for a plain chat and completion request (captured from it).
ROUTED_CHAT = (b'{"messages":[{"role":"user","content":"hi"}],"model":"m","logprobs":false,'
               b'"max_completion_tokens":3,"stream":false,"no_stop_trim":false,"ignore_eos":false,'
               b'"continue_final_message":false,"skip_special_tokens":true,"separate_reasoning":true,'
               b'"stream_reasoning":true,"return_hidden_states":false}')
ROUTED_COMPLETION = (b'{"model":"m","prompt":"hi","max_tokens":3,"stream":false,"echo":false,'
                     b'"no_stop_trim":false,"ignore_eos":false,"skip_special_tokens":true,"return_hidden_states":false}')


def test_bodies_the_router_forwards_are_accepted():
    chat = protocol.plan_chat(protocol.decode_body(ROUTED_CHAT, protocol.ChatCompletionRequest), _Limits())
    assert chat.max_tokens == 3
    completion = protocol.plan_completion(protocol.decode_body(ROUTED_COMPLETION, protocol.CompletionRequest),
                                          _Limits())
    assert completion.max_tokens == 3


@pytest.mark.parametrize("field", ["no_stop_trim", "return_hidden_states"])
def test_router_fields_that_would_change_the_output_are_refused(field):
    body = ROUTED_COMPLETION.replace(f'"{field}":false'.encode(), f'"{field}":true'.encode())
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.plan_completion(protocol.decode_body(body, protocol.CompletionRequest), _Limits())
    assert e.value.param == field


# --- slow: real servers -------------------------------------------------------------------------


@pytest.mark.slow
@needs_router
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


@pytest.mark.slow
@needs_router
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
