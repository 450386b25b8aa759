"""Per host, after evalprov_decide: make this host's part of the registered Decision its
variables (as facts), so the roles read plain evalprov_* variables."""

from __future__ import annotations

DOCUMENTATION = r"""
action: evalprov_take
short_description: Set this host's variables from evalprov's Decision
options:
  decision:
    description: The registered result of evalprov_decide.
    type: dict
    required: true
author: evalprov
"""

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        host = task_vars["inventory_hostname"]
        mine = (self._task.args.get("decision") or {}).get("hosts", {}).get(host)
        if mine is None:
            result.update(failed=True, msg=f"host {host}: no decision was made for it")
            return result
        result.update(changed=False, ansible_facts=dict(mine))
        return result
