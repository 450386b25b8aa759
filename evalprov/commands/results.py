"""evalprov results: a run's scores as a table, JSON, CSV or markdown."""

from __future__ import annotations

import argparse
import sys

from evalprov.commands.common import Command, examples, output_dir, run_args
from evalprov.errors import Exit


def arguments(p: argparse.ArgumentParser) -> None:
    run_args(p)
    p.add_argument("--format", choices=("table", "json", "csv", "md"), default="table")


def run(args: argparse.Namespace) -> int:
    from evalprov import results

    run_dir = results.find_run(output_dir(args), args.run)
    summary = results.load_summary(run_dir)
    print(results.render(summary, args.format))
    if args.format == "table":
        print(f"run {summary['run']}: {run_dir}", file=sys.stderr)
    return Exit.OK


COMMAND = Command(
    "results", "show a run's scores: task, host, metric, score, samples, duration",
    examples("evalprov results", "evalprov results 20261127-0912 --format md",
             "evalprov results -c CONFIG --format csv > scores.csv"),
    arguments=arguments, run=run)
