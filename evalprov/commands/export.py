"""evalprov export: a run to a JSON file, an MLflow tracking server or Weights & Biases."""

from __future__ import annotations

import argparse
from pathlib import Path

from evalprov.commands.common import Command, examples, load, run_args
from evalprov.errors import Exit


def arguments(p: argparse.ArgumentParser) -> None:
    run_args(p)
    p.add_argument("--to", required=True, choices=("json", "mlflow", "wandb"),
                   help="destination")
    p.add_argument("--out", metavar="FILE", help="json: the file (default <run>/export.json)")
    p.add_argument("--tracking-uri", metavar="URL",
                   help="mlflow: the tracking server (default export.mlflow.tracking_uri, "
                   "then MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", help="mlflow: experiment name (default evalprov)")
    p.add_argument("--project", help="wandb: project (default evalprov)")
    p.add_argument("--entity", help="wandb: entity")


def run(args: argparse.Namespace) -> int:
    from evalprov import export, results
    from evalprov.apply import output_root

    config = None
    if args.config:
        loaded = load(args)
        config = loaded.config
        out = output_root(loaded)
    else:
        out = Path(args.output_dir).expanduser().resolve()
    run_dir = results.find_run(out, args.run)
    cfg = export.settings(config, args.to)
    for key, value in (("tracking_uri", args.tracking_uri), ("experiment_name", args.experiment),
                       ("project", args.project), ("entity", args.entity)):
        if value:
            cfg[key] = value
    print(export.export(run_dir, args.to, cfg, Path(args.out) if args.out else None))
    return Exit.OK


COMMAND = Command(
    "export", "export a run to a JSON file, an MLflow tracking server or W&B",
    examples("evalprov export --to json",
             "evalprov export 20261127-0912 --to mlflow --tracking-uri http://127.0.0.1:5000",
             "WANDB_MODE=offline evalprov export 20261127-0912 --to wandb -c CONFIG"),
    arguments=arguments, run=run)
