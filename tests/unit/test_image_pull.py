"""The pull module's reading of `docker pull` on a pseudo-terminal (where docker prints each
layer's bytes, redrawing its lines with cursor escapes): a fake `docker` on PATH that prints
what docker 2x prints, and refuses to when its stdout is not a terminal."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.unit.collection import module

pull_mod = module("modules.evalprov_image_pull")
host = module("module_utils.evalprov_host")

DIGEST = "sha256:" + "ab" * 32
FAKE = r"""#!/bin/sh
[ -t 1 ] || { echo "stdout is not a terminal" >&2; exit 9; }
[ "$1" = pull ] || exit 8
if [ -e "$FAKE_DIR/fail" ]; then
  n=$(cat "$FAKE_DIR/fail"); echo $((n - 1)) > "$FAKE_DIR/fail"
  if [ "$n" -gt 0 ]; then
    echo "Error response from daemon: Get \"https://r/v2/\": connection refused"; exit 1
  fi
fi
up="\033[1A\033[2K"
printf 'v0.11.0: Pulling from vllm/vllm-openai\r\n'
printf '1111aaaa2222: Pulling fs layer\r\n3333bbbb4444: Pulling fs layer\r\n'
printf '5555cccc6666: Already exists\r\n'
printf "${up}${up}${up}1111aaaa2222: Downloading [=>      ]  1.5MB/30MB\r\n"
printf '3333bbbb4444: Downloading [>     ]  512kB/2.048MB\r\n5555cccc6666: Already exists\r\n'
printf "${up}${up}${up}1111aaaa2222: Downloading [======>  ]  20MB/30MB\r\n"
printf '3333bbbb4444: Download complete\r\n5555cccc6666: Already exists\r\n'
printf "${up}${up}${up}1111aaaa2222: Extracting [=========>]  30MB/30MB\r\n"
printf '3333bbbb4444: Pull complete\r\n5555cccc6666: Already exists\r\n'
printf "${up}${up}${up}1111aaaa2222: Pull complete\r\n"
printf '3333bbbb4444: Pull complete\r\n5555cccc6666: Already exists\r\n'
printf 'Digest: %s\r\n' "$FAKE_DIGEST"
printf 'Status: Downloaded newer image for vllm/vllm-openai:v0.11.0\r\n'
printf 'docker.io/vllm/vllm-openai:v0.11.0\r\n'
"""


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE)
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_DIGEST", DIGEST)
    return tmp_path


def test_a_pull_on_a_terminal_is_read_layer_by_layer_in_bytes(fake_docker):
    run_dir = fake_docker / "pull"
    run_dir.mkdir()
    result = pull_mod.pull("vllm/vllm-openai:v0.11.0", str(run_dir), retries=0, delay=0)
    assert result == {"changed": True, "digest": DIGEST, "pull_attempts": 1, "bytes": 32_048_000}
    view = json.loads((run_dir / "progress.json").read_text())
    # the layer that already existed counts as done and adds no bytes
    assert {k: view[k] for k in ("done_bytes", "total_bytes", "layers", "layers_done")} == {
        "done_bytes": 32_048_000, "total_bytes": 32_048_000, "layers": 3, "layers_done": 3}


def test_a_layer_half_way_counts_its_bytes_so_far():
    layers = pull_mod.Layers()
    for line in ("1111aaaa2222: Downloading [=>   ]  1.5MB/30MB",
                 "3333bbbb4444: Downloading [=>   ]  512kB/2.048MB",
                 "3333bbbb4444: Verifying Checksum", "5555cccc6666: Waiting"):
        layers.feed(line)
    assert layers.view() == {"done_bytes": 1_500_000 + 2_048_000,
                             "total_bytes": 30_000_000 + 2_048_000, "layers": 3,
                             "layers_done": 0}


def test_a_failing_pull_is_retried_then_reported_with_dockers_own_line(fake_docker):
    run_dir = fake_docker / "pull"
    run_dir.mkdir()
    (fake_docker / "fail").write_text("1")  # the first attempt fails, the second works
    result = pull_mod.pull("vllm/vllm-openai:v0.11.0", str(run_dir), retries=1, delay=0)
    assert result["pull_attempts"] == 2 and result["digest"] == DIGEST
    (fake_docker / "fail").write_text("5")
    result = pull_mod.pull("vllm/vllm-openai:v0.11.0", str(run_dir), retries=2, delay=0)
    assert result["failed"] and result["pull_attempts"] == 3
    assert result["msg"] == ("docker pull vllm/vllm-openai:v0.11.0 failed after 3 attempts: "
                             'Error response from daemon: Get "https://r/v2/": connection '
                             "refused")


def test_the_detached_pull_is_followed_until_its_result(fake_docker):
    run_dir = str(fake_docker / "detached")
    files = pull_mod.FILES
    pid = host.start_detached(run_dir, files, lambda: pull_mod.pull(
        "vllm/vllm-openai:v0.11.0", run_dir, 0, 0), "the pull")
    assert pid > 0
    for _ in range(100):  # bounded: 100 looks of up to 0.5 s
        look = host.poll_detached(run_dir, files, "evalprov_pull_progress", "lost", 0.5)
        if not look["running"]:
            break
    assert look["running"] is False and look["digest"] == DIGEST, look
    assert look["evalprov_pull_progress"]["done_bytes"] == 32_048_000
    assert Path(run_dir, "result.json").exists()


def test_an_interrupted_pull_is_stopped_with_its_docker_client(tmp_path, monkeypatch):
    """After an interrupt evalprov stops the pull it started (state=stop stops the runner's
    process group): the runner and its `docker pull` are gone, and a poll says so."""
    import subprocess

    marker = f"evalprov-slow-pull-{os.getpid()}"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(
        "#!/bin/bash\nprintf '1111aaaa2222: Downloading [=>  ]  1MB/90MB\\r\\n'\n"
        f"exec -a {marker} sleep 120\n")
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = str(tmp_path / "slow")
    pid = host.start_detached(run_dir, pull_mod.FILES, lambda: pull_mod.pull(
        "vllm/vllm-openai:v0.11.0", run_dir, 0, 0), "the pull")
    deadline = time.monotonic() + 60  # bounded: the first bytes, on a loaded machine
    while True:
        look = host.poll_detached(run_dir, pull_mod.FILES, "evalprov_pull_progress", "lost",
                                  0.25)
        if look["evalprov_pull_progress"].get("done_bytes") or time.monotonic() > deadline:
            break
    assert look["running"] and look["evalprov_pull_progress"]["done_bytes"] == 1_000_000
    pull_mod.stop(pid)
    look = host.poll_detached(run_dir, pull_mod.FILES, "evalprov_pull_progress", "lost", 5)
    assert look.get("failed") and look["msg"] == "lost", look
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
