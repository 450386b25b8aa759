"""evalprov validate: load a config and print it resolved."""

from __future__ import annotations

import argparse
import sys

from evalprov.commands.common import Command, config_args, dump, examples, load
from evalprov.errors import Exit


def run(args: argparse.Namespace) -> int:
    from evalprov.config.loader import resolved_dict

    loaded = load(args)
    print(dump(resolved_dict(loaded), args.format), end="")
    print(f"{loaded.source}: valid", file=sys.stderr)
    return Exit.OK


COMMAND = Command(
    "validate", "load a config and print it resolved",
    examples("evalprov validate examples/local_vllm_qwen.yaml",
             "evalprov validate examples/nel_seed.yaml -o execution.walltime=04:00:00"),
    arguments=config_args, run=run)
