"""Evaluation through `evalprov apply` on the fleet: the REAL harness (nvidia-lm-eval,
nvidia-simple-evals, nemo-evaluator in a test image pushed to the fleet's registry) runs
ifeval and gpqa_diamond against the stand-in vLLM server; results land on the controller."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from evalprov import apply
from evalprov.config.loader import load_config
from evalprov.hosts import host_facts
from tests.testbed import STANDIN_IMAGE

pytestmark = pytest.mark.fleet

SECRET = "hf_evalprov_task_secret_93b7d2"  # grepped for in every file evalprov writes
HOLD = "/tmp/evalprov-test-go"  # a stand-in holding its answers until this file exists
PARAMS = {"config": {"params": {"limit_samples": 3, "max_new_tokens": 32, "parallelism": 2}}}


def harness_container(inspected: dict) -> bool:
    return (inspected["Config"]["Labels"] or {}).get("evalprov.managed") == "eval"


@pytest.fixture
def eval_fleet(fleet_factory, standin_image, tmp_path):
    from tests.testbed.eval_image import ensure_eval_image

    fleet = fleet_factory((2, 2, 2), docker=True)
    image = ensure_eval_image(fleet)
    inv = fleet.write_inventory(tmp_path / "inventory.yml")
    yield fleet, inv, image
    remove_managed(fleet)


def remove_managed(fleet) -> None:
    """Every container evalprov made on the fleet's hosts (the next test starts clean)."""
    for h in fleet.hosts:
        names = fleet.docker(h.name, "ps", "-aq", "--filter", "label=evalprov.managed",
                             check=False).stdout.decode().split()
        if names:
            fleet.docker(h.name, "rm", "-f", *names, check=False)


def write_config(tmp_path: Path, image: str, tasks: list[dict], deployment: dict | None = None,
                 **execution) -> Path:
    cfg = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "vllm"}, "_self_"],
        "execution": {"output_dir": str(tmp_path / "out"), "health_check_timeout": 60,
                      **execution},
        "deployment": {"image": STANDIN_IMAGE, "hf_model_handle": "meta-llama/Llama-3.1-8B",
                       "served_model_name": "llama", "tensor_parallel_size": 1,
                       **(deployment or {})},
        "evaluation": {"nemo_evaluator_config": PARAMS,
                       "tasks": [{"container": image, **t} for t in tasks]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_apply(config: Path, inventory: Path, **opts):
    loaded = load_config(config, (), default_execution="baremetal")
    hosts = host_facts("baremetal", str(inventory), limit=opts.get("limit"))
    plan, result, run_dir = apply.run(loaded, hosts, apply.Options(str(inventory), **opts),
                                      "site.yml")
    text, code = apply.summary(result, False)
    return plan, result, run_dir, code, text


def test_real_harness_scores_come_home_and_secrets_stay_out(eval_fleet, tmp_path, monkeypatch,
                                                           capsys):
    fleet, inv, image = eval_fleet
    monkeypatch.setenv("EVALPROV_TEST_GPQA_TOKEN", SECRET)
    # the servers take a while to become healthy, as vLLM does while it loads
    config = write_config(tmp_path, image, [
        {"name": "ifeval"},
        {"name": "gpqa_diamond", "env_vars": {"HF_TOKEN": "EVALPROV_TEST_GPQA_TOKEN"}},
    ], placement="shard", deployment={"env_vars": {"STANDIN_START_DELAY": "lit:8"}})
    _plan, result, run_dir, code, text = run_apply(config, inv)
    assert code == 0, text
    # progress in a pipe: plain lines, no control characters; each host's health wait and
    # evaluation get a line, and each task's samples end with its outcome
    progress = capsys.readouterr().err
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", progress), repr(progress[-2000:])
    lines = progress.splitlines()
    for host, task in (("h1", "ifeval"), ("h2", "gpqa_diamond")):
        assert any(re.search(rf"{host}\s+loading\s+waiting for /health", line)
                   for line in lines), progress[-3000:]
        assert any(re.search(rf"{host}\s+evaluating\s+running the evaluation tasks", line)
                   for line in lines), progress[-3000:]
        mine = [line for line in lines if re.search(rf"{host}\s+{task}\s+\d/3 samples", line)]
        assert mine and re.search(r"3/3 samples, .*succeeded$", mine[-1]), mine
    by_task = {t["task"]: t for t in result.tasks}
    assert by_task["ifeval"]["host"] == "h1" and by_task["gpqa_diamond"]["host"] == "h2"
    for name, metric in (("ifeval", "prompt_level_strict_acc"), ("gpqa_diamond", "score")):
        rec = by_task[name]
        assert rec["status"] == "succeeded", rec
        assert rec["primary"]["metric"] == metric
        assert 0.0 <= rec["primary"]["score"] <= 1.0
        task_dir = run_dir / rec["host"] / name
        assert (task_dir / "results" / "results.yml").exists()
        assert (task_dir / "logs" / "harness.log").stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {t["task"] for t in summary["tasks"]} == {"ifeval", "gpqa_diamond"}

    # the CLI reads the same run back
    out = subprocess.run([sys.executable, "-m", "evalprov.cli", "results", "--output-dir",
                          str(tmp_path / "out"), "--format", "csv"], capture_output=True,
                         text=True, check=True).stdout
    assert "ifeval,h1,succeeded,prompt_level_strict_acc" in out
    logs = subprocess.run([sys.executable, "-m", "evalprov.cli", "logs", run_dir.name,
                           "--output-dir", str(tmp_path / "out"), "--host", "h2", "--task",
                           "gpqa_diamond"], capture_output=True, text=True, check=True).stdout
    assert "gpqa_diamond" in logs

    # the secret: in no file on the controller, not on the hosts' disks, no container keeps it
    leaked = [p for p in (tmp_path / "out").rglob("*")
              if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert SECRET not in text
    for h in fleet.hosts:
        files = fleet.exec(h.name, ["grep", "-rl", SECRET, "/var/lib/evalprov"],
                           check=False).stdout.decode()
        assert files == ""
        assert SECRET not in fleet.exec(h.name, ["ps", "auxww"]).stdout.decode()
        # task containers are gone (--rm), so no container config keeps the value
        assert fleet.docker(h.name, "ps", "-aq", "--filter",
                            "label=evalprov.managed=eval").stdout.strip() == b""


def test_every_host_runs_every_task_and_a_failing_task_does_not_stop_the_others(
        eval_fleet, tmp_path):
    _fleet, inv, image = eval_fleet
    config = write_config(tmp_path, image, [
        {"name": "ifeval"},
        # a task the harness rejects: fails with its log tail, the other task still runs
        {"name": "gpqa_diamond", "container": image.split("/")[0] + "/evalprov/no-such:1"},
    ], placement="every_host", eval_concurrency=2)
    _, result, _, code, text = run_apply(config, inv, limit="h1:h2")
    assert code == 1
    recs = {(t["host"], t["task"]): t for t in result.tasks}
    assert set(recs) == {(h, t) for h in ("h1", "h2") for t in ("ifeval", "gpqa_diamond")}
    for h in ("h1", "h2"):
        assert recs[(h, "ifeval")]["status"] == "succeeded"
        assert recs[(h, "gpqa_diamond")]["status"] == "failed"
        assert "harness exited" in recs[(h, "gpqa_diamond")]["error"]
    assert "error: h1/gpqa_diamond" in text


def test_missing_task_secret_is_an_error_before_anything_starts(eval_fleet, tmp_path,
                                                                monkeypatch):
    fleet, inv, image = eval_fleet
    monkeypatch.delenv("EVALPROV_TEST_NOT_SET", raising=False)
    config = write_config(tmp_path, image, [
        {"name": "gpqa_diamond", "env_vars": {"HF_TOKEN": "host:EVALPROV_TEST_NOT_SET"}}])
    proc = subprocess.run([sys.executable, "-m", "evalprov.cli", "apply", str(config), "-i",
                           str(inv)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "evaluation.tasks.0 (gpqa_diamond)" in proc.stderr
    assert "EVALPROV_TEST_NOT_SET" in proc.stderr
    assert not (tmp_path / "out").exists()
    for h in fleet.hosts:
        assert fleet.docker(h.name, "ps", "-aq").stdout.strip() == b""


# Lists every process (of the host it runs on) whose argv or environment holds one of the
# values (given hex-encoded, so they are in no argv themselves), and whether it runs in a
# container (a pid namespace other than this one's).
SCAN = """
import json, os, sys
values = [bytes.fromhex(v) for v in sys.argv[2:]]
skip = {int(p) for p in sys.argv[1].split(",") if p}
me = os.readlink("/proc/self/ns/pid")
def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None
skipped = {p: cmdline(p) for p in skip}
out = []
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) in skip:
        continue
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
        ns = os.readlink(f"/proc/{pid}/ns/pid")
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        continue
    # a skipped process's fork before its exec is that same process image
    if ppid in skipped and cmd == skipped[ppid]:
        continue
    argv_hits = [i for i, v in enumerate(values) if v in cmd]
    env_hits = [i for i, v in enumerate(values) if v in env]
    if argv_hits or env_hits:
        out.append({"pid": int(pid), "argv_hits": argv_hits, "env_hits": env_hits,
                    "container": ns != me,
                    "cmd": "<redacted>" if argv_hits else cmd.replace(b"\\0", b" ")
                    .decode(errors="replace")[:160]})
print(json.dumps(out))
"""


def holders(fleet, host: str | None, values: list[str], skip: tuple[int, ...] = ()) -> list:
    """SCAN on a host (None: on the controller, where "container" marks every process in
    another pid namespace: a container, or a fake host)."""
    argv = ["python3", "-c", SCAN, ",".join(map(str, skip)), *(v.encode().hex() for v in values)]
    if host is None:
        return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True,
                                         timeout=60).stdout)
    return json.loads(fleet.exec(host, argv, timeout=60).stdout.decode())


def test_secrets_passed_every_way_and_the_api_key_of_an_opened_api_leave_no_value_anywhere(
        eval_fleet, tmp_path):
    """deployment.host 0.0.0.0 keys the deployment; secrets reach the servers and tasks by a
    bare NAME, host:NAME, lit: with a secret name, and -o ...env_vars.X=lit:VALUE. The
    harness scores with the key (the server refuses requests without it), and no value is in
    any file under the output_dir (ledger, lock, ansible artifacts, results), on the hosts'
    disks, in any process's argv, in the docker CLI's or Ansible's environment, or in any
    container's config (servers included), during the run or after it; the servers' own
    environment, and the root-only file in memory each reads it from, hold the deployment's
    values only."""
    from evalprov import apikey
    from evalprov.apply import output_root, owner_id
    from evalprov.config.loader import load_config as load
    from tests.testbed.util import http_request

    fleet, inv, image = eval_fleet
    tag = secrets.token_hex(6)
    bare, hosted, literal, override = (f"{k}-{tag}-{secrets.token_hex(6)}"
                                       for k in ("bare", "hosted", "literal", "override"))
    task_only = [bare, literal]  # given to tasks only: in no server either
    config = write_config(tmp_path, image, [
        {"name": "ifeval", "env_vars": {"HF_TOKEN": "EVALPROV_TEST_BARE"}},
        {"name": "gpqa_diamond", "env_vars": {"MY_API_TOKEN": f"lit:{literal}"}},
    ], deployment={"host": "0.0.0.0",
                   # each server holds its task's requests until the watcher below has seen
                   # the task's harness container (it then makes the file)
                   "env_vars": {"HF_TOKEN": "host:EVALPROV_TEST_HOSTED",
                                "STANDIN_HOLD_UNTIL": f"lit:{HOLD}"}}, placement="shard")
    xdg = tmp_path / "xdg"
    env = {**os.environ, "XDG_CONFIG_HOME": str(xdg), "EVALPROV_TEST_BARE": bare,
           "EVALPROV_TEST_HOSTED": hosted}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evalprov.cli", "apply", str(config), "-i", str(inv), "-o",
         f"deployment.env_vars.X_SECRET_TOKEN=lit:{override}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    plain = [bare, hosted, literal, override]
    seen: dict[str, list] = {"inspect": [], "argv": [], "env": [], "controller": [],
                             "errors": []}
    stop = threading.Event()

    def look(h) -> None:
        ids = fleet.docker(h.name, "ps", "-q", check=False).stdout.decode().split()
        if ids:
            out = fleet.docker(h.name, "inspect", *ids, check=False).stdout.decode()
            found = json.loads(out or "[]")
            seen["inspect"].extend(found)
            if any(harness_container(c) for c in found):  # seen running: let it go on
                fleet.docker(h.name, "exec", "evalprov-vllm-0", "touch", HOLD, check=False)
        for p in holders(fleet, h.name, plain):
            seen["argv" if p["argv_hits"] else "env"].append((h.name, p))

    def watch() -> None:  # what a user of the hosts could see while the run goes on
        while not stop.is_set():
            try:
                for h in fleet.hosts:
                    look(h)
                seen["controller"].extend(holders(fleet, None, plain, (proc.pid, os.getpid())))
            except Exception as e:  # the test reports it; the watch goes on
                seen["errors"].append(repr(e))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        stop.set()
        watcher.join(timeout=120)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text

    loaded = load(config, (), default_execution="baremetal")
    key = apikey.deployment_key(loaded.config, owner_id(output_root(loaded)), {},
                                xdg / "evalprov" / "secret")
    assert key and stat_mode(xdg / "evalprov" / "secret") == 0o600
    values = [*plain, key]
    for v in values:
        assert v not in text

    # the API is opened and keyed: reachable from the controller, only with the key
    for h in fleet.hosts:
        url = fleet.url(h.name, 8000, "/v1/models")
        assert http_request(url, timeout=10)[0] == 401
        status, _, body = http_request(url, headers={"Authorization": f"Bearer {key}"},
                                       timeout=10)
        assert status == 200 and b"llama" in body
    # the harness sent it: both tasks scored
    summary = json.loads(next((tmp_path / "out").glob("*/summary.json")).read_text())
    assert {t["task"]: t["status"] for t in summary["tasks"]} == {
        "ifeval": "succeeded", "gpqa_diamond": "succeeded"}

    # the watcher saw harness containers: none held a value in its config
    assert seen["errors"] == []
    harness = [c for c in seen["inspect"] if harness_container(c)]
    for task in ("ifeval", "gpqa_diamond"):  # each task's harness, seen while it ran
        assert any(f"evalprov-eval-{task}-" in c["Name"] for c in harness), task
    for c in seen["inspect"]:  # servers too: they read theirs from a file in memory
        blob = json.dumps(c)
        for v in values:
            assert v not in blob, (c["Name"], values.index(v))
    # no process's argv held a value; only processes in containers held one in their
    # environment (the servers, and the harness while it ran), never the docker CLI,
    # Ansible's modules or sshd on the hosts, nor ansible-playbook on the controller
    assert seen["argv"] == []
    assert [p for _, p in seen["env"] if not p["container"]] == []
    # (the controller's own pid namespace: the fake hosts' processes are checked above)
    assert [p for p in seen["controller"] if not p["container"]] == []

    # after the run: no file under the output_dir, no file on the hosts
    leaked = [str(p) for p in (tmp_path / "out").rglob("*")
              if p.is_file() and any(v.encode() in p.read_bytes() for v in values)]
    assert leaked == []
    assert list((tmp_path / "out").glob("*/ansible/artifacts/*"))  # the artifacts were read
    for h in fleet.hosts:
        for v in values:
            # the deployment's values are in one root-only file in memory per server
            # (/run is a tmpfs), which its container mounts; nowhere else, not in dockerd's
            # state on disk
            found = fleet.exec(h.name, ["sh", "-c", f"grep -rlF -- {v} /var/lib/evalprov "
                                        "/tmp /root /run /var/lib/docker 2>/dev/null; true"],
                               timeout=120)
            held = [] if v in task_only else [
                f"/run/evalprov/{c}.secrets.json" for c in fleet.docker(
                    h.name, "ps", "--filter", "label=evalprov.managed=true", "--format",
                    "{{.Names}}").stdout.decode().split()]
            assert sorted(found.stdout.decode().split()) == sorted(held), (
                h.name, values.index(v))
        # ps auxeww: the task-only values are gone with the tasks; the others are held by
        # the servers only (in their containers)
        for p in holders(fleet, h.name, values):
            assert p["container"] and not p["argv_hits"], p
            assert not {values.index(v) for v in task_only} & set(p["env_hits"]), p
        for c in json.loads(fleet.docker(h.name, "inspect", *fleet.docker(
                h.name, "ps", "-aq").stdout.decode().split()).stdout.decode()):
            for v in task_only:
                assert v not in json.dumps(c)
            assert key not in json.dumps(c["Config"]["Cmd"]) + json.dumps(c["Args"])


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _metric(fleet, host: str, port: int, name: str) -> int:
    code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{port}/metrics', timeout=10).read().decode())")
    text = fleet.exec(host, ["python3", "-c", code]).stdout.decode()
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return int(float(line.split()[1]))


def _haproxy_pids(fleet, host: str) -> list[str]:
    out = fleet.exec(host, ["pgrep", "-x", "haproxy"], check=False).stdout.decode()
    return out.split()


def test_two_instances_on_a_host_serve_the_tasks_behind_one_haproxy(eval_fleet, tmp_path):
    """instances_per_host 2: the task calls the host's proxy (real haproxy), its requests
    spread over both instances, the counts come home; a second apply changes nothing and
    destroy stops the proxy too."""
    fleet, inv, image = eval_fleet
    config = write_config(tmp_path, image, [{"name": "ifeval"}], placement="shard",
                          instances_per_host=2)
    plan, result, run_dir, code, text = run_apply(config, inv, limit="h1")
    assert code == 0, text
    (hp,) = [h for h in plan.hosts if h.host == "h1"]
    assert hp.proxy is not None and [t.url for t in hp.tasks] == [
        "http://127.0.0.1:5009/v1/chat/completions"]
    (rec,) = result.tasks
    assert rec["status"] == "succeeded", rec
    # haproxy's counts, as they came home, are the instances' own
    counts = result.proxy_requests["h1"]
    assert set(counts) == {"evalprov-vllm-0", "evalprov-vllm-1"}
    assert all(n > 0 for n in counts.values()), counts  # spread over both
    for inst in hp.instances:
        assert _metric(fleet, "h1", inst.port, "vllm:num_requests_total") == counts[inst.name]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["proxy_requests"] == {"h1": counts}
    assert re.search(r"proxy on h1: \d+ request\(s\) over 2 instance\(s\)", text), text
    assert len(_haproxy_pids(fleet, "h1")) >= 1

    _, again, _, code, text = run_apply(config, inv, limit="h1")
    assert code == 0, text
    assert again.hosts["h1"].changed == 0, text

    proc = subprocess.run([sys.executable, "-m", "evalprov.cli", "destroy", str(config), "-i",
                           str(inv), "--limit", "h1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _haproxy_pids(fleet, "h1") == []
