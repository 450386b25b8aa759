"""evalprov logs: print a task's harness log. Without a run id, the newest run that ran that
host/task (a no-op apply reuses earlier results and runs nothing, so it has no log)."""

from __future__ import annotations

import argparse
import sys

from evalprov.commands.common import Command, examples, output_dir, run_args
from evalprov.errors import Exit


def arguments(p: argparse.ArgumentParser) -> None:
    run_args(p)
    p.add_argument("--host", help="only this host")
    p.add_argument("--task", help="only this task")


def run(args: argparse.Namespace) -> int:
    from evalprov import results

    if args.run:
        run_dir = results.find_run(output_dir(args), args.run)
        paths = results.task_log(run_dir, args.host, args.task)
    else:
        run_dir, paths, newer = results.find_log_run(output_dir(args), args.host, args.task)
        what = f"host {args.host or '*'} task {args.task or '*'}"
        skipped = ""
        if newer:
            names = ", ".join(newer[:3]) + (f" and {len(newer) - 3} more" if len(newer) > 3
                                            else "")
            skipped = f"; newer run(s) {names} did not run it"
        print(f"logs: run {run_dir.name}, the newest that ran {what}{skipped}", file=sys.stderr)
    for path in paths:
        print(f"==> {path.relative_to(run_dir)} <==")
        print(path.read_text(errors="replace"), end="")
    return Exit.OK


COMMAND = Command(
    "logs", "print a task's harness log",
    examples("evalprov logs 20261127-0912 --host gpu-node-01 --task ifeval",
             "evalprov logs --task ifeval    # the newest run that ran ifeval"),
    arguments=arguments, run=run)
