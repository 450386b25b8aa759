"""The command line: usage errors are one line with exit 2 and no traceback, `ls tasks` lists
the task table, and `--debug` is the one way to get a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evalprov import __version__
from evalprov.cli import main
from evalprov.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SEED = str(REPO / "examples" / "nel_seed.yaml")
BAD = str(REPO / "tests" / "data" / "bad_configs" / "tp_zero.yaml")
BAD_LINE = "deployment.tensor_parallel_size: got 0: input should be greater than or equal to 1"


def usage_error(argv: list[str], capsys) -> str:
    """Run main(argv), expect an argparse-style usage error, return its one stderr line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("evalprov: error: ")
    return err


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: command"),
        (["validate"], "the following arguments are required: config"),
        (["plan", SEED, "--gpus", "-1"], "--gpus -1: a GPU count is 0 or more"),
        (["plan", SEED, "--gpus", "many"], "argument --gpus: invalid int value: 'many'"),
        (["validate", SEED, "--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["plan", SEED, "--format", "csv"], "argument --format: invalid choice: 'csv'"),
        (["ls"], "the following arguments are required: what"),
        (["ls", "models"], "invalid choice: 'models'"),
        (["validate", SEED, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_usage_error_is_one_line_exit_2(argv, expect, capsys):
    err = usage_error(argv, capsys)
    assert expect in err
    assert "--help" in err  # says where to look next


def test_usage_error_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "evalprov.cli", "validate"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_unknown_harness_filter_is_one_line(capsys):
    assert main(["ls", "tasks", "--harness", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --harness: unknown harness 'nope'; one of ")
    assert "simple_evals" in err and err.count("\n") == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"evalprov {__version__}\n"


# --------------------------------------------------------------------------- ls tasks


def test_ls_tasks_lists_ifeval_with_its_harness_and_image(capsys):
    assert main(["ls", "tasks"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    ifeval = [r for r in rows if r and r[0] == "ifeval"]
    assert ifeval[0][1:4] == [
        "lm-evaluation-harness", "chat", "nvcr.io/nvidia/eval-factory/lm-evaluation-harness:26.03",
    ]
    # the other harness that defines ifeval is listed with the name that picks it
    assert any(r[1] == "codec" and "codec.ifeval" in " ".join(r) for r in ifeval[1:])
    assert len(rows) > 400


def test_ls_tasks_json_filtered_by_harness(capsys):
    assert main(["ls", "tasks", "--harness", "simple_evals", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["harness"] for r in rows} == {"simple_evals"}
    gpqa = next(r for r in rows if r["name"] == "gpqa_diamond")
    assert gpqa["container"] == "nvcr.io/nvidia/eval-factory/simple-evals:26.03"
    assert "ifeval" not in {r["name"] for r in rows}


# --------------------------------------------------------------------------- --debug


def test_config_error_without_debug_is_one_line(capsys):
    assert main(["validate", BAD]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: {BAD_LINE}\n")


@pytest.mark.parametrize("argv", [["--debug", "validate", BAD], ["validate", BAD, "--debug"]])
def test_debug_raises_the_config_error(argv):
    with pytest.raises(ConfigError) as exc:
        main(argv)
    assert exc.value.lines == [BAD_LINE]


def test_debug_prints_a_traceback_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "evalprov.cli", "--debug", "validate", BAD],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"evalprov.errors.ConfigError: {BAD_LINE}" in proc.stderr


def test_an_error_quoting_a_multiline_value_stays_one_line(capsys, tmp_path):
    """The message embeds the interpolation text raw; the CLI escapes control characters."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text('execution:\n  output_dir: "${oc.env:A\\nB}"\n')
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    # OmegaConf's grammar refuses a newline in a variable name
    assert err.startswith("error: execution.output_dir: '${oc.env:A\\nB}' is not a valid "
                          "interpolation")
