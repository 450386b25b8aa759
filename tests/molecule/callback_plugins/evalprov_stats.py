"""Ansible callback for the molecule scenarios: appends each playbook's per-host stats (ok,
changed, failures, unreachable, ...) as one JSON line to $EVALPROV_MOLECULE_STATS, so
tests/fleet/test_molecule.py asserts idempotence from runner stats, not from grepped output.
Does nothing when that variable is unset."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: evalprov_stats
type: aggregate
short_description: Write per-host play stats of each playbook run as JSON lines
description:
  - Appends one JSON object per playbook run (playbook file name and per-host stats) to the
    file named by the EVALPROV_MOLECULE_STATS environment variable, if it is set.
requirements:
  - enable in callbacks_enabled
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "evalprov_stats"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._playbook = None

    def v2_playbook_on_start(self, playbook):
        self._playbook = os.path.basename(playbook._file_name)

    def v2_playbook_on_stats(self, stats):
        path = os.environ.get("EVALPROV_MOLECULE_STATS")
        if not path:
            return
        hosts = {h: stats.summarize(h) for h in sorted(stats.processed)}
        with Path(path).open("a") as f:
            f.write(json.dumps({"playbook": self._playbook, "stats": hosts}) + "\n")
