"""Each host's timeline of a run, read off ansible-runner's events as they arrive: when the
probe, the image pull, the instances' start, the wait for /health, the tasks and the fetch
began and ended (the controller's clock; the callback stamps every result with its task's
start and end). Also keeps what the eval module read for the reproducibility record.

`Timeline(handler)` wraps the progress handler: every event goes to it unchanged, and its
attributes (hosts, facts, decision) are the handler's, so run_playbook sees no difference."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

# "Component | action" task names (STYLE.md) -> the phase they belong to
_PHASES = {"Preflight": "probe", "Image": "pull", "VLLM": "start", "Health": "healthy"}
_EVAL = (("Install", "install"), ("Ship", "samples"), ("Run", "eval"), ("Fetch", "fetch"))
# the order a host goes through them (the report draws them so); "queue": a Slurm job
# waiting for its nodes
ORDER = ("probe", "queue", "pull", "install", "start", "healthy", "samples", "eval", "fetch")
# a Slurm job driver's phases (its state.json) -> the timeline's
_JOB = {"starting": "start", "loading": "healthy", "evaluating": "eval"}
_RESULTS = {"runner_on_ok": "ok", "runner_on_failed": "failed",
            "runner_on_unreachable": "unreachable"}


def phase_of(task: str) -> str | None:
    head, sep, rest = task.partition(" | ")
    if not sep:
        return None
    head = head.strip()
    if head == "Slurm":  # the job's own phases come from its state (Timeline.job)
        return "fetch" if rest.strip().startswith("Fetch") else None
    if head == "Eval":
        return next((p for word, p in _EVAL if rest.strip().startswith(word)), "eval")
    return _PHASES.get(head)


def _stamp(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:  # the callback writes UTC
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


@dataclass
class Span:
    started: float | None
    finished: float | None
    status: str = "ok"


class Timeline:
    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.spans: dict[tuple[str, str], Span] = {}
        self.provenance: dict[str, dict[str, Any]] = {}
        self.submitted: dict[str, float | None] = {}  # when a Slurm job was submitted

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handler, name)

    def __call__(self, event: dict[str, Any]) -> Any:
        try:
            self.see(event)
        finally:
            result = self.handler(event)
        return result

    def see(self, event: dict[str, Any]) -> None:
        status = _RESULTS.get(event.get("event", ""))
        data = event.get("event_data") or {}
        host = data.get("host")
        if status is None or not host:
            return
        task = str(data.get("task") or "")
        res = data.get("res") or {}
        if not isinstance(res, dict):
            res = {}
        if isinstance(res.get("provenance"), dict):
            self.provenance[host] = res["provenance"]
        if task.startswith("Slurm | Submit"):
            self.submitted[host] = _stamp(data.get("end"))
        if res.get("evalprov_slurm_state") and isinstance(res.get("timeline"), dict):
            self.job(host, res["timeline"])
        phase = phase_of(task)
        if phase is None:
            return
        if status == "failed" and data.get("ignore_errors"):
            status = "ok"
        start, end = _stamp(data.get("start")), _stamp(data.get("end"))
        span = self.spans.get((host, phase))
        if span is None:
            self.spans[(host, phase)] = Span(start, end, status)
            return
        if start is not None and (span.started is None or start < span.started):
            span.started = start
        if end is not None and (span.finished is None or end > span.finished):
            span.finished = end
        if status != "ok":
            span.status = status

    def job(self, host: str, tl: dict[str, Any]) -> None:
        """A Slurm job's last look (evalprov_slurm poll): its queue wait (submitted ->
        started on its node), then each of its driver's phases until the next one."""
        started, ended = _stamp(tl.get("started")), _stamp(tl.get("ended"))
        marks = [("starting", started)] + [
            (str(p.get("phase")), _stamp(p.get("at"))) for p in tl.get("phases") or []
            if isinstance(p, dict)]
        for i, (name, at) in enumerate(marks):
            kind = _JOB.get(name)
            then = marks[i + 1] if i + 1 < len(marks) else ("", ended)
            if kind is None or at is None or then[1] is None:
                continue
            self.spans[(host, kind)] = Span(at, then[1],
                                            "failed" if then[0] == "failed" else "ok")
        submitted = self.submitted.get(host)
        if submitted is not None and started is not None:
            self.spans[(host, "queue")] = Span(submitted, max(submitted, started))

    def rows(self) -> list[tuple[str, str, float | None, float | None, str]]:
        """(host, phase, started, finished, status), for the ledger."""
        return [(h, p, s.started, s.finished, s.status)
                for (h, p), s in sorted(self.spans.items())]
