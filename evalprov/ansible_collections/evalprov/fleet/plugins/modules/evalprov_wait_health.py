#!/usr/bin/python
"""Wait until vLLM instances answer /health and list the served model in /v1/models; fail
fast when an instance's container exits, and at the deadline otherwise."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_wait_health
short_description: Wait for vLLM instances to become healthy
description:
  - Polls each instance's health path on 127.0.0.1, then /v1/models for the served model
    name. Fails as soon as an instance's container is no longer running, or at the timeout.
options:
  instances:
    description: Instances to wait for (name, port).
    type: list
    elements: dict
    required: true
  health_path:
    description: Health path.
    type: str
    default: /health
  served_model_name:
    description: Name /v1/models must list.
    type: str
  timeout:
    description: Seconds to wait for all instances.
    type: int
    default: 1800
  interval:
    description: Seconds between polls.
    type: float
    default: 1.0
  runtime:
    description: docker (inspect the container) or process (the pid in the state file).
    type: str
    default: docker
  state_dir:
    description: The process runtime's state files.
    type: path
    default: /var/lib/evalprov/vllm
author: evalprov
"""

import json
import shutil
import subprocess
import time
import urllib.request

from ansible.module_utils.basic import AnsibleModule


def get(url, timeout=3):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status, resp.read(65536)
    except Exception:
        return 0, b""


def process_state(state_dir, name):
    try:
        with open(f"{state_dir}/{name}.json") as f:
            rec = json.load(f)
        with open(f"/proc/{rec['pid']}/stat") as f:
            fields = f.read().split(") ", 1)[1].split()
    except (OSError, ValueError, KeyError, IndexError):
        return {"running": False, "status": "exited", "exit_code": None, "restarts": 0}
    running = fields[0] not in ("Z", "X") and fields[19] == rec.get("start_time")
    return {"running": running, "status": "running" if running else "exited",
            "exit_code": None, "restarts": 0}


def container_state(name):
    docker = shutil.which("docker")
    if not docker:
        return None
    proc = subprocess.run([docker, "inspect", "--type", "container", "--format",
                           "{{.State.Running}} {{.State.Status}} {{.State.ExitCode}} "
                           "{{.RestartCount}}", name],
                          capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        return {"running": False, "status": "missing", "exit_code": None, "restarts": 0}
    running, status, code, restarts = [*proc.stdout.split(), "", "", "", ""][:4]
    return {"running": running == "true", "status": status, "exit_code": code,
            "restarts": int(restarts or 0)}


def ready(port, health_path, served):
    status, _ = get(f"http://127.0.0.1:{port}{health_path}")
    if status != 200:
        return False, f"{health_path} not 200"
    status, body = get(f"http://127.0.0.1:{port}/v1/models")
    try:
        ids = [m.get("id") for m in json.loads(body or b"{}").get("data", [])]
    except ValueError:
        ids = []
    if status != 200 or (served and served not in ids):
        return False, f"/v1/models lists {ids}, not {served}"
    return True, ""


def main():
    module = AnsibleModule(
        argument_spec={
            "instances": {"type": "list", "elements": "dict", "required": True},
            "health_path": {"type": "str", "default": "/health"},
            "served_model_name": {"type": "str"},
            "timeout": {"type": "int", "default": 1800},
            "interval": {"type": "float", "default": 1.0},
            "runtime": {"type": "str", "default": "docker"},
            "state_dir": {"type": "path", "default": "/var/lib/evalprov/vllm"},
        },
        supports_check_mode=True,
    )
    p = module.params
    pending = {i["name"]: i for i in p["instances"]}
    if module.check_mode or not pending:
        module.exit_json(changed=False, waited_for=sorted(pending), healthy=[])
    start = time.monotonic()
    deadline = start + p["timeout"]
    healthy, why, restarts = {}, {}, {}
    while pending:
        for name, inst in list(pending.items()):
            ok, reason = ready(inst["port"], p["health_path"], p["served_model_name"])
            if ok:
                healthy[name] = round(time.monotonic() - start, 1)
                del pending[name]
                continue
            why[name] = reason
            state = (container_state(name) if p["runtime"] == "docker"
                     else process_state(p["state_dir"], name))
            if state is None:
                continue
            first = restarts.setdefault(name, state["restarts"])
            # a restart policy brings an exited server back: a restart is an exit too
            if not state["running"] or state["status"] == "restarting" \
                    or state["restarts"] > first:
                module.fail_json(
                    msg=f"instance {name} stopped before it became healthy (container "
                        f"{state['status']}, exit code {state['exit_code']}, "
                        f"{state['restarts']} restart(s))",
                    failed_instance=name, healthy=healthy, reason="exited")
        if not pending:
            break
        if time.monotonic() >= deadline:
            name = sorted(pending)[0]
            module.fail_json(
                msg=f"instance {name} not healthy after {p['timeout']} s ({why.get(name)}); "
                    "raise execution.health_check_timeout if the model loads slowly",
                failed_instance=name, healthy=healthy, reason="timeout")
        time.sleep(p["interval"])
    module.exit_json(changed=False, healthy=healthy, waited_for=sorted(healthy))


if __name__ == "__main__":
    main()
