"""`molecule test` of each role's scenario (roles/<role>/molecule/default): create one test-fleet
host (4 stub GPUs, dockerd, the stand-in image) on its own net, converge the role (after the
roles it depends on), converge again (idempotence), verify the host with testinfra, destroy.

Besides molecule's own verdict, the runner stats of every playbook run (recorded by
tests/molecule/callback_plugins/evalprov_stats.py) pin that the first converge changed the host
and the second changed nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.testbed.pytest_plugin import fleet_skip_reason

pytestmark = pytest.mark.fleet

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "evalprov" / "ansible_collections" / "evalprov" / "fleet" / "roles"
PROVISIONING_ROLES = ("evalprov_preflight", "evalprov_image", "evalprov_vllm", "evalprov_health")
SCENARIO_TIMEOUT = 300  # seconds; a scenario takes 20-45 s on 2 busy cores
MOLECULE_NET = os.environ.get("EVALPROV_MOLECULE_NET") or "79"  # as tests/molecule/testbed.yml


def scenario_roles() -> list[str]:
    return sorted(p.parents[2].name for p in ROLES.glob("*/molecule/default/molecule.yml"))


def test_every_provisioning_role_has_a_molecule_scenario():
    assert set(PROVISIONING_ROLES) <= set(scenario_roles())


@pytest.fixture(scope="module")
def molecule() -> str:
    reason = fleet_skip_reason()
    if reason:
        pytest.skip(reason)
    exe = Path(sys.executable).parent / "molecule"
    assert exe.exists(), "molecule is a test dependency: pip install -e .[test]"
    return str(exe)


def run_molecule_test(molecule: str, role: str, workdir: Path) -> tuple[int, str, float]:
    """``molecule test`` in the role's directory with its state in ``workdir``; returns
    (exit code, output, seconds). On timeout the whole molecule process group is killed and
    the instance destroyed."""
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ.get('PATH', '')}",  # its ansible-playbook and pytest
        "MOLECULE_EPHEMERAL_DIRECTORY": str(workdir / "molecule"),
        "EVALPROV_MOLECULE_STATS": str(workdir / "stats.jsonl"),
        "PY_COLORS": "0",
        "ANSIBLE_NOCOLOR": "1",
        "NO_COLOR": "1",
    }
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [molecule, "test"],
        cwd=ROLES / role,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=SCENARIO_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        # leave neither molecule's state ("created") nor the fleet behind for the next run
        for argv, cwd in (
            ([molecule, "destroy"], ROLES / role),
            ([sys.executable, "-m", "tests.testbed", "down", "--net", MOLECULE_NET, "--rm"], ROOT),
        ):
            subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=120, check=False)
        pytest.fail(f"molecule test in roles/{role} took over {SCENARIO_TIMEOUT}s:\n{out[-6000:]}")
    return proc.returncode, out, time.monotonic() - t0


@pytest.mark.parametrize("role", scenario_roles())
def test_molecule_scenario_converges_idempotently_and_verifies(molecule, role, tmp_path):
    code, out, elapsed = run_molecule_test(molecule, role, tmp_path)
    print(f"molecule test roles/{role}: {elapsed:.1f}s")
    assert code == 0, out[-8000:]

    runs = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["playbook"] for r in runs] == [
        "create.yml",
        "converge.yml",  # converge
        "converge.yml",  # idempotence
        "destroy.yml",
    ]
    converge, idempotence = runs[1]["stats"], runs[2]["stats"]
    assert set(converge) == set(idempotence) == {"h1"}
    for run in (converge, idempotence):
        assert run["h1"]["failures"] == run["h1"]["unreachable"] == 0
    assert converge["h1"]["changed"] > 0
    assert idempotence["h1"]["changed"] == 0
