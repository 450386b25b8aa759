"""The `evalprov` command: parse arguments, call the flow, print. No policy lives here."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from evalprov import __version__
from evalprov.errors import EvalprovError, Exit


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"evalprov: error: {message}; see `{self.prog} --help`\n")
        raise SystemExit(Exit.USAGE)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of 1 or more")
    return value


def _dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, default=list)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def _load(args: argparse.Namespace):
    from evalprov.config.loader import load_config

    default_execution = "baremetal" if getattr(args, "inventory", None) else "local"
    loaded = load_config(args.config, args.override or (), default_execution=default_execution)
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    return loaded


def _plan(args: argparse.Namespace):
    from evalprov.hosts import host_facts
    from evalprov.plan import plan

    loaded = _load(args)
    config = loaded.config
    hosts = host_facts(config.execution.type, args.inventory, args.gpus, args.facts, args.limit)
    return plan(config, hosts)


def cmd_validate(args: argparse.Namespace) -> int:
    from evalprov.config.loader import resolved_dict

    loaded = _load(args)
    print(_dump(resolved_dict(loaded), args.format), end="")
    print(f"{loaded.source}: valid", file=sys.stderr)
    return Exit.OK


def cmd_plan(args: argparse.Namespace) -> int:
    from evalprov.show import plan_data, plan_text

    result = _plan(args)
    print(plan_text(result) if args.format == "text" else _dump(plan_data(result), args.format))
    return Exit.OK


def cmd_inventory(args: argparse.Namespace) -> int:
    from evalprov.inventory import render, to_yaml

    data = render(_plan(args))
    print(to_yaml(data) if args.format == "yaml" else _dump(data, args.format), end="")
    return Exit.OK


def _provision(args: argparse.Namespace, playbook: str) -> int:
    from evalprov import apply
    from evalprov.hosts import host_facts

    loaded = _load(args)
    hosts = host_facts(loaded.config.execution.type, args.inventory, None, None, args.limit)
    opts = apply.Options(args.inventory, getattr(args, "check", False),
                         getattr(args, "diff", False), args.limit, getattr(args, "tags", None),
                         args.forks, getattr(args, "rerun", None),
                         getattr(args, "skip_tags", None))
    _, result, run_dir = apply.run(loaded, hosts, opts, playbook)
    text, code = apply.summary(result, opts.check)
    print(text)
    if code and playbook == "site.yml":
        print(f"next: fix the errors above, then run the same evalprov apply again "
              f"(logs under {run_dir})", file=sys.stderr)
    return code


def cmd_apply(args: argparse.Namespace) -> int:
    return _provision(args, "site.yml")


def cmd_destroy(args: argparse.Namespace) -> int:
    return _provision(args, "destroy.yml")


def _output_dir(args: argparse.Namespace):
    from pathlib import Path

    if args.config:
        from evalprov.apply import output_root

        return output_root(_load(args))
    return Path(args.output_dir).expanduser().resolve()


def cmd_results(args: argparse.Namespace) -> int:
    from evalprov import results

    run_dir = results.find_run(_output_dir(args), args.run)
    summary = results.load_summary(run_dir)
    print(results.render(summary, args.format))
    if args.format == "table":
        print(f"run {summary['run']}: {run_dir}", file=sys.stderr)
    return Exit.OK


def cmd_logs(args: argparse.Namespace) -> int:
    from evalprov import results

    run_dir = results.find_run(_output_dir(args), args.run)
    for path in results.task_log(run_dir, args.host, args.task):
        print(f"==> {path.relative_to(run_dir)} <==")
        print(path.read_text(errors="replace"), end="")
    return Exit.OK


def cmd_status(args: argparse.Namespace) -> int:
    from evalprov.ledger import DB_NAME, Ledger
    from evalprov.show import status_text

    out = _output_dir(args)
    if not (out / DB_NAME).exists():
        raise EvalprovError(f"status: no ledger in {out}; give --output-dir (the config's "
                            "execution.output_dir) or -c CONFIG")
    ledger = Ledger(out)
    try:
        run = ledger.run(args.run)
        print(status_text(run, ledger.deployments_of(run["run_id"]),
                          ledger.tasks_of(run["run_id"])))
    finally:
        ledger.close()
    return Exit.OK


def cmd_ls_tasks(args: argparse.Namespace) -> int:
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
        print(_dump(rows, args.format), end="")
    return Exit.OK


EPILOGS = {
    "validate": "examples:\n  evalprov validate examples/local_vllm_qwen.yaml\n"
                "  evalprov validate examples/nel_seed.yaml -o execution.walltime=04:00:00",
    "plan": "examples:\n  evalprov plan examples/baremetal_llama_3_1_8b_instruct.yaml "
            "-i inventories/fleet.yml\n  evalprov plan examples/nel_seed.yaml --format json\n"
            "  evalprov plan CONFIG -i INVENTORY --gpus 8",
    "inventory": "examples:\n  evalprov inventory examples/baremetal_llama_3_1_8b_instruct.yaml "
                 "-i inventories/fleet.yml",
    "apply": "examples:\n  evalprov apply CONFIG -i INVENTORY --check --diff\n"
             "  evalprov apply CONFIG -i INVENTORY --limit gpu-node-01 --forks 16",
    "destroy": "examples:\n  evalprov destroy CONFIG -i INVENTORY",
    "results": "examples:\n  evalprov results\n  evalprov results 20261127-0912 --format md\n"
               "  evalprov results -c CONFIG --format csv > scores.csv",
    "logs": "examples:\n  evalprov logs 20261127-0912 --host gpu-node-01 --task ifeval",
    "ls": "examples:\n  evalprov ls tasks\n  evalprov ls tasks --harness simple_evals",
}


def _one_line(text: str) -> str:
    """An error stays one line even when it quotes a value holding newlines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _debug_flag(p: argparse.ArgumentParser) -> None:
    """--debug after the subcommand too (`evalprov validate X --debug`); SUPPRESS keeps a
    --debug given before the subcommand."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="evalprov",
        description="Declarative provisioning for LLM evaluation on bare-metal GPU fleets: "
        "NEL configs in, vLLM served and evaluated on your hosts.",
    )
    parser.add_argument("--version", action="version", version=f"evalprov {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def config_cmd(name: str, help_: str, fn, fmts=("yaml", "json")) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", help="NEL-style YAML config")
        p.add_argument("-o", "--override", action="append", metavar="KEY=VALUE",
                       help="override a field, YAML-typed (repeatable)")
        p.add_argument("--format", choices=fmts, default=fmts[0])
        _debug_flag(p)
        p.set_defaults(func=fn)
        return p

    config_cmd("validate", "load a config and print it resolved", cmd_validate)
    for name, help_, fn, fmts in (
        ("plan", "show what runs where: GPUs, ports, vllm argv, tasks", cmd_plan,
         ("text", "yaml", "json")),
        ("inventory", "print the Ansible inventory variables evalprov generates", cmd_inventory,
         ("yaml", "json")),
    ):
        p = config_cmd(name, help_, fn, fmts)
        p.add_argument("-i", "--inventory", help="Ansible inventory of the GPU hosts")
        p.add_argument("--limit", help="host pattern, as ansible --limit")
        p.add_argument("--gpus", type=int, metavar="N", help="GPU count of every host")
        p.add_argument("--facts", metavar="FILE", help="YAML/JSON host: GPU count")

    for name, help_, fn in (
        ("apply", "provision the hosts: preflight, image, vllm serve, /health", cmd_apply),
        ("destroy", "remove what apply made on the hosts", cmd_destroy),
    ):
        p = config_cmd(name, help_, fn, ("text",))
        p.add_argument("-i", "--inventory", help="Ansible inventory of the GPU hosts")
        p.add_argument("--limit", help="host pattern, as ansible --limit")
        p.add_argument("--forks", type=_positive, metavar="N",
                       help="parallel hosts (ansible forks)")
        if name == "apply":
            p.add_argument("--check", action="store_true",
                           help="report what would change; change nothing")
            p.add_argument("--diff", action="store_true", help="show what changes")
            p.add_argument("--tags", help="only these role tags "
                           "(preflight,image,vllm,health,eval)")
            p.add_argument("--skip-tags", help="skip these role tags (e.g. eval)")
            p.add_argument("--rerun", choices=("failed", "all"),
                           help="failed: also redo tasks that failed before; all: redo every "
                           "task as a new attempt (old results are kept)")

    for name, help_, fn in (
        ("results", "show a run's scores: task, host, metric, score, samples, duration",
         cmd_results),
        ("logs", "print a task's harness log", cmd_logs),
        ("status", "show a run: every host, instance and task with state, attempt, timings",
         cmd_status),
    ):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("run", nargs="?", help="run id (or its prefix, or the run's directory); "
                       "default: the newest run")
        p.add_argument("--output-dir", default="evalprov-results",
                       help="the config's execution.output_dir (default ./evalprov-results)")
        p.add_argument("-c", "--config", help="read output_dir from this config instead")
        p.add_argument("-o", "--override", action="append", metavar="KEY=VALUE",
                       help=argparse.SUPPRESS)
        p.set_defaults(func=fn)
        if name == "status":
            pass
        elif name == "results":
            p.add_argument("--format", choices=("table", "json", "csv", "md"), default="table")
        else:
            p.add_argument("--host", help="only this host")
            p.add_argument("--task", help="only this task")

    ls = sub.add_parser("ls", help="list known things", epilog=EPILOGS["ls"],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls_sub = ls.add_subparsers(dest="what", required=True, parser_class=_Parser)
    lt = ls_sub.add_parser("tasks", help="tasks with harness, image and endpoint type")
    lt.add_argument("--harness", help="only this harness")
    lt.add_argument("--format", choices=("text", "yaml", "json"), default="text")
    _debug_flag(lt)
    lt.set_defaults(func=cmd_ls_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "gpus", None) is not None and args.gpus < 0:
        parser.error(f"--gpus {args.gpus}: a GPU count is 0 or more")
    try:
        return int(args.func(args))
    except EvalprovError as exc:
        if args.debug:
            raise
        for line in exc.lines:
            print(f"error: {_one_line(line)}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(Exit.INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
