"""The evaluation side of the plan (run configs, NEL's merge order) and the controller's
results handling (unpack, scores, summary, tables), without hosts."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from evalprov import results
from evalprov.errors import EvalprovError, PlanError
from evalprov.plan import HostFacts, plan

DATA = Path(__file__).resolve().parents[1] / "data" / "harness"


def test_run_config_merges_evaluation_then_task_settings(make_config, vllm_user):
    user = vllm_user(tasks=[
        {"name": "ifeval", "nemo_evaluator_config": {"config": {"params": {"limit_samples": 2}}}},
        {"name": "gpqa_diamond"},
    ])
    user["evaluation"]["nemo_evaluator_config"] = {
        "config": {"params": {"limit_samples": 5, "max_new_tokens": 64, "parallelism": 2}}}
    runs = plan(make_config(user), [HostFacts("h", 1)]).task_runs
    ifeval, gpqa = (r.run_config for r in runs)
    assert ifeval["config"]["params"] == {"limit_samples": 2, "max_new_tokens": 64,
                                          "parallelism": 2}
    assert gpqa["config"]["params"]["limit_samples"] == 5
    assert ifeval["config"]["type"] == "lm-evaluation-harness.ifeval"
    assert gpqa["target"]["api_endpoint"] == {
        "url": "http://127.0.0.1:8000/v1/chat/completions", "model_id": "model", "type": "chat"}


def test_unknown_harness_param_is_a_plan_error_naming_the_task(make_config, vllm_user):
    user = vllm_user(tasks=[{"name": "ifeval", "nemo_evaluator_config": {
        "config": {"params": {"limit_sample": 2}}}}])
    with pytest.raises(PlanError) as err:
        plan(make_config(user), [HostFacts("h", 1)])
    assert "task ifeval" in str(err.value) and "limit_sample" in str(err.value)


def test_dataset_dir_is_mounted_read_only(make_config, vllm_user):
    user = vllm_user(tasks=[{"name": "ifeval", "dataset_dir": "/data/ifeval"}])
    (run,) = plan(make_config(user), [HostFacts("h", 1)]).task_runs
    assert run.volumes == ("/data/ifeval:/datasets:ro",)


def _archive(tmp_path: Path, name: str, rc: int, with_results: bool) -> Path:
    src = tmp_path / "src" / name
    (src / "logs").mkdir(parents=True)
    (src / "logs" / "harness.log").write_text("line 1\nboom: the harness failed\n")
    (src / "evalprov-task.json").write_text(json.dumps({"name": name, "rc": rc,
                                                        "seconds": 3.5, "started": 1.0}))
    if with_results:
        (src / "results").mkdir()
        shutil.copy(DATA / f"{name}.results.yml", src / "results" / "results.yml")
    dest = tmp_path / "run" / "fetch" / "h1" / f"{name}.tar.gz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=name)
    return dest


def test_collect_unpacks_scores_failures_and_missing_hosts(tmp_path):
    _archive(tmp_path, "ifeval", 0, True)
    _archive(tmp_path, "gpqa_diamond", 1, False)
    run = tmp_path / "run"
    recs = results.collect(run, {"h1": [{"name": "ifeval"}, {"name": "gpqa_diamond"}],
                                 "h2": [{"name": "ifeval"}]}, unreachable={"h2"})
    by = {(r["host"], r["task"]): r for r in recs}
    ok = by[("h1", "ifeval")]
    assert ok["status"] == "succeeded" and ok["seconds"] == 3.5
    assert ok["primary"]["metric"] == "prompt_level_strict_acc"
    assert (run / "h1" / "ifeval" / "results" / "results.yml").exists()
    bad = by[("h1", "gpqa_diamond")]
    assert bad["status"] == "failed" and "boom: the harness failed" in bad["error"]
    assert by[("h2", "ifeval")]["status"] == "missing"
    assert by[("h2", "ifeval")]["error"] == "host unreachable"
    assert not (run / "fetch").exists()

    results.write_summary(run, "r1", recs, {"hosts": ["h1", "h2"]})
    summary = results.load_summary(results.find_run(tmp_path, "r"))  # prefix
    table = results.render(summary, "table")
    assert table.splitlines()[0].split() == ["task", "host", "status", "metric", "score",
                                             "samples", "seconds", "gpu_hours"]
    assert "error: h1/gpqa_diamond" in table
    csv = results.render(summary, "csv").splitlines()
    assert csv[1].startswith("ifeval,h1,succeeded,prompt_level_strict_acc.")
    md = results.render(summary, "md").splitlines()
    assert md[0].startswith("| task | host |") and len(md) == 2 + len(recs)
    assert json.loads(results.render(summary, "json"))["run"] == "r1"
    assert [p.parent.parent.name for p in results.task_log(run, "h1", None)] == [
        "gpqa_diamond", "ifeval"]


def test_find_run_errors_are_one_line(tmp_path):
    with pytest.raises(EvalprovError, match="does not exist"):
        results.find_run(tmp_path / "nope", None)
    with pytest.raises(EvalprovError, match="no runs with results"):
        results.find_run(tmp_path, None)
