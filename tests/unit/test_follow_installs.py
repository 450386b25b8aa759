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
    shown = tmp_path / "follow.out"
    shown.touch()
    # each install holds a step until the follower has shown it (at most 30 s), so the test
    # does not depend on how often a loaded machine lets the follower look
    jobs = {name: subprocess.Popen(
        ["bash", "-c", f"for i in 1 2 3; do echo '{name}: pip: Collecting pkg'$i; "
                       f"for _ in $(seq 300); do grep -q '] {name}: {name}: pip: Collecting "
                       f"pkg'$i'$' {shown} && break; sleep 0.1; done; done; "
                       f"printf 'progress\\r{name}: done\\n'"],
        stdout=log.open("w")) for name, log in logs.items()}
    spec = [f"{name}={job.pid}:{logs[name]}" for name, job in jobs.items()]
    with shown.open("w") as out:
        follow = subprocess.run(["bash", str(SCRIPT), *spec], stdout=out, timeout=120,
                                env={"PATH": "/usr/bin:/bin", "EVALPROV_FOLLOW_EVERY": "0"})
    for job in jobs.values():
        assert job.wait(timeout=10) == 0
    assert follow.returncode == 0
    text = shown.read_text()
    assert not CONTROL.search(text), repr(text)
    lines = text.splitlines()
    for name in logs:
        mine = [line.split("] ", 1)[1] for line in lines if f"] {name}: " in line]
        # each step once, in order (a line only when the last one changed)
        assert mine[:3] == [f"{name}: {name}: pip: Collecting pkg{i}" for i in (1, 2, 3)], lines
        assert len(mine) == len(set(mine)), lines
