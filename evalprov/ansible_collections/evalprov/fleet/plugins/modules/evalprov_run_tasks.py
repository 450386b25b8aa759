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

import json
import os
import shutil
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    provenance,
    stop_group,
    write_pid,
)


def tail(path, lines):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def command(p, task, values):
    """argv, env and cwd for one task, as planned; secret values only in the environment."""
    env = dict(os.environ)
    env.update(task["env"])
    env.update(values)
    if p["runtime"] == "docker":
        docker = shutil.which("docker") or "docker"
        argv = [docker, "run", "--rm", "--name", task["container_name"], "--network", "host",
                "-v", f"{task['dir']}:/work"]
        for key, value in sorted(task["labels"].items()):
            argv += ["--label", f"{key}={value}"]
        for vol in task.get("volumes") or []:
            argv += ["-v", vol]
        for key in sorted({**task["env"], **values}):
            argv += ["-e", key]  # the value comes from this process's environment
        return [*argv, task["container"], *task["argv"]], env, task["cwd"]
    if task.get("path_prepend"):
        env["PATH"] = task["path_prepend"] + os.pathsep + env.get("PATH", os.defpath)
    return list(task["argv"]), env, task["cwd"]


def remove_stale_containers(owner):
    """This deployment's harness containers that an interrupted run left behind (the
    controller stopped, the container went on); never another deployment's."""
    docker = shutil.which("docker") or "docker"
    found = subprocess.run([docker, "ps", "-aq", "--filter", "label=evalprov.managed=eval",
                            "--filter", f"label=evalprov.owner={owner}"],
                           capture_output=True, text=True, check=False).stdout.split()
    if found:
        subprocess.run([docker, "rm", "-f", *found], capture_output=True, check=False)


def run_one(p, task):
    tdir = task["dir"]
    logs = os.path.join(tdir, "logs")
    for d in (os.path.join(tdir, "results"), logs):
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(tdir, "run_config.yml"), "w") as f:
        json.dump(task["run_config"], f, indent=1)  # JSON is YAML: no PyYAML on the host
    values = dict((p["env"] or {}).get(task["name"]) or {})
    argv, env, cwd = command(p, task, values)
    log_path = os.path.join(logs, "harness.log")
    start = time.time()
    with open(log_path, "wb") as log:
        try:
            # its own process group, recorded: evalprov_stop_tasks stops it and all it started
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True)
            write_pid(os.path.join(tdir, "harness.pid"), proc.pid)
            try:
                rc = proc.wait(timeout=p["timeout"])
            except subprocess.TimeoutExpired:
                stop_group(proc.pid)
                proc.wait()
                rc = 124
                log.write(f"\nevalprov: task timed out after {p['timeout']} s\n".encode())
        except OSError as exc:
            rc = 127
            log.write(f"\nevalprov: cannot start the harness: {exc}\n".encode())
    seconds = round(time.time() - start, 2)
    meta = {"name": task["name"], "slug": task["slug"], "rc": rc, "seconds": seconds,
            "started": start, "status": "succeeded" if rc == 0 else "failed"}
    with open(os.path.join(tdir, "evalprov-task.json"), "w") as f:
        json.dump(meta, f)
    archive = tdir + ".tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tdir, arcname=task["slug"])
    meta["archive"] = archive
    if rc != 0:
        meta["log_tail"] = tail(log_path, p["log_lines"])
    return meta


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
