#!/usr/bin/python
"""Keep a server container's secret environment in memory on its host: a JSON file on a
tmpfs, readable by root only, that the container mounts read-only (never its config)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_secret_file
short_description: Keep an instance's secret environment in a root-only file in memory
description:
  - Writes the values as JSON to <dir>/<name>.secrets.json (mode 0600) on a filesystem in
    memory (tmpfs); refuses a directory on a disk. The instance's container mounts the
    file read-only and reads it before its command, so no value is in the container's
    config (docker inspect) nor in dockerd's state on disk.
options:
  name:
    description: The instance (container) name.
    type: str
    required: true
  values:
    description: The environment values (secrets).
    type: dict
    default: {}
  state:
    description: present writes the file; absent removes it.
    type: str
    choices: [present, absent]
    default: present
  dir:
    description: The directory in memory.
    type: path
    default: /run/evalprov
author: evalprov
"""

RETURN = r"""
path:
  description: The file's path on the host.
  type: str
  returned: always
volume:
  description: How the container mounts it (read-only).
  type: str
  returned: always
entrypoint:
  description: What runs before the container's command to read it into the environment.
  type: list
  returned: always
"""

import os
import re

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    ENV_FROM_FILE,
    SECRETS_IN_CONTAINER,
    remove_file,
    secret_file_path,
    write_secret_file,
)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def main():
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "values": {"type": "dict", "default": {}, "no_log": True},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "dir": {"type": "path", "default": "/run/evalprov"},
        },
        supports_check_mode=True,
    )
    p = module.params
    if not NAME.fullmatch(p["name"]):
        module.fail_json(msg=f"name {p['name']!r} is not a container name")
    path = secret_file_path(p["name"], p["dir"])
    how = {"path": path, "volume": f"{path}:{SECRETS_IN_CONTAINER}:ro",
           "entrypoint": ["python3", "-c", ENV_FROM_FILE, SECRETS_IN_CONTAINER]}
    if p["state"] == "absent":
        if module.check_mode:
            module.exit_json(changed=os.path.exists(path), **how)
        module.exit_json(changed=remove_file(path), **how)
    try:
        changed = write_secret_file(path, p["values"] or {}, dry=module.check_mode)
    except (OSError, ValueError) as exc:
        module.fail_json(msg=str(exc), **how)
    module.exit_json(changed=changed, **how)


if __name__ == "__main__":
    main()
