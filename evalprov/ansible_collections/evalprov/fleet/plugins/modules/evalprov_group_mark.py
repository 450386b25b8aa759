#!/usr/bin/python
"""Mark a node group on one of its members: ready (its head serves) or failed (a member
failed; the reason). The member's health wait reads the mark and ends."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_group_mark
short_description: Tell a node group's member that the group is ready or has failed
description:
  - Writes the group's mark for this run into the member's state directory, where its
    evalprov_wait_health reads it on every poll.
options:
  group:
    description: The node group's name.
    type: str
    required: true
  run:
    description: The run's id (a mark of another run is ignored).
    type: str
    required: true
  state:
    description: ready or failed.
    type: str
    choices: [ready, failed]
    required: true
  reason:
    description: Why the group failed (the failing member's message).
    type: str
    default: ""
  messages:
    description:
      - The failing task's messages, its failed items' first (a loop's own message only
        says that items failed); the first one not empty is appended to reason.
    type: list
    elements: str
    default: []
  by:
    description: The member that marks.
    type: str
    default: ""
  state_dir:
    description: The member's state directory.
    type: path
    required: true
author: evalprov
"""

import re

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    read_group_mark,
    write_group_mark,
)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def main():
    module = AnsibleModule(
        argument_spec={
            "group": {"type": "str", "required": True},
            "run": {"type": "str", "required": True},
            "state": {"type": "str", "choices": ["ready", "failed"], "required": True},
            "reason": {"type": "str", "default": ""},
            "messages": {"type": "list", "elements": "str", "default": []},
            "by": {"type": "str", "default": ""},
            "state_dir": {"type": "path", "required": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    reason = p["reason"] + next((m for m in p["messages"] if m), "")
    for key in ("group", "run"):
        if not NAME.fullmatch(p[key]):
            module.fail_json(msg=f"{key} {p[key]!r} is not a name")
    old = read_group_mark(p["state_dir"], p["group"], p["run"])
    # the first failure is the cause: a later one (the others stopping) does not replace it
    if old.get("state") == "failed" or old.get("state") == p["state"]:
        module.exit_json(changed=False, mark=old)
    if not module.check_mode:
        write_group_mark(p["state_dir"], p["group"], p["run"], p["state"], reason[:2000],
                         p["by"])
    module.exit_json(changed=True, mark={"state": p["state"]})


if __name__ == "__main__":
    main()
