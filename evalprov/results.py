"""Results on the controller: unpack what each host sent, read the scores, write
`<run>/summary.json`, and show a run as a table (or json/csv/markdown).

Layout: `<output_dir>/<run>/<host>/<task>/{run_config.yml, results/, logs/harness.log,
evalprov-task.json}`. Every write is atomic (a temp file or dir, then a rename)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from evalprov.errors import EvalprovError
from evalprov.harness import read_scores

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


def task_record(host: str, task: dict[str, Any], task_dir: Path | None) -> dict[str, Any]:
    """One (host, task) of the run: status, timing, scores, the log tail of a failure."""
    rec: dict[str, Any] = {
        "host": host, "task": task["name"], "harness": task.get("harness"),
        "status": "missing", "seconds": None, "scores": [], "primary": None,
        "samples": None, "error": None, "dir": str(task_dir) if task_dir else None,
    }
    if task_dir is None or not (task_dir / TASK_META).exists():
        rec["error"] = "no results came back from the host"
        return rec
    meta = json.loads((task_dir / TASK_META).read_text())
    rec["seconds"] = meta.get("seconds")
    rec["started"] = meta.get("started")
    results_yml = next(iter(sorted((task_dir / "results").rglob("results.yml"))), None)
    if meta.get("rc") != 0:
        rec["status"] = "failed"
        log = task_dir / "logs" / "harness.log"
        tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
        rec["error"] = f"harness exited {meta.get('rc')}: " + " | ".join(tail)[-2000:]
        return rec
    if results_yml is None:
        rec["status"] = "failed"
        rec["error"] = "the harness exited 0 but wrote no results.yml"
        return rec
    scores = read_scores(results_yml)
    rec["scores"] = scores
    primary = next((s for s in scores if s["primary"]), None)
    rec["primary"] = primary
    rec["samples"] = (primary or {}).get("samples") or _samples(task_dir)
    rec["status"] = "succeeded" if scores else "failed"
    if not scores:
        rec["error"] = f"no scores in {results_yml}"
    return rec


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


def collect(run_dir: Path, tasks_by_host: dict[str, list[dict[str, Any]]],
            unreachable: set[str]) -> list[dict[str, Any]]:
    """Unpack the fetched archives into the run's layout and read every planned task."""
    fetch = run_dir / "fetch"
    records = []
    for host, tasks in tasks_by_host.items():
        for task in tasks:
            safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in task["name"])
            archive = fetch / host / f"{safe}.tar.gz"
            task_dir = None
            if archive.exists():
                task_dir = unpack(archive, run_dir / host / safe)
                archive.unlink()
            rec = task_record(host, task, task_dir)
            if rec["status"] == "missing" and host in unreachable:
                rec["error"] = "host unreachable"
            records.append(rec)
    shutil.rmtree(fetch, ignore_errors=True)
    return records


def write_summary(run_dir: Path, run_id: str, records: list[dict[str, Any]],
                  extra: dict[str, Any]) -> Path:
    summary = {"run": run_id, **extra, "tasks": records}
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


def load_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / SUMMARY).read_text())


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for rec in summary["tasks"]:
        primary = rec.get("primary") or {}
        out.append({
            "task": rec["task"], "host": rec["host"], "status": rec["status"],
            "metric": f"{primary.get('metric')}.{primary.get('name')}" if primary else "",
            "score": primary.get("score"), "samples": rec.get("samples"),
            "seconds": rec.get("seconds"), "error": rec.get("error") or "",
        })
    return out


def render(summary: dict[str, Any], fmt: str) -> str:
    data = rows(summary)
    cols = ["task", "host", "status", "metric", "score", "samples", "seconds"]
    if fmt == "json":
        return json.dumps(summary, indent=2, default=str)
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
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c)
              for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in table]
    for r in data:
        if r["error"]:
            lines.append(f"error: {r['host']}/{r['task']}: {r['error'][:300]}")
    return "\n".join(lines)


def task_log(run_dir: Path, host: str | None, task: str | None) -> list[Path]:
    logs = sorted(run_dir.glob("*/*/logs/harness.log"))
    found = [p for p in logs if (host in (None, p.parent.parent.parent.name))
             and (task in (None, p.parent.parent.name))]
    if not found:
        have = ", ".join(f"{p.parent.parent.parent.name}/{p.parent.parent.name}" for p in logs)
        raise EvalprovError(f"logs: no task log for host {host or '*'} task {task or '*'} in "
                            f"{run_dir}; have: {have or 'none'}")
    return found
