"""Slurm: model loads and wall time per config for K tasks, evalprov's one job beside NEL's
job-per-task shape, on the same real Slurm cluster in the same invocation.

The cluster is tests/testbed/slurm.py (slurmctld + munged on the controller, a slurmd in each
fake host, fake GPU gres); the server is the stand-in vLLM image with a model load time of
--load seconds (STANDIN_START_DELAY: what a real model costs before /health answers), the
harness is NVIDIA's real one (its image from the fleet's registry), on the seed example
(examples/nel_seed.yaml, ifeval and gpqa_diamond) with overrides for the cluster only.

  evalprov: one `evalprov apply` of the config: ONE job serves once and runs the K tasks.
  NEL shape (the baseline): K applies of the same config with one task each, one after the
      other: K jobs, each loading the model (what NEL's Slurm executor submits: a job per task).

Loads are counted from the job directories (one server log per job that started a server),
not assumed. Prints both rows and the ratios.

    python bench/slurm.py [--load 20] [--net 85] [--json OUT]

Needs root; uses its own net (never 77, the test suite's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.testbed.eval_image import ensure_eval_image  # noqa: E402
from tests.testbed.image import STANDIN_IMAGE, ensure_standin_image  # noqa: E402
from tests.testbed.slurm import ACCOUNT, PARTITION, SlurmCluster  # noqa: E402

SEED = ROOT / "examples" / "nel_seed.yaml"
TASKS = ("ifeval", "gpqa_diamond")


def apply(cluster, image: str, remote: Path, local: Path, load: int,
          tasks: tuple[str, ...]) -> float:
    task_list = json.dumps([{"name": t, "container": image} for t in tasks])
    args = [
        sys.executable, "-m", "evalprov.cli", "apply", str(SEED), "-i", str(cluster.inventory),
        "-o", "execution.hostname=h1", "-o", f"execution.account={ACCOUNT}",
        "-o", f"execution.partition={PARTITION}", "-o", f"execution.output_dir={remote}",
        "-o", f"execution.local_output_dir={local}", "-o", "execution.gres=gpu:2",
        "-o", "execution.endpoint_readiness_timeout=600",
        "-o", f"deployment.image={STANDIN_IMAGE}", "-o", "deployment.data_parallel_size=2",
        "-o", f"deployment.env_vars.STANDIN_START_DELAY=lit:{load}",
        "-o", f"evaluation.tasks={task_list}",
        "-o", "evaluation.nemo_evaluator_config.config.params.limit_samples=3",
        "-o", "evaluation.nemo_evaluator_config.config.params.max_new_tokens=32",
    ]
    env = {**os.environ, "HF_TOKEN_FOR_GPQA_DIAMOND": "bench-not-a-secret"}
    t0 = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: apply failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds


def loads(remote: Path) -> int:
    """Jobs that started a server: one server log each."""
    return len(list(remote.glob("*/evalprov-vllm-*.log")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--load", type=int, default=20, help="model load seconds (stand-in)")
    ap.add_argument("--net", type=int, default=85)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    c = SlurmCluster(gpus=(2, 2), net=args.net)
    c.up()
    try:
        ensure_standin_image(c.fleet)
        image = ensure_eval_image(c.fleet)
        for h in c.fleet.hosts:
            for ref in (STANDIN_IMAGE, image):
                c.fleet.docker(h.name, "pull", ref, timeout=600)
        c.inventory = c.fleet.write_inventory(c.dir / "inventory.yml")
        work = Path(tempfile.mkdtemp(prefix="evp-bench-slurm-", dir="/tmp"))
        rows = {}
        # the baseline first: NEL's shape, a job per task
        remote = c.dir / "shared" / "nel"
        remote.mkdir(parents=True)
        t = sum(apply(c, image, remote, work / "nel", args.load, (task,)) for task in TASKS)
        rows["nel_job_per_task"] = {"jobs": len(TASKS), "loads": loads(remote), "seconds": t}
        remote = c.dir / "shared" / "evalprov"
        remote.mkdir(parents=True)
        t = apply(c, image, remote, work / "evalprov", args.load, TASKS)
        rows["evalprov_one_job"] = {"jobs": 1, "loads": loads(remote), "seconds": t}
    finally:
        c.down()
    base, ours = rows["nel_job_per_task"], rows["evalprov_one_job"]
    print(f"K = {len(TASKS)} tasks, model load {args.load} s (stand-in), real harness, "
          "same cluster, same invocation")
    print(f"{'shape':<22} {'jobs':>5} {'loads':>6} {'wall s':>8}")
    for name, r in rows.items():
        print(f"{name:<22} {r['jobs']:>5} {r['loads']:>6} {r['seconds']:>8.1f}")
    print(f"model loads per config: evalprov {ours['loads']} vs NEL shape {base['loads']} "
          f"({ours['loads'] / max(base['loads'], 1):.2f}x)")
    print(f"wall time: {ours['seconds'] / base['seconds']:.2f}x the NEL shape")
    if args.json:
        Path(args.json).write_text(json.dumps({"load": args.load, **rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
