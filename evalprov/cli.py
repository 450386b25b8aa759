"""The `evalprov` command: parse arguments, call the flow, print. No policy lives here.

Each subcommand is a module of evalprov.commands exporting `COMMAND` (a `Command`: name,
help, examples, arguments, run); `COMMANDS` lists them in the order `--help` shows and
`build_parser` adds every one the same way (each gets --debug and its examples).

Errors: a domain error (EvalprovError) is one line per problem and its exit code; anything
else is one line too, with the traceback only under --debug. Output into a closed pipe
(`evalprov status | head -1`) ends quietly, as coreutils do."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys

from evalprov import __version__
from evalprov.commands import (
    apply,
    compare,
    destroy,
    export,
    inventory,
    logs,
    ls,
    migrate,
    plan,
    report,
    results,
    status,
    validate,
)
from evalprov.commands.common import Command, Parser, debug_flag
from evalprov.errors import EvalprovError, Exit

__all__ = ["COMMANDS", "PIPE_EXIT", "build_parser", "main"]

COMMANDS: tuple[Command, ...] = tuple(m.COMMAND for m in (
    validate, migrate, plan, inventory, apply, destroy, results, logs, status, ls, report, compare,
    export))

# a process killed by SIGPIPE reports 128 + 13 to the shell (`seq 1e6 | head -1` under
# pipefail); evalprov exits with the same status, without a traceback
PIPE_EXIT = 128 + int(signal.SIGPIPE)


def _add(sub: argparse._SubParsersAction, cmd: Command) -> None:
    p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, epilog=cmd.epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_flag(p)
    cmd.arguments(p)
    if cmd.children:
        nested = p.add_subparsers(dest=cmd.dest, required=True, parser_class=Parser)
        for child in cmd.children:
            _add(nested, child)
    else:
        p.set_defaults(func=cmd.run)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="evalprov",
        description="Declarative provisioning for LLM evaluation on bare-metal GPU fleets: "
        "NEL configs in, vLLM served and evaluated on your hosts.",
    )
    parser.add_argument("--version", action="version", version=f"evalprov {__version__}")
    debug_flag(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for cmd in COMMANDS:
        _add(sub, cmd)
    return parser


def _one_line(text: str) -> str:
    """An error stays one line even when it quotes a value holding newlines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _dispatch(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args))
    except EvalprovError as exc:
        if debug:
            raise
        for line in exc.lines:
            print(f"error: {_one_line(line)}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(Exit.INTERRUPTED)
    except Exception as exc:
        if debug or (isinstance(exc, BrokenPipeError) and _stdio_closed()):
            raise
        print(f"error: internal error: {type(exc).__name__}: {_one_line(str(exc))}; run "
              "again with --debug for the traceback", file=sys.stderr)
        return int(Exit.FAILED)


def _stdio_closed() -> bool:
    """Whether stdout or stderr is a pipe whose reader has gone (poll says POLLERR), i.e. a
    BrokenPipeError is the user's `| head`, not a failure inside evalprov."""
    poll = select.poll()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            poll.register(stream.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def _quiet_pipe() -> None:
    """The reader of stdout (or stderr) went away: point both at /dev/null so nothing more,
    not even the interpreter's flush at exit, writes to the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _dispatch(argv)
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()  # a closed pipe shows here, while it can still be handled
    except BrokenPipeError:
        _quiet_pipe()
        return PIPE_EXIT


if __name__ == "__main__":
    sys.exit(main())
