"""evalprov compare: several runs' scores side by side, with each run's delta against the
first."""

from __future__ import annotations

import argparse

from evalprov.commands.common import Command, examples, output_dir
from evalprov.errors import Exit


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run ids (or prefixes, or run directories); the first is the baseline")
    p.add_argument("--output-dir", default="evalprov-results",
                   help="the config's execution.output_dir (default ./evalprov-results)")
    p.add_argument("-c", "--config", help="read output_dir from this config instead")
    p.add_argument("-o", "--override", action="append", metavar="KEY=VALUE",
                   help=argparse.SUPPRESS)
    p.add_argument("--format", choices=("table", "json", "csv", "md"), default="table")
    p.add_argument("--every-metric", action="store_true",
                   help="every score the harness wrote, not only each task's primary one")


def run(args: argparse.Namespace) -> int:
    from evalprov import compare, results
    from evalprov.errors import EvalprovError

    if len(args.runs) < 2:
        raise EvalprovError("compare: give two runs or more (the first is the baseline); "
                            "`evalprov status` lists them")
    out = output_dir(args)
    summaries = [results.load_summary(results.find_run(out, r)) for r in args.runs]
    print(compare.render(compare.table(summaries, args.every_metric), args.format))
    return Exit.OK


COMMAND = Command(
    "compare", "show several runs' scores side by side with deltas against the first",
    examples("evalprov compare 20261127-0912 20261128-1010",
             "evalprov compare RUN_A RUN_B RUN_C -c CONFIG --format md",
             "evalprov compare RUN_A RUN_B --every-metric --format csv > delta.csv"),
    arguments=arguments, run=run)
