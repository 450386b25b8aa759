"""evalprov destroy: remove what apply made on the hosts."""

from __future__ import annotations

import argparse

from evalprov.commands.apply import provision, provision_args
from evalprov.commands.common import Command, examples


def run(args: argparse.Namespace) -> int:
    return provision(args, "destroy.yml")


COMMAND = Command(
    "destroy", "remove what apply made on the hosts",
    examples("evalprov destroy CONFIG -i INVENTORY",
             "evalprov destroy CONFIG -i INVENTORY --limit gpu-node-01"),
    arguments=provision_args, run=run)
