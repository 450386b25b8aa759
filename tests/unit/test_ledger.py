"""The run ledger: one BEGIN IMMEDIATE transaction per logical write, a schema version with
in-place migration (a database written by evalprov 0.1, user_version 0, included), refusal
of a newer schema, one line for a damaged file, and no secret from the command line on disk."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from evalprov.errors import EvalprovError
from evalprov.ledger import DB_NAME, LOCK_NAME, MIGRATIONS, SCHEMA_VERSION, Ledger, locked
from evalprov.records import TaskRecord

SECRET = "sk-verysecret-4f9a1c"

# The schema exactly as evalprov 0.1's ledger.py created it (executescript, user_version 0).
V0_SCHEMA = """
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


def make_v0(out: Path) -> None:
    """A ledger as evalprov 0.1 left it: one finished run, its command stored as typed."""
    out.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(out / DB_NAME, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V0_SCHEMA)
    db.execute("INSERT INTO runs VALUES ('r0', 1.0, 2.0, 'succeeded', 'c.yaml', ?, 'ctl', 7, "
               "NULL)", (f"/usr/bin/evalprov apply c.yaml -o deployment.env_vars.HF_TOKEN="
                         f"lit:{SECRET} --limit h1",))
    db.execute("INSERT INTO deployments VALUES ('r0', 'h1', 'i0', 'spec', 8000, 'serving', "
               "NULL, 2.0)")
    db.execute("INSERT INTO task_runs (run_id, host, task, key, instance, attempt, status, "
               "seconds, metric, score, samples) VALUES ('r0', 'h1', 'ifeval', 'k1', 'i0', 1, "
               "'succeeded', 3.5, 'acc.strict', 0.75, 10)")
    db.close()


def files_hold(out: Path, needle: str) -> list[str]:
    return [p.name for p in out.iterdir() if p.is_file() and needle.encode() in p.read_bytes()]


# --------------------------------------------------------------------------- schema version


def test_a_new_ledger_is_at_the_current_version(tmp_path):
    with Ledger(tmp_path) as led:
        assert led.version == SCHEMA_VERSION == len(MIGRATIONS)
        assert {r[0] for r in led.db.execute("SELECT name FROM sqlite_master WHERE type = "
                                             "'table'")} >= {"runs", "deployments", "task_runs"}


def test_a_v0_ledger_from_the_old_code_migrates_in_place(tmp_path):
    make_v0(tmp_path)
    with Ledger(tmp_path) as led:
        assert led.version == SCHEMA_VERSION
        (run,) = led.runs()
        assert (run["run_id"], run["status"], run["config"]) == ("r0", "succeeded", "c.yaml")
        # the secret the old code stored is redacted by the migration; the rest is kept
        assert SECRET not in run["command"]
        assert "deployment.env_vars.HF_TOKEN=***" in run["command"]
        assert "--limit h1" in run["command"]
        (rec,) = led.task_records("r0")
        assert (rec.host, rec.task, rec.status, rec.attempt, rec.score) == (
            "h1", "ifeval", "succeeded", 1, 0.75)
        assert rec.primary == {"metric": "acc", "name": "strict", "score": 0.75}
        assert led.latest("h1", "ifeval", "k1")["status"] == "succeeded"
        assert [d["instance"] for d in led.deployments_of("r0")] == ["i0"]
        # and it is writable: a second attempt counts the first
        led.start_run("r1", "c.yaml", "all", command="evalprov apply c.yaml")
        led.add_attempts("r1", [("h1", "ifeval", "k1", "i0")])
        assert led.tasks_of("r1")[0]["attempt"] == 2
    assert files_hold(tmp_path, SECRET) == []  # not left in the file's free space either
    with Ledger(tmp_path) as led:  # opening again is a no-op
        assert led.version == SCHEMA_VERSION and len(led.runs()) == 2


def test_migrations_run_one_step_per_transaction_and_only_once(tmp_path, monkeypatch):
    make_v0(tmp_path)
    calls = []
    import evalprov.ledger as ledger_mod

    steps = tuple((lambda db, i=i, f=f: (calls.append(i), f(db))[1])
                  for i, f in enumerate(MIGRATIONS))
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", steps)
    Ledger(tmp_path).close()
    Ledger(tmp_path).close()
    assert calls == list(range(SCHEMA_VERSION))


def test_a_failed_migration_step_leaves_the_previous_version(tmp_path, monkeypatch):
    make_v0(tmp_path)
    import evalprov.ledger as ledger_mod

    def boom(db):
        db.execute("UPDATE runs SET status = 'changed'")
        raise RuntimeError("step failed")

    monkeypatch.setattr(ledger_mod, "MIGRATIONS", (MIGRATIONS[0], boom))
    with pytest.raises(RuntimeError):
        Ledger(tmp_path)
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute("SELECT status FROM runs").fetchone()[0] == "succeeded"  # rolled back
    db.close()


def test_a_ledger_from_a_newer_evalprov_is_refused_in_one_line(tmp_path):
    Ledger(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    db.close()
    with pytest.raises(EvalprovError) as exc:
        Ledger(tmp_path)
    (line,) = exc.value.lines
    assert str(tmp_path / DB_NAME) in line and "\n" not in line
    assert f"schema version {SCHEMA_VERSION + 5} is newer" in line and "upgrade evalprov" in line
    db = sqlite3.connect(tmp_path / DB_NAME)  # and left as it was
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 5
    db.close()


@pytest.mark.parametrize("content", [b"\x8f\x00garbage" * 500,
                                     b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_damaged_ledger_is_one_line_naming_the_file_and_the_fix(tmp_path, content):
    (tmp_path / DB_NAME).write_bytes(content)
    with pytest.raises(EvalprovError) as exc:
        Ledger(tmp_path)
    (line,) = exc.value.lines
    assert line.startswith(f"{tmp_path / DB_NAME}: not a readable evalprov ledger")
    assert f"mv {tmp_path / DB_NAME}" in line


# --------------------------------------------------------------------------- transactions


WRITES = {
    "start_run": lambda led: led.start_run("r1", "c.yaml", None, command="evalprov apply c"),
    "add_attempts": lambda led: led.add_attempts("r1", [("h", "a", "k", None),
                                                         ("h", "b", "k", None)]),
    "mark_running": lambda led: led.mark_running("r1", "h"),
    "record_deployment": lambda led: led.record_deployment("r1", "h", "i0", "s", 8000,
                                                           "serving"),
    "finish_task": lambda led: led.finish_task("r1", {"host": "h", "task": "a",
                                                      "status": "succeeded", "seconds": 1.0}),
    "finish_run": lambda led: led.finish_run("r1", "succeeded"),
}


def test_every_write_is_one_begin_immediate_transaction(tmp_path):
    with Ledger(tmp_path) as led:
        for name, write in WRITES.items():
            trace: list[str] = []
            led.db.set_trace_callback(trace.append)
            write(led)
            led.db.set_trace_callback(None)
            assert trace[0] == "BEGIN IMMEDIATE", name
            assert trace[-1] == "COMMIT", name
            assert sum(s.startswith("BEGIN") for s in trace) == 1, (name, trace)
            assert not led.db.in_transaction
        rows = {r["task"]: r for r in led.tasks_of("r1")}
        assert rows["a"]["status"] == "succeeded" and rows["b"]["status"] == "interrupted"


def test_a_failing_write_leaves_nothing_behind(tmp_path):
    with Ledger(tmp_path) as led:
        led.start_run("r1", "c.yaml", None, command="evalprov apply c")
        with pytest.raises(sqlite3.IntegrityError):
            led.add_attempts("r1", [("h", "a", "k", None), (None, "b", "k", None)])
        assert led.tasks_of("r1") == []  # the first row was rolled back with the second
        assert not led.db.in_transaction


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def test_two_writers_serialise_and_the_second_counts_the_firsts_attempt(tmp_path):
    """Connection A holds the write lock; B's add_attempts waits for it (BEGIN IMMEDIATE, not
    a read that a concurrent insert could overtake), then reads A's committed attempt."""
    def second_writer():  # its own connection, opened and used in its own thread
        with Ledger(tmp_path) as b:
            b.start_run("rb", "c.yaml", None, command="evalprov apply c")
            b.add_attempts("rb", [("h", "t", "k", None)])
            return [r["attempt"] for r in b.tasks_of("rb")]

    a = Ledger(tmp_path)
    reader = sqlite3.connect(tmp_path / DB_NAME)
    try:
        a.start_run("ra", "c.yaml", None, command="evalprov apply c")
        with a._tx() as db:
            db.execute("INSERT INTO task_runs (run_id, host, task, key, attempt, status) "
                       "VALUES ('ra', 'h', 't', 'k', 1, 'pending')")
            t, box = _in_thread(second_writer)
            time.sleep(0.5)
            assert t.is_alive(), f"B did not wait for A's transaction: {box}"
            # a third connection reads the last committed state meanwhile (WAL), not A's row
            assert reader.execute("SELECT COUNT(*) FROM task_runs").fetchone()[0] == 0
        t.join(10)
        assert not t.is_alive() and "error" not in box, box
        assert box["value"] == [2]
        assert reader.execute("SELECT COUNT(*) FROM task_runs").fetchone()[0] == 2
    finally:
        a.close()
        reader.close()


def test_a_writer_that_waits_past_the_timeout_gets_one_line(tmp_path):
    a = Ledger(tmp_path)
    b = Ledger(tmp_path, timeout=0.2)
    try:
        with a._tx(), pytest.raises(EvalprovError) as exc:
            b.start_run("rb", "c.yaml", None, command="evalprov apply c")
        (line,) = exc.value.lines
        assert "locked by another process for more than 0.2s" in line
        assert not b.db.in_transaction
        b.start_run("rb", "c.yaml", None, command="evalprov apply c")  # free again: it works
        assert [r["run_id"] for r in b.runs()] == ["rb"]
    finally:
        a.close()
        b.close()


def test_finish_task_takes_a_task_record_or_its_dict(tmp_path):
    with Ledger(tmp_path) as led:
        led.start_run("r1", "c.yaml", None, command="evalprov apply c")
        led.add_attempts("r1", [("h", "a", "k", None), ("h", "b", "k", None)])
        primary = {"metric": "acc", "name": "strict", "score": 0.5, "primary": True}
        led.finish_task("r1", TaskRecord("h", "a", "succeeded", seconds=2.0, primary=primary,
                                         samples=4, dir="/x/a"))
        led.finish_task("r1", {"host": "h", "task": "b", "status": "weird", "error": "e"})
        a, b = led.tasks_of("r1")
        assert (a["status"], a["metric"], a["score"], a["samples"], a["result_dir"]) == (
            "succeeded", "acc.strict", 0.5, 4, "/x/a")
        assert (b["status"], b["metric"], b["error"]) == ("missing", None, "e")


# --------------------------------------------------------------------------- secrets


def test_no_lit_secret_from_argv_reaches_the_ledger_or_the_lock_file(tmp_path, monkeypatch):
    argv = ["/usr/bin/evalprov", "apply", "c.yaml", "-o",
            f"deployment.env_vars.HF_TOKEN=lit:{SECRET}", f"--override=x.api_key={SECRET}1",
            "--api-key", f"{SECRET}2", "-o", "execution.walltime=04:00:00", "--limit", "h1"]
    monkeypatch.setattr(sys, "argv", argv)
    with locked(tmp_path):
        lock = (tmp_path / LOCK_NAME).read_text()
        with Ledger(tmp_path) as led:
            led.start_run("r1", "c.yaml", None)
            command = led.runs()[0]["command"]
    for text in (lock, command):
        assert SECRET not in text
        assert "deployment.env_vars.HF_TOKEN=***" in text
        assert "--override=x.api_key=***" in text and "--api-key '***'" in text
        assert "execution.walltime=04:00:00" in text and "--limit h1" in text  # kept
    assert files_hold(tmp_path, SECRET) == []


def test_the_lock_names_its_holder_to_a_second_apply(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evalprov", "apply", "c.yaml", "-o",
                                      f"deployment.env_vars.X=lit:{SECRET}"])
    with locked(tmp_path), pytest.raises(EvalprovError) as exc, locked(tmp_path):
        pass
    (line,) = exc.value.lines
    assert "is in use by another evalprov (pid " in line and "apply c.yaml" in line
    assert SECRET not in line


def test_no_older_run_claims_an_instance_a_later_run_or_destroy_took(tmp_path):
    """status tells the truth: a later run's row of the same instance supersedes the older
    one, and destroy marks every run's row of a removed instance destroyed."""
    ledger = Ledger(tmp_path)
    try:
        for run in ("r1", "r2"):
            ledger.start_run(run, "c.yaml", None, command="evalprov apply c.yaml")
            ledger.record_deployment(run, "h1", "evalprov-vllm-0", "aaa", 8000, "serving")
        ledger.record_deployment("r2", "h2", "evalprov-vllm-0", "bbb", 8000, "serving")
        r1 = {d["host"]: d["status"] for d in ledger.deployments_of("r1")}
        assert r1 == {"h1": "superseded by r2"}
        ledger.mark_gone("h1", ["evalprov-vllm-0"])
        r2 = {d["host"]: d["status"] for d in ledger.deployments_of("r2")}
        assert r2 == {"h1": "destroyed", "h2": "serving"}  # h2 was not destroyed
        assert ledger.deployments_of("r1")[0]["status"] == "superseded by r2"
    finally:
        ledger.close()
