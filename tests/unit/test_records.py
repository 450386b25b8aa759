"""TaskRecord: the one shape of a task's outcome for the ledger, summary.json and the tables;
summary.json entries are written exactly as before and old files still read."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from evalprov import results
from evalprov.ledger import Ledger
from evalprov.records import TaskRecord
from evalprov.show import status_text

DATA = Path(__file__).resolve().parents[1] / "data" / "harness"

# keys and order of a collected summary.json entry, as evalprov 0.1 wrote them
COLLECTED_KEYS = ["host", "task", "harness", "status", "seconds", "scores", "primary",
                  "samples", "error", "dir", "started"]


def _archive(run: Path, host: str, name: str, rc: int) -> None:
    src = run.parent / "src" / name
    (src / "logs").mkdir(parents=True)
    (src / "logs" / "harness.log").write_text("log\n")
    (src / "evalprov-task.json").write_text(json.dumps({"name": name, "rc": rc, "seconds": 2.5,
                                                        "started": 10.0}))
    if rc == 0:
        (src / "results").mkdir()
        shutil.copy(DATA / f"{name}.results.yml", src / "results" / "results.yml")
    dest = run / "fetch" / host / f"{name}.tar.gz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=name)


def test_collect_returns_summary_dicts_in_the_old_format(tmp_path):
    run = tmp_path / "run"
    _archive(run, "h1", "ifeval", 0)
    recs = results.collect(run, {"h1": [{"name": "ifeval", "harness": "lm-evaluation-harness"}],
                                 "h2": [{"name": "ifeval"}]}, unreachable=set())
    ok, missing = recs
    assert isinstance(ok, dict) and list(ok) == COLLECTED_KEYS
    assert ok["harness"] == "lm-evaluation-harness" and ok["started"] == 10.0
    assert list(missing) == COLLECTED_KEYS[:-1]  # no meta, no started, as before
    assert missing["error"] == "no results came back from the host"
    # a summary written from them reads back to the same records, field for field
    results.write_summary(run, "r1", recs, {"hosts": ["h1", "h2"]})
    summary = results.load_summary(run)
    assert summary["tasks"] == json.loads(json.dumps(recs, default=str))
    back = [TaskRecord.from_dict(d).to_dict() for d in summary["tasks"]]
    assert back == summary["tasks"]


def test_an_old_summary_with_reused_entries_and_unknown_keys_reads_and_round_trips(tmp_path):
    entry = {"host": "h", "task": "ifeval", "status": "succeeded", "seconds": 3.0, "samples": 5,
             "dir": "/o/r0/h/ifeval", "scores": [],
             "primary": {"metric": "acc", "name": "strict", "score": 0.5},
             "reused_from": "r0", "error": None, "future_field": {"x": 1}}
    rec = TaskRecord.from_dict(entry)
    assert (rec.metric, rec.score, rec.reused_from, rec.extra) == (
        "acc.strict", 0.5, "r0", {"future_field": {"x": 1}})
    assert rec.to_dict() == {**entry, "harness": None}
    run = tmp_path / "r1"
    run.mkdir()
    (run / results.SUMMARY).write_text(json.dumps({"run": "r1", "tasks": [entry]}))
    table = results.render(results.load_summary(run), "table").splitlines()
    assert table[1].split()[:5] == ["ifeval", "h", "succeeded", "acc.strict", "0.5000"]


def test_render_and_write_summary_take_task_records_too(tmp_path):
    rec = TaskRecord("h", "t", "failed", error="boom")
    results.write_summary(tmp_path, "r1", [rec], {})
    data = json.loads((tmp_path / results.SUMMARY).read_text())
    assert data["tasks"] == [rec.to_dict()]
    assert json.loads(results.render({"run": "r1", "tasks": [rec]}, "json"))["tasks"][0][
        "error"] == "boom"
    assert "error: h/t: boom" in results.render({"tasks": [rec]}, "table")


def _ledger_row(tmp_path: Path, status: str):
    led = Ledger(tmp_path)
    led.start_run("r0", "c.yaml", None, command="evalprov apply c")
    led.add_attempts("r0", [("h", "ifeval", "k", "i0")])
    led.mark_running("r0", "h")
    led.finish_task("r0", {"host": "h", "task": "ifeval", "status": status, "seconds": 3.0,
                           "samples": 5, "dir": "/o/r0/h/ifeval",
                           "primary": {"metric": "acc", "name": "strict", "score": 0.5}
                           if status == "succeeded" else None,
                           "error": None if status == "succeeded" else "harness exited 1"})
    return led, led.latest("h", "ifeval", "k")


def test_from_row_reads_a_ledger_row(tmp_path):
    led, row = _ledger_row(tmp_path, "succeeded")
    try:
        rec = TaskRecord.from_row(row)
        assert (rec.host, rec.task, rec.status, rec.attempt, rec.run_id, rec.key, rec.instance,
                rec.seconds, rec.samples, rec.dir) == (
            "h", "ifeval", "succeeded", 1, "r0", "k", "i0", 3.0, 5, "/o/r0/h/ifeval")
        assert rec.primary == {"metric": "acc", "name": "strict", "score": 0.5}
        assert rec.started is not None and rec.finished is not None
        assert TaskRecord.from_row(dict(row)) == rec
        assert led.task_records("r0") == [rec]
        text = status_text(led.run(None), led.deployments_of("r0"), led.task_records("r0"))
        assert status_text(led.run(None), [], led.tasks_of("r0")).splitlines()[-1] == \
            text.splitlines()[-1]
        assert text.splitlines()[-1].split()[:4] == ["h", "ifeval", "succeeded", "1"]
        assert "0.5000" in text.splitlines()[-1]
    finally:
        led.close()


def test_reused_is_the_record_apply_carries_over(tmp_path):
    """TaskRecord.reused(row) builds what apply.reused_record(row) builds today."""
    led, row = _ledger_row(tmp_path / "ok", "succeeded")
    led.close()
    assert TaskRecord.reused(row).to_dict() == {
        "host": "h", "task": "ifeval", "harness": None, "status": "succeeded", "seconds": 3.0,
        "samples": 5, "dir": "/o/r0/h/ifeval", "scores": [],
        "primary": {"metric": "acc", "name": "strict", "score": 0.5}, "reused_from": "r0",
        "error": None}
    led, row = _ledger_row(tmp_path / "bad", "failed")
    led.close()
    rec = TaskRecord.reused(row)
    assert rec.primary is None and rec.status == "failed"
    assert rec.error == ("failed in run r0 (attempt 1): harness exited 1; rerun it with "
                         "--rerun failed")
