"""The real evaluation harness (`nemo-evaluator run_eval` from nvidia-lm-eval / nvidia-simple-evals
26.3), offline: ifeval and gpqa_diamond on evalprov's own sample rows, against the OpenAI-compatible
stand-in server on 127.0.0.1, driven only through evalprov.harness.

Needs the venv made by scripts/install-harness (EVALPROV_HARNESS_VENV, default
/opt/evalprov/harness-venv); skipped with a reason when it is missing. All traffic stays on
127.0.0.1 (the stand-in and run_eval's own adapter proxy).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from evalprov import harness

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "testbed" / "standin" / "server.py"
VENV = harness.harness_venv()
SERVED_NAME = "tiny"
LIMIT, MAX_NEW_TOKENS, PARALLELISM = 5, 64, 2
HEALTH_DEADLINE = 20.0
RUN_DEADLINE = 600.0

if not (VENV / "bin" / "nemo-evaluator").exists():
    pytest.skip(
        f"harness venv missing ({VENV}/bin/nemo-evaluator): run scripts/install-harness "
        "or set EVALPROV_HARNESS_VENV",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def _requests_served(base: str) -> int:
    _, body = _get(base + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("vllm:num_requests_total "):
            return int(line.split()[1])
    raise AssertionError(f"no request counter in /metrics: {body[:200]!r}")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The stand-in vLLM server on 127.0.0.1: its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("standin") / "server.log"
    argv = [sys.executable, str(STANDIN), "serve", "tiny-model", "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", SERVED_NAME]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + HEALTH_DEADLINE
        while True:
            if proc.poll() is not None:
                pytest.fail(f"stand-in exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if _get(base + "/health", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"stand-in not healthy in {HEALTH_DEADLINE} s: {log.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("task", "harness_name"),
    [("ifeval", "lm-evaluation-harness"), ("gpqa_diamond", "simple_evals")],
)
def test_real_harness_scores_sample_data_offline(standin, tmp_path, task, harness_name):
    out = tmp_path / "out"
    cfg = harness.run_config(
        task, harness_name, harness.endpoint_url(standin, "chat"), SERVED_NAME, "chat", out,
        {"limit_samples": LIMIT, "max_new_tokens": MAX_NEW_TOKENS, "parallelism": PARALLELISM},
    )
    path = harness.write_run_config(cfg, tmp_path / harness.RUN_CONFIG_NAME)
    inv = harness.invocation(path, venv=VENV, cache_dir=tmp_path)
    samples_before = _tree(inv.cwd)
    served_before = _requests_served(standin)

    started = time.monotonic()
    with (tmp_path / "run_eval.log").open("w") as log:
        proc = subprocess.run(inv.argv, env=inv.env, cwd=inv.cwd, stdout=log,
                              stderr=subprocess.STDOUT, timeout=RUN_DEADLINE, check=False)
    seconds = time.monotonic() - started
    text = (tmp_path / "run_eval.log").read_text()
    assert proc.returncode == 0, f"run_eval exited {proc.returncode}:\n{text[-4000:]}"
    print(f"{task}: run_eval {seconds:.1f} s")

    results = out / "results.yml"
    assert results.is_file(), f"no results.yml in {sorted(p.name for p in out.iterdir())}"
    best = harness.primary_score(harness.read_scores(results), task)
    assert isinstance(best["score"], float)
    assert 0.0 <= best["score"] <= 1.0
    assert (best["metric"], best["name"]) == harness.PRIMARY[task]

    # The harness ran what we asked for: our params, on LIMIT samples of our sample data.
    used = yaml.safe_load((out / "run_config.yml").read_text())["config"]
    assert used["type"] == f"{harness_name}.{task}"
    assert used["params"]["limit_samples"] == LIMIT
    assert used["params"]["max_new_tokens"] == MAX_NEW_TOKENS
    assert used["params"]["parallelism"] == PARALLELISM
    stats = json.loads((out / "eval_factory_metrics.json").read_text())["response_stats"]
    assert stats["successful_count"] == LIMIT
    assert _requests_served(standin) - served_before == LIMIT

    # Offline: lm-eval's import-time punkt_tab download was never attempted, and the harness
    # wrote nothing into the (possibly read-only, installed) samples directory.
    assert "[nltk_data]" not in text
    assert _tree(inv.cwd) == samples_before
