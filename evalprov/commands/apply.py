"""evalprov apply: provision the hosts (preflight, image, vllm serve, /health) and evaluate."""

from __future__ import annotations

import argparse
import sys

from evalprov.commands.common import Command, config_args, examples, host_args, load, positive


def provision_args(p: argparse.ArgumentParser) -> None:
    """What apply and destroy share."""
    config_args(p, ("text",))
    host_args(p)
    p.add_argument("--forks", type=positive, metavar="N", help="parallel hosts (ansible forks)")


def arguments(p: argparse.ArgumentParser) -> None:
    provision_args(p)
    p.add_argument("--check", action="store_true", help="report what would change; change nothing")
    p.add_argument("--diff", action="store_true", help="show what changes")
    p.add_argument("--tags", help="only these role tags (preflight,image,vllm,health,eval)")
    p.add_argument("--skip-tags", help="skip these role tags (e.g. eval)")
    p.add_argument("--rerun", choices=("failed", "all"),
                   help="failed: also redo tasks that failed before; all: redo every task as a "
                   "new attempt (old results are kept)")


def provision(args: argparse.Namespace, playbook: str) -> int:
    """Run a playbook through evalprov.apply and print its summary; the exit code is apply's."""
    from evalprov import apply
    from evalprov.hosts import host_facts

    loaded = load(args)
    hosts = host_facts(loaded.config.execution.type, args.inventory, None, None, args.limit)
    opts = apply.Options(inventory=args.inventory, check=getattr(args, "check", False),
                         diff=getattr(args, "diff", False), limit=args.limit,
                         tags=getattr(args, "tags", None), forks=args.forks,
                         rerun=getattr(args, "rerun", None),
                         skip_tags=getattr(args, "skip_tags", None))
    _, result, run_dir = apply.run(loaded, hosts, opts, playbook)
    text, code = apply.summary(result, opts.check)
    print(text)
    if playbook == "site.yml" and not opts.check and (run_dir / "summary.json").exists():
        from evalprov.export import auto_export

        for line in auto_export(loaded.config, run_dir):  # NEL's execution.auto_export
            print(line, file=sys.stderr)
    if code == 1 and playbook == "site.yml":  # (an interrupt says its own next step)
        print(f"next: fix the errors above, then run the same evalprov apply again "
              f"(logs under {run_dir})", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    return provision(args, "site.yml")


COMMAND = Command(
    "apply", "provision the hosts: preflight, image, vllm serve, /health",
    examples("evalprov apply CONFIG -i INVENTORY --check --diff",
             "evalprov apply CONFIG -i INVENTORY --limit gpu-node-01 --forks 16",
             "evalprov apply CONFIG -i INVENTORY --rerun failed"),
    arguments=arguments, run=run)
