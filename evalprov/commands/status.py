"""evalprov status: a run from the ledger, every host, instance and task."""

from __future__ import annotations

import argparse

from evalprov.commands.common import Command, examples, output_dir, run_args
from evalprov.errors import EvalprovError, Exit


def run(args: argparse.Namespace) -> int:
    from evalprov.ledger import DB_NAME, Ledger
    from evalprov.show import status_text
    from evalprov.usage import gpu_hours

    out = output_dir(args)
    if not (out / DB_NAME).exists():
        raise EvalprovError(f"status: no ledger in {out}; give --output-dir (the config's "
                            "execution.output_dir) or -c CONFIG")
    with Ledger(out) as ledger:
        run = ledger.run(args.run)
        deployments = ledger.deployments_of(run["run_id"])
        use = gpu_hours(run, deployments, ledger.tasks_of(run["run_id"]))
        print(status_text(run, deployments, ledger.task_records(run["run_id"]), use))
    return Exit.OK


COMMAND = Command(
    "status", "show a run: every host, instance and task with state, attempt, timings",
    examples("evalprov status", "evalprov status 20261127-0912 -c CONFIG",
             "evalprov status --output-dir /results"),
    arguments=run_args, run=run)
