"""Tests that pin the test fleet itself (tests/testbed): hosts, ssh, Ansible,
GPU stubs, registry mirror, the stand-in vLLM image, faults and teardown."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from tests.testbed import STANDIN_IMAGE, Fleet
from tests.testbed.image import run_standin_locally
from tests.testbed.util import http_request, pid_alive, pid_cmdline, pids_in_ns, wait_for

# The plugin is normally registered by the root conftest; registering it again by the
# same name is a no-op, and this keeps the module runnable on its own.
pytest_plugins = ["tests.testbed.pytest_plugin"]

SERVED = "tiny-standin"


def vllm_argv(model: str = "/models/tiny", name: str = SERVED, *extra: str) -> list[str]:
    """The argv evalprov runs in the container (the real image's CLI)."""
    return [
        "vllm",
        "serve",
        model,
        "--tensor-parallel-size=1",
        "--pipeline-parallel-size=1",
        "--data-parallel-size=1",
        "--port",
        "8000",
        "--trust-remote-code",
        "--served-model-name",
        name,
        "--gpu-memory-utilization",
        "0.95",
        *extra,
    ]


def container_state(fleet: Fleet, host: str, name: str) -> tuple[str, int]:
    out = fleet.docker(host, "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name)
    status, code = out.stdout.decode().split()
    return status, int(code)


# --------------------------------------------------------------------- hosts + ssh
@pytest.mark.fleet
def test_three_hosts_plain_ssh(fleet):
    assert [h.gpus for h in fleet.hosts] == [8, 4, 2]
    for h in fleet.hosts:
        out = (
            fleet.ssh(
                h.name,
                "hostname; wc -c </etc/resolv.conf; echo $HOME; grep -c pyenv ~/.bashrc || true",
            )
            .stdout.decode()
            .split()
        )
        assert out == [h.hostname, "0", "/root", "0"], out
        assert h.ip == f"10.213.{fleet.net}.1{h.index}"
    # each host has its own /root, /tmp and /opt
    fleet.ssh("h1", "echo h1 > /root/marker && echo h1 > /tmp/marker && echo h1 > /opt/marker")
    r = fleet.ssh("h2", "cat /root/marker /tmp/marker /opt/marker", check=False)
    assert r.returncode != 0
    assert not os.path.exists("/opt/marker")
    # /etc/hosts knows the fleet; no route leaves the test subnet
    assert "fleet-h3" in fleet.ssh("h1", "getent hosts fleet-h3").stdout.decode()
    routes = fleet.ssh("h1", "ip route").stdout.decode()
    assert "default" not in routes and fleet.subnet in routes


@pytest.mark.fleet
def test_ansible_runner_ping(fleet, tmp_path):
    ansible_runner = pytest.importorskip("ansible_runner")
    t0 = time.monotonic()
    r = ansible_runner.run(
        private_data_dir=str(tmp_path),
        inventory=fleet.inventory(),
        host_pattern="all",
        module="ping",
        quiet=True,
        timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert r.status == "successful", (r.status, r.stdout.read())
    assert sorted(r.stats["ok"]) == ["h1", "h2", "h3"]
    print(f"ansible_runner ping on 3 hosts: {elapsed:.2f}s")
    # the written YAML inventory carries the same vars
    yaml = pytest.importorskip("yaml")
    inv = yaml.safe_load(fleet.write_inventory(tmp_path / "inv.yml").read_text())
    hv = inv["all"]["hosts"]["h2"]
    assert hv["ansible_host"] == f"10.213.{fleet.net}.12" and hv["ansible_user"] == "root"
    assert "ControlPath=" + str(fleet.control_path_dir) in hv["ansible_ssh_common_args"]


@pytest.mark.fleet
def test_nvidia_smi_stub_reports_gpu_count(fleet):
    for h in fleet.hosts:
        q = fleet.ssh(
            h.name,
            "nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits",
        ).stdout.decode()
        rows = [line.split(", ") for line in q.strip().splitlines()]
        assert len(rows) == h.gpus
        assert [r[0] for r in rows] == [str(i) for i in range(h.gpus)]
        assert {r[1] for r in rows} == {"NVIDIA H100 80GB HBM3"}
        assert {r[2] for r in rows} == {"81559"}
        assert [r[3] for r in rows] == h.gpu_uuids
        listing = fleet.ssh(h.name, "nvidia-smi -L").stdout.decode().strip().splitlines()
        assert len(listing) == h.gpus and listing[0].startswith("GPU 0: NVIDIA H100")
        assert fleet.ssh(h.name, "command -v nvidia-container-runtime-hook").returncode == 0


# ---------------------------------------------------------------- docker + image
@pytest.mark.fleet
def test_docker_pull_through_mirror(fleet, standin_image):
    assert standin_image == STANDIN_IMAGE == "vllm/vllm-openai:evalprov-standin"
    t0 = time.monotonic()
    fleet.ssh("h3", f"docker pull {standin_image}", timeout=120)
    print(f"pull via mirror: {time.monotonic() - t0:.2f}s")
    info = json.loads(fleet.ssh("h3", f"docker image inspect {standin_image}").stdout)
    assert info[0]["Config"]["Entrypoint"] in (None, [])
    # a Docker Hub name the mirror lacks fails at once: docker's fallback to the Hub finds no
    # DNS (refused, nothing waited out) and no route out
    r = fleet.ssh("h3", "docker pull vllm/vllm-openai:no-such-tag", check=False, timeout=60)
    assert r.returncode != 0
    said = (r.stdout + r.stderr).decode()
    assert any(w in said for w in ("connection refused", "not found", "manifest unknown")), said
    assert "timeout" not in said.lower(), said


@pytest.mark.fleet
def test_standin_container_with_gpus(fleet, standin_image):
    host, port = "h1", 18001
    extra = ["--max-num-seqs", "16", "--enable-prefix-caching"]
    argv = vllm_argv("/models/tiny", SERVED, *extra)
    # NB: docker's CLI parses --gpus as CSV: "device=1,2" must be quoted as one field,
    # else it reads device=1 plus a count of 2 ("cannot set both Count and DeviceIDs").
    fleet.docker(
        host,
        "run",
        "-d",
        "--name",
        "standin-gpus",
        "--gpus",
        '"device=1,2"',
        "-p",
        f"{port}:8000",
        standin_image,
        *argv,
    )
    try:
        t0 = time.monotonic()
        wait_for(
            lambda: http_request(fleet.url(host, port, "/health"))[0] == 200,
            timeout=30,
            what="stand-in /health",
        )
        print(f"container healthy after {time.monotonic() - t0:.2f}s")
        _, _, body = http_request(fleet.url(host, port, "/evalprov/argv"))
        got = json.loads(body)
        assert got["argv"] == argv
        assert got["env"]["NVIDIA_VISIBLE_DEVICES"] == "1,2"
        assert got["unknown"] == extra
        assert got["args"]["served_model_name"] == [SERVED]
        _, _, body = http_request(fleet.url(host, port, "/v1/models"))
        assert [m["id"] for m in json.loads(body)["data"]] == [SERVED]
        q = "Which is right?\nA) one\nB) two\nC) three\nD) four"
        status, _, body = http_request(
            fleet.url(host, port, "/v1/chat/completions"),
            method="POST",
            body={"model": SERVED, "messages": [{"role": "user", "content": q}]},
        )
        assert status == 200
        resp = json.loads(body)
        assert resp["choices"][0]["message"]["content"] == "Answer: A"
        assert resp["usage"]["completion_tokens"] > 0
        logs = fleet.docker(host, "logs", "standin-gpus").stdout.decode()
        assert "POST /v1/chat/completions" in logs
        # containers land in this host's own cgroup parent
        assert any(
            os.path.isdir(f"/sys/fs/cgroup/{c}/{fleet.host(host).cgroup_parent}")
            for c in os.listdir("/sys/fs/cgroup")
        )
    finally:
        fleet.docker(host, "rm", "-f", "standin-gpus", check=False)


@pytest.mark.fleet
def test_standin_exit_after_makes_container_exit(fleet, standin_image):
    host = "h2"
    fleet.docker(
        host,
        "run",
        "-d",
        "--name",
        "standin-crash",
        "-e",
        "STANDIN_EXIT_AFTER=1",
        standin_image,
        *vllm_argv(),
    )
    try:
        wait_for(
            lambda: container_state(fleet, host, "standin-crash") == ("exited", 3),
            timeout=30,
            what="container exit code 3",
        )
        logs = fleet.docker(host, "logs", "standin-crash").stdout.decode()
        logs += fleet.docker(host, "logs", "standin-crash").stderr.decode()
        assert "STANDIN_EXIT_AFTER" in logs
    finally:
        fleet.docker(host, "rm", "-f", "standin-crash", check=False)


@pytest.mark.fleet
def test_gpus_flag_needs_the_hook(fleet_factory, standin_image):
    """A host with K=0 has no stubs: no nvidia-smi, and dockerd refuses --gpus."""
    f = fleet_factory([2, 0], docker=True)
    assert f.ssh("h2", "command -v nvidia-smi", check=False).returncode != 0
    r = f.docker("h2", "run", "--rm", "--gpus", "all", standin_image, "true", check=False)
    assert r.returncode != 0 and b"capabilities: [[gpu]]" in r.stderr
    r = f.docker(
        "h1",
        "run",
        "--rm",
        "--gpus",
        "all",
        standin_image,
        "sh",
        "-c",
        "echo $NVIDIA_VISIBLE_DEVICES",
    )
    assert r.stdout.decode().strip() == "all"


# ---------------------------------------------------------------------- faults
@pytest.mark.fleet
def test_kill_and_revive_host(fleet):
    fleet.ssh("h2", "true")  # a ControlPersist master exists now
    fleet.kill_host("h2")
    assert not fleet.host_alive("h2")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((fleet.host("h2").ip, 22), timeout=3).close()
    assert fleet.ssh("h1", "true").returncode == 0  # the others are untouched
    fleet.revive_host("h2")
    assert fleet.ssh("h2", "hostname").stdout.decode().strip() == "fleet-h2"
    assert fleet.ssh("h2", "docker info -f '{{.ServerVersion}}'").returncode == 0


@pytest.mark.fleet
def test_disconnect_and_reconnect_host(fleet):
    fleet.disconnect_host("h3")
    try:
        with pytest.raises((TimeoutError, socket.timeout, OSError)):
            socket.create_connection((fleet.host("h3").ip, 22), timeout=1).close()
        assert fleet.host_alive("h3")
    finally:
        fleet.reconnect_host("h3")
    wait_for(
        lambda: fleet.ssh("h3", "true", check=False, timeout=10).returncode == 0,
        timeout=20,
        what="h3 reachable again",
    )


# -------------------------------------------------------------------- teardown
@pytest.mark.fleet
def test_teardown_leaves_nothing(fleet_factory, standin_image, tmp_path):
    fleet_factory.close()
    f = Fleet([8, 4, 2], docker=True, workdir=tmp_path / "fleet", net=fleet_factory.net)
    try:
        f.up()
        print(f"3 hosts with dockerd up in {f.timings['up']:.2f}s")
        f.ssh("h1", "true")
        f.docker(
            "h1", "run", "-d", "--name", "busy", "-p", "18002:8000", standin_image, *vllm_argv()
        )
        wait_for(
            lambda: http_request(f.url("h1", 18002, "/health"))[0] == 200,
            timeout=30,
            what="stand-in /health",
        )
        pidns = [h.pidns for h in f.hosts]
        registry_pid = f.registry.pid
    finally:
        f.down()
    print(f"teardown in {f.timings['down']:.2f}s")
    assert all(not pids_in_ns("pid", ns) for ns in pidns)
    for h in f.hosts:
        assert not os.path.exists(f"/run/netns/{h.netns}")
        assert not os.path.exists(f"/sys/class/net/{h.veth}")
        assert not any(
            os.path.exists(f"/sys/fs/cgroup/{c}/{h.cgroup_parent}")
            for c in os.listdir("/sys/fs/cgroup")
        )
    assert not os.path.exists(f"/sys/class/net/{f.bridge}")
    cp = f.control_path_dir
    assert not cp.exists() or not list(cp.iterdir())  # ssh -O exit closed every master
    assert not [
        p for p in os.listdir("/proc") if p.isdigit() and str(cp) in " ".join(pid_cmdline(int(p)))
    ]
    # the registry is gone too (no connection attempt: without the bridge, 10.213.<net>.1
    # would be routed off the machine)
    assert registry_pid and not pid_alive(registry_pid)
    # a second down() is harmless
    f.down()


def _free_net(avoid: int) -> int:
    for net in range(254, 199, -1):
        if net != avoid and not os.path.exists(f"/sys/class/net/evpbr{net}"):
            return net
    raise AssertionError("no free net in 200..254")


@pytest.mark.fleet
def test_two_fleets_on_different_nets_run_side_by_side(fleet, standin_image, tmp_path):
    other = Fleet([2], docker=True, workdir=tmp_path / "other", net=_free_net(fleet.net))
    try:
        other.up()
        mine, theirs = fleet.hosts[0], other.hosts[0]
        assert mine.name == theirs.name == "h1"  # same inventory names ...
        assert {mine.netns, mine.veth, mine.cgroup_parent}.isdisjoint(
            {theirs.netns, theirs.veth, theirs.cgroup_parent}
        )  # ... different kernel objects
        assert theirs.ip == f"10.213.{other.net}.11" and other.bridge == f"evpbr{other.net}"
        assert other.registry.addr == f"10.213.{other.net}.1:5000" != fleet.registry.addr
        # each host reaches its own registry; the image pushed through one is served by the
        # other too (shared storage)
        other.ssh("h1", f"docker pull {standin_image}", timeout=120)
        # the fleets cannot reach each other (no route between the subnets)
        probe = f"python3 -c \"import socket; socket.create_connection(('{mine.ip}', 22), 2)\""
        assert other.ssh("h1", probe, check=False).returncode != 0
        assert fleet.ssh("h1", "hostname").stdout.decode().strip() == "fleet-h1"
    finally:
        other.down()
    # tearing the other fleet down left this one whole
    assert os.path.exists(f"/sys/class/net/{fleet.bridge}")
    assert all(fleet.host_alive(h.name) for h in fleet.hosts)
    assert fleet.ssh("h1", "docker info -f '{{.ServerVersion}}'").returncode == 0


def test_net_names_and_environment_default(monkeypatch, tmp_path):
    monkeypatch.setenv("EVALPROV_TESTBED_NET", "81")
    f = Fleet([1], workdir=tmp_path / "f")
    h = f.hosts[0]
    assert (f.net, f.subnet, f.bridge, f.registry.addr) == (
        81,
        "10.213.81.0/24",
        "evpbr81",
        "10.213.81.1:5000",
    )
    assert (h.name, h.ip, h.netns, h.veth) == ("h1", "10.213.81.11", "evp81h1", "evp81-h1")
    assert Fleet([1], workdir=tmp_path / "g", net=77).bridge == "evpbr77"
    for bad in ("0", "255", "x"):
        monkeypatch.setenv("EVALPROV_TESTBED_NET", bad)
        with pytest.raises(ValueError, match="EVALPROV_TESTBED_NET"):
            Fleet([1], workdir=tmp_path / "h")


# ------------------------------------------ the stand-in server on its own (no root)
@pytest.fixture
def local_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start_local(port, env=None, *extra):
    proc = run_standin_locally(port, "--served-model-name", SERVED, *extra, env=env)

    def listening():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        return http_request(f"http://127.0.0.1:{port}/v1/models", timeout=1)[0] in (200, 503)

    wait_for(listening, timeout=15, what="local stand-in")
    return proc


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_standin_start_delay_and_requests(local_port):
    url = f"http://127.0.0.1:{local_port}"
    # the delay counts from the process's start: long enough that the first look comes
    # inside it on a loaded machine
    proc = _start_local(local_port, {"STANDIN_START_DELAY": "10"}, "--foo", "bar")
    try:
        assert http_request(url + "/health")[0] == 503
        wait_for(lambda: http_request(url + "/health")[0] == 200, timeout=60, what="healthy")
        st, _, body = http_request(
            url + "/v1/completions",
            method="POST",
            body={"model": SERVED, "prompt": "2+2=", "max_tokens": 3},
        )
        resp = json.loads(body)
        assert st == 200 and resp["choices"][0]["finish_reason"] == "length"
        assert resp["usage"]["completion_tokens"] <= 3
        st, _, _ = http_request(
            url + "/v1/completions", method="POST", body={"model": "other", "prompt": "x"}
        )
        assert st == 404
        st, hdrs, body = http_request(
            url + "/v1/chat/completions",
            method="POST",
            body={"model": SERVED, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert st == 200 and hdrs["content-type"] == "text/event-stream"
        assert body.rstrip().endswith(b"data: [DONE]")
        args = json.loads(http_request(url + "/evalprov/argv")[2])
        assert args["unknown"] == ["--foo", "bar"]
    finally:
        _stop(proc)
    assert proc.returncode == 0


def test_standin_never_healthy_and_failing(local_port):
    url = f"http://127.0.0.1:{local_port}"
    proc = _start_local(local_port, {"STANDIN_NEVER_HEALTHY": "1"})
    try:
        time.sleep(0.3)
        assert http_request(url + "/health")[0] == 503
    finally:
        _stop(proc)
    proc = _start_local(local_port, {"STANDIN_FAIL_REQUESTS": "1"})
    try:
        assert http_request(url + "/health")[0] == 200
        st, _, _ = http_request(
            url + "/v1/chat/completions",
            method="POST",
            body={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert st == 500
    finally:
        _stop(proc)


def test_standin_exit_after_locally(local_port):
    # not _start_local: the 0.5 s may run out before a first look sees it serving
    proc = run_standin_locally(local_port, "--served-model-name", SERVED,
                               env={"STANDIN_EXIT_AFTER": "0.5"})
    try:
        assert proc.wait(timeout=60) == 3
        assert b"STANDIN_EXIT_AFTER" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
