"""The collection's host-side code without a host: module_utils' /proc readers and the
health module's root-cause line, imported as Ansible imports them (ansible_collections.*)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def test_a_secret_file_is_written_in_memory_only_for_its_owner(tmp_path):
    """The server containers' secrets: 0600 JSON on a tmpfs, rewritten only when the values
    change; a directory on a disk is refused before any value is written."""
    shm = Path("/dev/shm")
    if host.filesystem_of(str(shm)) not in host.MEMORY_FS:
        pytest.skip("/dev/shm is not a tmpfs here")
    directory = shm / f"evalprov-test-{os.getpid()}"
    path = host.secret_file_path("evalprov-vllm-0", str(directory))
    try:
        assert host.write_secret_file(path, {"HF_TOKEN": "v1"}, dry=True)
        assert not os.path.exists(path)
        assert host.write_secret_file(path, {"HF_TOKEN": "v1"})
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert json.loads(Path(path).read_text()) == {"HF_TOKEN": "v1"}
        assert not host.write_secret_file(path, {"HF_TOKEN": "v1"})  # steady state
        assert host.write_secret_file(path, {"HF_TOKEN": "v2"})
        assert host.remove_file(path) and not host.remove_file(path)
    finally:
        for p in directory.glob("*"):
            p.unlink()
        if directory.exists():
            directory.rmdir()
    if host.filesystem_of(str(tmp_path)) in host.MEMORY_FS:
        return
    disk = host.secret_file_path("evalprov-vllm-0", str(tmp_path / "d"))
    with pytest.raises(ValueError, match="not in memory"):
        host.write_secret_file(disk, {"HF_TOKEN": "v1"})
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_the_container_reads_its_secrets_from_the_file_and_execs_its_command(tmp_path):
    values = {"HF_TOKEN": "tok-1", "OTHER_KEY": "x y"}
    src = tmp_path / "s.json"
    src.write_text(json.dumps(values))
    code = "import os, sys; print(os.environ['HF_TOKEN'], os.environ['OTHER_KEY'], sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", host.ENV_FROM_FILE, str(src), sys.executable,
                          "-c", code, "--a", "b"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tok-1 x y ['--a', 'b']"
    gone = subprocess.run([sys.executable, "-c", host.ENV_FROM_FILE, str(tmp_path / "none"),
                           "true"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1
    assert gone.stderr.startswith("evalprov: the secret environment is gone")
