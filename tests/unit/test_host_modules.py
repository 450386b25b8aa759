"""The collection's host-side code without a host: module_utils' /proc readers and the
health module's root-cause line, imported as Ansible imports them (ansible_collections.*)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from tests.unit.collection import module

host = module("module_utils.evalprov_host")
health_mod = module("modules.evalprov_wait_health")


def test_listening_ports_sees_a_socket_listening_on_loopback():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        assert s.getsockname()[1] in host.listening_ports()
    finally:
        s.close()


def test_is_ours_needs_the_same_pid_and_start_time(tmp_path):
    proc = subprocess.Popen(["sleep", "30"])
    try:
        host.write_pid(str(tmp_path / "p.pid"), proc.pid)
        rec = host.read_pid(str(tmp_path / "p.pid"))
        assert host.is_ours(rec)
        assert not host.is_ours({**rec, "start_time": "1"})  # a reused pid is not ours
    finally:
        proc.kill()
        proc.wait()
    assert not host.is_ours(rec)


def test_stop_group_stops_a_process_and_its_children():
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    time.sleep(0.2)
    host.stop_group(proc.pid, grace=5)
    proc.wait(timeout=10)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


LOG = (
    "INFO 12-02 engine starting\n"
    "ERROR 12-02 [core.py:708] EngineCore failed to start.\n"
    "ERROR 12-02 ValueError: Total number of attention heads (2) must be divisible by tensor "
    "parallel size (4).\n"
    "RuntimeError: Engine core initialization failed. See root cause above.\n"
)


@pytest.mark.parametrize("runtime", ["docker", "process"])
def test_a_server_that_died_is_reported_by_its_decisive_line_in_its_runtimes_words(runtime):
    state = {"running": False, "status": "exited", "exit_code": 1, "restarts": 0}
    msg = health_mod.stopped_message(runtime, "evalprov-vllm-0", state, LOG)
    assert msg.startswith("instance evalprov-vllm-0 stopped before it became healthy: ")
    assert "must be divisible by tensor parallel size (4)" in msg  # the root cause, first
    assert "RuntimeError" not in msg  # not the derived error after it
    if runtime == "process":
        assert "container" not in msg and "vllm serve process exited" in msg
    else:
        assert "container exited, exit code 1" in msg
