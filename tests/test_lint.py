"""Lint is part of the test command: ruff for Python, ansible-lint (production profile) for
playbooks and roles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(not (ROOT / "roles").exists() or not any((ROOT / "roles").iterdir()),
                    reason="no roles yet")
def test_ansible_lint_production_profile():
    exe = shutil.which("ansible-lint")
    assert exe, "ansible-lint is a test dependency: pip install -e .[test]"
    proc = subprocess.run([exe, "--profile", "production", "--offline", "playbooks", "roles"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
