"""Planner scale: time to plan 1, 100 and 1000 hosts x 50 tasks.

Baseline, measured in the same run: ansible-core parsing a YAML inventory of the same hosts
(InventoryManager), a cost every Ansible run pays before its first task. Target: planning
1000 hosts in under 1 s.

    python bench/plan_scale.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from evalprov.config.loader import compose, interpolate, validate
from evalprov.config.tasks import task_table
from evalprov.inventory import render
from evalprov.plan import HostFacts, plan


def make_config(placement: str):
    names = []
    for t in task_table().tasks:
        if t.name not in names:
            names.append(t.name)
        if len(names) == 50:
            break
    user = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "vllm"}, "_self_"],
        "execution": {"output_dir": "/tmp/out", "placement": placement,
                      "instances_per_host": "auto"},
        "deployment": {"hf_model_handle": "meta-llama/Llama-3.1-8B-Instruct",
                       "served_model_name": "llama", "tensor_parallel_size": 2,
                       "extra_args": "--max-model-len 8192"},
        "evaluation": {"tasks": [{"name": n} for n in names]},
    }
    return validate(interpolate(compose(user)), user).config


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def ansible_parse(path: Path) -> None:
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    InventoryManager(loader=DataLoader(), sources=[str(path)]).get_hosts("all")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    warm = tmp / "warm.yml"
    warm.write_text("all:\n  hosts:\n    h0: {}\n")
    ansible_parse(warm)  # warm the imports (not timed)
    print(f"{'hosts':>6} {'placement':>10} {'task runs':>9} {'plan s':>8} {'+render s':>9} "
          f"{'ms/host':>8} {'ansible inv s':>13} {'ratio':>6}")
    for placement in ("shard", "every_host"):
        config = make_config(placement)
        for n in (1, 100, 1000):
            hosts = [HostFacts(f"gpu-{i:04d}", 8) for i in range(n)]
            inv = tmp / f"inv{n}.yml"
            inv.write_text(yaml.safe_dump({"all": {"hosts": {h.name: {"evalprov_gpu_count": 8}
                                                              for h in hosts}}}))
            p_best, _ = best(lambda hosts=hosts, config=config: plan(config, hosts), args.repeat)
            r_best, _ = best(lambda hosts=hosts, config=config: render(plan(config, hosts)),
                             args.repeat)
            a_best, _ = best(lambda inv=inv: ansible_parse(inv), args.repeat)
            runs = len(plan(config, hosts).task_runs)
            print(f"{n:>6} {placement:>10} {runs:>9} {p_best:>8.4f} {r_best:>9.4f} "
                  f"{1000 * r_best / n:>8.3f} {a_best:>13.4f} {r_best / a_best:>6.2f}")
    print("ratio = (plan + render) / ansible-core inventory parse of the same hosts; "
          "target: 1000 hosts planned in < 1 s")


if __name__ == "__main__":
    main()
