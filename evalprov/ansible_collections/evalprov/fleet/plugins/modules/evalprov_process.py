#!/usr/bin/python
"""Supervise `vllm serve` as a host process (the `process` runtime): a systemd unit where
systemd is PID 1, otherwise a managed background process with a pid file, a log file and a
clean stop. Idempotent by the spec hash kept in the instance's state file."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_process
short_description: Run vllm serve from a venv under supervision
options:
  name:
    description: Instance name (unit and state file name).
    type: str
    required: true
  state:
    description: started (converge to this spec) or absent (stop and forget).
    type: str
    choices: [started, absent]
    default: started
  argv:
    description: Command line; argv[0] is looked up in the venv's bin.
    type: list
    elements: str
  venv:
    description: The venv whose bin holds argv[0] (none: argv[0] is an absolute path).
    type: path
  env:
    description: Environment values that are not secret (shown in output and diffs).
    type: dict
    default: {}
  secret_env:
    description: Environment values that are secrets (masked in every output).
    type: dict
    default: {}
  spec_hash:
    description: Hash of the planned spec; same hash and running means nothing to do.
    type: str
  port:
    description: Port the instance serves on (kept in the state file for the probe).
    type: int
  record:
    description: More values kept in the state file for the probe (e.g. a proxy's stats port).
    type: dict
    default: {}
  state_dir:
    description: Where state files, pid files and logs live.
    type: path
    required: true
  supervisor:
    description: auto (systemd when it is PID 1), systemd or background.
    type: str
    choices: [auto, systemd, background]
    default: auto
  stop_timeout:
    description: Seconds to wait after SIGTERM before SIGKILL.
    type: int
    default: 30
  restart:
    description: Under systemd, restart the program when it fails (a node group's member
      is not restarted; its group is).
    type: bool
    default: true
author: evalprov
"""

import contextlib
import json
import os
import signal
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    MEMORY_DIR,
    is_ours,
    pid_alive,
    proc_stat,
    read_state,
    require_memory,
)


def start_time(pid):
    st = proc_stat(pid)
    return st[1] if st else None


def systemd_is_init():
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip() == "systemd"
    except OSError:
        return False


def stop_background(state, timeout):
    pid = state.get("pid")
    if not is_ours(state):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)  # the server and its engine workers
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def program(p):
    """argv with argv[0] resolved in the venv's bin (an absolute argv[0] stays)."""
    first = p["argv"][0]
    if p["venv"] and not os.path.isabs(first):
        first = os.path.join(p["venv"], "bin", first)
    return [first, *p["argv"][1:]]


def search_path(p):
    return (os.path.join(p["venv"], "bin") + ":" if p["venv"] else "") + \
        "/usr/local/bin:/usr/bin:/bin"


def start_background(p, log_path):
    env = {"PATH": search_path(p), "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    if p["venv"]:
        env["VIRTUAL_ENV"] = p["venv"]
    env.update({k: str(v) for k, v in (p["env"] or {}).items()})
    argv = program(p)
    with open(log_path, "ab") as log:
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=p["state_dir"],
                                start_new_session=True, close_fds=True)
    time.sleep(0.2)
    return proc.pid


def systemd(p, unit, action):
    subprocess.run(["systemctl", action, unit], check=False, capture_output=True)


def start_systemd(p, unit, log_path):
    env_file = f"{MEMORY_DIR}/{p['name']}.env"  # in memory: values never reach the disk
    os.makedirs(MEMORY_DIR, mode=0o700, exist_ok=True)
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for k, v in (p["env"] or {}).items():
            f.write(f"{k}={json.dumps(str(v))}\n")
    argv = program(p)
    quoted = " ".join(json.dumps(a) for a in argv)
    venv = f" VIRTUAL_ENV={p['venv']}" if p["venv"] else ""
    with open(f"/etc/systemd/system/{unit}", "w") as f:
        f.write(f"""[Unit]
Description=evalprov {p['name']}
After=network-online.target

[Service]
Environment=PATH={search_path(p)}{venv}
EnvironmentFile={env_file}
ExecStart={quoted}
WorkingDirectory={p['state_dir']}
StandardOutput=append:{log_path}
StandardError=append:{log_path}
KillMode=control-group
TimeoutStopSec={p['stop_timeout']}
Restart={"on-failure" if p["restart"] else "no"}

[Install]
WantedBy=multi-user.target
""")
    subprocess.run(["systemctl", "daemon-reload"], check=True, capture_output=True)
    subprocess.run(["systemctl", "restart", unit], check=True, capture_output=True)
    out = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", unit],
                         capture_output=True, text=True, check=False).stdout.strip()
    return int(out or 0)


def main():
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "choices": ["started", "absent"], "default": "started"},
            "argv": {"type": "list", "elements": "str"},
            "venv": {"type": "path"},
            "env": {"type": "dict", "default": {}},
            "secret_env": {"type": "dict", "default": {}, "no_log": True},
            "spec_hash": {"type": "str"},
            "port": {"type": "int"},
            "record": {"type": "dict", "default": {}},
            "state_dir": {"type": "path", "required": True},
            "supervisor": {"type": "str", "choices": ["auto", "systemd", "background"],
                           "default": "auto"},
            "stop_timeout": {"type": "int", "default": 30},
            "restart": {"type": "bool", "default": True},
        },
        required_if=[("state", "started", ("argv", "spec_hash"))],
        supports_check_mode=True,
    )
    p = module.params
    p["env"] = {**(p["env"] or {}), **(p["secret_env"] or {})}
    name = p["name"]
    state_path = os.path.join(p["state_dir"], f"{name}.json")
    log_path = os.path.join(p["state_dir"], f"{name}.log")
    unit = f"evalprov-{name}.service"
    state = read_state(p["state_dir"], name)
    running = is_ours(state)
    if p["state"] == "started" and running and state.get("spec_hash") == p["spec_hash"]:
        module.exit_json(changed=False, pid=state["pid"], log=log_path)
    if p["state"] == "absent" and not state and not running:
        module.exit_json(changed=False)
    if module.check_mode:
        module.exit_json(changed=True, diff={"before": {"spec_hash": state.get("spec_hash")},
                                             "after": {"spec_hash": p["spec_hash"]}})
    supervisor = p["supervisor"]
    if supervisor == "auto":
        supervisor = "systemd" if systemd_is_init() else "background"
    if supervisor == "systemd" and p["secret_env"] and p["state"] == "started":
        try:  # systemd reads the environment from a file: it must be in memory
            require_memory(MEMORY_DIR)
        except ValueError as exc:
            module.fail_json(msg=f"instance {name}: {exc}")
    if state.get("supervisor") == "systemd":
        systemd(p, unit, "stop")
    else:
        stop_background(state, p["stop_timeout"])
    if p["state"] == "absent":
        for path in (state_path, f"/etc/systemd/system/{unit}", f"{MEMORY_DIR}/{name}.env"):
            if os.path.exists(path):
                os.unlink(path)
        module.exit_json(changed=True)
    os.makedirs(p["state_dir"], mode=0o700, exist_ok=True)
    if supervisor == "systemd":
        pid = start_systemd(p, unit, log_path)
    else:
        pid = start_background(p, log_path)
    new = {**(p["record"] or {}), "pid": pid, "start_time": start_time(pid),
           "spec_hash": p["spec_hash"],
           "port": p["port"],
           "supervisor": supervisor, "argv": p["argv"], "log": log_path}
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new, f)
    os.replace(tmp, state_path)
    module.exit_json(changed=True, pid=pid, log=log_path, supervisor=supervisor)


if __name__ == "__main__":
    main()
