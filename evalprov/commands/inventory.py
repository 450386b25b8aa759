"""evalprov inventory: the Ansible inventory variables evalprov generates for a plan."""

from __future__ import annotations

import argparse

from evalprov.commands.common import (
    Command,
    config_args,
    dump,
    examples,
    facts_args,
    host_args,
    make_plan,
)
from evalprov.errors import Exit


def arguments(p: argparse.ArgumentParser) -> None:
    config_args(p, ("yaml", "json"))
    host_args(p)
    facts_args(p)


def run(args: argparse.Namespace) -> int:
    from evalprov.inventory import render, to_yaml

    data = render(make_plan(args))
    print(to_yaml(data) if args.format == "yaml" else dump(data, args.format), end="")
    return Exit.OK


COMMAND = Command(
    "inventory", "print the Ansible inventory variables evalprov generates",
    examples("evalprov inventory examples/baremetal_llama_3_1_8b_instruct.yaml "
             "-i inventories/fleet.yml",
             "evalprov inventory CONFIG -i INVENTORY --format json"),
    arguments=arguments, run=run)
