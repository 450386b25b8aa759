"""Evaluation through `evalprov apply` on the fleet: the REAL harness (nvidia-lm-eval,
nvidia-simple-evals, nemo-evaluator in a test image pushed to the fleet's registry) runs
ifeval and gpqa_diamond against the stand-in vLLM server; results land on the controller."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evalprov import apply
from evalprov.config.loader import load_config
from evalprov.hosts import host_facts
from tests.testbed import STANDIN_IMAGE

pytestmark = pytest.mark.fleet

SECRET = "hf_evalprov_task_secret_93b7d2"  # grepped for in every file evalprov writes
PARAMS = {"config": {"params": {"limit_samples": 3, "max_new_tokens": 32, "parallelism": 2}}}


@pytest.fixture
def eval_fleet(fleet_factory, standin_image, tmp_path):
    from tests.testbed.eval_image import ensure_eval_image

    fleet = fleet_factory((2, 2, 2), docker=True)
    image = ensure_eval_image(fleet)
    inv = fleet.write_inventory(tmp_path / "inventory.yml")
    yield fleet, inv, image
    for h in fleet.hosts:
        names = fleet.docker(h.name, "ps", "-aq", "--filter", "label=evalprov.managed",
                             check=False).stdout.decode().split()
        if names:
            fleet.docker(h.name, "rm", "-f", *names, check=False)


def write_config(tmp_path: Path, image: str, tasks: list[dict], **execution) -> Path:
    cfg = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "vllm"}, "_self_"],
        "execution": {"output_dir": str(tmp_path / "out"), "health_check_timeout": 60,
                      **execution},
        "deployment": {"image": STANDIN_IMAGE, "hf_model_handle": "meta-llama/Llama-3.1-8B",
                       "served_model_name": "llama", "tensor_parallel_size": 1},
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


def test_real_harness_scores_come_home_and_secrets_stay_out(eval_fleet, tmp_path, monkeypatch):
    fleet, inv, image = eval_fleet
    monkeypatch.setenv("EVALPROV_TEST_GPQA_TOKEN", SECRET)
    config = write_config(tmp_path, image, [
        {"name": "ifeval"},
        {"name": "gpqa_diamond", "env_vars": {"HF_TOKEN": "EVALPROV_TEST_GPQA_TOKEN"}},
    ], placement="shard")
    _plan, result, run_dir, code, text = run_apply(config, inv)
    assert code == 0, text
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
