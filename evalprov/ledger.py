"""The run ledger: SQLite in output_dir, written as a run goes, so an interrupted or failed run
can be finished later with only its missing pieces (`apply --rerun failed`).

Tables: runs (one per apply), deployments (one per instance per run), task_runs (one per
attempt of a task on a host). A task is identified across runs by (host, task, key): the key
hashes everything that decides its result (run config, image, instance spec), so a changed
model or setting is a new task while the same one is never run twice.

Every logical write is one transaction (`BEGIN IMMEDIATE` ... `COMMIT`, rolled back on any
error), so a reader or a crash sees all of it or none of it, and two writers serialise (the
second waits for the first, up to the timeout) instead of interleaving a read and a write.

The schema carries a version (`PRAGMA user_version`). `MIGRATIONS[n]` takes a database from
version n to n+1, each step in its own transaction; a database written by an older evalprov
is brought up to date in place when opened, and one from a newer evalprov is refused with
one line. A damaged file is one line naming it and the fix.

A lock file next to the database keeps a second apply on the same output_dir out."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evalprov.errors import EvalprovError
from evalprov.records import TaskRecord, as_record
from evalprov.redact import redact_command_text, redacted_command

DB_NAME = "evalprov.db"
LOCK_NAME = "evalprov.lock"
TERMINAL = ("succeeded", "failed")

# version 1: the tables as evalprov 0.1 created them (with user_version 0)
_V1 = (
    """CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, started REAL NOT NULL, finished REAL, status TEXT NOT NULL,
  config TEXT, command TEXT, controller TEXT, pid INTEGER, rerun TEXT
)""",
    """CREATE TABLE IF NOT EXISTS deployments (
  run_id TEXT NOT NULL, host TEXT NOT NULL, instance TEXT NOT NULL, spec_hash TEXT NOT NULL,
  port INTEGER, status TEXT NOT NULL, error TEXT, updated REAL NOT NULL,
  PRIMARY KEY (run_id, host, instance)
)""",
    """CREATE TABLE IF NOT EXISTS task_runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run_id TEXT NOT NULL, host TEXT NOT NULL, task TEXT NOT NULL, key TEXT NOT NULL,
  instance TEXT, attempt INTEGER NOT NULL, status TEXT NOT NULL,
  started REAL, finished REAL, seconds REAL, result_dir TEXT, metric TEXT, score REAL,
  samples INTEGER, error TEXT
)""",
    "CREATE INDEX IF NOT EXISTS task_runs_key ON task_runs (host, task, key)",
)


def _to_v1(db: sqlite3.Connection) -> None:
    """Create the tables (a new database; a version-0 one already has them)."""
    for sql in _V1:
        db.execute(sql)


def _to_v2(db: sqlite3.Connection) -> None:
    """Older versions stored the command line as typed, secrets included: redact it; index
    task_runs by run (status and results read a run's rows)."""
    for run_id, command in db.execute("SELECT run_id, command FROM runs").fetchall():
        if command:
            redacted = redact_command_text(command)
            if redacted != command:
                db.execute("UPDATE runs SET command = ? WHERE run_id = ?", (redacted, run_id))
    db.execute("CREATE INDEX IF NOT EXISTS task_runs_run ON task_runs (run_id)")


def _to_v3(db: sqlite3.Connection) -> None:
    """See the run: the GPUs each instance holds (GPU-hours), the run's reproducibility
    record (JSON), and each host's timeline (one row per phase: probe, pull, start,
    healthy, eval, fetch, with the controller's clock)."""
    db.execute("ALTER TABLE deployments ADD COLUMN gpus INTEGER")
    db.execute("ALTER TABLE runs ADD COLUMN record TEXT")
    db.execute("""CREATE TABLE IF NOT EXISTS phases (
  run_id TEXT NOT NULL, host TEXT NOT NULL, phase TEXT NOT NULL, started REAL, finished REAL,
  status TEXT NOT NULL, PRIMARY KEY (run_id, host, phase)
)""")


# MIGRATIONS[n] takes the schema from version n to n + 1; append, never edit a shipped step
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_to_v1, _to_v2, _to_v3)
SCHEMA_VERSION = len(MIGRATIONS)


def task_key(task_vars: dict[str, Any], instance_hash: str | None) -> str:
    blob = json.dumps({"task": task_vars, "instance": instance_hash}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def db_error(path: Path, exc: sqlite3.Error, timeout: float | None = None) -> EvalprovError:
    """One line for a database that cannot be used: locked too long, or not a ledger."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        waited = f" for more than {timeout:g}s" if timeout is not None else ""
        return EvalprovError(f"{path}: the ledger is locked by another process{waited}; wait "
                             "for the other evalprov to finish and run again")
    return EvalprovError(
        f"{path}: not a readable evalprov ledger ({text}); move it aside with its -wal/-shm "
        f"files (`mv {path} {path}.broken`) and run again: a new ledger starts empty, the run "
        "directories are kept")


def _usage_error(exc: BaseException) -> bool:
    """A database the user has to fix (damaged, locked, unreadable), not a programming error
    (those keep their traceback)."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError)


SQLITE_MAX_PATH = 512  # SQLITE_MAX_PATHNAME of a default SQLite build


class Ledger:
    def __init__(self, output_dir: Path, timeout: float = 30) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / DB_NAME
        self.timeout = timeout
        try:
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.OperationalError as exc:
            raise EvalprovError(
                f"execution.output_dir: cannot open the ledger {str(self.path)[:120]}... "
                f"({exc}; SQLite refuses paths over {SQLITE_MAX_PATH} characters, this one "
                f"has {len(str(self.path))}); choose a shorter, writable execution.output_dir")

        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            # overwrite deleted and replaced content (a redacted command's old text) with zeros
            self.db.execute("PRAGMA secure_delete=ON")
            self._migrate()
        except BaseException as exc:
            self.db.close()
            if _usage_error(exc):
                raise db_error(self.path, exc, timeout) from exc
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema

    @property
    def version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _check_not_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            from evalprov import __version__

            raise EvalprovError(
                f"{self.path}: ledger schema version {version} is newer than this evalprov "
                f"({__version__}) knows (up to {SCHEMA_VERSION}); upgrade evalprov, or give "
                "another execution.output_dir")

    def _migrate(self) -> None:
        self._check_not_newer(self.version)
        while self.version < SCHEMA_VERSION:
            with self._tx():  # re-read under the write lock: another process may have done it
                version = self.version
                self._check_not_newer(version)
                if version >= SCHEMA_VERSION:
                    break
                MIGRATIONS[version](self.db)
                self.db.execute(f"PRAGMA user_version = {version + 1:d}")

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front (waiting up
        to the timeout for another writer), COMMIT on success, ROLLBACK on any error."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            if _usage_error(exc):
                raise db_error(self.path, exc, self.timeout) from exc
            raise
        try:
            yield self.db
        except BaseException as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if _usage_error(exc):
                raise db_error(self.path, exc, self.timeout) from exc
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if _usage_error(exc):
                raise db_error(self.path, exc, self.timeout) from exc
            raise

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            if _usage_error(exc):
                raise db_error(self.path, exc, self.timeout) from exc
            raise

    # ------------------------------------------------------------------ writes (one tx each)

    def start_run(self, run_id: str, config: str, rerun: str | None,
                  command: str | None = None) -> None:
        """A new run, status running. command: the command line to record (default: this
        process's argv), always redacted of secrets."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (run_id, started, status, config, command, controller, pid, "
                "rerun) VALUES (?, ?, 'running', ?, ?, ?, ?, ?)",
                (run_id, time.time(), config,
                 redacted_command() if command is None else redact_command_text(command),
                 socket.gethostname(), os.getpid(), rerun))

    def finish_run(self, run_id: str, status: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE runs SET finished = ?, status = ? WHERE run_id = ?",
                       (now, status, run_id))
            # anything still marked running did not finish: it is missing, not lost
            db.execute("UPDATE task_runs SET status = 'interrupted', finished = ? "
                       "WHERE run_id = ? AND status IN ('pending', 'running')", (now, run_id))

    def record_deployment(self, run_id: str, host: str, instance: str, spec_hash: str,
                          port: int, status: str, error: str | None = None,
                          gpus: int | None = None) -> None:
        """This run's state of an instance (gpus: how many it holds, for GPU-hours); earlier
        runs' rows of the same instance say it is now this run's (so no older run still
        claims it serves)."""
        with self._tx() as db:
            db.execute("UPDATE deployments SET status = ?, updated = ? WHERE host = ? AND "
                       "instance = ? AND run_id != ? AND status IN ('serving', 'failed')",
                       (f"superseded by {run_id}", time.time(), host, instance, run_id))
            db.execute(
                "INSERT OR REPLACE INTO deployments (run_id, host, instance, spec_hash, port, "
                "status, error, updated, gpus) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, host, instance, spec_hash, port, status, error, time.time(), gpus))

    def mark_gone(self, host: str, instances: list[str], status: str = "destroyed") -> None:
        """Instances that no longer run on a host (destroy removed them): every run's row
        of them says so."""
        with self._tx() as db:
            for instance in instances:
                db.execute("UPDATE deployments SET status = ?, updated = ? WHERE host = ? AND "
                           "instance = ? AND status NOT LIKE 'superseded%'",
                           (status, time.time(), host, instance))

    def add_attempts(self, run_id: str, rows: list[tuple[str, str, str, str | None]]) -> None:
        """rows: (host, task, key, instance) planned to run now, status pending. The attempt
        number counts earlier runs' attempts, read in the same transaction."""
        with self._tx() as db:
            for host, task, key, instance in rows:
                attempt = 1 + db.execute(
                    "SELECT COUNT(*) FROM task_runs WHERE host = ? AND task = ? AND key = ? "
                    "AND run_id != ?", (host, task, key, run_id)).fetchone()[0]
                db.execute(
                    "INSERT INTO task_runs (run_id, host, task, key, instance, attempt, status)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                    (run_id, host, task, key, instance, attempt))

    def mark_running(self, run_id: str, host: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE task_runs SET status = 'running', started = ? WHERE run_id = ? "
                       "AND host = ? AND status = 'pending'", (time.time(), run_id, host))

    def finish_task(self, run_id: str, rec: TaskRecord | dict[str, Any]) -> None:
        """Record a task's outcome (a TaskRecord, or its summary dict as collect returns)."""
        record = as_record(rec)
        v = record.ledger_values()
        with self._tx() as db:
            db.execute(
                "UPDATE task_runs SET status = ?, finished = ?, seconds = ?, result_dir = ?, "
                "metric = ?, score = ?, samples = ?, error = ? "
                "WHERE run_id = ? AND host = ? AND task = ?",
                (v["status"], time.time(), v["seconds"], v["result_dir"], v["metric"],
                 v["score"], v["samples"], v["error"], run_id, record.host, record.task))

    def record_phases(self, run_id: str,
                      rows: list[tuple[str, str, float | None, float | None, str]]) -> None:
        """rows: (host, phase, started, finished, status) of this run's timeline."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO phases (run_id, host, phase, started, finished, status) "
                "VALUES (?, ?, ?, ?, ?, ?)", [(run_id, *r) for r in rows])

    def set_record(self, run_id: str, record: dict[str, Any]) -> None:
        """The run's reproducibility record (provenance.build: never a secret value)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET record = ? WHERE run_id = ?",
                       (json.dumps(record, sort_keys=True, default=str), run_id))

    # ------------------------------------------------------------------ reads

    def latest(self, host: str, task: str, key: str) -> sqlite3.Row | None:
        """The newest finished-or-not attempt of this task in an earlier run."""
        rows = self._read("SELECT * FROM task_runs WHERE host = ? AND task = ? AND key = ? "
                          "ORDER BY id DESC LIMIT 1", (host, task, key))
        return rows[0] if rows else None

    def last_success(self, host: str, task: str, key: str) -> sqlite3.Row | None:
        rows = self._read("SELECT * FROM task_runs WHERE host = ? AND task = ? AND key = ? AND "
                          "status = 'succeeded' ORDER BY id DESC LIMIT 1", (host, task, key))
        return rows[0] if rows else None

    def runs(self) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM runs ORDER BY started")

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
        return self._read("SELECT * FROM task_runs WHERE run_id = ? ORDER BY host, task",
                          (run_id,))

    def task_records(self, run_id: str) -> list[TaskRecord]:
        """The run's task attempts as records (host, task order)."""
        return [TaskRecord.from_row(r) for r in self.tasks_of(run_id)]

    def deployments_of(self, run_id: str) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM deployments WHERE run_id = ? ORDER BY host, instance",
                          (run_id,))

    def phases_of(self, run_id: str) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM phases WHERE run_id = ? ORDER BY host, started",
                          (run_id,))

    def record_of(self, run_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM runs WHERE run_id = ?", (run_id,))
        if not rows or not rows[0]["record"]:
            return None
        try:
            data = json.loads(rows[0]["record"])
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


def lock_info(argv: list[str] | None = None) -> str:
    """What the lock file says about its holder (the command redacted of secrets)."""
    return (f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {redacted_command(argv)[:300]}")


def busy(output_dir: Path) -> bool:
    """Another evalprov holds the output_dir's lock now (nothing is taken or changed)."""
    path = output_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


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
        os.ftruncate(fd, 0)
        os.pwrite(fd, lock_info().encode(), 0)
        yield
    finally:
        os.close(fd)
