"""The stand-in vLLM honours vLLM's multi-node roles (data parallel, and TP x PP over
--nnodes): a head that serves the API and waits for its headless workers, workers that join
it and die with it. Real processes of tests/testbed/standin/server.py on 127.0.0.1; every
wait has a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.testbed.image import SERVER_PY
from tests.testbed.util import free_port, wait_while_running

HEARTBEAT = "2"  # the head drops a silent worker after 3 of these (6 s: a loaded machine
# can leave a live worker unscheduled for seconds)
DEADLINE = 20.0  # seconds any one wait may take on a loaded 2-core machine
EXIT_HEAD_LOST = 4




def _wait(what: str, pred, procs=()) -> None:
    wait_while_running(what, pred, procs, deadline=DEADLINE, interval=0.05)


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _health(port: int) -> int:
    return _get(port, "/health")[0]


def _ranks(port: int) -> dict:
    code, body = _get(port, "/evalprov/ranks")
    return json.loads(body) if code == 200 else {}


def _complete(port: int) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"model": "m", "prompt": "Hi", "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class Cluster:
    """Stand-in processes of one test; all of them are killed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}
        self.rpc = free_port()
        self.api = free_port()

    def start(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = self.tmp / f"standin-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-u", str(SERVER_PY), "serve", "m", *args],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "STANDIN_DP_HEARTBEAT": HEARTBEAT, **(env or {})})
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def head(self, size: int, local: int) -> subprocess.Popen:
        return self.start("--host", "127.0.0.1", "--port", str(self.api),
                          "--data-parallel-size", str(size),
                          "--data-parallel-size-local", str(local),
                          "--data-parallel-address", "127.0.0.1",
                          "--data-parallel-rpc-port", str(self.rpc))

    def worker(self, size: int, local: int, start: int, env: dict | None = None):
        return self.start("--headless", "--port", str(free_port()),
                          "--data-parallel-size", str(size),
                          "--data-parallel-size-local", str(local),
                          "--data-parallel-start-rank", str(start),
                          "--data-parallel-address", "127.0.0.1",
                          "--data-parallel-rpc-port", str(self.rpc), env=env)

    def log(self, proc: subprocess.Popen) -> str:
        return self.logs[proc.pid].read_text()

    def exited(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{proc.args[3:]} still running after {DEADLINE:g} s") from None

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def _joined(c: Cluster, n: int) -> Callable[[], bool]:
    return lambda: len(_ranks(c.api).get("joined", [])) == n


def test_the_head_is_healthy_only_once_all_ranks_have_joined(cluster):
    head = cluster.head(size=4, local=1)
    _wait("head's API up", lambda: _health(cluster.api) == 503, [head])
    assert b"waiting for data-parallel rank(s) 1,2,3" in _get(cluster.api, "/health")[1]
    assert _complete(cluster.api) == 503
    workers = []
    for rank in (1, 2, 3):
        workers.append(cluster.worker(size=4, local=1, start=rank))
        _wait(f"rank {rank} joined", _joined(cluster, rank + 1), [head, *workers])
        if rank < 3:
            assert _health(cluster.api) == 503, f"healthy with ranks 0..{rank} of 4"
    assert _health(cluster.api) == 200
    rep = _ranks(cluster.api)
    assert rep["joined"] == [0, 1, 2, 3] and rep["missing"] == [] and rep["healthy"]
    assert sorted(r for w in rep["workers"] for r in w["ranks"]) == [1, 2, 3]
    assert _complete(cluster.api) == 200
    for w in workers:
        assert "joined the data-parallel head" in cluster.log(w)


def test_a_worker_holding_several_ranks_covers_them(cluster):
    head = cluster.head(size=4, local=2)
    w = cluster.worker(size=4, local=2, start=2)
    _wait("head healthy", lambda: _health(cluster.api) == 200, [head, w])
    assert _ranks(cluster.api)["owner"]["3"].startswith(os.uname().nodename)


def test_a_killed_worker_makes_the_head_unhealthy_and_its_log_names_it(cluster):
    head = cluster.head(size=2, local=1)
    w = cluster.worker(size=2, local=1, start=1)
    _wait("head healthy", lambda: _health(cluster.api) == 200, [head, w])
    w.kill()
    w.wait()
    _wait("head unhealthy after the worker died", lambda: _health(cluster.api) == 503, [head])
    log = cluster.log(head)
    assert f"rank(s) 1 lost: worker {os.uname().nodename}/pid {w.pid}" in log
    assert "closed its connection" in log
    assert b"rank(s) 1 lost" in _get(cluster.api, "/health")[1]
    rep = _ranks(cluster.api)
    assert list(rep["lost"]) == ["1"] and str(w.pid) in rep["lost"]["1"]
    assert rep["joined"] == [0] and not rep["healthy"]
    # like vLLM after an engine core died, the head does not recover: a new worker is refused
    again = cluster.worker(size=2, local=1, start=1)
    assert cluster.exited(again) == EXIT_HEAD_LOST
    assert "refused" in cluster.log(again) and _health(cluster.api) == 503


def test_a_worker_whose_heartbeats_stop_is_lost(cluster):
    head = cluster.head(size=2, local=1)
    w = cluster.worker(size=2, local=1, start=1)
    _wait("head healthy", lambda: _health(cluster.api) == 200, [head, w])
    os.kill(w.pid, signal.SIGSTOP)  # connection stays open, heartbeats stop
    _wait("head unhealthy after heartbeats stopped", lambda: _health(cluster.api) == 503, [head])
    assert f"pid {w.pid}" in cluster.log(head) and "stopped its heartbeats" in cluster.log(head)
    os.kill(w.pid, signal.SIGCONT)
    assert cluster.exited(w) == EXIT_HEAD_LOST  # the head closed on it


def test_a_worker_exits_nonzero_when_its_head_dies(cluster):
    head = cluster.head(size=3, local=1)
    workers = [cluster.worker(size=3, local=1, start=r) for r in (1, 2)]
    _wait("head healthy", lambda: _health(cluster.api) == 200, [head, *workers])
    head.kill()
    head.wait()
    for w in workers:
        assert cluster.exited(w) == EXIT_HEAD_LOST
        assert "lost the data-parallel head at 127.0.0.1" in cluster.log(w)


def test_a_worker_started_first_waits_for_its_head(cluster):
    w = cluster.worker(size=2, local=1, start=1)
    _wait("worker retrying", lambda: "joining the head" in cluster.log(w), [w])
    head = cluster.head(size=2, local=1)
    _wait("head healthy", lambda: _health(cluster.api) == 200, [head, w])


def test_a_worker_gives_up_on_an_absent_head_after_its_join_timeout(cluster):
    w = cluster.worker(size=2, local=1, start=1, env={"STANDIN_DP_JOIN_TIMEOUT": "0.5"})
    assert cluster.exited(w) == EXIT_HEAD_LOST
    assert "could not reach the data-parallel head" in cluster.log(w)


def test_a_headless_worker_serves_no_http_and_stops_on_sigterm(cluster):
    head = cluster.head(size=2, local=1)
    port = free_port()
    w = cluster.start("--headless", "--host", "127.0.0.1", "--port", str(port),
                      "-dp", "2", "-dpl", "1", "-dpr", "1", "--data-parallel-address",
                      "127.0.0.1", "--data-parallel-rpc-port", str(cluster.rpc))
    _wait("head healthy", lambda: _health(cluster.api) == 200, [head, w])
    assert _health(port) == 0, "a headless worker answered HTTP"
    w.terminate()
    assert cluster.exited(w) == 0
    assert "received signal 15" in cluster.log(w)


def test_overlapping_ranks_are_refused(cluster):
    head = cluster.head(size=3, local=1)
    first = cluster.worker(size=3, local=1, start=1)
    _wait("rank 1 joined", _joined(cluster, 2), [head, first])
    second = cluster.worker(size=3, local=2, start=1)
    assert cluster.exited(second) == EXIT_HEAD_LOST
    assert "refused rank(s) 1,2" in cluster.log(second)
    assert _ranks(cluster.api)["joined"] == [0, 1] and first.poll() is None


def test_a_worker_of_another_size_is_refused(cluster):
    head = cluster.head(size=2, local=1)
    _wait("head up", lambda: _health(cluster.api) == 503, [head])
    w = cluster.worker(size=4, local=1, start=1)
    assert cluster.exited(w) == EXIT_HEAD_LOST
    assert "--data-parallel-size 2" in cluster.log(w)


@pytest.mark.parametrize("args, problem", [
    (["--headless", "-dp", "2", "-dpl", "1", "-dpr", "1"],
     "--headless needs --data-parallel-address"),
    (["-dp", "2", "-dpl", "1", "-dpr", "1"], "only applicable in headless mode"),
    (["-dp", "2", "-dpl", "3"], "--data-parallel-size-local 3 must be between 0 and"),
    (["--headless", "-dp", "2", "-dpl", "1", "-dpr", "2", "-dpa", "127.0.0.1"],
     "--data-parallel-start-rank 2 with --data-parallel-size-local 1 must lie within"),
    (["-dp", "2", "-dpl", "1", "--data-parallel-rpc-port", "70000"], "is not a port"),
])
def test_inconsistent_data_parallel_flags_exit_2_with_a_usage_line(args, problem):
    proc = subprocess.run([sys.executable, str(SERVER_PY), "serve", "m", *args],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: vllm serve MODEL")
    assert problem in proc.stderr


def test_each_instance_counts_the_requests_it_answered(cluster):
    one = cluster.start("--host", "127.0.0.1", "--port", str(cluster.api))
    _wait("up", lambda: _health(cluster.api) == 200, [one])
    for _ in range(3):
        assert _complete(cluster.api) == 200
    assert _ranks(cluster.api)["requests"] == 3
    assert b"vllm:num_requests_total 3\n" in _get(cluster.api, "/metrics")[1]
    assert _ranks(cluster.api)["role"] == "single"


# ------------------------------------------------- multi-node TP x PP (vLLM's --nnodes)


def _node(c: Cluster, n: int, rank: int, *extra: str) -> subprocess.Popen:
    flags = ("-tp", "2", "-pp", str(n), "--nnodes", str(n), "--node-rank", str(rank),
             "--master-addr", "127.0.0.1", "--master-port", str(c.rpc))
    if rank:
        return c.start("--headless", *flags, *extra)
    return c.start("--host", "127.0.0.1", "--port", str(c.api), *flags, *extra)


def test_a_multinode_world_serves_only_once_every_node_joined_and_not_after_one_is_lost(
        cluster):
    head = _node(cluster, 3, 0)
    _wait("head's API up", lambda: _health(cluster.api) == 503, [head])
    one = _node(cluster, 3, 1)
    _wait("node 1 joined", _joined(cluster, 2), [head, one])
    assert _health(cluster.api) == 503
    two = _node(cluster, 3, 2)
    _wait("node 2 joined", _joined(cluster, 3), [head, one, two])
    assert _health(cluster.api) == 200 and _complete(cluster.api) == 200
    assert ("headless multiproc executor, with head node address "
            f"127.0.0.1:{cluster.rpc} for torch.distributed process group") in cluster.log(two)
    two.kill()
    _wait("the head to see node 2 lost", lambda: _health(cluster.api) == 503, [head, one])


@pytest.mark.parametrize("args, problem", [
    (["-tp", "2", "--nnodes", "3"], "`--nnodes 3` must evenly divide the total world size (2)"),
    (["-pp", "2", "--nnodes", "2", "--node-rank", "2", "--headless"],
     "`--node-rank` must be between 0 and 1"),
    (["-pp", "2", "--nnodes", "2", "--node-rank", "1"], "every node but --node-rank 0 runs"),
    (["-pp", "2", "--nnodes", "2", "--headless"], "--node-rank 0 serves the API"),
])
def test_inconsistent_multinode_flags_exit_2(args, problem):
    proc = subprocess.run([sys.executable, str(SERVER_PY), "serve", "m", *args],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == 2 and problem in proc.stderr, proc.stderr
