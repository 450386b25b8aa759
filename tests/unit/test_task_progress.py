"""The eval module's host side of live progress, without a host: samples counted off a
harness log as it grows, and tasks started detached from the caller, then followed with
polls that return their progress while they run and their result when they have ended."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from tests.unit.collection import module

tasks = module("module_utils.evalprov_tasks")

DONE = "[I 2026-12-02T06:04:18.260] Request completed status_code=200 path= logger=root\n"

# A stand-in harness: answers `first` requests, waits for the file `go`, answers the rest.
HARNESS = f"""
import os, sys, time
first, rest, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
line = {DONE!r}
for _ in range(first):
    print(line, end="", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
for _ in range(rest):
    print(line, end="", flush=True)
"""


def _until(look, what, seconds=60.0):
    """look() until what(result) holds (bounded), returning the last result."""
    deadline = time.monotonic() + seconds
    while True:
        result = look()
        if what(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def _params(tmp_path, *names, first=2, rest=1, limit=3):
    run_dir = tmp_path / "run"
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    return {
        "run_dir": str(run_dir), "runtime": "process", "env": {}, "timeout": 120,
        "log_lines": 5, "concurrency": 2, "provenance": {}, "owner": "test",
        "tasks": [{"name": n, "slug": n, "dir": str(run_dir / n), "env": {}, "labels": {},
                   "cwd": str(tmp_path), "path_prepend": "",
                   "run_config": {"config": {"params": {"limit_samples": limit}}},
                   "argv": [sys.executable, str(script), str(first), str(rest),
                            str(tmp_path / "go")]} for n in names],
    }


def test_samples_are_counted_off_the_harness_log_as_it_grows(tmp_path):
    log = tmp_path / "harness.log"
    log.write_text(DONE * 2 + DONE[:30])  # the third line is still being written
    reader = tasks.LogProgress(str(log), total=5)
    assert reader.read() == 2
    with log.open("a") as f:
        f.write(DONE[30:] + "unrelated line\n")
    assert reader.read() == 3
    assert reader.read() == 3  # read once, counted once


def test_a_progress_bar_in_the_log_gives_its_own_count_and_total(tmp_path):
    log = tmp_path / "harness.log"
    log.write_text("Requesting API:  10%|#   | 12/120 [00:03<00:27, 4.0it/s]\r"
                   "Requesting API:  20%|##  | 24/120 [00:06<00:24, 4.0it/s]\r")
    reader = tasks.LogProgress(str(log), total=None)
    assert reader.read() == 24
    assert reader.total == 120


def test_the_run_config_limit_is_the_total_and_no_limit_is_unknown():
    assert tasks.limit_of({"run_config": {"config": {"params": {"limit_samples": 7}}}}) == 7
    assert tasks.limit_of({"run_config": {"config": {"params": {}}}}) is None


def test_started_tasks_report_samples_while_they_run_and_their_result_at_the_end(tmp_path):
    p = _params(tmp_path, "ifeval", "gpqa_diamond")
    pid = tasks.start(p)
    assert pid > 0 and pid != os.getpid()
    run_dir = p["run_dir"]
    seen = _until(lambda: tasks.poll(run_dir, wait=0.2),
                  lambda r: all(v["done"] == 2 for v in r["evalprov_eval_progress"].values()))
    # the harness waits for `go`: the tasks are running, two samples of three done each
    assert seen["running"] is True
    assert seen["evalprov_eval_progress"] == {
        n: {"status": "running", "done": 2, "total": 3,
            "seconds": seen["evalprov_eval_progress"][n]["seconds"]}
        for n in ("ifeval", "gpqa_diamond")}
    (tmp_path / "go").touch()
    end = _until(lambda: tasks.poll(run_dir, wait=1.0), lambda r: not r["running"])
    assert end["running"] is False and "failed" not in end
    assert sorted(t["name"] for t in end["tasks"]) == ["gpqa_diamond", "ifeval"]
    assert all(t["rc"] == 0 and os.path.exists(t["archive"]) for t in end["tasks"])
    assert {n: (v["status"], v["done"]) for n, v in end["evalprov_eval_progress"].items()} \
        == {"ifeval": ("succeeded", 3), "gpqa_diamond": ("succeeded", 3)}
    assert end["failed_tasks"] == []


def test_a_task_runner_that_dies_is_a_failure_not_an_endless_wait(tmp_path):
    p = _params(tmp_path, "ifeval")
    pid = tasks.start(p)
    _until(lambda: tasks.poll(p["run_dir"], wait=0.2),
           lambda r: r["evalprov_eval_progress"].get("ifeval", {}).get("done") == 2)
    os.kill(pid, signal.SIGKILL)
    gone = _until(lambda: tasks.poll(p["run_dir"], wait=0.2), lambda r: not r["running"])
    assert gone.get("failed") is True
    assert "stopped without a result" in gone["msg"]
    (tmp_path / "go").touch()  # let the orphaned stand-in harness end


def test_a_started_runner_keeps_no_descriptor_of_its_caller(tmp_path):
    """Ansible waits for the module's stdout to close: the runner must not hold it."""
    p = _params(tmp_path, "ifeval")
    r, w = os.pipe()
    caller = f"pipe:[{os.fstat(r).st_ino}]"  # the runner's own pipes (subprocess) are fine
    saved = os.dup(1)
    os.dup2(w, 1)
    try:
        pid = tasks.start(p)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(w)
    fds = os.listdir(f"/proc/{pid}/fd")
    targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}
    assert caller not in targets, targets
    os.set_blocking(r, False)
    try:
        assert os.read(r, 1) == b""  # every writer gone: EOF, not EAGAIN
    finally:
        os.close(r)
        (tmp_path / "go").touch()
        _until(lambda: tasks.poll(p["run_dir"], wait=0.5), lambda res: not res["running"])
    assert json.loads((Path(p["run_dir"]) / "result.json").read_text())["tasks"][0]["rc"] == 0
