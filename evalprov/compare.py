"""`evalprov compare`: the scores of several runs side by side, each later run's delta
against the first (the baseline), as a table, JSON, CSV or markdown.

A row is one task and metric (and host, when some run has a task on several hosts: an
every_host run compares host by host). By default the primary score of each task; with
every_metric, every score the harness wrote."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from evalprov.records import TaskRecord
from evalprov.results import records, text_table


def _scores(rec: TaskRecord, every_metric: bool) -> list[tuple[str, float]]:
    if not rec.succeeded:
        return []
    if every_metric and rec.scores:
        return [(f"{s.get('metric')}.{s.get('name')}", float(s["score"])) for s in rec.scores
                if isinstance(s, dict) and isinstance(s.get("score"), int | float)]
    return [(rec.metric, float(rec.score))] if rec.metric and rec.score is not None else []


def table(summaries: list[dict[str, Any]], every_metric: bool = False) -> dict[str, Any]:
    """{"runs": [ids], "by_host": bool, "rows": [{task, host, metric, scores: [...],
    deltas: [...]}]}: scores[i] is run i's (None: not in it), deltas[i] = scores[i] -
    scores[0] (None where either is missing; deltas[0] is None)."""
    runs = [s["run"] for s in summaries]
    recs = [records(s) for s in summaries]
    by_host = any(len({r.host for r in rs if r.task == t}) > 1
                  for rs in recs for t in {r.task for r in rs})
    cells: dict[tuple[str, str, str], list[float | None]] = {}
    for i, rs in enumerate(recs):
        for r in rs:
            for metric, score in _scores(r, every_metric):
                key = (r.task, r.host if by_host else "", metric)
                cells.setdefault(key, [None] * len(runs))[i] = score
    rows = []
    for (task, host, metric), scores in sorted(cells.items()):
        base = scores[0]
        deltas = [None if i == 0 or s is None or base is None else round(s - base, 10)
                  for i, s in enumerate(scores)]
        rows.append({"task": task, "host": host or None, "metric": metric,
                     "scores": scores, "deltas": deltas})
    return {"runs": runs, "by_host": by_host, "rows": rows}


def _columns(data: dict[str, Any]) -> list[str]:
    cols = ["task", *(["host"] if data["by_host"] else []), "metric"]
    for i, run in enumerate(data["runs"]):
        cols.append(run)
        if i:
            cols.append(f"delta {run}")
    return cols


def _flat(data: dict[str, Any]) -> list[list[Any]]:
    out = []
    for row in data["rows"]:
        line: list[Any] = [row["task"], *([row["host"]] if data["by_host"] else []),
                           row["metric"]]
        for i, score in enumerate(row["scores"]):
            line.append(score)
            if i:
                line.append(row["deltas"][i])
        out.append(line)
    return out


def _cell(v: Any, delta: bool = False) -> str:
    if v is None:
        return "-" if not delta else ""
    if isinstance(v, float):
        return f"{v:+.4f}" if delta else f"{v:.4f}"
    return str(v)


def render(data: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2)
    cols = _columns(data)
    flat = _flat(data)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        w.writerows([["" if v is None else v for v in row] for row in flat])
        return buf.getvalue().rstrip("\n")
    is_delta = [c.startswith("delta ") for c in cols]
    text = [[_cell(v, d) for v, d in zip(row, is_delta, strict=True)] for row in flat]
    if fmt == "md":
        return text_table(cols, text, "md")
    lines = [text_table(cols, text, "table")]
    if not text:
        lines.append("(no scores in these runs)")
    return "\n".join(lines)
