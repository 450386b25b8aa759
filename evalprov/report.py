"""`evalprov report`: one self-contained HTML file for a run — each host's timeline (probe,
pull, start, healthy, each task, fetch), the scores table, a chart of the scores per task
(per host too when a task ran on several hosts), the failures with their log tails, GPU-hours
and the reproducibility record.

Self-contained: inline CSS and inline SVG, no script, no font, no image, nothing fetched.
Every value is escaped by Jinja2's autoescape (config values, task names and log lines are
hostile data); the numbers placed in SVG attributes are computed here as floats."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jinja2

from evalprov.results import SUMMARY, load_summary, records
from evalprov.timeline import ORDER

LOG_TAIL = 40
WIDTH = 900  # the SVG's drawing width
LANE = 22  # one timeline row
LABEL = 170  # room for the row labels
COLORS = {"probe": "#9aa5b1", "queue": "#cfd8dc", "pull": "#6c8ebf", "install": "#8e7cc3",
          "start": "#e69138",
          "healthy": "#f1c232", "samples": "#b4a7d6", "eval": "#93c47d", "fetch": "#76a5af",
          "task": "#38761d", "failed": "#cc0000"}


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def timeline_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per host phase and per task, with start and end (epoch seconds)."""
    rows = []
    for p in summary.get("timeline") or []:
        if p.get("started") is None or p.get("finished") is None:
            continue
        rows.append({"host": p["host"], "label": p["phase"], "kind": p["phase"],
                     "start": float(p["started"]), "end": float(p["finished"]),
                     "status": p.get("status") or "ok"})
    for r in records(summary):
        if r.reused_from or r.started is None or r.seconds is None:
            continue
        rows.append({"host": r.host, "label": f"task {r.task}", "kind": "task",
                     "start": float(r.started), "end": float(r.started) + float(r.seconds),
                     "status": "ok" if r.succeeded else "failed", "task": r.task})
    order = {k: i for i, k in enumerate(ORDER)}
    rows.sort(key=lambda x: (x["host"], x["start"], order.get(x["kind"], len(order))))
    return rows


def timeline_svg(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Geometry of the timeline: one lane per row, bars scaled to the run's span."""
    if not rows:
        return {"bars": [], "height": 0, "span": 0.0, "ticks": []}
    t0 = min(r["start"] for r in rows)
    t1 = max(r["end"] for r in rows)
    span = max(t1 - t0, 1e-6)
    scale = (WIDTH - LABEL - 10) / span
    bars = []
    for i, r in enumerate(rows):
        x = LABEL + (r["start"] - t0) * scale
        w = max((r["end"] - r["start"]) * scale, 1.0)
        color = COLORS["failed"] if r["status"] != "ok" else COLORS.get(r["kind"], "#999")
        bars.append({**r, "x": round(x, 2), "y": 20 + i * LANE, "w": round(w, 2),
                     "color": color, "seconds": round(r["end"] - r["start"], 2),
                     "offset": round(r["start"] - t0, 2)})
    ticks = [{"x": round(LABEL + f * (WIDTH - LABEL - 10), 2), "label": f"{f * span:.1f}s",
              "anchor": "end" if f == 1.0 else "middle"} for f in (0, 0.25, 0.5, 0.75, 1.0)]
    return {"bars": bars, "height": 30 + len(rows) * LANE, "span": round(span, 2),
            "ticks": ticks}


def chart_svg(summary: dict[str, Any]) -> dict[str, Any]:
    """Bars of the primary score per task; one bar per host where a task ran on several."""
    scored = [r for r in records(summary) if r.score is not None]
    tasks = sorted({r.task for r in scored})
    hosts = sorted({r.host for r in scored})
    per_task_hosts = {t: sorted(r.host for r in scored if r.task == t) for t in tasks}
    grouped = any(len(h) > 1 for h in per_task_hosts.values())
    top = max([1.0, *(float(r.score) for r in scored)])
    height, base, bw, gap = 260, 220, 26, 24
    bars, labels, x = [], [], 50.0
    palette = ["#3c78d8", "#e69138", "#6aa84f", "#a64d79", "#45818e", "#cc4125", "#7f6000"]
    for t in tasks:
        group = [r for r in scored if r.task == t]
        group.sort(key=lambda r: r.host)
        start = x
        for r in group:
            h = float(r.score) / top * (base - 20)
            color = palette[hosts.index(r.host) % len(palette)] if grouped else palette[0]
            bars.append({"task": t, "host": r.host, "score": float(r.score),
                         "metric": r.metric or "", "x": round(x, 2), "y": round(base - h, 2),
                         "w": bw, "h": round(h, 2), "color": color})
            x += bw + 4
        labels.append({"task": t, "x": round((start + x - 4) / 2, 2)})
        x += gap
    legend = [{"host": h, "color": palette[i % len(palette)]} for i, h in enumerate(hosts)
              ] if grouped else []
    return {"bars": bars, "labels": labels, "width": max(int(x) + 20, 300), "height": height,
            "base": base, "top": top, "grouped": grouped, "legend": legend}


def failures(summary: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for r in records(summary):
        if r.succeeded:
            continue
        tail = ""
        if r.dir and not r.reused_from:
            tail = _tail(Path(r.dir) / "logs" / "harness.log")
        out.append({"host": r.host, "task": r.task, "status": r.status,
                    "error": r.error or "", "log": tail})
    for log in sorted((run_dir / "logs").glob("*/*.log")):
        out.append({"host": log.parent.name, "task": f"instance {log.stem}",
                    "status": "not healthy", "error": "the server did not become healthy",
                    "log": _tail(log)})
    return out


def report_data(run_dir: Path, ledger_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the page shows, from the run's summary.json (and the ledger's run row)."""
    summary = load_summary(run_dir)
    recs = records(summary)
    use = summary.get("usage") or {}
    rows = timeline_rows(summary)
    return {
        "run": summary["run"],
        "status": (ledger_run or {}).get("status") or ("succeeded" if all(
            r.succeeded for r in recs) else "failed"),
        "started": _when((ledger_run or {}).get("started")),
        "finished": _when((ledger_run or {}).get("finished")),
        "config": summary.get("config"),
        "model": summary.get("served_model_name"),
        "hosts": summary.get("hosts") or sorted({r.host for r in recs}),
        "tasks": [{"task": r.task, "host": r.host, "status": r.status,
                   "metric": r.metric or "", "score": r.score, "samples": r.samples,
                   "seconds": r.seconds, "gpu_hours": r.extra.get("gpu_hours"),
                   "reused_from": r.reused_from} for r in recs],
        "usage": use,
        "timeline": timeline_svg(rows),
        "chart": chart_svg(summary),
        "failures": failures(summary, run_dir),
        "record": summary.get("record"),
        "record_json": json.dumps(summary.get("record"), indent=2, sort_keys=True,
                                  default=str),
        "colors": {k: v for k, v in COLORS.items() if k != "failed"},
        "width": WIDTH,
        "label_x": LABEL,
    }


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>evalprov run {{ d.run }}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.failed,.missing,.interrupted{color:#b00}.succeeded{color:#070}
pre{background:#f7f7f7;border:1px solid #ddd;padding:8px;overflow:auto;max-height:360px;
white-space:pre-wrap;word-break:break-all}
.legend span{display:inline-block;margin-right:12px}.sw{display:inline-block;width:10px;
height:10px;margin-right:4px}svg text{font:11px sans-serif}
</style></head><body>
<h1>evalprov run <code id="run-id">{{ d.run }}</code>
 <span class="{{ d.status }}">{{ d.status }}</span></h1>
<p>model <b>{{ d.model or '-' }}</b> · config <code>{{ d.config or '-' }}</code> ·
hosts {{ d.hosts | join(', ') }} · started {{ d.started }} · finished {{ d.finished }}</p>
<p id="gpu-hours">GPU-hours: <b>{{ fmt(d.usage.gpu_hours) }}</b>
{% if d.usage %}({{ d.usage.gpus if d.usage.gpus is not none else 'unknown' }} GPU(s) held
for {{ '%.1f' % (d.usage.seconds or 0) }} s){% endif %}</p>

<h2>Timeline</h2>
{% if d.timeline.bars %}
<div class="legend">{% for k, c in d.colors.items() %}<span><i class="sw"
style="background:{{ c }}"></i>{{ k }}</span>{% endfor %}</div>
<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{{ d.width }}"
 height="{{ d.timeline.height }}" role="img" aria-label="timeline per host"
 data-span="{{ d.timeline.span }}">
{% for t in d.timeline.ticks %}<line x1="{{ t.x }}" x2="{{ t.x }}" y1="12"
 y2="{{ d.timeline.height }}" stroke="#eee"/><text x="{{ t.x }}" y="10"
 text-anchor="{{ t.anchor }}">{{ t.label }}</text>{% endfor %}
{% for b in d.timeline.bars %}<g class="bar" data-host="{{ b.host }}" data-kind="{{ b.kind }}"
 data-label="{{ b.label }}" data-seconds="{{ b.seconds }}" data-status="{{ b.status }}">
<text x="4" y="{{ b.y + 14 }}">{{ b.host }}: {{ b.label }}</text>
<rect x="{{ b.x }}" y="{{ b.y + 3 }}" width="{{ b.w }}" height="15" fill="{{ b.color }}">
<title>{{ b.host }} {{ b.label }}: {{ b.seconds }} s from +{{ b.offset }} s
({{ b.status }})</title></rect></g>
{% endfor %}</svg>
{% else %}<p id="timeline-none">No timeline: this run recorded no phase.</p>{% endif %}

<h2>Scores</h2>
<table id="scores"><tr><th>task</th><th>host</th><th>status</th><th>metric</th>
<th>score</th><th>samples</th><th>seconds</th><th>GPU-hours</th></tr>
{% for t in d.tasks %}<tr data-task="{{ t.task }}" data-host="{{ t.host }}">
<td>{{ t.task }}</td><td>{{ t.host }}</td><td class="{{ t.status }}">{{ t.status }}{% if
t.reused_from %} (from {{ t.reused_from }}){% endif %}</td><td>{{ t.metric }}</td>
<td class="num score">{{ num(t.score) }}</td><td class="num">{{ t.samples if
t.samples is not none else '' }}</td><td class="num">{{ num(t.seconds, 1) }}</td>
<td class="num">{{ fmt(t.gpu_hours) }}</td></tr>
{% endfor %}</table>

<h2>Scores per task{% if d.chart.grouped %} and host{% endif %}</h2>
{% if d.chart.bars %}
{% if d.chart.legend %}<div class="legend">{% for l in d.chart.legend %}<span><i class="sw"
style="background:{{ l.color }}"></i>{{ l.host }}</span>{% endfor %}</div>{% endif %}
<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{{ d.chart.width }}"
 height="{{ d.chart.height }}" role="img" aria-label="scores per task">
<line x1="40" x2="{{ d.chart.width }}" y1="{{ d.chart.base }}" y2="{{ d.chart.base }}"
 stroke="#888"/>
<text x="4" y="24">{{ num(d.chart.top) }}</text><text x="4" y="{{ d.chart.base }}">0</text>
{% for b in d.chart.bars %}<rect class="score-bar" data-task="{{ b.task }}"
 data-host="{{ b.host }}" data-score="{{ b.score }}" x="{{ b.x }}" y="{{ b.y }}"
 width="{{ b.w }}" height="{{ b.h }}" fill="{{ b.color }}"><title>{{ b.task }} on
{{ b.host }}: {{ b.metric }} = {{ num(b.score) }}</title></rect>
<text x="{{ b.x + b.w / 2 }}" y="{{ b.y - 3 }}" text-anchor="middle">{{ num(b.score, 3)
}}</text>{% endfor %}
{% for l in d.chart.labels %}<text x="{{ l.x }}" y="{{ d.chart.base + 16 }}"
 text-anchor="middle">{{ l.task }}</text>{% endfor %}
</svg>
{% else %}<p id="chart-none">No scores to chart.</p>{% endif %}

<h2>Failures</h2>
<div id="failures">
{% for f in d.failures %}<div class="failure" data-host="{{ f.host }}" data-task="{{ f.task }}">
<h3>{{ f.host }} / {{ f.task }}: <span class="failed">{{ f.status }}</span></h3>
<p>{{ f.error }}</p>{% if f.log %}<pre>{{ f.log }}</pre>{% endif %}</div>
{% else %}<p>None: every task succeeded.</p>{% endfor %}
</div>

<h2>Reproducibility record</h2>
{% if d.record %}
<table id="record-summary">
<tr><th>evalprov</th><td>{{ d.record.evalprov_version }}</td></tr>
<tr><th>argv</th><td><code>{{ (d.record.argv or []) | join(' ') }}</code></td></tr>
<tr><th>config</th><td><code>{{ d.record.config_source }}</code> sha256
<code>{{ d.record.config_sha256 }}</code></td></tr>
<tr><th>vLLM version</th><td>{{ d.record.vllm_version or ('unknown: ' ~
(d.record.vllm_version_reason or '')) }}</td></tr>
<tr><th>image</th><td><code>{{ d.record.image or '-' }}</code></td></tr>
{% for h, r in (d.record.hosts or {}).items() %}<tr><th>host {{ h }}</th><td>
{% if r.image %}image id <code class="image-id">{{ r.image.id or 'unknown' }}</code>
{% if r.image.repo_digests %} digests <code>{{ r.image.repo_digests | join(', ') }}</code>
{% endif %}<br>{% endif %}
vLLM {{ r.vllm_version or ('unknown: ' ~ (r.vllm_version_reason or '')) }}<br>
model {% if r.model %}{{ r.model.kind }} {{ r.model.id or r.model.path or '' }}
{{ r.model.revision or r.model.sha256 or ('(' ~ (r.model.reason or 'unknown') ~ ')') }}
{% else %}unknown: {{ r.model_reason }}{% endif %}<br>
harness {% if r.harness %}{% for where, hv in r.harness.items() %}{{ where }}:
{% if hv.versions %}{% for p, v in hv.versions.items() %}{{ p }} {{ v }}{% if not loop.last
%}, {% endif %}{% endfor %}{% else %}unknown ({{ hv.reason }}){% endif %} {% endfor %}
{% else %}unknown: {{ r.harness_reason }}{% endif %}</td></tr>
{% endfor %}</table>
<details><summary>The whole record (JSON), with the resolved config</summary>
<pre id="record">{{ d.record_json }}</pre></details>
{% else %}<p id="record">No record: this run was made by an evalprov without one.</p>{% endif %}
<p><small>evalprov report · written {{ now }}</small></p>
</body></html>
"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return "" if isinstance(value, jinja2.Undefined) else str(value)


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}" if isinstance(value, int | float) else "-"


def render_html(data: dict[str, Any]) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    template = env.from_string(TEMPLATE)
    return template.render(d=data, num=_num, fmt=_fmt,
                           now=time.strftime("%Y-%m-%d %H:%M:%S"))


def ledger_row(out: Path, run_id: str) -> dict[str, Any] | None:
    """The run's ledger row (status, start, end), when its output_dir has a ledger."""
    from evalprov.errors import EvalprovError
    from evalprov.ledger import DB_NAME, Ledger

    if not (out / DB_NAME).exists():
        return None
    try:
        with Ledger(out) as ledger:
            return dict(ledger.run(run_id))
    except EvalprovError:
        return None


def write_report(run_dir: Path, out: Path | None = None,
                 ledger_run: dict[str, Any] | None = None) -> Path:
    from evalprov.results import write_atomic

    if ledger_run is None:
        ledger_run = ledger_row(run_dir.parent, run_dir.name)
    path = out or run_dir / "report.html"
    write_atomic(path, render_html(report_data(run_dir, ledger_run)))
    return path


__all__ = ["SUMMARY", "render_html", "report_data", "write_report"]
