#!/usr/bin/python
"""Run a host's evaluation tasks with NVIDIA's harness exactly as evalprov planned them (the
directory, container name, adapter address, run config, environment and command all come in
the task), at most `concurrency` at a time, and pack each task's results and log for the
controller to fetch.

Secret values arrive in the `env` option (no_log) and reach the harness only through the
environment of the process that starts it: `docker run -e NAME` (the value is read from the
docker CLI's own environment, never on a command line) and `--rm`, so no stopped container
keeps them; nothing is written to disk."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_run_tasks
short_description: Run evaluation tasks with nemo-evaluator and pack their results
options:
  run_dir:
    description: Directory for this run's tasks on the host.
    type: path
    required: true
  tasks:
    description: Tasks as evalprov planned them (name, slug, dir, container, container_name,
      labels, run_config, volumes, env, path_prepend, cwd, argv).
    type: list
    elements: dict
    required: true
  owner:
    description: Owner label of this deployment; only its stale harness containers are removed.
    type: str
    required: true
  runtime:
    description: docker (the task's container) or process (the harness venv on the host).
    type: str
    choices: [docker, process]
    default: docker
  concurrency:
    description: Tasks run at once.
    type: int
    default: 1
  env:
    description: Per task name, the environment values it gets (secrets).
    type: dict
    default: {}
  timeout:
    description: Seconds one task may run.
    type: int
    default: 86400
  log_lines:
    description: Log lines returned for a failed task.
    type: int
    default: 40
  provenance:
    description: What to read for the run's reproducibility record while the tasks run
      (runtime, instances, images, model, hash_cache, harness_venv, harness_images);
      returned as provenance. Empty reads nothing.
    type: dict
    default: {}
author: evalprov
"""

import os
from concurrent.futures import ThreadPoolExecutor

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    provenance,
    write_pid,
)
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_tasks import (
    remove_stale_containers,
    run_one,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "run_dir": {"type": "path", "required": True},
            "tasks": {"type": "list", "elements": "dict", "required": True},
            "owner": {"type": "str", "required": True},
            "runtime": {"type": "str", "choices": ["docker", "process"], "default": "docker"},
            "concurrency": {"type": "int", "default": 1},
            "env": {"type": "dict", "default": {}, "no_log": True},
            "timeout": {"type": "int", "default": 86400},
            "log_lines": {"type": "int", "default": 40},
            "provenance": {"type": "dict", "default": {}},
        },
        supports_check_mode=True,
    )
    p = module.params
    if module.check_mode:
        module.exit_json(changed=bool(p["tasks"]), tasks=[
            {"name": t["name"], "status": "would run"} for t in p["tasks"]])
    os.makedirs(p["run_dir"], mode=0o700, exist_ok=True)
    write_pid(os.path.join(p["run_dir"], "run_tasks.pid"), os.getpid())
    if p["runtime"] == "docker":
        remove_stale_containers(p["owner"])
    with ThreadPoolExecutor(max_workers=1) as side:
        # the record's facts are read while the tasks run (the servers are up)
        facts = side.submit(provenance, p["provenance"]) if p["provenance"] else None
        with ThreadPoolExecutor(max_workers=max(1, p["concurrency"])) as pool:
            done = list(pool.map(lambda t: run_one(p, t), p["tasks"]))
        try:
            record = facts.result() if facts else None
        except Exception as exc:  # a record is never worth failing the tasks for
            record = {"error": f"{type(exc).__name__}: {exc}"}
    module.exit_json(changed=bool(done), tasks=done, provenance=record,
                     failed_tasks=[t["name"] for t in done if t["rc"] != 0])


if __name__ == "__main__":
    main()
