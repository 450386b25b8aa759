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
  log_lines:
    description: Log lines of a failed instance returned (log_tail) for the controller.
    type: int
    default: 200
  api_key:
    description: The deployment's API key, sent to /v1/models when its servers require one.
    type: str
  proxy:
    description: The proxy in front of the instances (name, stats_port, servers); once they
      are healthy, wait until it has every server up too. Empty, none.
    type: dict
    default: {}
author: evalprov
"""

import os
import shutil
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    container_state,
    decisive_line,
    health,
    is_ours,
    proxy_servers,
    read_group_mark,
    read_state,
)


def process_state(state_dir, name):
    rec = read_state(state_dir, name)
    running = bool(rec) and is_ours(rec)
    return {"running": running, "status": "running" if running else "exited",
            "exit_code": None, "restarts": 0}


def log_tail(runtime, state_dir, name, lines):
    if runtime == "docker":
        docker = shutil.which("docker") or "docker"
        try:
            proc = subprocess.run([docker, "logs", "--tail", str(lines), name],
                                  capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"(no log: {exc})"
        return (proc.stdout + proc.stderr)[-200000:]
    try:
        with open(os.path.join(state_dir, name + ".log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200000))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def stopped_message(runtime, name, state, tail, inst=None):
    cause = decisive_line(tail)
    if runtime == "docker":
        how = (f"container {state['status']}, exit code {state['exit_code']}, "
               f"{state['restarts']} restart(s)")
    else:
        how = "the vllm serve process exited"
    inst = inst or {}
    if inst.get("role") == "worker":
        part = (f"node rank {inst.get('rank')}" if "--nnodes" in (inst.get("argv") or ())
                else f"data-parallel ranks from {inst.get('rank')}")
        head = (f"worker {name} ({part}) of node group {inst.get('group')} stopped before "
                "the group served")
    elif inst.get("role") == "head":
        head = f"head {name} of node group {inst.get('group')} stopped before it became healthy"
    else:
        head = f"instance {name} stopped before it became healthy"
    return f"{head}: {cause} ({how})" if cause else f"{head} ({how})"


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
            "log_lines": {"type": "int", "default": 200},
            "api_key": {"type": "str", "no_log": True},
            "proxy": {"type": "dict", "default": {}},
            "group": {"type": "dict", "default": {}},
        },
        supports_check_mode=True,
    )
    p = module.params
    pending = {i["name"]: i for i in p["instances"]}
    proxy = p["proxy"] or {}
    if module.check_mode or not (pending or proxy):
        module.exit_json(changed=False, waited_for=sorted(pending), healthy=[])
    start = time.monotonic()
    deadline = start + p["timeout"]
    healthy, why, restarts = {}, {}, {}
    group = p["group"] or {}
    while pending:
        mark = read_group_mark(p["state_dir"], group["name"], group["run"]) if group else {}
        if mark.get("state") == "failed":
            name = sorted(pending)[0]
            module.fail_json(msg=f"node group {group['name']} failed: {mark.get('reason')}",
                             failed_instance=name, healthy=healthy, reason="group",
                             log_tail=log_tail(p["runtime"], p["state_dir"], name,
                                               p["log_lines"]))
        for name, inst in list(pending.items()):
            if inst.get("role") == "worker":
                ok = mark.get("state") == "ready"
                reason = f"waiting for its head {inst.get('head')} to serve"
            else:
                ok, reason = health(inst["port"], p["health_path"], p["served_model_name"],
                                    p["api_key"])
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
                tail = log_tail(p["runtime"], p["state_dir"], name, p["log_lines"])
                module.fail_json(msg=stopped_message(p["runtime"], name, state, tail, inst),
                                 failed_instance=name, healthy=healthy, reason="exited",
                                 log_tail=tail)
        if not pending:
            break
        if time.monotonic() >= deadline:
            name = sorted(pending)[0]
            tail = log_tail(p["runtime"], p["state_dir"], name, p["log_lines"])
            module.fail_json(log_tail=tail,
                msg=f"instance {name} not healthy after {p['timeout']} s ({why.get(name)}); "
                    "raise execution.health_check_timeout if the model loads slowly",
                failed_instance=name, healthy=healthy, reason="timeout")
        time.sleep(p["interval"])
    if proxy:
        wait_proxy(module, proxy, deadline, p["interval"], p["state_dir"])
        healthy[proxy["name"]] = round(time.monotonic() - start, 1)
    module.exit_json(changed=False, healthy=healthy, waited_for=sorted(healthy))


def wait_proxy(module, proxy, deadline, interval, state_dir):
    """Until the proxy reports every server behind it up (its health checks need a few
    looks after a server becomes healthy); fail when haproxy exits or at the deadline."""
    name, wanted = proxy["name"], set(proxy["servers"])
    up = {}
    while True:
        up = proxy_servers(proxy["stats_port"])
        if wanted <= {s for s, (ok, _) in up.items() if ok}:
            return
        if not is_ours(read_state(state_dir, name)):
            tail = log_tail("process", state_dir, name, 50)
            module.fail_json(msg=f"proxy {name} (haproxy) exited: {decisive_line(tail) or tail}",
                             failed_instance=name, reason="exited", log_tail=tail)
        if time.monotonic() >= deadline:
            down = sorted(wanted - {s for s, (ok, _) in up.items() if ok})
            module.fail_json(msg=f"proxy {name}: instance(s) {', '.join(down)} not up behind "
                                 "it at the deadline", failed_instance=name, reason="timeout",
                             log_tail=log_tail("process", state_dir, name, 50))
        time.sleep(interval)


if __name__ == "__main__":
    main()
