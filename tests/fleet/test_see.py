"""See the run on the fleet: the reproducibility record's image digest is what `docker image
inspect` says on the host, its vLLM version is what the server reports, its harness
versions are the eval image's; GPU-hours are the ledger's timings times the planned GPUs;
every host that ran a task has its timeline (probe, pull, start, healthy, eval, fetch); the
report is written from the run. Real sshd/dockerd hosts, the stand-in vLLM image from the
fleet's registry and the real harness image (tests/testbed)."""

from __future__ import annotations

import json
import re

import pytest

from evalprov import report, results
from evalprov.ledger import Ledger
from tests.fleet.test_eval import (  # noqa: F401
    eval_fleet,
    remove_managed,
    run_apply,
    write_config,
)
from tests.testbed import STANDIN_IMAGE

pytestmark = pytest.mark.fleet


def test_the_record_matches_the_hosts_and_gpu_hours_the_ledger(eval_fleet, tmp_path):  # noqa: F811
    fleet, inv, image = eval_fleet
    # hosts that never had the server image: the timeline has a pull (the fleet is shared
    # with the tests before this one)
    remove_managed(fleet)
    for h in fleet.hosts:
        fleet.docker(h.name, "rmi", "-f", STANDIN_IMAGE, check=False)
    config = write_config(tmp_path, image, [{"name": "ifeval"}, {"name": "gpqa_diamond"}],
                          placement="shard")
    plan, _result, run_dir, code, text = run_apply(config, inv)
    assert code == 0, text
    summary = results.load_summary(run_dir)
    rec = summary["record"]
    ran = sorted({t["host"] for t in summary["tasks"]})
    assert ran, summary["tasks"]
    # the pull was followed in bytes: its last look counted every layer of the image, and
    # every byte of those it downloaded (the looks before it are the live view's updates)
    pulled = {}
    for path in run_dir.glob("ansible/artifacts/*/job_events/*.json"):
        event = json.loads(path.read_text())
        data = event.get("event_data") or {}
        if event.get("event") == "runner_on_ok" and str(data.get("task", "")).startswith(
                "Image | Follow the pull"):
            pulled[data["host"]] = data["res"]["evalprov_pull_progress"]
    assert set(pulled) == {h.name for h in fleet.hosts}, pulled
    for host, look in pulled.items():
        inspect = json.loads(fleet.docker(host, "image", "inspect", STANDIN_IMAGE).stdout)[0]
        assert look["layers"] == len(inspect["RootFS"]["Layers"]), look
        assert look["layers_done"] == look["layers"], look
        assert look["done_bytes"] == look["total_bytes"], look
        assert 0 < look["total_bytes"] <= inspect["Size"], look  # compressed <= unpacked
    for host in ran:
        inspect = json.loads(fleet.docker(host, "image", "inspect", STANDIN_IMAGE).stdout)[0]
        got = rec["hosts"][host]["image"]
        assert got["id"] == inspect["Id"]
        assert got["repo_digests"] == sorted(inspect["RepoDigests"])
        assert rec["hosts"][host]["vllm_version"] == "0.0.0+evalprov.standin"
        harness = rec["hosts"][host]["harness"][image]
        assert harness["versions"]["nemo-evaluator"] == "0.2.8", harness
        assert rec["hosts"][host]["model"]["kind"] == "hf"
        assert rec["hosts"][host]["model"]["id"] == "meta-llama/Llama-3.1-8B"
    assert rec["config"]["deployment"]["image"] == STANDIN_IMAGE
    # GPU-hours: the ledger's wall time x the planned GPUs; each task: its seconds x its GPUs
    with Ledger(run_dir.parent) as led:
        run = led.run(summary["run"])
        wall = run["finished"] - run["started"]
        phases = led.phases_of(summary["run"])
        tasks = {(t["host"], t["task"]): t for t in led.tasks_of(summary["run"])}
    planned = sum(len(i.gpus) for i in plan.instances)
    assert summary["usage"]["gpus"] == planned
    assert summary["usage"]["gpu_hours"] == pytest.approx(planned * wall / 3600, abs=1e-6)
    per_instance = {(i.host, i.name): len(i.gpus) for i in plan.instances}
    for entry in summary["tasks"]:
        row = tasks[(entry["host"], entry["task"])]
        want = per_instance[(row["host"], row["instance"])] * row["seconds"] / 3600
        assert entry["gpu_hours"] == pytest.approx(want, abs=1e-6)
    for host in ran:
        mine = {p["phase"]: p for p in phases if p["host"] == host}
        assert {"probe", "pull", "start", "healthy", "eval", "fetch"} <= set(mine), mine
        assert all(p["finished"] >= p["started"] for p in mine.values())
        assert mine["probe"]["started"] <= mine["eval"]["started"] <= mine["fetch"]["started"]
    page = report.write_report(run_dir).read_text()
    for host in ran:
        assert re.search(rf'data-host="{host}" data-kind="eval"', page)
