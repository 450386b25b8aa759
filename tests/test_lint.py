"""Lint is part of the test command: ruff for Python, ansible-lint (production profile) for
playbooks and roles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


COLLECTION = ROOT / "evalprov" / "ansible_collections" / "evalprov" / "fleet"


def test_ansible_lint_production_profile(tmp_path):
    """The collection evalprov.fleet (playbooks, roles, plugins) as ansible-lint sees a
    collection: run from its root."""
    exe = shutil.which("ansible-lint")
    assert exe, "ansible-lint is a test dependency: pip install -e .[test]"
    # this tree's collection first (not a copy some earlier tool left in ~/.ansible)
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": os.pathsep.join(
        [str(ROOT / "evalprov"), "/usr/share/ansible/collections"]),
        # and no copy of it in ~/.ansible (molecule installs one there) is looked at
        "ANSIBLE_HOME": str(tmp_path / "ansible-home")}
    proc = subprocess.run([exe, "--profile", "production", "--offline", "playbooks", "roles"],
                          cwd=COLLECTION, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_test_modules_have_unique_basenames():
    """pytest's default import mode imports test files by basename: two files with one name in
    different folders abort collection of the whole suite."""
    seen: dict[str, Path] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a basename; rename one"
        seen[path.name] = path
