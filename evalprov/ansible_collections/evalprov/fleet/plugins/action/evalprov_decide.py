"""Controller side, once per apply (run_once), between the probe and the roles: hand every
probed host's raw facts to evalprov's own decide() in-process and register its Decision:
the problems (the task fails with all of them) and each host's role variables."""

from __future__ import annotations

DOCUMENTATION = r"""
action: evalprov_decide
short_description: Decide every host's actions from the probe's facts (evalprov.decide)
options:
  inputs:
    description: Path of evalprov's in-memory inputs file (written by evalprov apply).
    type: str
    required: true
  facts_var:
    description: Name of the registered probe result on each host.
    type: str
    default: evalprov_preflight_probe
author: evalprov
"""

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        from evalprov.decide import decide_in_ansible

        args = self._task.args
        hostvars = task_vars["hostvars"]
        var = args.get("facts_var", "evalprov_preflight_probe")
        probed = {}
        for host in task_vars.get("ansible_play_hosts") or []:
            hv = hostvars[host]
            res = hv.get(var)
            if isinstance(res, dict) and res.get("evalprov_facts"):
                probed[host] = (dict(res), hv.get("ansible_connection") == "local")
        result.update(decide_in_ansible(args["inputs"], probed))
        result["changed"] = False
        return result
