"""GPU-hours from the ledger's timings: GPUs held x time.

- a run: every instance the run recorded holds its planned GPUs for the run's wall time
  (started -> finished; a run still going counts up to now);
- a task: the GPUs of the instance it ran against x the task's seconds.

Pure: it takes ledger rows (or dicts of their columns). An instance whose GPU count the
ledger does not know (a run from before schema 3) makes the figure None, never a guess."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Usage:
    gpus: int | None  # GPUs held by the run's instances (None: not known)
    seconds: float | None  # the run's wall time
    gpu_hours: float | None
    tasks: dict[tuple[str, str], float | None] = field(default_factory=dict)  # (host, task)
    hosts: dict[str, float | None] = field(default_factory=dict)

    def task(self, host: str, task: str) -> float | None:
        return self.tasks.get((host, task))

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "seconds": self.seconds, "gpu_hours": self.gpu_hours,
                "hosts": dict(self.hosts),
                "tasks": [{"host": h, "task": t, "gpu_hours": v}
                          for (h, t), v in sorted(self.tasks.items())]}


def _get(row: Any, key: str) -> Any:
    if isinstance(row, dict):
        return row.get(key)
    keys = set(row.keys())  # a sqlite3.Row: `in` tests its values
    return row[key] if key in keys else None


def hours(gpus: int | None, seconds: float | None) -> float | None:
    if gpus is None or seconds is None:
        return None
    return round(gpus * seconds / 3600.0, 6)


def gpu_hours(run: Any, deployments: list[Any], tasks: list[Any],
              now: float | None = None) -> Usage:
    started = _get(run, "started")
    finished = _get(run, "finished")
    if finished is None:
        finished = time.time() if now is None else now
    seconds = None if started is None else max(0.0, float(finished) - float(started))
    held: dict[tuple[str, str], int | None] = {
        (_get(d, "host"), _get(d, "instance")): _get(d, "gpus") for d in deployments}
    known = all(g is not None for g in held.values())
    gpus = sum(g or 0 for g in held.values()) if known else None
    per_host: dict[str, float | None] = {}
    for (host, _), g in held.items():
        h = hours(g, seconds)
        prev = per_host.get(host, 0.0)
        per_host[host] = None if h is None or prev is None else round(prev + h, 6)
    per_task: dict[tuple[str, str], float | None] = {}
    for t in tasks:
        key = (_get(t, "host"), _get(t, "task"))
        g = held.get((key[0], _get(t, "instance")))
        if _get(t, "instance") is None and not held:
            g = 0  # deployment none: the run holds no GPUs
        per_task[key] = hours(g, _get(t, "seconds"))
    return Usage(gpus, seconds, hours(gpus, seconds), per_task, per_host)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
