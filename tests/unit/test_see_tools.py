"""The report, MLflow and W&B against the real things: the report opened in headless
Chromium (Debian's package; no console message, the timeline and chart carry the run's
numbers, a screenshot kept), a real MLflow tracking server (sqlite backend, from
/opt/evalprov/mlflow-venv: scripts/install-mlflow) receiving an export that its own client
reads back, and W&B in offline mode writing a run directory whose summary holds the scores.
Everything listens on and talks to 127.0.0.1 only."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from evalprov import export, report, results
from tests.unit.seerun import IMAGE_ID, make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MLFLOW_VENV = Path(os.environ.get("EVALPROV_MLFLOW_VENV", "/opt/evalprov/mlflow-venv"))
ROOT = os.geteuid() == 0
BOUND = 120.0  # seconds: every wait below


def _keep(path: Path) -> None:
    """A test artifact: copied to $EVALPROV_ARTIFACTS when set."""
    dest = os.environ.get("EVALPROV_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(dest) / path.name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- chromium


def _chromium(args: list[str], page: Path, profile: Path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if not ROOT:
            pytest.skip("chromium is not installed and this is not root (scripts/setup "
                        "installs Debian's chromium as root)")
        pytest.fail("chromium is not installed: run scripts/setup (apt-get install chromium)")
    argv = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}",
            *(["--no-sandbox"] if ROOT else []), *args, page.as_uri()]
    return subprocess.run(argv, capture_output=True, text=True, timeout=BOUND, check=False)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Refused to" in line]


def test_the_report_in_headless_chromium(tmp_path, monkeypatch):
    made = make_run(tmp_path / "out", "r1", hosts=("h1", "h2"), placement="every_host",
                    scores={("h1", "ifeval"): 0.5, ("h2", "ifeval"): 0.75,
                            ("h1", "gpqa_diamond"): 0.25},
                    fail={("h2", "gpqa_diamond")}, log_line="<b>Traceback: boom</b>",
                    monkeypatch=monkeypatch)
    page = report.write_report(made.run_dir)
    # the console check itself works: a page with a failing script is caught
    bad = tmp_path / "control.html"
    bad.write_text("<html><body><script>throw new Error('control-boom')</script></body></html>")
    control = _chromium(["--dump-dom"], bad, tmp_path / "profile-control")
    assert any("control-boom" in line for line in _console(control.stderr)), control.stderr

    proc = _chromium(["--dump-dom"], page, tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _console(proc.stderr) == []
    dom = proc.stdout
    summary = results.load_summary(made.run_dir)
    # the timeline: every host's phases with their seconds, every task of the run
    bars = re.findall(r'<g class="bar" data-host="([^"]+)" data-kind="([^"]+)"\s+'
                      r'data-label="([^"]+)" data-seconds="([^"]+)" data-status="([^"]+)"',
                      dom)
    seen = {(h, k): float(s) for h, k, _, s, _ in bars}
    for host in ("h1", "h2"):
        assert seen[(host, "pull")] == 3.0 and seen[(host, "healthy")] == 3.0
        assert seen[(host, "start")] == 2.0 and seen[(host, "fetch")] == 1.0
    tasks = [(h, label, status) for h, k, label, _, status in bars if k == "task"]
    assert sorted(tasks) == [("h1", "task gpqa_diamond", "ok"), ("h1", "task ifeval", "ok"),
                             ("h2", "task gpqa_diamond", "failed"), ("h2", "task ifeval", "ok")]
    # the chart: one bar per task and host with the run's scores
    chart = {(t, h): float(s) for t, h, s in re.findall(
        r'class="score-bar" data-task="([^"]+)"\s+data-host="([^"]+)" data-score="([^"]+)"',
        dom)}
    want = {(r["task"], r["host"]): r["primary"]["score"] for r in summary["tasks"]
            if r["primary"]}
    assert chart == want == {("ifeval", "h1"): 0.5, ("ifeval", "h2"): 0.75,
                             ("gpqa_diamond", "h1"): 0.25}
    # failures with the log tail (as text), the record
    assert html.escape("<b>Traceback: boom</b>") in dom and "<b>Traceback" not in dom
    assert IMAGE_ID in dom
    shot = tmp_path / "report-r1.png"
    proc = _chromium([f"--screenshot={shot}", "--window-size=1280,2200",
                      "--hide-scrollbars"], page, tmp_path / "profile-shot")
    assert proc.returncode == 0 and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _keep(shot)


# --------------------------------------------------------------------------- mlflow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    exe = MLFLOW_VENV / "bin" / "mlflow"
    if not exe.exists():
        if not ROOT:
            pytest.skip(f"no MLflow venv at {MLFLOW_VENV} and not root (scripts/install-mlflow "
                        "makes it)")
        pytest.fail(f"no MLflow venv at {MLFLOW_VENV}: run scripts/install-mlflow")
    base = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = (base / "server.log").open("w")
    proc = subprocess.Popen(
        [str(exe), "server", "--backend-store-uri", f"sqlite:///{base}/mlflow.db",
         "--artifacts-destination", str(base / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=base,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    uri = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + BOUND
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer in {BOUND:g} s: "
                            f"{(base / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


READ_BACK = """
import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient(sys.argv[1])
exp = c.get_experiment_by_name(sys.argv[2])
runs = c.search_runs([exp.experiment_id])
def walk(run_id, path=None):
    for a in c.list_artifacts(run_id, path):
        yield from (walk(run_id, a.path) if a.is_dir else [a.path])
out = []
for r in runs:
    report = c.download_artifacts(r.info.run_id, "report.html", sys.argv[3])
    out.append({"run_id": r.info.run_id, "status": r.info.status, "name": r.info.run_name,
                "metrics": r.data.metrics, "params": r.data.params, "tags": r.data.tags,
                "artifacts": sorted(walk(r.info.run_id)),
                "report": open(report).read()})
print(json.dumps(out))
"""


def _read_back(uri: str, experiment: str, tmp: Path) -> list[dict]:
    proc = subprocess.run([str(MLFLOW_VENV / "bin" / "python"), "-c", READ_BACK, uri,
                           experiment, str(tmp)], capture_output=True, text=True,
                          timeout=BOUND, check=False, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_to_a_real_mlflow_server_read_back_by_its_client(tmp_path, monkeypatch,
                                                                 mlflow_server):
    made = make_run(tmp_path / "out", "r1", hosts=("h1", "h2"), placement="every_host",
                    scores={("h1", "ifeval"): 0.5, ("h2", "ifeval"): 0.75},
                    fail={("h2", "gpqa_diamond")}, monkeypatch=monkeypatch)
    cfg = {"tracking_uri": mlflow_server, "experiment_name": "evalprov-test",
           "tags": {"team": "eval"}, "description": "nightly"}
    where = export.export(made.run_dir, "mlflow", cfg)
    assert where.startswith(f"{mlflow_server} experiment ")
    again = export.export(made.run_dir, "mlflow", cfg)  # the same run is not sent twice
    assert again.endswith("(exported before; not again)")
    (run,) = _read_back(mlflow_server, "evalprov-test", tmp_path / "dl")
    assert run["run_id"] in where and run["name"] == "r1"
    assert run["status"] == "FAILED"  # h2's gpqa_diamond failed
    m = run["metrics"]
    assert m["h1/ifeval/prompt_level_strict_acc.prompt_level_strict_acc"] == 0.5
    assert m["h2/ifeval/prompt_level_strict_acc.prompt_level_strict_acc"] == 0.75
    assert m["h1/gpqa_diamond/score.micro"] == 0.2
    assert not any(k.startswith("h2/gpqa_diamond/score") for k in m)
    summary = results.load_summary(made.run_dir)
    assert m["run/gpu_hours"] == pytest.approx(summary["usage"]["gpu_hours"])
    p = run["params"]
    assert p["evalprov.run"] == "r1" and p["vllm_version"] == "0.9.1"
    assert p["h1.image_id"] == IMAGE_ID and p["config_sha256"] == summary["record"][
        "config_sha256"]
    assert run["tags"]["evalprov.run"] == "r1" and run["tags"]["team"] == "eval"
    assert run["tags"]["mlflow.note.content"] == "nightly"
    assert run["artifacts"] == ["logs/h1/gpqa_diamond/harness.log",
                                "logs/h1/ifeval/harness.log",
                                "logs/h2/gpqa_diamond/harness.log",
                                "logs/h2/ifeval/harness.log", "report.html", "summary.json"]
    assert 'id="timeline"' in run["report"] and "evalprov run" in run["report"]


# --------------------------------------------------------------------------- wandb


def test_export_to_wandb_offline_writes_a_run_whose_summary_holds_the_scores(tmp_path,
                                                                             monkeypatch):
    pytest.importorskip("wandb", reason="wandb is the optional extra evalprov[wandb] (and "
                        "in evalprov[test])")
    made = make_run(tmp_path / "out", "r1", scores={("h1", "ifeval"): 0.5,
                                                     ("h1", "gpqa_diamond"): 0.25},
                    monkeypatch=monkeypatch)
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    where = export.export(made.run_dir, "wandb", {"project": "evalprov-test",
                                                  "dir": str(tmp_path / "wb")})
    assert where.startswith("wandb run ") and "(offline)" in where
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert where.endswith(str(run_dir))
    summary = wait_offline_summary(run_dir)
    assert summary["ifeval/prompt_level_strict_acc.prompt_level_strict_acc"] == 0.5
    assert summary["gpqa_diamond/score.micro"] == 0.25
    assert summary["ifeval/gpu_hours"] == pytest.approx(2 * 30 / 3600, abs=1e-6)
    assert summary["run/gpu_hours"] == pytest.approx(
        results.load_summary(made.run_dir)["usage"]["gpu_hours"])


def wait_offline_summary(run_dir: Path, timeout: float = 60.0) -> dict:
    """The offline run's summary once wandb's service has flushed it (run.finish() can
    return while the service still writes the run's log on a busy machine): bounded."""
    import time

    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return offline_summary(run_dir)
        except (AssertionError, ValueError, DecodeError):  # a record still being written
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def offline_summary(run_dir: Path) -> dict:
    """The run's summary as W&B stored it: files/wandb-summary.json where the SDK writes
    one, else the summary records of the run's own log (run-<id>.wandb; wandb 0.31 writes
    only that in offline mode): a W&B header, then LevelDB-log chunks of protobuf records."""
    path = run_dir / "files" / "wandb-summary.json"
    if path.exists():
        return json.loads(path.read_text())
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("run-*.wandb")
    data = log.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending, out = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind, chunk = data[pos + 6], data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (2, 3):  # FIRST, MIDDLE
            pending += chunk
            continue
        if kind not in (1, 4):  # FULL, LAST
            continue
        rec = pb.Record.FromString(pending + chunk)
        pending = b""
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
    assert out, f"no summary record in {log}"
    return out
