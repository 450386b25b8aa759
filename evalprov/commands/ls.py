"""evalprov ls tasks: the task table (task, harness, endpoint types, container)."""

from __future__ import annotations

import argparse

from evalprov.commands.common import Command, dump, examples
from evalprov.errors import EvalprovError, Exit


def tasks_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harness", help="only this harness")
    p.add_argument("--format", choices=("text", "yaml", "json"), default="text")


def run_tasks(args: argparse.Namespace) -> int:
    from evalprov.config.tasks import task_table
    from evalprov.show import tasks_text

    table = task_table()
    if args.harness and args.harness not in table.harnesses:
        raise EvalprovError(f"--harness: unknown harness {args.harness!r}; one of "
                            f"{', '.join(table.harnesses)}")
    if args.format == "text":
        print(tasks_text(table, args.harness))
    else:
        rows = [
            {"name": t.name, "harness": t.harness, "container": t.container,
             "endpoint_types": list(t.endpoint_types), "description": t.description}
            for t in table.tasks if args.harness in (None, t.harness)
        ]
        print(dump(rows, args.format), end="")
    return Exit.OK


TASKS = Command(
    "tasks", "tasks with harness, image and endpoint type",
    examples("evalprov ls tasks", "evalprov ls tasks --harness simple_evals --format json"),
    arguments=tasks_arguments, run=run_tasks)

COMMAND = Command(
    "ls", "list known things",
    examples("evalprov ls tasks", "evalprov ls tasks --harness simple_evals"),
    children=(TASKS,))
