#!/usr/bin/python
"""Run a host's evaluation tasks with NVIDIA's harness exactly as evalprov planned them (the
directory, container name, adapter address, run config, environment and command all come in
the task), at most `concurrency` at a time, and pack each task's results and log for the
controller to fetch.

state=run runs them and returns when all have ended. state=start starts them detached from
the module (module_utils.evalprov_tasks.start) and returns at once; state=poll then looks at
them (waiting up to `wait` seconds for the end), returning evalprov_eval_progress (per task:
status, samples done, total, seconds) while they run and the same result as state=run when
they have ended. A role follows them with `until: not result.running`, so each look is a
retry event the controller shows.

Secret values arrive in the `env` option (no_log) and reach the harness only through the
environment of the process that starts it: `docker run -e NAME` (the value is read from the
docker CLI's own environment, never on a command line) and `--rm`, so no stopped container
keeps them; nothing is written to disk."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_run_tasks
short_description: Run evaluation tasks with nemo-evaluator and pack their results
options:
  state:
    description: run (and wait), start (detached) or poll (a started run).
    type: str
    choices: [run, start, poll]
    default: run
  wait:
    description: state=poll, seconds to wait for the end before returning the progress.
    type: float
    default: 2.0
  run_dir:
    description: Directory for this run's tasks on the host.
    type: path
    required: true
  tasks:
    description: Tasks as evalprov planned them (name, slug, dir, container, container_name,
      labels, run_config, volumes, env, path_prepend, cwd, argv).
    type: list
    elements: dict
    default: []
  owner:
    description: Owner label of this deployment; only its stale harness containers are removed.
    type: str
    default: ""
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
  proxy_stats_port:
    description: The stats port of the proxy the tasks call (0, none); the requests each
      instance behind it answered while they ran are returned as proxy_requests.
    type: int
    default: 0
author: evalprov
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    proxy_mark,
    proxy_requests,
    write_pid,
)
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_tasks import (
    PID,
    poll,
    remove_stale_containers,
    run_all,
    start,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "choices": ["run", "start", "poll"], "default": "run"},
            "wait": {"type": "float", "default": 2.0},
            "run_dir": {"type": "path", "required": True},
            "tasks": {"type": "list", "elements": "dict", "default": []},
            "owner": {"type": "str", "default": ""},
            "runtime": {"type": "str", "choices": ["docker", "process"], "default": "docker"},
            "concurrency": {"type": "int", "default": 1},
            "env": {"type": "dict", "default": {}, "no_log": True},
            "timeout": {"type": "int", "default": 86400},
            "log_lines": {"type": "int", "default": 40},
            "provenance": {"type": "dict", "default": {}},
            "proxy_stats_port": {"type": "int", "default": 0},
        },
        supports_check_mode=True,
    )
    p = module.params
    if p["state"] == "poll":
        if module.check_mode:
            module.exit_json(changed=False, running=False, tasks=[])
        result = poll(p["run_dir"], p["wait"])
        if not result.get("running"):
            result["proxy_requests"] = proxy_requests(p["run_dir"])
        if result.pop("failed", False):
            module.fail_json(**result)
        module.exit_json(**result)
    if module.check_mode:
        module.exit_json(changed=bool(p["tasks"]), running=False, tasks=[
            {"name": t["name"], "status": "would run"} for t in p["tasks"]])
    if not p["owner"]:
        module.fail_json(msg="owner is required to run tasks")
    os.makedirs(p["run_dir"], mode=0o700, exist_ok=True)
    if p["runtime"] == "docker":
        remove_stale_containers(p["owner"])
    if p["proxy_stats_port"]:
        proxy_mark(p["run_dir"], p["proxy_stats_port"])
    if p["state"] == "start":
        pid = start(p)
        if not pid:
            module.fail_json(msg="the task runner did not start on the host")
        module.exit_json(changed=True, running=True, pid=pid,
                         tasks=[{"name": t["name"], "status": "started"} for t in p["tasks"]])
    write_pid(os.path.join(p["run_dir"], PID), os.getpid())
    module.exit_json(**run_all(p))


if __name__ == "__main__":
    main()
