"""Every subcommand: an examples epilog, --debug (a traceback only with it), one line for a
damaged summary.json or evalprov.db, quiet exit into a closed pipe; `logs` without a run id
picks the newest run that ran the task."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import evalprov.show
from evalprov.cli import COMMANDS, PIPE_EXIT, build_parser, main
from evalprov.errors import EvalprovError
from evalprov.ledger import DB_NAME, SCHEMA_VERSION, Ledger
from evalprov.results import SUMMARY

REPO = Path(__file__).resolve().parents[2]
BAD = str(REPO / "tests" / "data" / "bad_configs" / "tp_zero.yaml")
SEED = str(REPO / "examples" / "nel_seed.yaml")


def leaf_parsers(parser: argparse.ArgumentParser, path=()):
    """(words, parser) of every runnable subcommand, e.g. (("ls", "tasks"), <parser>)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaf_parsers(child, (*path, name))


def all_parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, child in a.choices.items():
                yield from all_parsers(child, (*path, name))


# argv per runnable subcommand that makes it fail with a domain error before it touches
# any host; {out} is an empty directory
FAILING = {
    ("validate",): ["validate", BAD],
    ("migrate",): ["migrate", BAD],
    ("plan",): ["plan", BAD],
    ("inventory",): ["inventory", BAD],
    ("apply",): ["apply", BAD],
    ("destroy",): ["destroy", BAD],
    ("results",): ["results", "--output-dir", "{out}/nope"],
    ("logs",): ["logs", "--output-dir", "{out}/nope"],
    ("status",): ["status", "--output-dir", "{out}"],
    ("ls", "tasks"): ["ls", "tasks", "--harness", "nope"],
    ("report",): ["report", "--output-dir", "{out}/nope"],
    ("compare",): ["compare", "a", "b", "--output-dir", "{out}/nope"],
    ("export",): ["export", "--to", "json", "--output-dir", "{out}/nope"],
}


def test_the_table_names_every_subcommand_and_each_has_examples_and_debug():
    parser = build_parser()
    assert {p for p, _ in leaf_parsers(parser)} == set(FAILING)
    assert [c.name for c in COMMANDS] == list(
        next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    for path, p in all_parsers(parser):
        if not path:
            continue
        assert p.epilog and p.epilog.startswith("examples:\n  evalprov "), path
        assert "--debug" in p._option_string_actions, path
        assert "examples:" in p.format_help(), path


@pytest.mark.parametrize("words", sorted(FAILING), ids=" ".join)
def test_every_subcommand_is_one_line_without_debug_and_raises_with_it(words, tmp_path,
                                                                       capsys):
    argv = [a.format(out=tmp_path) for a in FAILING[words]]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(EvalprovError):
        main([*argv, "--debug"])
    with pytest.raises(EvalprovError):
        main(["--debug", *argv])


def test_debug_after_ls_too(capsys):
    with pytest.raises(EvalprovError):
        main(["ls", "--debug", "tasks", "--harness", "nope"])


def test_an_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("a bug\nwith two lines")

    monkeypatch.setattr(evalprov.show, "tasks_text", broken)
    assert main(["ls", "tasks"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: internal error: RuntimeError: a bug\\nwith two lines; run again "
                   "with --debug for the traceback\n")
    with pytest.raises(RuntimeError):
        main(["ls", "tasks", "--debug"])


def test_gpus_below_zero_is_a_usage_error_of_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inventory", SEED, "--gpus", "-2"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("evalprov: error: --gpus -2: a GPU count is 0 or more; "
                                       "see `evalprov inventory --help`\n")


@pytest.mark.parametrize("module", ["evalprov", "evalprov.cli"])
def test_python_dash_m(module):
    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("evalprov ")


# --------------------------------------------------------------------------- fixtures


def big_output_dir(out: Path, tasks: int = 4000) -> str:
    """An output_dir with one run of many tasks (ledger + summary.json), more output than a
    pipe buffers."""
    run_id = "20260101-000000-aaaa"
    with Ledger(out) as led:
        led.start_run(run_id, "c.yaml", None, command="evalprov apply c.yaml")
        led.add_attempts(run_id, [("host-" + str(i), "ifeval", "k", None)
                                  for i in range(tasks)])
        led.finish_run(run_id, "succeeded")
    (out / run_id).mkdir()
    (out / run_id / SUMMARY).write_text(json.dumps({"run": run_id, "tasks": [
        {"host": f"host-{i}", "task": "ifeval", "status": "failed", "error": "x" * 80}
        for i in range(tasks)]}))
    return run_id


def with_log(out: Path, run_id: str, host: str, task: str, text: str) -> None:
    log = out / run_id / host / task / "logs" / "harness.log"
    log.parent.mkdir(parents=True)
    log.write_text(text)


# --------------------------------------------------------------------------- broken pipe


@pytest.mark.parametrize("args", [["status"], ["results", "--format", "json"],
                                  ["results"], ["results", "--format", "csv"]])
def test_output_into_head_ends_quietly(args, tmp_path):
    out = tmp_path / "out"
    big_output_dir(out)
    cmd = [sys.executable, "-m", "evalprov", *args, "--output-dir", str(out)]
    proc = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -1', "_", *cmd],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.stdout.count("\n") == 1
    assert proc.stderr in ("", f"run 20260101-000000-aaaa: {out / '20260101-000000-aaaa'}\n"), \
        proc.stderr
    assert proc.returncode == PIPE_EXIT


ALL_COMMANDS_OUTPUT = [
    ["validate", SEED], ["plan", SEED], ["inventory", SEED], ["ls", "tasks"],
    ["status", "--output-dir", "{out}"], ["results", "--output-dir", "{out}"],
    ["logs", "--output-dir", "{out}"], ["--help"], ["ls", "tasks", "--help"],
]


@pytest.mark.parametrize("args", ALL_COMMANDS_OUTPUT, ids=" ".join)
def test_a_pipe_closed_before_any_output_is_quiet_for_every_command(args, tmp_path):
    out = tmp_path / "out"
    run_id = big_output_dir(out, tasks=3)
    with_log(out, run_id, "host-0", "ifeval", "a log\n")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before evalprov writes a byte
    try:
        proc = subprocess.run([sys.executable, "-m", "evalprov",
                               *[a.format(out=out) for a in args]],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              cwd=REPO)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr
    # argparse itself drops a --help it cannot write (exit 0); the rest exit as coreutils do
    assert proc.returncode in ((0, PIPE_EXIT) if "--help" in args else (PIPE_EXIT,)), \
        proc.stderr


# --------------------------------------------------------------------------- damaged files


def test_damaged_summary_json_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    run_id = big_output_dir(out, tasks=2)
    summary = out / run_id / SUMMARY
    for content in (os.urandom(4096), b'{"run": "x", "tasks": [', b'{"run": "x"}',
                    b'{"run": "x", "tasks": [{"host": 1}]}', b"[]"):
        summary.write_bytes(content)
        assert main(["results", "--output-dir", str(out)]) == 2
        _, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith(f"error: {summary}: not a readable "
                                                       "evalprov summary (")
        assert f"mv {summary} {summary}.broken" in err


def test_damaged_ledger_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / DB_NAME).write_bytes(os.urandom(8192))
    assert main(["status", "--output-dir", str(tmp_path)]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / DB_NAME}: not a readable evalprov ledger")
    with pytest.raises(EvalprovError):
        main(["status", "--output-dir", str(tmp_path), "--debug"])


def test_damaged_files_in_a_real_process_have_no_traceback(tmp_path):
    (tmp_path / DB_NAME).write_bytes(os.urandom(8192))
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / SUMMARY).write_bytes(os.urandom(8192))
    for args in (["status"], ["results"], ["results", "--format", "json"]):
        proc = subprocess.run([sys.executable, "-m", "evalprov", *args, "--output-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=60,
                              cwd=REPO)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_status_of_a_newer_ledger_is_one_line(tmp_path, capsys):
    Ledger(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    assert main(["status", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is newer than this evalprov" in err


# --------------------------------------------------------------------------- logs


def test_logs_without_a_run_picks_the_newest_run_that_ran_the_task(tmp_path, capsys):
    out = tmp_path / "out"
    for run_id in ("20260101-000000-aaaa", "20260102-000000-bbbb", "20260103-000000-cccc"):
        (out / run_id).mkdir(parents=True)
        (out / run_id / SUMMARY).write_text(json.dumps({"run": run_id, "tasks": []}))
    with_log(out, "20260101-000000-aaaa", "h1", "gpqa_diamond", "old gpqa\n")
    with_log(out, "20260102-000000-bbbb", "h1", "ifeval", "ifeval ran here\n")
    # 20260103 is a no-op apply: everything reused, nothing ran, no logs

    assert main(["logs", "--output-dir", str(out), "--task", "ifeval"]) == 0
    stdout, err = capsys.readouterr()
    assert stdout == "==> h1/ifeval/logs/harness.log <==\nifeval ran here\n"
    assert err == ("logs: run 20260102-000000-bbbb, the newest that ran host * task ifeval; "
                   "newer run(s) 20260103-000000-cccc did not run it\n")

    assert main(["logs", "--output-dir", str(out), "--host", "h1", "--task",
                 "gpqa_diamond"]) == 0
    stdout, err = capsys.readouterr()
    assert "old gpqa" in stdout and "run 20260101-000000-aaaa" in err
    assert "20260103-000000-cccc, 20260102-000000-bbbb did not run it" in err

    assert main(["logs", "--output-dir", str(out)]) == 0  # any task: the newest with a log
    assert "run 20260102-000000-bbbb" in capsys.readouterr().err

    # a run id given is taken as given
    assert main(["logs", "20260103", "--output-dir", str(out)]) == 2
    assert "no task log for host * task *" in capsys.readouterr().err

    assert main(["logs", "--output-dir", str(out), "--task", "mmlu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run in" in err and "task mmlu" in err


def test_a_broken_pipe_inside_evalprov_is_not_mistaken_for_a_closed_stdout(monkeypatch,
                                                                            capsys):
    def broken(*a, **k):
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a subprocess evalprov talks to died

    monkeypatch.setattr(evalprov.show, "tasks_text", broken)
    assert main(["ls", "tasks"]) == 1
    assert capsys.readouterr().err.startswith("error: internal error: BrokenPipeError: ")
