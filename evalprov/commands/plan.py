"""evalprov plan: what runs where (GPUs, ports, the vllm argv, tasks), changing nothing."""

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
    config_args(p, ("text", "yaml", "json"))
    host_args(p)
    facts_args(p)


def run(args: argparse.Namespace) -> int:
    from evalprov.show import plan_data, plan_text

    result = make_plan(args)
    print(plan_text(result) if args.format == "text" else dump(plan_data(result), args.format))
    return Exit.OK


COMMAND = Command(
    "plan", "show what runs where: GPUs, ports, vllm argv, tasks",
    examples("evalprov plan examples/baremetal_llama_3_1_8b_instruct.yaml -i inventories/fleet.yml",
             "evalprov plan examples/nel_seed.yaml --format json",
             "evalprov plan CONFIG -i INVENTORY --gpus 8"),
    arguments=arguments, run=run)
