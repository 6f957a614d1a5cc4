"""Multi-node tensor parallelism, with two "nodes" on this machine: two `python -m server`
processes with --nnodes 2 and one TP rank each, meeting over loopback (gloo), against one process
with --tp 1. The tiny dummy config (4 heads, 2 KV heads) splits over 2 ranks; dummy weights are
seeded and identical for any tp, so float32 greedy text must match."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from conftest import REPO, SkiffServer, all_exit, free_port

pytestmark = pytest.mark.slow

TINY = ("--model", "configs/tiny-llama.json", "--load-format", "dummy")
PROMPTS = [[300 + i for i in range(12)], [1000, 2000, 3000, 4000, 5000]]


def _greedy_texts(url: str) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    return [client.completions.create(model=model, prompt=p, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]


def test_two_nodes_one_rank_each_match_one_process():
    single = SkiffServer(*TINY).start()
    try:
        expected = _greedy_texts(single.url)
    finally:
        single.stop()

    addr = f"127.0.0.1:{free_port()}"
    multi = ("--tp", "2", "--nnodes", "2", "--dist-init-addr", addr)
    head = SkiffServer(*TINY, *multi, "--node-rank", "0")
    follower_log: list[str] = []
    follower = subprocess.Popen(
        [sys.executable, "-m", "server", *TINY, *multi, "--node-rank", "1", "--dtype", "float32", "--device", "cpu"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=lambda: follower_log.extend(follower.stdout), daemon=True).start()
    try:
        head.start()
        kids = head.children()
        assert "skiff-sched-0" in kids and "skiff-sched-1" not in kids  # rank 1 runs on the other node
        assert _greedy_texts(head.url) == expected
        # Node 0 stops the group: the follower's rank leaves and that node exits 0 as well.
        t0 = time.monotonic()
        head.proc.send_signal(signal.SIGTERM)
        assert head.proc.wait(30) == 0
        assert follower.wait(30) == 0, "".join(follower_log[-20:])
        assert time.monotonic() - t0 < 15
        assert all_exit(kids.values())
        assert any("follow rank 0" in line for line in follower_log)
    finally:
        head.stop()
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_multinode_flags_are_checked():
    from server.config import parse_args

    cfg = parse_args(["--tp", "4", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:5000"])
    assert list(cfg.local_tp_ranks) == [2, 3]
    assert list(parse_args(["--tp", "2"]).local_tp_ranks) == [0, 1]
    for bad in (["--tp", "3", "--nnodes", "2", "--dist-init-addr", "h:1"],  # ranks do not split evenly
                ["--tp", "2", "--nnodes", "2"],  # no rendezvous address
                ["--tp", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
