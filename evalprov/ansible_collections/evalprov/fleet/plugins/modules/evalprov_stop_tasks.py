#!/usr/bin/python
"""Stop what one evalprov run started on a host for its evaluation tasks (after an
interrupt): the run_tasks module process, every harness process group it recorded, and the
run's harness containers (by the run's and the deployment's labels, nobody else's). Tasks
that had finished are listed with their packed results, for the controller to fetch."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_stop_tasks
short_description: Stop an evalprov run's harness processes and containers
options:
  run_dir:
    description: The run's directory on the host.
    type: path
    required: true
  run_id:
    description: The run's id (label evalprov.run of its containers).
    type: str
    required: true
  owner:
    description: The deployment's owner label.
    type: str
    required: true
  runtime:
    description: docker or process.
    type: str
    choices: [docker, process]
    default: docker
author: evalprov
"""

import glob
import json
import os
import shutil
import subprocess
import tarfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    is_ours,
    read_pid,
    stop_group,
)


def stop_recorded(path, group):
    rec = read_pid(path)
    if not rec or not is_ours(rec):
        return False
    if group:
        stop_group(rec["pid"])
    else:
        os.kill(rec["pid"], 15)
    return True


def main():
    module = AnsibleModule(
        argument_spec={
            "run_dir": {"type": "path", "required": True},
            "run_id": {"type": "str", "required": True},
            "owner": {"type": "str", "required": True},
            "runtime": {"type": "str", "choices": ["docker", "process"], "default": "docker"},
        },
        supports_check_mode=False,
    )
    p = module.params
    stopped = []
    # first the module that starts tasks, so it starts no other; then each harness group
    if stop_recorded(os.path.join(p["run_dir"], "run_tasks.pid"), group=False):
        stopped.append("run_tasks")
    for pid_file in sorted(glob.glob(os.path.join(p["run_dir"], "*", "harness.pid"))):
        if stop_recorded(pid_file, group=True):
            stopped.append(os.path.basename(os.path.dirname(pid_file)))
    removed = []
    if p["runtime"] == "docker" and shutil.which("docker"):
        found = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=evalprov.run={p['run_id']}",
             "--filter", f"label=evalprov.owner={p['owner']}"],
            capture_output=True, text=True, check=False).stdout.split()
        if found:
            subprocess.run(["docker", "rm", "-f", *found], capture_output=True, check=False)
            removed = found
    finished = []
    for meta_path in sorted(glob.glob(os.path.join(p["run_dir"], "*", "evalprov-task.json"))):
        tdir = os.path.dirname(meta_path)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        archive = tdir + ".tar.gz"
        if not os.path.exists(archive):
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(tdir, arcname=os.path.basename(tdir))
        finished.append({"name": meta.get("name"), "slug": os.path.basename(tdir),
                         "status": meta.get("status"), "archive": archive})
    module.exit_json(changed=bool(stopped or removed), stopped=stopped, removed=removed,
                     finished=finished)


if __name__ == "__main__":
    main()
