"""evalprov report: one self-contained HTML file of a run (timeline, scores, chart,
failures with their log tails, GPU-hours, the reproducibility record)."""

from __future__ import annotations

import argparse
from pathlib import Path

from evalprov.commands.common import Command, examples, output_dir, run_args
from evalprov.errors import Exit


def arguments(p: argparse.ArgumentParser) -> None:
    run_args(p)
    p.add_argument("--out", metavar="FILE",
                   help="where to write the HTML (default <run>/report.html)")


def run(args: argparse.Namespace) -> int:
    from evalprov import report, results

    out = output_dir(args)
    run_dir = results.find_run(out, args.run)
    summary = results.load_summary(run_dir)
    path = report.write_report(run_dir, Path(args.out) if args.out else None,
                               report.ledger_row(run_dir.parent, summary["run"]))
    print(path)
    return Exit.OK


COMMAND = Command(
    "report", "write one self-contained HTML report of a run",
    examples("evalprov report", "evalprov report 20261127-0912 -c CONFIG",
             "evalprov report --output-dir /results --out run.html"),
    arguments=arguments, run=run)
