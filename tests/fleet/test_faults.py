"""Faults during `evalprov apply` on the fleet, judged by the FINAL LEDGER STATE.

Two 1-GPU hosts on net 85, the stand-in vLLM image and the REAL harness image
(tests/testbed/eval_image). Each test breaks something while a run is going -- a host
crashes, the vLLM container dies, a server never gets healthy, the registry lacks the
image, the controller gets Ctrl-C, a second apply races the first -- and then reads the
ledger (runs, deployments, task_runs) and the files on the controller.

Waits are on observable state (ledger rows, containers on a host, progress lines), never
on sleeps, and every wait is bounded (in-process applies by a SIGINT watchdog). Races are
removed by freezing things: the vLLM container (docker pause) to keep a host's task running,
the first apply (SIGSTOP) to keep it holding the lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from evalprov import apply
from evalprov.config.loader import load_config
from evalprov.hosts import host_facts
from evalprov.inventory import task_vars
from evalprov.ledger import DB_NAME, Ledger, task_key
from tests.testbed import STANDIN_IMAGE
from tests.testbed.util import beside

pytestmark = pytest.mark.fleet

NET = 85  # other engineers' fleets use 77-83
GPUS = (1, 1)
ROOT = Path(__file__).resolve().parents[2]
SERVED = "llama"
INSTANCE = "evalprov-vllm-0"
PARAMS = {"config": {"params": {"limit_samples": 2, "max_new_tokens": 16, "parallelism": 1}}}
MISSING_IMAGE = "vllm/vllm-openai:does-not-exist"
_EVAL_IMAGE: dict[str, str] = {}  # registry address -> harness image ref


# --------------------------------------------------------------------------- fleet


def _containers(fleet, host: str, label: str | None = None) -> list[str]:
    args = ["ps", "-aq", "--no-trunc"] + (["--filter", f"label={label}"] if label else [])
    return fleet.docker(host, *args, check=False).stdout.decode().split()


def _running_eval(fleet, host: str) -> list[str]:
    return fleet.docker(host, "ps", "-q", "--filter", "label=evalprov.managed=eval",
                        check=False).stdout.decode().split()


def _clean(fleet) -> None:
    """Every host up, connected and without containers (the next test starts clean)."""
    for h in fleet.hosts:
        if not fleet.host_alive(h.name):
            fleet.revive_host(h.name)
        fleet.reconnect_host(h.name)
        ids = _containers(fleet, h.name)
        if ids:
            fleet.docker(h.name, "unpause", *ids, check=False)
            fleet.docker(h.name, "rm", "-f", *ids, check=False)


def _prepare(fleet_factory, where: Path):
    from tests.testbed.eval_image import ensure_eval_image
    from tests.testbed.image import ensure_standin_image

    fleet = fleet_factory(GPUS, docker=True, net=NET)
    if fleet_factory.image_info is None:
        fleet_factory.image_info = ensure_standin_image(fleet)
    addr = fleet.registry.addr
    if addr not in _EVAL_IMAGE:
        _EVAL_IMAGE[addr] = ensure_eval_image(fleet)
    image = _EVAL_IMAGE[addr]
    _clean(fleet)

    def pull(host: str) -> None:  # a fresh host would pull the harness inside its first task
        if fleet.docker(host, "image", "inspect", image, check=False).returncode != 0:
            fleet.docker(host, "pull", image, timeout=300)

    with ThreadPoolExecutor(len(fleet.hosts)) as ex:
        list(ex.map(pull, [h.name for h in fleet.hosts]))
    return fleet, fleet.write_inventory(where / "inventory.yml"), image


@pytest.fixture
def env(fleet_factory, tmp_path):
    fleet, inv, image = _prepare(fleet_factory, tmp_path)
    yield fleet, inv, image
    _clean(fleet)


# --------------------------------------------------------------------------- apply


def write_config(where: Path, image: str, tasks: list, *, vllm_image: str = STANDIN_IMAGE,
                 env_vars: dict | None = None, params: dict | None = None,
                 **execution) -> Path:
    cfg = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "vllm"}, "_self_"],
        "execution": {"output_dir": str(where / "out"), "health_check_timeout": 60,
                      **execution},
        "deployment": {"image": vllm_image, "hf_model_handle": "meta-llama/Llama-3.1-8B",
                       "served_model_name": SERVED, "tensor_parallel_size": 1,
                       **({"env_vars": env_vars} if env_vars else {})},
        "evaluation": {"nemo_evaluator_config": params or PARAMS,
                       "tasks": [{"container": image, "name": t} for t in tasks]},
    }
    path = where / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


APPLY_LIMIT_S = 240  # one in-process apply; the watchdog Ctrl-C's it after that


def run_apply(config: Path, inventory: Path, **opts):
    """`evalprov apply` in this process (the main thread: apply installs signal handlers),
    bounded: past APPLY_LIMIT_S a watchdog sends SIGINT, which apply turns into a cancelled,
    recorded run, and the test fails here."""
    loaded = load_config(config, (), default_execution="baremetal")
    hosts = host_facts("baremetal", str(inventory), limit=opts.get("limit"))
    fired = threading.Event()

    def watchdog() -> None:
        fired.set()
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(APPLY_LIMIT_S, watchdog)
    timer.start()
    try:
        plan, result, run_dir = apply.run(loaded, hosts, apply.Options(str(inventory), **opts),
                                          "site.yml")
    finally:
        timer.cancel()
    assert not fired.is_set(), f"apply ran longer than {APPLY_LIMIT_S}s and was interrupted"
    text, code = apply.summary(result, False)
    return plan, result, run_dir, code, text


def cli_argv(config: Path, inventory: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "evalprov.cli", "apply", str(config), "-i", str(inventory),
            *extra]


class Background:
    """`evalprov apply` as a child process; its stderr (the progress lines) read as it comes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.err: list[str] = []
        self._out: list[str] = []
        # one reader per stream, and nothing else reads them (communicate() would take a
        # share of stderr's lines from the reader)
        self._readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                         for stream, into in ((self.proc.stderr, self.err),
                                              (self.proc.stdout, self._out))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def saw(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in list(self.err))

    def wait(self, timeout: float) -> int:
        self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(10)
        return self.proc.returncode

    @property
    def out(self) -> str:
        return "".join(self._out)

    @property
    def text(self) -> str:
        return self.out + "".join(self.err)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


# --------------------------------------------------------------------------- observing


def wait_until(pred: Callable[[], Any], timeout: float, what: str,
               abort: Callable[[], bool] = lambda: False) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if abort():
            raise AssertionError(f"gave up waiting for {what}: the run ended first")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def peek(out: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Read the ledger while a run writes it (a missing file or schema is 'no rows')."""
    if not (out / DB_NAME).exists():
        return []
    try:
        con = sqlite3.connect(out / DB_NAME, timeout=5)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return []


LATEST_RUN = "(SELECT run_id FROM runs ORDER BY started DESC LIMIT 1)"


def host_tasks_running(out: Path, host: str) -> list[tuple]:
    rows = peek(out, f"SELECT task, status FROM task_runs WHERE host = ? AND run_id = "
                     f"{LATEST_RUN}", (host,))
    return rows if rows and all(s == "running" for _, s in rows) else []


def ledger(out: Path) -> dict[str, Any]:
    """The whole ledger through evalprov's own Ledger: runs in order, and per run its task
    rows and deployments as dicts."""
    led = Ledger(out)
    try:
        runs = [dict(r) for r in led.runs()]
        return {
            "runs": runs,
            "tasks": {r["run_id"]: [dict(t) for t in led.tasks_of(r["run_id"])] for r in runs},
            "deployments": {r["run_id"]: [dict(d) for d in led.deployments_of(r["run_id"])]
                            for r in runs},
            "all_tasks": [dict(t) for t in led.db.execute(
                "SELECT * FROM task_runs ORDER BY id").fetchall()],
        }
    finally:
        led.close()


def by_host_task(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["host"], r["task"]): r for r in rows}


def tree_hashes(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def plan_keys(plan) -> dict[tuple[str, str], str]:
    """(host, task) -> ledger key of every task of a plan, computed as apply does."""
    hashes = {(i.host, i.name): i.spec_hash for i in plan.instances}
    return {(hp.host, t.name): task_key(task_vars(t), hashes.get((hp.host, t.instance)))
            for hp in plan.hosts for t in hp.tasks}


def assert_settled(state: dict) -> None:
    """No run still 'running' and no task row left 'pending'/'running' anywhere."""
    assert all(r["status"] != "running" and r["finished"] for r in state["runs"]), state["runs"]
    left = [t for t in state["all_tasks"] if t["status"] in ("pending", "running")]
    assert left == [], left


# --------------------------------------------------------------------------- 1 + 7: host crash


def _host_crash(fleet, inv: Path, image: str, where: Path) -> dict[str, Any]:
    """h1 crashes while its two tasks run; h2 finishes its task. Then h1 boots again and
    `--rerun failed` finishes only h1's work."""
    config = write_config(where, image, ["ifeval", "gpqa_diamond", "gpqa_diamond_nemo"])
    out = where / "out"
    seen: dict[str, Any] = {}

    def crash_h1(done) -> None:
        # mid-task: the ledger says running AND the harness container runs on h1
        seen["running"] = wait_until(
            lambda: host_tasks_running(out, "h1") if _running_eval(fleet, "h1") else [],
            300, "h1's tasks running in a harness container", abort=done.is_set)
        fleet.kill_host("h1")
        seen["killed"] = time.monotonic()

    t0 = time.monotonic()
    with beside(crash_h1):
        plan1, res1, run1, code1, text1 = run_apply(config, inv)
    first_s = time.monotonic() - t0
    state1 = ledger(out)
    h2_dir = run1 / "h2" / "gpqa_diamond"
    h2_before = tree_hashes(h2_dir)
    h2_container = _containers(fleet, "h2")

    fleet.revive_host("h1")
    t1 = time.monotonic()
    _, res2, run2, code2, text2 = run_apply(config, inv, rerun="failed")
    return {
        "out": out, "plan": plan1, "seen": seen, "first": (res1, run1, code1, text1),
        "first_s": first_s, "state1": state1, "h2_dir": h2_dir, "h2_before": h2_before,
        "h2_after": tree_hashes(h2_dir), "h2_container": h2_container,
        "h2_container_after": _containers(fleet, "h2"),
        "rerun": (res2, run2, code2, text2), "rerun_s": time.monotonic() - t1,
        "final": ledger(out),
    }


@pytest.fixture(scope="module")
def host_crash(fleet_factory, tmp_path_factory):
    where = tmp_path_factory.mktemp("crash")
    fleet, inv, image = _prepare(fleet_factory, where)
    try:
        return _host_crash(fleet, inv, image, where)
    finally:
        _clean(fleet)


def test_host_crash_mid_run_other_hosts_finish_and_rerun_finishes_only_its_tasks(host_crash):
    s = host_crash
    res1, run1, code1, text1 = s["first"]
    assert {t for t, _ in s["seen"]["running"]} == {"ifeval", "gpqa_diamond_nemo"}

    # the run: exit 1 naming h1; h2's task came home
    assert code1 == 1, text1
    assert res1.hosts["h1"].unreachable > 0
    assert re.search(r"^error: h1: unreachable", text1, re.M), text1
    assert not re.search(r"^error: h2", text1, re.M), text1
    recs = by_host_task(res1.tasks)
    assert recs[("h2", "gpqa_diamond")]["status"] == "succeeded"

    # its ledger: run failed; h1's tasks missing (not lost), h2's succeeded; deployments
    st = s["state1"]
    assert_settled(st)
    (run,) = st["runs"]
    assert run["run_id"] == run1.name and run["status"] == "failed"
    rows = by_host_task(st["tasks"][run1.name])
    assert set(rows) == {("h1", "ifeval"), ("h1", "gpqa_diamond_nemo"), ("h2", "gpqa_diamond")}
    for task in ("ifeval", "gpqa_diamond_nemo"):
        row = rows[("h1", task)]
        assert row["status"] == "missing" and row["attempt"] == 1, row
        assert row["error"] == "host unreachable" and row["started"], row
    h2 = rows[("h2", "gpqa_diamond")]
    assert h2["status"] == "succeeded" and h2["attempt"] == 1 and h2["error"] is None
    assert h2["result_dir"] == str(s["h2_dir"]) and h2["samples"] == 2
    deps = {d["host"]: d["status"] for d in st["deployments"][run1.name]}
    assert deps == {"h1": "failed", "h2": "serving"}

    # the rerun after h1 booted again: only h1's tasks ran, h2's was reused as it was
    res2, run2, code2, text2 = s["rerun"]
    assert code2 == 0, text2
    final = s["final"]
    assert_settled(final)
    assert [r["status"] for r in final["runs"]] == ["failed", "succeeded"]
    assert final["runs"][1]["run_id"] == run2.name and final["runs"][1]["rerun"] == "failed"
    rows2 = by_host_task(final["tasks"][run2.name])
    assert set(rows2) == {("h1", "ifeval"), ("h1", "gpqa_diamond_nemo")}
    assert all(r["status"] == "succeeded" and r["attempt"] == 2 for r in rows2.values()), rows2
    assert {d["host"]: d["status"] for d in final["deployments"][run2.name]} == {
        "h1": "serving", "h2": "serving"}
    reused = [t for t in res2.tasks if t.get("reused_from")]
    assert [(t["host"], t["task"], t["reused_from"]) for t in reused] == [
        ("h2", "gpqa_diamond", run1.name)]
    assert not (run2 / "h2").exists()
    assert s["h2_after"] == s["h2_before"] and s["h2_before"]  # byte-identical
    assert s["h2_container_after"] == s["h2_container"]  # h2's server was left alone
    summary = json.loads((run2 / "summary.json").read_text())
    assert {(t["host"], t["task"]) for t in summary["tasks"]} == set(rows) and all(
        t["status"] == "succeeded" for t in summary["tasks"])


# --------------------------------------------------------------------------- 2: server dies


def test_vllm_container_dies_during_a_task_then_rerun_restarts_it(env, tmp_path):
    fleet, inv, image = env
    params = {"config": {"params": {**PARAMS["config"]["params"], "max_retries": 1,
                                    "request_timeout": 5}}}
    config = write_config(tmp_path, image, ["ifeval"], params=params)  # shard: h1 runs it
    out = tmp_path / "out"
    def kill_server(done) -> None:
        wait_until(lambda: host_tasks_running(out, "h1") and _running_eval(fleet, "h1"),
                   300, "h1's task running in a harness container", abort=done.is_set)
        fleet.docker("h1", "kill", INSTANCE)

    with beside(kill_server):
        _, _, run1, code1, text1 = run_apply(config, inv)
    assert code1 == 1, text1
    st = ledger(out)
    assert_settled(st)
    assert st["runs"][0]["status"] == "failed"
    rows = by_host_task(st["tasks"][run1.name])
    failed = rows[("h1", "ifeval")]
    assert failed["status"] == "failed" and failed["attempt"] == 1, failed
    # the task's error names its server first (watched while the task ran; asked again when
    # the harness gave up before the watch had counted enough misses), then the harness's
    # exit and the tail of its log
    log = run1 / "h1" / "ifeval" / "logs" / "harness.log"
    assert failed["error"].startswith("its server stopped serving: http://127.0.0.1:8000/"
                                      "health did not answer ("), failed["error"]
    assert "; harness exited " in failed["error"], failed["error"]
    last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1]
    assert last.strip() in failed["error"]
    assert "Connection refused" in log.read_text(errors="replace")
    assert "error: h1/ifeval: its server stopped serving: " in text1, text1
    assert set(rows) == {("h1", "ifeval")}
    state = json.loads(fleet.docker("h1", "inspect", INSTANCE).stdout)[0]["State"]
    assert not state["Running"]

    # --rerun failed: the probe sees the server not running, so it is started again
    _, res2, run2, code2, text2 = run_apply(config, inv, rerun="failed")
    assert code2 == 0, text2
    probe = res2.facts["h1"]["units"][INSTANCE]
    assert not probe["running"] and not probe["serving"], probe
    decided = res2.decision["hosts"]
    assert [i["name"] for i in decided["h1"]["evalprov_vllm_start"]] == [INSTANCE]
    assert decided["h2"]["evalprov_vllm_start"] == []
    assert any("Start the instances" in c for c in res2.hosts["h1"].would_change)
    assert not any("Start the instances" in c for c in res2.hosts["h2"].would_change)
    assert json.loads(fleet.docker("h1", "inspect", INSTANCE).stdout)[0]["State"]["Running"]
    final = ledger(out)
    assert_settled(final)
    assert [r["status"] for r in final["runs"]] == ["failed", "succeeded"]
    rows2 = by_host_task(final["tasks"][run2.name])
    assert set(rows2) == {("h1", "ifeval")}
    assert rows2[("h1", "ifeval")]["status"] == "succeeded"
    assert rows2[("h1", "ifeval")]["attempt"] == 2
    assert {d["host"]: d["status"] for d in final["deployments"][run2.name]} == {
        "h1": "serving", "h2": "serving"}


# --------------------------------------------------------------------------- 3: never healthy


def test_server_never_healthy_on_one_host_fails_at_the_timeout_others_unaffected(env,
                                                                                 tmp_path):
    fleet, inv, image = env
    out = tmp_path / "out"
    # the config cannot single out a host: the broken server goes to h1 with --limit h1
    (tmp_path / "broken").mkdir()
    broken = write_config(tmp_path / "broken", image, ["gpqa_diamond"],
                          health_check_timeout=5, output_dir=str(out),
                          env_vars={"STANDIN_NEVER_HEALTHY": "lit:1"})
    t0 = time.monotonic()
    _, res1, run1, code1, text1 = run_apply(broken, inv, limit="h1")
    took = time.monotonic() - t0
    assert code1 == 1, text1
    assert f"instance {INSTANCE} not healthy after 5 s" in text1
    assert took >= 5, took  # it waited out the timeout
    log = run1 / "logs" / "h1" / f"{INSTANCE}.log"
    assert str(log) in text1
    assert log.stat().st_mode & 0o777 == 0o600
    assert "Uvicorn running" in log.read_text()  # the server's own output, saved
    assert set(res1.hosts) == {"h1"}
    assert _containers(fleet, "h2") == []  # h2 untouched
    h1_container = _containers(fleet, "h1")

    # h2 serves and evaluates normally into the same output_dir
    healthy = write_config(tmp_path, image, ["gpqa_diamond"], output_dir=str(out))
    _, res2, run2, code2, text2 = run_apply(healthy, inv, limit="h2")
    assert code2 == 0, text2
    assert set(res2.hosts) == {"h2"}
    assert _containers(fleet, "h1") == h1_container  # and h1 was left as it was

    st = ledger(out)
    assert_settled(st)
    assert [(r["run_id"], r["status"]) for r in st["runs"]] == [
        (run1.name, "failed"), (run2.name, "succeeded")]
    (t1,) = st["tasks"][run1.name]
    assert (t1["host"], t1["status"], t1["attempt"]) == ("h1", "missing", 1)
    assert t1["error"] == "no results came back from the host"
    assert [(d["host"], d["status"]) for d in st["deployments"][run1.name]] == [("h1", "failed")]
    (t2,) = st["tasks"][run2.name]
    assert (t2["host"], t2["status"], t2["attempt"]) == ("h2", "succeeded", 1)
    assert [(d["host"], d["status"]) for d in st["deployments"][run2.name]] == [
        ("h2", "serving")]


# --------------------------------------------------------------------------- 4: no such image


def test_registry_without_the_image_fails_after_the_retries_and_starts_nothing(env, tmp_path):
    fleet, inv, image = env
    config = write_config(tmp_path, image, ["gpqa_diamond"], vllm_image=MISSING_IMAGE)
    t0 = time.monotonic()
    _, _, run_dir, code, text = run_apply(config, inv)
    took = time.monotonic() - t0
    assert code == 1, text
    # the retries really happened (evalprov_image_pull_retries 3, delay 5 s), and the
    # message names the image, counts the attempts right (the first pull + 3 retries) and
    # quotes docker's own last line
    events = [json.loads(p.read_text()) for p in
              (run_dir / "ansible" / "artifacts").glob("*/job_events/*.json")]
    attempts = {e["event_data"]["host"]: e["event_data"]["res"].get("pull_attempts")
                for e in events if e.get("event") == "runner_on_failed"
                and str(e["event_data"].get("task", "")).startswith("Image | Follow the pull")}
    assert attempts == {"h1": 4, "h2": 4}, attempts
    for h in ("h1", "h2"):
        assert f"error: {h}: host {h}: docker pull {MISSING_IMAGE} failed after 4 attempts: " \
            in text, text
    assert took >= 15, took
    # nothing half-started: no container (server or harness) on any host, no image
    for h in fleet.hosts:
        assert _containers(fleet, h.name) == []
        assert fleet.docker(h.name, "image", "inspect", MISSING_IMAGE,
                            check=False).returncode != 0
    st = ledger(tmp_path / "out")
    assert_settled(st)
    (run,) = st["runs"]
    assert run["status"] == "failed"
    assert {(d["host"], d["status"]) for d in st["deployments"][run["run_id"]]} == {
        ("h1", "failed"), ("h2", "failed")}
    (task,) = st["tasks"][run["run_id"]]
    assert (task["status"], task["attempt"]) == ("missing", 1)
    assert task["error"] == "no results came back from the host"
    assert task["started"] is None  # never got to the eval role


# --------------------------------------------------------------------------- 5: Ctrl-C


def test_sigint_mid_run_exits_130_ledger_consistent_and_rerun_completes(env, tmp_path):
    fleet, inv, image = env
    config = write_config(tmp_path, image, ["ifeval", "gpqa_diamond"])  # h1 ifeval, h2 gpqa
    out = tmp_path / "out"
    bg = Background(cli_argv(config, inv))
    paused = False
    try:
        # hold h1's task mid-run: its server is frozen, so it cannot finish before the signal
        wait_until(lambda: host_tasks_running(out, "h1") and _running_eval(fleet, "h1"), 300,
                   "h1's task running in a harness container",
                   abort=lambda: bg.proc.poll() is not None)
        fleet.docker("h1", "pause", INSTANCE)
        paused = True
        # meanwhile h2's task finished and its results reached the controller
        wait_until(lambda: bg.saw(r"\sh2\s+\S+\s+Eval \| Fetch each task"), 300,
                   "h2's results fetched", abort=lambda: bg.proc.poll() is not None)
        assert host_tasks_running(out, "h1"), "h1 must still be running at the signal"
        os.kill(bg.proc.pid, signal.SIGINT)
        code = bg.wait(timeout=120)
    finally:
        bg.stop()
        if paused:
            fleet.docker("h1", "unpause", INSTANCE, check=False)
    assert code == 130, bg.text
    assert "interrupted: state saved" in bg.text
    assert bg.text.count("next:") == 1, bg.text  # one next step
    # what the run started is stopped: no harness container, no harness process on h1
    assert _running_eval(fleet, "h1") == []
    procs = fleet.exec("h1", ["ps", "-eo", "args"]).stdout.decode()
    assert "run_eval" not in procs and "evalprov_run_tasks" not in procs, procs

    st = ledger(out)
    assert_settled(st)
    (run1,) = st["runs"]
    assert run1["status"] == "interrupted"
    rows = by_host_task(st["tasks"][run1["run_id"]])
    assert set(rows) == {("h1", "ifeval"), ("h2", "gpqa_diamond")}
    assert rows[("h1", "ifeval")]["status"] in ("missing", "interrupted")
    assert rows[("h1", "ifeval")]["attempt"] == 1
    done = rows[("h2", "gpqa_diamond")]
    assert (done["status"], done["attempt"]) == ("succeeded", 1), done
    done_dir = Path(done["result_dir"])
    assert done_dir == out / run1["run_id"] / "h2" / "gpqa_diamond"
    assert not (out / run1["run_id"] / "h1").exists()
    before = tree_hashes(done_dir)
    assert any(k.endswith("results.yml") for k in before), before

    # Ctrl-C twice ("again to abort") during the rerun: still no run or task left running
    bg = Background(cli_argv(config, inv, "--rerun", "failed"))
    try:
        wait_until(lambda: host_tasks_running(out, "h1") and _running_eval(fleet, "h1"), 300,
                   "the rerun's task running", abort=lambda: bg.proc.poll() is not None)
        os.kill(bg.proc.pid, signal.SIGINT)
        # the second once the first was taken (two signals sent at once can arrive as one)
        wait_until(lambda: bg.saw("Ctrl-C again to abort"), 60, "the first interrupt taken",
                   abort=lambda: bg.proc.poll() is not None)
        os.kill(bg.proc.pid, signal.SIGINT)
        code = bg.wait(timeout=120)
    finally:
        bg.stop()
    assert code == 130, bg.text
    st = ledger(out)
    assert_settled(st)
    assert [r["status"] for r in st["runs"]] == ["interrupted", "interrupted"]
    (aborted,) = st["tasks"][st["runs"][1]["run_id"]]
    assert (aborted["host"], aborted["task"], aborted["attempt"]) == ("h1", "ifeval", 2)
    assert aborted["status"] in ("missing", "interrupted")

    rerun = subprocess.run(cli_argv(config, inv, "--rerun", "failed"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    final = ledger(out)
    assert_settled(final)
    assert [r["status"] for r in final["runs"]] == ["interrupted", "interrupted", "succeeded"]
    run3 = final["runs"][2]["run_id"]
    (last,) = final["tasks"][run3]
    assert (last["host"], last["task"], last["status"], last["attempt"]) == (
        "h1", "ifeval", "succeeded", 3)
    assert tree_hashes(done_dir) == before  # byte-identical
    assert not (out / run3 / "h2").exists()
    summary = json.loads((out / run3 / "summary.json").read_text())
    assert [(t["host"], t["task"], t.get("reused_from")) for t in summary["tasks"]] == [
        ("h1", "ifeval", None), ("h2", "gpqa_diamond", run1["run_id"])]


# --------------------------------------------------------------------------- 6: the lock


def test_second_apply_on_the_same_output_dir_refuses_naming_the_holder(env, tmp_path):
    _, inv, image = env
    config = write_config(tmp_path, image, [])  # provisioning only
    out = tmp_path / "out"
    first = Background(cli_argv(config, inv))
    stopped = False
    try:
        wait_until(lambda: peek(out, "SELECT run_id FROM runs WHERE status = 'running'"), 120,
                   "the first apply to start its run",
                   abort=lambda: first.proc.poll() is not None)
        # freeze the first apply while it holds the lock, however slow the second is to start
        os.kill(first.proc.pid, signal.SIGSTOP)
        stopped = True
        second = subprocess.run(cli_argv(config, inv), cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        os.kill(first.proc.pid, signal.SIGCONT)
        stopped = False
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"output_dir {out} is in use by another evalprov (pid {first.proc.pid} on " in (
            second.stderr)
        assert "evalprov/cli.py apply " + str(config) in second.stderr  # the holder's command
        assert "Traceback" not in second.stderr
        code = first.wait(timeout=180)
    finally:
        if stopped:
            os.kill(first.proc.pid, signal.SIGCONT)
        first.stop()
    assert code == 0, first.text
    st = ledger(out)
    assert_settled(st)
    (run,) = st["runs"]  # the second left no trace
    assert (run["status"], run["pid"]) == ("succeeded", first.proc.pid)
    assert [(d["host"], d["status"]) for d in st["deployments"][run["run_id"]]] == [
        ("h1", "serving"), ("h2", "serving")]


# --------------------------------------------------------------------------- 7: nothing lost


def test_after_the_reruns_every_planned_task_has_exactly_one_success(host_crash):
    keys = plan_keys(host_crash["plan"])
    rows = host_crash["final"]["all_tasks"]
    table = [f"{'host':<5} {'task':<20} {'key':<17} attempts (run: status)"]
    problems = []
    for (host, task), key in sorted(keys.items()):
        mine = [r for r in rows if (r["host"], r["task"], r["key"]) == (host, task, key)]
        table.append(f"{host:<5} {task:<20} {key:<17} " + ", ".join(
            f"#{r['attempt']} {r['run_id']}: {r['status']}" for r in mine))
        if [r["status"] for r in mine].count("succeeded") != 1:
            problems.append((host, task))
    print("\n" + "\n".join(table))
    assert problems == [], "\n".join(table)
    # and the ledger has nothing beyond the plan
    assert {(r["host"], r["task"], r["key"]) for r in rows} == {
        (h, t, k) for (h, t), k in keys.items()}
    assert host_crash["final"]["runs"][-1]["status"] == "succeeded"

