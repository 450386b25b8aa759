"""Results on the controller: unpack what each host sent, read the scores, write
`<run>/summary.json`, and show a run as a table (or json/csv/markdown).

Layout: `<output_dir>/<run>/<host>/<task>/{run_config.yml, results/, logs/harness.log,
evalprov-task.json}`. Every write is atomic (a temp file or dir, then a rename)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from evalprov.errors import EvalprovError
from evalprov.harness import read_scores
from evalprov.records import TaskRecord, as_record

SUMMARY = "summary.json"
TASK_META = "evalprov-task.json"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def unpack(archive: Path, dest: Path) -> Path:
    """Extract one task's archive into dest (the task dir), replacing it whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        inner = [p for p in tmp.iterdir()]
        src = inner[0] if len(inner) == 1 and inner[0].is_dir() else tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(src, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_task(host: str, task: dict[str, Any], task_dir: Path | None) -> TaskRecord:
    """One (host, task) of the run: status, timing, scores, the log tail of a failure."""
    rec = TaskRecord(host=host, task=task["name"], harness=task.get("harness"),
                     dir=str(task_dir) if task_dir else None)
    if task_dir is None or not (task_dir / TASK_META).exists():
        rec.error = "no results came back from the host"
        return rec
    meta = json.loads((task_dir / TASK_META).read_text())
    rec.seconds = meta.get("seconds")
    rec.started = meta.get("started")
    results_yml = next(iter(sorted((task_dir / "results").rglob("results.yml"))), None)
    if meta.get("rc") != 0:
        rec.status = "failed"
        log = task_dir / "logs" / "harness.log"
        tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
        rec.error = f"harness exited {meta.get('rc')}: " + " | ".join(tail)[-2000:]
        if meta.get("server_lost"):  # the cause first: the harness only saw its effects
            rec.error = f"{meta['server_lost']}; {rec.error}"
        return rec
    if results_yml is None:
        rec.status = "failed"
        rec.error = "the harness exited 0 but wrote no results.yml"
        return rec
    scores = read_scores(results_yml)
    rec.scores = scores
    rec.primary = next((s for s in scores if s["primary"]), None)
    rec.samples = (rec.primary or {}).get("samples") or _samples(task_dir)
    rec.status = "succeeded" if scores else "failed"
    if not scores:
        rec.error = f"no scores in {results_yml}"
    return rec


def task_record(host: str, task: dict[str, Any], task_dir: Path | None) -> dict[str, Any]:
    """read_task as its summary.json entry."""
    return read_task(host, task, task_dir).to_dict()


def _samples(task_dir: Path) -> int | None:
    for path in (task_dir / "results").rglob("eval_factory_metrics.json"):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        count = (data.get("response_stats") or {}).get("successful_count")
        if isinstance(count, int):
            return count
    return None


def collect_records(run_dir: Path, tasks_by_host: dict[str, list[dict[str, Any]]],
                    unreachable: set[str]) -> list[TaskRecord]:
    """Unpack the fetched archives into the run's layout and read every planned task."""
    fetch = run_dir / "fetch"
    records = []
    for host, tasks in tasks_by_host.items():
        for task in tasks:
            safe = task.get("slug") or re.sub(r"[^A-Za-z0-9_.-]", "_", task["name"])
            archive = fetch / host / f"{safe}.tar.gz"
            task_dir = None
            if archive.exists():
                task_dir = unpack(archive, run_dir / host / safe)
                archive.unlink()
            rec = read_task(host, task, task_dir)
            if rec.status == "missing" and host in unreachable:
                rec.error = "host unreachable"
            records.append(rec)
    shutil.rmtree(fetch, ignore_errors=True)
    return records


def collect(run_dir: Path, tasks_by_host: dict[str, list[dict[str, Any]]],
            unreachable: set[str]) -> list[dict[str, Any]]:
    """collect_records as summary.json entries (the dicts apply passes on)."""
    return [r.to_dict() for r in collect_records(run_dir, tasks_by_host, unreachable)]


def _entries(records: list[TaskRecord | dict[str, Any]]) -> list[dict[str, Any]]:
    """summary.json entries; a dict is written as it is."""
    return [r.to_dict() if isinstance(r, TaskRecord) else r for r in records]


def write_summary(run_dir: Path, run_id: str, records: list[TaskRecord | dict[str, Any]],
                  extra: dict[str, Any]) -> Path:
    summary = {"run": run_id, **extra, "tasks": _entries(records)}
    path = run_dir / SUMMARY
    write_atomic(path, json.dumps(summary, indent=2, default=str))
    return path


# --------------------------------------------------------------------------- reading runs


def find_run(output_dir: Path, run: str | None) -> Path:
    """A run dir: a path, a run id under output_dir, or (None) the newest run there."""
    if run and Path(run).is_dir() and (Path(run) / SUMMARY).exists():
        return Path(run)
    if not output_dir.is_dir():
        raise EvalprovError(f"--output-dir: {str(output_dir)!r} does not exist; give the "
                            "output_dir of your config")
    runs = sorted(p for p in output_dir.iterdir() if (p / SUMMARY).exists())
    if run:
        hits = [p for p in runs if p.name == run or p.name.startswith(run)]
        if len(hits) != 1:
            known = ", ".join(p.name for p in runs[-5:]) or "none"
            raise EvalprovError(f"run {run!r}: {'no' if not hits else 'more than one'} run of "
                                f"that name in {output_dir}; recent runs: {known}")
        return hits[0]
    if not runs:
        raise EvalprovError(f"--output-dir: no runs with results in {output_dir}; run "
                            "`evalprov apply` first")
    return runs[-1]


def _broken(path: Path, why: str) -> EvalprovError:
    return EvalprovError(
        f"{path}: not a readable evalprov summary ({why}); move it aside (e.g. `mv {path} "
        f"{path}.broken`): `evalprov status {path.parent.name}` still shows the run from the "
        "ledger, and the next `evalprov apply` writes a new summary")


def load_summary(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json, checked: a damaged one is one line naming the file and the fix."""
    path = run_dir / SUMMARY
    try:
        data = json.loads(path.read_bytes().decode())
    except OSError as exc:
        raise _broken(path, exc.strerror or str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise _broken(path, f"not UTF-8 text at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise _broken(path, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                      ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise _broken(path, "no list of tasks")
    if not isinstance(data.get("run"), str):
        raise _broken(path, "no run id")
    for i, rec in enumerate(data["tasks"]):
        if not (isinstance(rec, dict) and isinstance(rec.get("host"), str)
                and isinstance(rec.get("task"), str) and isinstance(rec.get("status"), str)):
            raise _broken(path, f"task entry {i} has no host, task and status")
        if rec.get("primary") is not None and not isinstance(rec["primary"], dict):
            raise _broken(path, f"task entry {i} has a primary score that is not a mapping")
    return data


def records(summary: dict[str, Any]) -> list[TaskRecord]:
    return [as_record(rec) for rec in summary["tasks"]]


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"task": r.task, "host": r.host, "status": r.status, "metric": r.metric or "",
             "score": r.score, "samples": r.samples, "seconds": r.seconds,
             "gpu_hours": r.extra.get("gpu_hours"), "error": r.error or ""}
            for r in records(summary)]


def usage_line(summary: dict[str, Any]) -> str:
    """The run's GPU-hours (GPUs held x the run's wall time), when the summary has them."""
    use = summary.get("usage")
    if not isinstance(use, dict):
        return ""
    total = use.get("gpu_hours")
    if total is None:
        return "gpu-hours: unknown (the ledger has no GPU count for some instance)"
    return (f"gpu-hours: {total:.4f} ({use.get('gpus')} GPU(s) held for "
            f"{float(use.get('seconds') or 0):.1f} s)")


def text_table(cols: list[str], table: list[list[str]], fmt: str) -> str:
    """Rows of text cells as a Markdown table (fmt md) or aligned columns (table)."""
    if fmt == "md":
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c)
              for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)


def render(summary: dict[str, Any], fmt: str) -> str:
    data = rows(summary)
    cols = ["task", "host", "status", "metric", "score", "samples", "seconds", "gpu_hours"]
    if fmt == "json":
        return json.dumps({**summary, "tasks": _entries(summary["tasks"])}, indent=2,
                          default=str)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[*cols, "error"], lineterminator="\n")
        w.writeheader()
        w.writerows(data)
        return buf.getvalue().rstrip("\n")

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    table = [[cell(r[c]) for c in cols] for r in data]
    if fmt == "md":
        return text_table(cols, table, "md")
    lines = [text_table(cols, table, "table")]
    for r in data:
        if r["error"]:
            lines.append(f"error: {r['host']}/{r['task']}: {r['error'][:300]}")
    if usage_line(summary):
        lines.append(usage_line(summary))
    return "\n".join(lines)


def _logs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*/*/logs/harness.log"))


def _matching(logs: list[Path], host: str | None, task: str | None) -> list[Path]:
    return [p for p in logs if host in (None, p.parent.parent.parent.name)
            and task in (None, p.parent.parent.name)]


def _what(host: str | None, task: str | None) -> str:
    return f"host {host or '*'} task {task or '*'}"


def task_log(run_dir: Path, host: str | None, task: str | None) -> list[Path]:
    logs = _logs(run_dir)
    found = _matching(logs, host, task)
    if not found:
        have = ", ".join(f"{p.parent.parent.parent.name}/{p.parent.parent.name}" for p in logs)
        raise EvalprovError(f"logs: no task log for {_what(host, task)} in {run_dir}; have: "
                            f"{have or 'none'}")
    return found


def find_log_run(output_dir: Path, host: str | None, task: str | None
                 ) -> tuple[Path, list[Path], list[str]]:
    """The newest run under output_dir that ran this host/task (has its harness log): a run
    that reused every task from an earlier one (a no-op apply) ran nothing and has no log.
    Returns the run dir, its matching logs, and the newer runs passed over."""
    if not output_dir.is_dir():
        raise EvalprovError(f"--output-dir: {str(output_dir)!r} does not exist; give the "
                            "output_dir of your config")
    runs = sorted((p for p in output_dir.iterdir() if p.is_dir()
                   and ((p / SUMMARY).exists() or _logs(p))), reverse=True)
    if not runs:
        raise EvalprovError(f"--output-dir: no runs with results in {output_dir}; run "
                            "`evalprov apply` first")
    for i, run_dir in enumerate(runs):
        found = _matching(_logs(run_dir), host, task)
        if found:
            return run_dir, found, [p.name for p in runs[:i]]
    recent = ", ".join(p.name for p in runs[:5])
    raise EvalprovError(f"logs: no run in {output_dir} has a task log for {_what(host, task)} "
                        f"(runs: {recent}); check --host/--task with `evalprov status`")
