"""The hostile-input corpus: every file under tests/data/bad_configs/ is a config a user could
write, and `evalprov validate` must answer it with one `error:` line per problem that names
the field, the value and the fix, exit code 2, and no traceback.

File header (comment lines at the top of each YAML file):
    # expect: <substring of the error output>        required
    # args: -o key=value ...                          optional, extra CLI arguments
    # errors: N                                       optional, error lines expected (default 1)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from evalprov.cli import main

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "bad_configs"
UNSET_VAR = "EVALPROV_TEST_SURELY_UNSET_VAR"


@dataclass(frozen=True)
class Case:
    path: Path
    expect: str
    args: tuple[str, ...]
    errors: int

    @property
    def argv(self) -> list[str]:
        return ["validate", str(self.path), *self.args]


def _case(path: Path) -> Case:
    header = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^# (expect|args|errors): (.*)$", line)
        if not m:
            break
        header[m.group(1)] = m.group(2)
    return Case(
        path=path,
        expect=header.get("expect", ""),
        args=tuple(shlex.split(header.get("args", ""))),
        errors=int(header.get("errors", "1")),
    )


CASES = [_case(p) for p in sorted(CORPUS.glob("*.yaml"))]


def _error_lines(stderr: str) -> list[str]:
    """stderr minus warnings; what remains must all be error lines."""
    return [line for line in stderr.splitlines() if not line.startswith("warning: ")]


def check_answer(case: Case, rc: int, stdout: str, stderr: str) -> None:
    assert rc == 2, f"{case.path.name}: exit {rc}\n{stderr}"
    assert "Traceback" not in stdout + stderr
    lines = _error_lines(stderr)
    assert lines, f"{case.path.name}: no error printed"
    bad = [line for line in lines if not line.startswith("error: ")]
    assert not bad, f"{case.path.name}: lines not starting with 'error: ': {bad}"
    assert case.expect in stderr, f"{case.path.name}: {case.expect!r} not in\n{stderr}"
    assert len(lines) == case.errors, f"{case.path.name}: {len(lines)} error lines\n{stderr}"
    assert stdout == "", "a config that fails validation prints nothing on stdout"


def test_corpus_covers_at_least_30_configs_each_with_an_expectation():
    assert len(CASES) >= 30
    missing = [c.path.name for c in CASES if not c.expect]
    assert not missing, f"files without '# expect:' on line 1: {missing}"


@pytest.mark.parametrize("case", CASES, ids=[c.path.stem for c in CASES])
def test_bad_config_gets_one_line_per_error_and_exit_2(case, capsys, monkeypatch):
    monkeypatch.delenv(UNSET_VAR, raising=False)
    rc = main(case.argv)
    out, err = capsys.readouterr()
    check_answer(case, rc, out, err)


# A handful through the real process: the console entry point behaves as main() does.
SUBPROCESS_CASES = [
    "invalid_yaml", "empty", "typo_top_level", "env_unset", "override_no_equals",
    "value_with_newline", "task_unknown_ifevl",
]


def _run(argv: list[str], *, console_script: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != UNSET_VAR}
    if console_script:
        exe = shutil.which("evalprov") or str(Path(sys.executable).parent / "evalprov")
        assert Path(exe).exists(), "the evalprov console script is not installed (pip install -e .)"
        cmd = [exe, *argv]
    else:
        cmd = [sys.executable, "-m", "evalprov.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


@pytest.mark.parametrize("stem", SUBPROCESS_CASES)
def test_bad_config_in_a_real_process(stem):
    case = _case(CORPUS / f"{stem}.yaml")
    proc = _run(case.argv)
    check_answer(case, proc.returncode, proc.stdout, proc.stderr)


def test_console_script_answers_like_python_m():
    case = _case(CORPUS / "typo_deployment.yaml")
    proc = _run(case.argv, console_script=True)
    check_answer(case, proc.returncode, proc.stdout, proc.stderr)


def test_nonexistent_config_file_is_one_line(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert main(["validate", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert err == (f"error: config: file {str(missing)!r} not found; "
                   "give the path of a YAML config\n")
    assert out == ""


def test_directory_instead_of_config_file_is_one_line(capsys, tmp_path):
    assert main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config: cannot read") and err.count("\n") == 1


def test_env_value_error_does_not_echo_the_value(capsys):
    """An unprefixed env value may be a pasted secret: the error names the variable only."""
    rc = main(["validate", str(CORPUS / "env_value_spaces.yaml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "HF_TOKEN" in err
    assert "secret" not in err


def test_placeholder_and_typo_are_both_reported(capsys):
    """A ??? left in does not hide other mistakes in the same file."""
    main(["validate", str(CORPUS / "typo_and_placeholder.yaml")])
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [
        "error: deployment.served_model_name: required value missing (??? placeholder); set it "
        "in the config or with -o deployment.served_model_name=VALUE",
        "error: execution.placment: unknown field; did you mean placement?",
    ]


def test_misspelled_required_field_is_one_line_not_two(capsys):
    """`acount:` in slurm execution: the typo line alone, not also 'account missing'."""
    main(["validate", str(CORPUS / "typo_execution.yaml")])
    lines = _error_lines(capsys.readouterr().err)
    assert lines == ["error: execution.acount: unknown field; did you mean account?"]
