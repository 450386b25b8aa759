"""Redacting a command line before it is written anywhere (the ledger's runs.command, the
lock file): secrets given on the command line must not reach the disk.

Only values that may be secret are replaced, each by ``***``; everything else (the config
path, --limit, counts, ordinary overrides) is kept as typed so the record stays useful:

- an ``-o``/``--override`` ``KEY=VALUE`` whose key path contains ``env_vars``, or whose key
  names a token, key, secret or password, or whose value is (or holds) a ``lit:``/``host:``
  env var spec or an ``env_vars`` mapping: ``KEY=***``;
- an option whose name mentions a token, key, secret or password (``--api-key X``,
  ``--api-key=X``, ``--hf-token X``): its value.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence

MASK = "***"

_SECRET_WORD = re.compile(r"token|key|secret|passw(or)?d|credential", re.IGNORECASE)
# a lit:/host: spec at the start of the value or of a YAML scalar inside it
# ("{A: lit:x}", "[lit:x]"); "localhost:8000" is not one
_SPEC = re.compile(r"(?:^|[\s{\[,:'\"=])(?:lit|host):", re.IGNORECASE)
_OVERRIDE_LONG = "--override"


def _is_override_flag(arg: str) -> bool:
    """-o, --override, or an abbreviation argparse accepts (--ov, --over, ...)."""
    return arg == "-o" or (len(arg) >= 4 and _OVERRIDE_LONG.startswith(arg))


def _secret_option(name: str) -> bool:
    return name.startswith("--") and bool(_SECRET_WORD.search(name[2:]))


def secret_override(item: str) -> bool:
    """Whether an override KEY=VALUE may carry a secret (see the module docstring)."""
    key, sep, value = item.partition("=")
    if not sep:  # not KEY=VALUE (argparse reports it); keep no part of it that could leak
        return bool(_SPEC.search(item) or _SECRET_WORD.search(item) or "env_vars" in item)
    return ("env_vars" in key.lower() or bool(_SECRET_WORD.search(key))
            or bool(_SPEC.search(value)) or "env_vars" in value.lower())


def _mask_override(item: str) -> str:
    if not secret_override(item):
        return item
    key, sep, _ = item.partition("=")
    return f"{key}={MASK}" if sep else MASK


def redact_argv(argv: Sequence[str]) -> list[str]:
    """argv with every value that may be secret replaced by ``***`` (argv[0] kept)."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        if i == 0:
            out.append(arg)
        elif arg == "--":
            out.extend(args[i:])
            break
        elif _is_override_flag(arg) and nxt is not None:
            out += [arg, _mask_override(nxt)]
            i += 1
        elif arg.startswith("-o") and not arg.startswith("--") and len(arg) > 2:
            out.append("-o" + _mask_override(arg[2:]))  # -oKEY=VALUE
        elif arg.startswith("--") and "=" in arg:
            name, _, value = arg.partition("=")
            if _is_override_flag(name):
                out.append(f"{name}={_mask_override(value)}")
            elif _secret_option(name):
                out.append(f"{name}={MASK}")
            else:
                out.append(arg)
        elif _secret_option(arg) and nxt is not None and not nxt.startswith("-"):
            out += [arg, MASK]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def redacted_command(argv: Sequence[str] | None = None) -> str:
    """The command line (default: this process's) as one string, redacted and shell-quoted
    so it can be read back with shlex.split."""
    return shlex.join(redact_argv(sys.argv if argv is None else argv))


def redact_command_text(text: str) -> str:
    """Redact a command stored as text by older versions (`" ".join(argv)`, unquoted)."""
    try:
        argv = shlex.split(text)
    except ValueError:
        argv = text.split()
    redacted = redact_argv(argv)
    return text if redacted == argv else shlex.join(redacted)
