"""One task on one host in one run, as the ledger, summary.json and the tables see it.

`TaskRecord` is the one shape: `from_dict`/`to_dict` read and write a summary.json entry
(the format is unchanged: a dict per task with host, task, harness, status, seconds, scores,
primary, samples, error, dir and, when known, started and reused_from); `from_row` reads a
ledger `task_runs` row. Keys a reader does not know are kept in `extra` and written back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# the order of a summary.json entry written by results.collect
_SUMMARY_KEYS = ("host", "task", "harness", "status", "seconds", "scores", "primary",
                 "samples", "error", "dir")
# written only when set (reused_from: a record carried over from an earlier run)
_OPTIONAL_KEYS = ("started", "finished", "reused_from", "attempt", "run_id", "key",
                  "instance")


@dataclass
class TaskRecord:
    host: str
    task: str
    status: str = "missing"  # succeeded | failed | missing | pending | running | interrupted
    harness: str | None = None
    seconds: float | None = None
    scores: list[dict[str, Any]] = field(default_factory=list)
    primary: dict[str, Any] | None = None  # {"metric", "name", "score", ...}
    samples: int | None = None
    error: str | None = None
    dir: str | None = None
    started: float | None = None
    finished: float | None = None
    reused_from: str | None = None
    attempt: int | None = None
    run_id: str | None = None
    key: str | None = None
    instance: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived

    @property
    def metric(self) -> str | None:
        """"metric.name" of the primary score (the ledger's metric column)."""
        if not self.primary:
            return None
        return f"{self.primary.get('metric')}.{self.primary.get('name')}"

    @property
    def score(self) -> float | None:
        return (self.primary or {}).get("score")

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    # ------------------------------------------------------------------ conversions

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        """A summary.json entry (or a record dict as apply builds it)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if known.get("scores") is None:
            known["scores"] = []
        return cls(**known, extra=extra)

    @classmethod
    def from_row(cls, row: Any) -> TaskRecord:
        """A ledger task_runs row (sqlite3.Row or a dict of its columns)."""
        get = _getter(row)
        metric, _, name = (get("metric") or "").partition(".")
        primary = ({"metric": metric, "name": name, "score": get("score")}
                   if get("metric") else None)
        return cls(host=get("host"), task=get("task"), status=get("status"),
                   seconds=get("seconds"), primary=primary, samples=get("samples"),
                   error=get("error"), dir=get("result_dir"), started=get("started"),
                   finished=get("finished"), attempt=get("attempt"), run_id=get("run_id"),
                   key=get("key"), instance=get("instance"))

    @classmethod
    def reused(cls, row: Any) -> TaskRecord:
        """The record of a task done in an earlier run (a ledger row), carried into this run's
        summary without running it again; a failure says how to run it again."""
        rec = cls.from_row(row)
        rec = dataclasses.replace(rec, reused_from=rec.run_id, started=None, finished=None,
                                  attempt=None, run_id=None, key=None, instance=None)
        if rec.status == "failed":
            rec.error = (f"failed in run {row['run_id']} (attempt {row['attempt']}): "
                         f"{row['error'] or ''}; rerun it with --rerun failed")
        return rec

    def to_dict(self) -> dict[str, Any]:
        """The summary.json entry."""
        out = {k: getattr(self, k) for k in _SUMMARY_KEYS}
        out["scores"] = list(self.scores)
        for k in _OPTIONAL_KEYS:
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        out.update(self.extra)
        return out

    def ledger_values(self) -> dict[str, Any]:
        """The task_runs columns a finished task sets."""
        status = self.status if self.status in ("succeeded", "failed") else "missing"
        return {"status": status, "seconds": self.seconds, "result_dir": self.dir,
                "metric": self.metric, "score": self.score, "samples": self.samples,
                "error": self.error}


def _getter(row: Any):
    if isinstance(row, dict):
        return row.get
    keys = set(row.keys())
    return lambda k: row[k] if k in keys else None


def as_record(rec: TaskRecord | dict[str, Any]) -> TaskRecord:
    return rec if isinstance(rec, TaskRecord) else TaskRecord.from_dict(rec)
