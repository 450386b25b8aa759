"""What every subcommand of `evalprov` shares: the parser class (usage errors are one line,
exit 2), the `Command` table entry, argument groups, and loading a config or an output_dir."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evalprov.errors import Exit


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"evalprov: error: {message}; see `{self.prog} --help`\n")
        raise SystemExit(Exit.USAGE)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, help, examples, arguments and what it runs. A command with
    children (`ls`) runs one of them, chosen by the next word (stored as `dest`)."""

    name: str
    help: str
    epilog: str
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    run: Callable[[argparse.Namespace], int] | None = None
    children: tuple[Command, ...] = ()
    dest: str = "what"


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


# --------------------------------------------------------------------------- argument types


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of 1 or more")
    return value


class GpuCount(argparse.Action):
    """--gpus N: an int (argparse says so otherwise), 0 or more."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values < 0:
            parser.error(f"{option_string} {values}: a GPU count is 0 or more")
        setattr(namespace, self.dest, values)


# --------------------------------------------------------------------------- argument groups


def config_args(p: argparse.ArgumentParser, fmts: tuple[str, ...] = ("yaml", "json")) -> None:
    p.add_argument("config", help="NEL-style YAML config")
    p.add_argument("-o", "--override", action="append", metavar="KEY=VALUE",
                   help="override a field, YAML-typed (repeatable)")
    p.add_argument("--format", choices=fmts, default=fmts[0])


def host_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--inventory", help="Ansible inventory of the GPU hosts")
    p.add_argument("--limit", help="host pattern, as ansible --limit")


def facts_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, action=GpuCount, metavar="N",
                   help="GPU count of every host")
    p.add_argument("--facts", metavar="FILE", help="YAML/JSON host: GPU count")


def run_args(p: argparse.ArgumentParser) -> None:
    """A run of an output_dir: the run id, and where the output_dir is."""
    p.add_argument("run", nargs="?", help="run id (or its prefix, or the run's directory); "
                   "default: the newest run")
    p.add_argument("--output-dir", default="evalprov-results",
                   help="the config's execution.output_dir (default ./evalprov-results)")
    p.add_argument("-c", "--config", help="read output_dir from this config instead")
    p.add_argument("-o", "--override", action="append", metavar="KEY=VALUE",
                   help=argparse.SUPPRESS)


def debug_flag(p: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """--debug before or after the subcommand (`evalprov validate X --debug`); a subcommand's
    SUPPRESS default keeps a --debug given before it."""
    p.add_argument("--debug", action="store_true", default=default,
                   help="show tracebacks on errors")


# --------------------------------------------------------------------------- helpers


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, default=list)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def load(args: argparse.Namespace):
    from evalprov.config.loader import load_config

    default_execution = "baremetal" if getattr(args, "inventory", None) else "local"
    loaded = load_config(args.config, args.override or (), default_execution=default_execution)
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    return loaded


def make_plan(args: argparse.Namespace):
    """The plan apply would make (with the deployment's API key in its spec hashes)."""
    from evalprov.apply import api_key_id
    from evalprov.hosts import host_facts
    from evalprov.plan import plan

    loaded = load(args)
    config = loaded.config
    hosts = host_facts(config.execution.type, args.inventory, args.gpus, args.facts, args.limit)
    return plan(config, hosts, api_key_id(loaded))


def output_dir(args: argparse.Namespace) -> Path:
    if args.config:
        from evalprov.apply import output_root

        return output_root(load(args))
    return Path(args.output_dir).expanduser().resolve()
