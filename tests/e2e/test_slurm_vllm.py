"""Real vLLM (the CPU build, the tiny local model) and NVIDIA's real harness as ONE Slurm
job through `evalprov apply`: the process runtime on the node, from the venvs a cluster
shares (/opt/evalprov on every fake host), on the real Slurm 22.05 test cluster. Both tasks
score, the results come home, and the job leaves no vLLM or harness process on any node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.testbed.slurm import ACCOUNT, PARTITION

pytestmark = [pytest.mark.e2e, pytest.mark.fleet]

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "local_quickstart.yaml"
VENVS = (Path("/opt/evalprov/vllm-venv/bin/vllm"),
         Path("/opt/evalprov/harness-venv/bin/nemo-evaluator"),
         Path("/var/lib/evalprov/models/tiny-llama/config.json"))


@pytest.fixture
def ready():
    missing = [str(p) for p in VENVS if not p.exists()]
    if missing:
        pytest.skip(f"{missing[0]} missing: run scripts/setup (as root)")


def test_real_vllm_and_harness_run_as_one_slurm_job(ready, slurm_cluster, tmp_path):
    c = slurm_cluster
    quick = yaml.safe_load(QUICKSTART.read_text())
    remote = c.dir / "shared" / tmp_path.name
    remote.mkdir(parents=True)
    config = {
        "defaults": [{"execution": "slurm/default"}, {"deployment": "vllm"}, "_self_"],
        "execution": {
            "hostname": "h1", "account": ACCOUNT, "partition": PARTITION,
            "output_dir": str(remote), "local_output_dir": str(tmp_path / "results"),
            "walltime": "00:15:00", "endpoint_readiness_timeout": 600,
            "runtime": "process", "device": "cpu", "sample_data": True,
            "eval_concurrency": 2,
        },
        "deployment": quick["deployment"],
        "evaluation": quick["evaluation"],
    }
    path = tmp_path / "slurm-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "evalprov.cli", "apply", str(path), "-i",
                           str(c.inventory)], capture_output=True, text=True, timeout=1200,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = sorted(p for p in (tmp_path / "results").iterdir() if (p / "summary.json").exists())
    summary = json.loads((runs[-1] / "summary.json").read_text())
    by_task = {t["task"]: t for t in summary["tasks"]}
    for name, metric in (("ifeval", "prompt_level_strict_acc"), ("gpqa_diamond", "score")):
        rec = by_task[name]
        assert rec["status"] == "succeeded", rec
        assert rec["primary"]["metric"] == metric
        assert 0.0 <= rec["primary"]["score"] <= 1.0
        assert rec["samples"] == 5
    job_dir = remote / summary["run"]
    state = json.loads((job_dir / "state.json").read_text())
    assert state["phase"] == "done"
    log = (job_dir / "evalprov-vllm-0.log").read_text(errors="replace")
    assert "--served-model-name" in log or "tiny" in log
    assert "evaluating" in proc.stderr
    for h in c.fleet.hosts:
        ps = c.fleet.exec(h.name, ["ps", "-eo", "args"]).stdout.decode()
        assert "vllm serve" not in ps and "nemo-evaluator" not in ps, ps
    assert c.squeue() == []
