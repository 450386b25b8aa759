"""scripts/follow-installs, which the quickstart runs while its installs go on in the
background: what each install is doing, as plain lines without control characters when its
output is not a terminal, and it ends when the installs have ended."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "follow-installs"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def test_installs_show_their_steps_as_plain_lines_and_the_follow_ends_with_them(tmp_path):
    logs = {name: tmp_path / f"{name}.log" for name in ("vllm", "harness")}
    jobs = {name: subprocess.Popen(
        ["bash", "-c", f"for i in 1 2 3; do echo '{name}: pip: Collecting pkg'$i; "
                       f"sleep 1.2; done; printf 'progress\\r{name}: done\\n'"],
        stdout=log.open("w")) for name, log in logs.items()}
    spec = [f"{name}={job.pid}:{logs[name]}" for name, job in jobs.items()]
    follow = subprocess.run(["bash", str(SCRIPT), *spec], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin",
                                             "EVALPROV_FOLLOW_EVERY": "0"})
    for job in jobs.values():
        assert job.wait(timeout=10) == 0
    assert follow.returncode == 0
    assert not CONTROL.search(follow.stdout), repr(follow.stdout)
    lines = follow.stdout.splitlines()
    for name in logs:
        mine = [line.split("] ", 1)[1] for line in lines if f"] {name}: " in line]
        # each step once, in order (a line only when the last one changed)
        assert mine[:2] == [f"{name}: {name}: pip: Collecting pkg1",
                            f"{name}: {name}: pip: Collecting pkg2"], lines
        assert len(mine) == len(set(mine)), lines
