"""The eval module's host side of live progress, without a host: samples counted off a
harness log as it grows, and tasks started detached from the caller, then followed with
polls that return their progress while they run and their result when they have ended."""

from __future__ import annotations

import contextlib
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
deadline = time.monotonic() + 600  # every test makes `go`; this only bounds a stray one
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
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        # a descriptor the runner closed since the listing (its progress file, say) is
        # not one it holds
        with contextlib.suppress(FileNotFoundError):
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    assert caller not in targets, targets
    os.set_blocking(r, False)
    try:
        assert os.read(r, 1) == b""  # every writer gone: EOF, not EAGAIN
    finally:
        os.close(r)
        (tmp_path / "go").touch()
        _until(lambda: tasks.poll(p["run_dir"], wait=0.5), lambda res: not res["running"])
    assert json.loads((Path(p["run_dir"]) / "result.json").read_text())["tasks"][0]["rc"] == 0


class _Server:
    """A loopback HTTP server whose /health answers 200 until told otherwise."""

    def __init__(self):
        import http.server
        import threading

        outer = self
        self.status, self.body = 200, b"ok"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(outer.status)
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/health"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_server_that_stops_serving_ends_its_tasks_naming_it_and_starts_no_more(tmp_path):
    """A task's server (its health URL) watched while the tasks run: once it answers 503
    three times in a row, the running task ends at once (not at its timeout), the queued one
    is never started, and each says why first; a task on another server is untouched."""
    server, other = _Server(), _Server()
    try:
        p = _params(tmp_path, "ifeval", "gpqa_diamond", "mmlu")
        p["concurrency"] = 2  # ifeval and mmlu run; gpqa_diamond waits for ifeval's slot
        p["tasks"] = [p["tasks"][0], p["tasks"][2], p["tasks"][1]]
        for t in p["tasks"]:
            t["health_urls"] = [server.url]
        p["tasks"][1]["health_urls"] = [other.url]  # mmlu: another server
        p["server_watch"] = {"interval": 0.2, "misses": 3, "timeout": 5.0}
        tasks.start(p)
        run_dir = p["run_dir"]
        _until(lambda: tasks.poll(run_dir, wait=0.2),
               lambda r: r["evalprov_eval_progress"]["ifeval"]["done"] == 2)
        server.status, server.body = 503, b"data-parallel rank(s) 2 lost: worker h2 gone\nmore"
        ended = _until(lambda: tasks.poll(run_dir, wait=0.5),
                       lambda r: r["evalprov_eval_progress"]["gpqa_diamond"]["status"]
                       == "failed")
        assert ended["evalprov_eval_progress"]["ifeval"]["status"] == "failed", ended
        assert ended["evalprov_eval_progress"]["mmlu"]["status"] == "running", ended
        (tmp_path / "go").touch()  # mmlu's harness may finish now
        end = _until(lambda: tasks.poll(run_dir, wait=1.0), lambda r: not r["running"])
    finally:
        server.close()
        other.close()
    by = {t["name"]: t for t in end["tasks"]}
    want = (f"its server stopped serving: {server.url} answered HTTP 503: data-parallel "
            "rank(s) 2 lost: worker h2 gone, 3 times in a row while the tasks ran")
    for name in ("ifeval", "gpqa_diamond"):
        assert by[name]["rc"] == tasks.LOST_RC and by[name]["server_lost"] == want, by[name]
    assert by["mmlu"]["rc"] == 0 and "server_lost" not in by["mmlu"]
    log = (Path(run_dir) / "gpqa_diamond" / "logs" / "harness.log").read_text()
    assert log == f"evalprov: not started: {want}\n"  # the harness never ran
    assert f"evalprov: task ended: {want}" in (
        Path(run_dir) / "ifeval" / "logs" / "harness.log").read_text()


def test_the_record_of_a_task_whose_server_was_lost_names_that_first(tmp_path):
    from evalprov.results import read_task

    d = tmp_path / "t"
    (d / "logs").mkdir(parents=True)
    (d / "logs" / "harness.log").write_text("openai.APIConnectionError: refused\n")
    (d / "evalprov-task.json").write_text(json.dumps(
        {"rc": 125, "server_lost": "its server stopped serving: X", "seconds": 1}))
    rec = read_task("h1", {"name": "ifeval"}, d)
    assert rec.status == "failed"
    assert rec.error.startswith("its server stopped serving: X; harness exited 125: openai")


def test_a_json_error_answer_is_reduced_to_its_message():
    host = module("module_utils.evalprov_host")
    server = _Server()
    try:
        server.status = 503
        server.body = json.dumps({"object": "error", "message": "rank 2 lost\nmore",
                                  "code": 503}).encode()
        assert host.http_answer(server.url) == (503, "rank 2 lost")
        server.body = json.dumps({"error": {"message": "engine dead"}}).encode()
        assert host.http_answer(server.url) == (503, "engine dead")
        server.status, server.body = 200, b"{}"
        assert host.http_answer(server.url) == (200, "")
    finally:
        server.close()
    status, what = host.http_answer(server.url, timeout=2)
    assert status == 0 and "refused" in what.lower()


def test_a_task_that_fails_on_its_own_while_its_server_is_down_names_the_server(tmp_path):
    """The harness gives up first (its requests refused) before the watch counted enough
    misses: its failure is still put down to the server, asked again right then; a task
    failing beside a healthy server keeps its own error."""
    server = _Server()
    try:
        p = _params(tmp_path, "ifeval")
        fail = tmp_path / "fail.py"
        fail.write_text("import sys; print('openai.APIConnectionError'); sys.exit(1)\n")
        p["tasks"][0]["argv"] = [sys.executable, str(fail)]
        p["tasks"][0]["health_urls"] = [server.url]
        watch = tasks.ServerWatch({server.url}, interval=0.1, misses=3, timeout=5.0)
        alive = tasks.run_one(p, p["tasks"][0], watch)
        assert alive["rc"] == 1 and "server_lost" not in alive
        server.status, server.body = 503, b"engine dead"
        dead = tasks.run_one(p, p["tasks"][0], watch)
    finally:
        server.close()
    assert dead["rc"] == 1 and dead["server_lost"] == (
        f"its server stopped serving: {server.url} answered HTTP 503: engine dead, 3 times "
        "in a row while the tasks ran")


def test_servers_behind_one_proxy_are_lost_only_when_all_of_them_are(tmp_path):
    up, down = _Server(), _Server()
    try:
        down.status = 503
        watch = tasks.ServerWatch({up.url, down.url}, interval=0.05, misses=2, timeout=5.0)
        for _ in range(3):
            watch.look()
        assert watch.reason([up.url, down.url]) is None  # the proxy still has one
        assert watch.reason([down.url]).startswith(f"its server stopped serving: {down.url} ")
        assert watch.confirm([up.url, down.url]) is None
        up.status = 503
        assert watch.confirm([up.url, down.url]).startswith(  # the first one named
            f"its server stopped serving: {up.url} answered HTTP 503")
        assert watch.reason([]) is None and watch.confirm([]) is None
    finally:
        up.close()
        down.close()
