"""A finished run written the way `evalprov apply` writes one, without hosts: a real config
file (loaded by the loader), a real decision (evalprov.decide), the ledger through its API,
each task's archive as the eval module packs it (evalprov-task.json, results.yml, the
harness log), ansible-runner-shaped events through the Timeline, and apply.record_run, which
unpacks, scores, writes summary.json, the record and the GPU-hours."""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalprov import apply
from evalprov.check import HostFacts
from evalprov.config.loader import load_config
from evalprov.decide import Inputs, decide
from evalprov.ledger import Ledger
from evalprov.plan import HostFacts as PlanHost
from evalprov.runner import HostResult, RunResult
from evalprov.timeline import Timeline

DATA = Path(__file__).resolve().parents[1] / "data" / "harness"
IMAGE_ID = "sha256:" + "ab" * 32
DIGEST = "registry.test/vllm/vllm-openai@sha256:" + "cd" * 32
SECRET = "hf_sEcReT-value-771"

CONFIG = """\
defaults:
  - execution: baremetal
  - deployment: vllm
  - _self_
deployment:
  image: registry.test/vllm/vllm-openai:v0.9.1
  hf_model_handle: org/model
  served_model_name: tiny
  tensor_parallel_size: {tp}
  env_vars:
    HF_TOKEN: host:EVP_TEST_HF_TOKEN
execution:
  output_dir: {out}
  placement: {placement}
  hf_cache_dir: ${{oc.env:EVP_TEST_CACHE}}
evaluation:
  tasks:
{tasks}
"""


@dataclass
class Made:
    run_id: str
    run_dir: Path
    out: Path
    loaded: Any
    decision: Any


def _event(kind: str, host: str, task: str, start: float, end: float,
           res: dict[str, Any] | None = None) -> dict[str, Any]:
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + (  # noqa: E731
        f"{t % 1:.6f}"[1:] + "+00:00")
    return {"event": kind, "event_data": {"host": host, "task": task, "start": iso(start),
                                          "end": iso(end), "res": res or {}}}


def make_run(out: Path, run_id: str, *, hosts: tuple[str, ...] = ("h1",),
             tasks: tuple[str, ...] = ("ifeval", "gpqa_diamond"),
             scores: dict[tuple[str, str], float] | None = None,
             fail: set[tuple[str, str]] = frozenset(), placement: str = "shard",
             tp: int = 2, seconds: float = 30.0, tmp: Path | None = None,
             log_line: str = "the harness failed", monkeypatch=None) -> Made:
    """One run of `tasks` on `hosts`; scores[(host, task)] replaces every value of its
    results.yml (default 0.2); a (host, task) in fail exits 1 with log_line in its log."""
    scores = scores or {}
    tmp = tmp or out.parent
    cfg = tmp / f"{run_id}.yaml"
    cfg.write_text(CONFIG.format(
        out=out, placement=placement, tp=tp,
        tasks="\n".join(f"    - name: {t}" for t in tasks)))
    environ = {"EVP_TEST_HF_TOKEN": SECRET, "EVP_TEST_CACHE": "/var/lib/evp-cache"}
    if monkeypatch is not None:
        for k, v in environ.items():
            monkeypatch.setenv(k, v)
    loaded = load_config(cfg, environ=environ)
    loaded.source = str(cfg)
    inputs = Inputs(config=loaded.config, hosts=tuple(PlanHost(h, tp) for h in hosts),
                    run_id=run_id, owner="test")
    facts = {h: HostFacts(gpu_count=tp, docker_present=True, docker_running=True,
                          nvidia_runtime=True) for h in hosts}
    d = decide(inputs, facts)
    run_dir = out / run_id
    run_dir.mkdir(parents=True)
    ledger = Ledger(out)
    try:
        ledger.start_run(run_id, str(cfg), None,
                         command=f"evalprov apply {cfg} -o deployment.env_vars.X=lit:{SECRET}")
        ledger.add_attempts(run_id, [(a.host, a.task, a.key, a.instance) for a in d.to_run])
        t0 = time.time()
        timeline = Timeline(lambda event: True)
        for h in hosts:
            ledger.mark_running(run_id, h)
            marks = [("Preflight | Probe", 0, 1), ("Image | Pull x", 1, 4),
                     ("VLLM | Start the instances", 4, 6),
                     ("Health | Wait for /health and the served model", 6, 9)]
            for name, a, b in marks:
                timeline(_event("runner_on_ok", h, name, t0 + a, t0 + b))
            host_tasks = [t for t in d.plan.host(h).tasks]
            for i, t in enumerate(host_tasks):
                key = (h, t.name)
                src = tmp / "src" / run_id / h / t.slug
                (src / "logs").mkdir(parents=True)
                (src / "logs" / "harness.log").write_text(
                    "starting\n" + (f"{log_line}\n" if key in fail else "done\n"))
                rc = 1 if key in fail else 0
                (src / "evalprov-task.json").write_text(json.dumps(
                    {"name": t.name, "slug": t.slug, "rc": rc, "seconds": seconds,
                     "started": t0 + 10 + i * seconds}))
                if rc == 0:
                    (src / "results").mkdir()
                    text = (DATA / f"{t.name}.results.yml").read_text()
                    value = scores.get(key, 0.2)
                    (src / "results" / "results.yml").write_text(
                        text.replace("value: 0.2", f"value: {value}"))
                archive = run_dir / "fetch" / h / f"{t.slug}.tar.gz"
                archive.parent.mkdir(parents=True, exist_ok=True)
                with tarfile.open(archive, "w:gz") as tar:
                    tar.add(src, arcname=t.slug)
                shutil.rmtree(src)
            end = t0 + 10 + len(host_tasks) * seconds
            prov = {"instances": {i.name: {"vllm_version": "0.9.1", "image_id": IMAGE_ID}
                                  for i in d.plan.host(h).instances},
                    "images": {IMAGE_ID: {"id": IMAGE_ID, "repo_digests": [DIGEST],
                                          "repo_tags": ["registry.test/vllm/vllm-openai:v0.9.1"]}},
                    "model": {"kind": "hf", "id": "org/model", "revision": "f" * 40,
                              "ref": "main"},
                    "harness": {"nvcr.io/x": {"versions": {"nemo-evaluator": "0.2.8"}}}}
            timeline(_event("runner_on_ok", h, "Eval | Run the evaluation tasks", t0 + 10,
                            end, {"provenance": prov, "tasks": []}))
            timeline(_event("runner_on_ok", h, "Eval | Fetch each task's results and log",
                            end, end + 1))
        result = RunResult("successful", 0, {h: HostResult() for h in hosts},
                           {h: {"docker": {"image": {"id": IMAGE_ID, "digests": []}}}
                            for h in hosts}, 50.0, run_dir / "ansible")
        apply.record_run(loaded, d, result, run_dir, run_id, ledger, timeline)
    finally:
        ledger.close()
    return Made(run_id, run_dir, out, loaded, d)
