"""Golden output of `evalprov plan` (text) and `evalprov inventory` for the shipped examples,
run through `evalprov.cli.main` exactly as a user types them (from the repository root).

A change in what evalprov prints fails here with a unified diff. When the change is intended,
regenerate and review the diff of tests/golden/ before committing:

    EVALPROV_UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from evalprov.cli import main

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UPDATE_ENV = "EVALPROV_UPDATE_GOLDEN"

# example -> the extra arguments its header comment gives
EXAMPLES = {
    "nel_seed": [],
    "slurm_llama_3_1_8b_instruct": [],
    "slurm_llama_3_1_8b_instruct_hf": [],
    "baremetal_llama_3_1_8b_instruct": ["-i", "inventories/fleet.yml"],
    "baremetal_multinode_llama_3_1_405b_instruct": ["-i", "inventories/multinode.yml"],
}
COMMANDS = {"plan": ("plan.txt", ["--format", "text"]), "inventory": ("inventory.yaml", [])}


def check_golden(path: Path, actual: str, update: bool) -> None:
    """Compare ``actual`` with the golden file (or write it when ``update``); fail with a
    unified diff naming the file and how to regenerate it."""
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        pytest.fail(f"golden file {path.name} is missing; create it with {UPDATE_ENV}=1",
                    pytrace=False)
    expected = path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=f"tests/golden/{path.name}", tofile="actual",
        ))
        pytest.fail(f"output differs from tests/golden/{path.name} (if intended, regenerate "
                    f"with {UPDATE_ENV}=1 and review the diff):\n{diff}", pytrace=False)


@pytest.fixture
def in_repo(repo, monkeypatch):
    """Run from the repository root with an environment that cannot leak into the output."""
    monkeypatch.chdir(repo)
    monkeypatch.setenv("USER", "evalprov")
    for name in ("HF_TOKEN", "HF_TOKEN_FOR_GPQA_DIAMOND"):
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith(("EVALPROV_", "ANSIBLE_")) and name != UPDATE_ENV:
            monkeypatch.delenv(name)
    return repo


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_output_matches_golden(in_repo, capsys, example, command):
    suffix, fmt = COMMANDS[command]
    code = main([command, f"examples/{example}.yaml", *EXAMPLES[example], *fmt])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert str(in_repo) not in out  # no machine paths
    check_golden(GOLDEN / f"{example}.{suffix}", out, os.environ.get(UPDATE_ENV) == "1")


def test_every_golden_file_belongs_to_a_test():
    expected = {f"{e}.{s}" for e in EXAMPLES for s, _ in COMMANDS.values()}
    assert {p.name for p in GOLDEN.iterdir()} == expected


def test_a_changed_output_fails_with_a_unified_diff(tmp_path):
    golden = tmp_path / "x.plan.txt"
    golden.write_text("line one\nport 8000\n")
    check_golden(golden, "line one\nport 8000\n", update=False)
    with pytest.raises(pytest.fail.Exception) as err:
        check_golden(golden, "line one\nport 8001\n", update=False)
    text = str(err.value)
    assert "--- tests/golden/x.plan.txt" in text and "+++ actual" in text
    assert "-port 8000" in text and "+port 8001" in text and UPDATE_ENV in text
    with pytest.raises(pytest.fail.Exception, match="missing"):
        check_golden(tmp_path / "absent.txt", "x", update=False)
