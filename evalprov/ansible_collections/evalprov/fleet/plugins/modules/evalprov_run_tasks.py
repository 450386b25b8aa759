#!/usr/bin/python
"""Run a host's evaluation tasks with NVIDIA's harness, at most `concurrency` at a time, each
in its own directory, and pack each task's results and log for the controller to fetch.

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
    description: Tasks (name, container, run_config, volumes, env_names).
    type: list
    elements: dict
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
  harness_venv:
    description: The harness venv (process runtime).
    type: path
    default: /opt/evalprov/harness-venv
  samples_dir:
    description: Working directory of the harness (process runtime; datasets resolve there).
    type: path
  timeout:
    description: Seconds one task may run.
    type: int
    default: 86400
  log_lines:
    description: Log lines returned for a failed task.
    type: int
    default: 40
author: evalprov
"""

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

from ansible.module_utils.basic import AnsibleModule

HARNESS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NEMO_EVALUATOR_TELEMETRY_LEVEL": "0",
}


def safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def tail(path, lines):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def write_yaml_as_json(path, data):
    # JSON is YAML: no PyYAML needed on the host
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def command(p, task, tdir, values):
    """argv, env and cwd for one task."""
    env = dict(os.environ)
    env.update(values)
    if p["runtime"] == "docker":
        name = "evalprov-eval-" + safe(task["name"]) + "-" + os.path.basename(p["run_dir"])
        argv = [shutil.which("docker") or "docker", "run", "--rm", "--name", name[:120],
                "--network", "host", "--label", "evalprov.managed=eval",
                "-v", f"{tdir}:/work"]
        for vol in task.get("volumes") or []:
            argv += ["-v", vol]
        for key in HARNESS_ENV:
            argv += ["-e", key]
        for key in sorted(values):
            argv += ["-e", key]  # value from this process's environment
        env.update(HARNESS_ENV)
        argv += [task["container"], "nemo-evaluator", "run_eval", "--run_config",
                 "/work/run_config.yml"]
        return argv, env, tdir
    venv = p["harness_venv"]
    env.update(HARNESS_ENV)
    env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env.get("PATH", os.defpath)
    env["VIRTUAL_ENV"] = venv
    samples = p["samples_dir"] or tdir
    env["NLTK_DATA"] = os.path.join(samples, "nltk_data")
    argv = [os.path.join(venv, "bin", "nemo-evaluator"), "run_eval", "--run_config",
            os.path.join(tdir, "run_config.yml")]
    return argv, env, samples


def remove_stale_containers():
    """Harness containers an interrupted run left behind (the controller stopped, the
    container went on): remove them before they compete with this run."""
    docker = shutil.which("docker") or "docker"
    found = subprocess.run([docker, "ps", "-aq", "--filter", "label=evalprov.managed=eval"],
                           capture_output=True, text=True, check=False).stdout.split()
    if found:
        subprocess.run([docker, "rm", "-f", *found], capture_output=True, check=False)


def adapter_host(index):
    """A loopback address of its own for each task's run_eval adapter proxy (ADAPTER_HOST).
    run_eval picks the adapter's port by binding, closing and binding again later, so two
    tasks started together can pick the same port on one address; on distinct addresses of
    127.0.0.0/8 they cannot collide. (ADAPTER_PORT cannot be used: lm-eval tasks enter the
    adapter twice and then refuse their own port.)"""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


def run_one(p, task):
    name = task["name"]
    tdir = os.path.join(p["run_dir"], safe(name))
    results = os.path.join(tdir, "results")
    logs = os.path.join(tdir, "logs")
    for d in (results, logs):
        os.makedirs(d, exist_ok=True)
    config = json.loads(json.dumps(task["run_config"]))
    config.setdefault("config", {})["output_dir"] = (
        "/work/results" if p["runtime"] == "docker" else results)
    write_yaml_as_json(os.path.join(tdir, "run_config.yml"), config)
    values = dict((p["env"] or {}).get(name) or {})
    values["ADAPTER_HOST"] = adapter_host(task["_index"])
    argv, env, cwd = command(p, task, tdir, values)
    log_path = os.path.join(logs, "harness.log")
    start = time.time()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  timeout=p["timeout"], check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
            log.write(f"\nevalprov: task timed out after {p['timeout']} s\n".encode())
        except OSError as exc:
            rc = 127
            log.write(f"\nevalprov: cannot start the harness: {exc}\n".encode())
    seconds = round(time.time() - start, 2)
    meta = {"name": name, "rc": rc, "seconds": seconds, "started": start,
            "status": "succeeded" if rc == 0 else "failed"}
    with open(os.path.join(tdir, "evalprov-task.json"), "w") as f:
        json.dump(meta, f)
    archive = tdir + ".tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tdir, arcname=safe(name))
    meta["archive"] = archive
    if rc != 0:
        meta["log_tail"] = tail(log_path, p["log_lines"])
    return meta


def main():
    module = AnsibleModule(
        argument_spec={
            "run_dir": {"type": "path", "required": True},
            "tasks": {"type": "list", "elements": "dict", "required": True},
            "runtime": {"type": "str", "choices": ["docker", "process"], "default": "docker"},
            "concurrency": {"type": "int", "default": 1},
            "env": {"type": "dict", "default": {}, "no_log": True},
            "harness_venv": {"type": "path", "default": "/opt/evalprov/harness-venv"},
            "samples_dir": {"type": "path"},
            "timeout": {"type": "int", "default": 86400},
            "log_lines": {"type": "int", "default": 40},
        },
        supports_check_mode=True,
    )
    p = module.params
    if module.check_mode:
        module.exit_json(changed=bool(p["tasks"]), tasks=[
            {"name": t["name"], "status": "would run"} for t in p["tasks"]])
    os.makedirs(p["run_dir"], mode=0o700, exist_ok=True)
    if p["runtime"] == "docker":
        remove_stale_containers()
    for i, task in enumerate(p["tasks"]):
        task["_index"] = i
    with ThreadPoolExecutor(max_workers=max(1, p["concurrency"])) as pool:
        done = list(pool.map(lambda t: run_one(p, t), p["tasks"]))
    module.exit_json(changed=bool(done), tasks=done,
                     failed_tasks=[t["name"] for t in done if t["rc"] != 0])


if __name__ == "__main__":
    main()
