"""The run ledger: SQLite in output_dir, written as a run goes, so an interrupted or failed run
can be finished later with only its missing pieces (`apply --rerun failed`).

Tables: runs (one per apply), deployments (one per instance per run), task_runs (one per
attempt of a task on a host). A task is identified across runs by (host, task, key): the key
hashes everything that decides its result (run config, image, instance spec), so a changed
model or setting is a new task while the same one is never run twice.

A lock file next to the database keeps a second apply on the same output_dir out."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evalprov.errors import EvalprovError

DB_NAME = "evalprov.db"
LOCK_NAME = "evalprov.lock"
TERMINAL = ("succeeded", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, started REAL NOT NULL, finished REAL, status TEXT NOT NULL,
  config TEXT, command TEXT, controller TEXT, pid INTEGER, rerun TEXT
);
CREATE TABLE IF NOT EXISTS deployments (
  run_id TEXT NOT NULL, host TEXT NOT NULL, instance TEXT NOT NULL, spec_hash TEXT NOT NULL,
  port INTEGER, status TEXT NOT NULL, error TEXT, updated REAL NOT NULL,
  PRIMARY KEY (run_id, host, instance)
);
CREATE TABLE IF NOT EXISTS task_runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run_id TEXT NOT NULL, host TEXT NOT NULL, task TEXT NOT NULL, key TEXT NOT NULL,
  instance TEXT, attempt INTEGER NOT NULL, status TEXT NOT NULL,
  started REAL, finished REAL, seconds REAL, result_dir TEXT, metric TEXT, score REAL,
  samples INTEGER, error TEXT
);
CREATE INDEX IF NOT EXISTS task_runs_key ON task_runs (host, task, key);
"""


def task_key(task_vars: dict[str, Any], instance_hash: str | None) -> str:
    blob = json.dumps({"task": task_vars, "instance": instance_hash}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Ledger:
    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / DB_NAME
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writes (each atomic)

    def start_run(self, run_id: str, config: str, rerun: str | None) -> None:
        self.db.execute(
            "INSERT INTO runs (run_id, started, status, config, command, controller, pid, rerun)"
            " VALUES (?, ?, 'running', ?, ?, ?, ?, ?)",
            (run_id, time.time(), config, " ".join(sys.argv), socket.gethostname(), os.getpid(),
             rerun))

    def finish_run(self, run_id: str, status: str) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET finished = ?, status = ? WHERE run_id = ?",
                            (time.time(), status, run_id))
            # anything still marked running did not finish: it is missing, not lost
            self.db.execute("UPDATE task_runs SET status = 'interrupted', finished = ? "
                            "WHERE run_id = ? AND status IN ('pending', 'running')",
                            (time.time(), run_id))

    def record_deployment(self, run_id: str, host: str, instance: str, spec_hash: str,
                          port: int, status: str, error: str | None = None) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, host, instance, spec_hash, port, status, error, time.time()))

    def add_attempts(self, run_id: str, rows: list[tuple[str, str, str, str | None]]) -> None:
        """rows: (host, task, key, instance) planned to run now, status pending."""
        with self.db:
            for host, task, key, instance in rows:
                attempt = 1 + (self.db.execute(
                    "SELECT COUNT(*) FROM task_runs WHERE host = ? AND task = ? AND key = ? "
                    "AND run_id != ?", (host, task, key, run_id)).fetchone()[0])
                self.db.execute(
                    "INSERT INTO task_runs (run_id, host, task, key, instance, attempt, status)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                    (run_id, host, task, key, instance, attempt))

    def mark_running(self, run_id: str, host: str) -> None:
        self.db.execute("UPDATE task_runs SET status = 'running', started = ? WHERE run_id = ? "
                        "AND host = ? AND status = 'pending'", (time.time(), run_id, host))

    def finish_task(self, run_id: str, rec: dict[str, Any]) -> None:
        primary = rec.get("primary") or {}
        status = rec["status"] if rec["status"] in TERMINAL else "missing"
        self.db.execute(
            "UPDATE task_runs SET status = ?, finished = ?, seconds = ?, result_dir = ?, "
            "metric = ?, score = ?, samples = ?, error = ? "
            "WHERE run_id = ? AND host = ? AND task = ?",
            (status, time.time(), rec.get("seconds"), rec.get("dir"),
             f"{primary.get('metric')}.{primary.get('name')}" if primary else None,
             primary.get("score"), rec.get("samples"), rec.get("error"),
             run_id, rec["host"], rec["task"]))

    # ------------------------------------------------------------------ reads

    def latest(self, host: str, task: str, key: str) -> sqlite3.Row | None:
        """The newest finished-or-not attempt of this task in an earlier run."""
        return self.db.execute(
            "SELECT * FROM task_runs WHERE host = ? AND task = ? AND key = ? "
            "ORDER BY id DESC LIMIT 1", (host, task, key)).fetchone()

    def last_success(self, host: str, task: str, key: str) -> sqlite3.Row | None:
        return self.db.execute(
            "SELECT * FROM task_runs WHERE host = ? AND task = ? AND key = ? AND "
            "status = 'succeeded' ORDER BY id DESC LIMIT 1", (host, task, key)).fetchone()

    def runs(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM runs ORDER BY started").fetchall()

    def run(self, run_id: str | None) -> sqlite3.Row:
        runs = self.runs()
        if not runs:
            raise EvalprovError(f"status: no runs in {self.path.parent}; run `evalprov apply`")
        if run_id is None:
            return runs[-1]
        hits = [r for r in runs if r["run_id"].startswith(run_id)]
        if len(hits) != 1:
            recent = ", ".join(r["run_id"] for r in runs[-5:])
            raise EvalprovError(f"run {run_id!r}: {'no' if not hits else 'more than one'} run "
                                f"matches in {self.path.parent}; recent runs: {recent}")
        return hits[0]

    def tasks_of(self, run_id: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM task_runs WHERE run_id = ? ORDER BY host, task",
                               (run_id,)).fetchall()

    def deployments_of(self, run_id: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM deployments WHERE run_id = ? ORDER BY host, "
                               "instance", (run_id,)).fetchall()


@contextmanager
def locked(output_dir: Path):
    """Hold the output_dir's lock; a second holder gets one line naming the first."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise EvalprovError(
                f"output_dir {output_dir} is in use by another evalprov ({holder}); wait for it "
                "or stop it") from None
        info = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        os.close(fd)
