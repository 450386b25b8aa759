"""evalprov migrate: a NEL config of any NEL version, printed (or written) in the current
schema with a comment on every line that changed, and validated.

Nothing is resolved: ${...} stay as written (no value from the environment is printed), and
on stdout a literal whose variable name says it is a secret is shown masked (--write keeps
it in the file)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from evalprov.commands.common import Command, examples
from evalprov.errors import Exit

PREFIX = "evalprov migrate:"
MASKED = "lit:<secret: not shown; --write keeps it>"


def _lines_of(text: str) -> dict[str, int]:
    """Dotted path -> 0-based line of its key (or list item) in the YAML text."""
    out: dict[str, int] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{where}.{key.value}" if where else str(key.value)
                out[path] = key.start_mark.line
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{where}.{i}"
                out[path] = item.start_mark.line
                walk(item, path)

    walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return out


def _mask_secrets(data: dict[str, Any]) -> list[str]:
    """Replace secret literals in every env_vars map (in place); their paths."""
    from evalprov.config.envvars import parse_env_value
    from evalprov.secrets import is_secret

    masked = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                path = f"{where}.{k}" if where else str(k)
                if k == "env_vars" and isinstance(v, dict):
                    for name, raw in v.items():
                        try:
                            spec = parse_env_value(raw)
                        except ValueError:
                            continue
                        if spec.source == "lit" and is_secret(str(name), spec):
                            v[name] = MASKED
                            masked.append(f"{path}.{name}")
                else:
                    walk(v, path)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}.{i}")

    walk(data, "")
    return masked


def render(data: dict[str, Any], changes: list, source: str) -> str:
    """The config as YAML, each changed line commented, removed fields listed on top."""
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100,
                          allow_unicode=True)
    lines = text.splitlines()
    where = _lines_of(text)
    notes: dict[int, list[str]] = {}
    header = [f"# {PREFIX} {source} in the current NEL schema ({len(changes)} changes)"]
    for change in changes:
        line = where.get(change.path) if change.path else None
        if line is None:
            header.append(f"# {PREFIX} {change.was}: {change.note}")
        else:
            notes.setdefault(line, []).append(change.note)
    for line, texts in notes.items():
        lines[line] += f"  # {PREFIX} " + "; ".join(dict.fromkeys(texts))
    return "\n".join(header + lines) + "\n"


def migrate(path: str, override_texts: list[str], default_execution: str = "local"):
    """(YAML text of the migrated config, its LoadedConfig, the changes)."""
    import copy

    from evalprov.config import overrides
    from evalprov.config.generations import normalise
    from evalprov.config.loader import load_user, read_yaml

    user = read_yaml(path)
    for ov in (overrides.parse(t) for t in override_texts):
        if ov.group_choice:
            overrides.choose_option(user, ov)
        else:
            overrides.apply(user, ov, strict=False)
    current, changes = normalise(user)
    text = render(current, changes, path)
    loaded = load_user(copy.deepcopy(current), (), default_execution, source=f"{path} (migrated)")
    return text, current, changes, loaded


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    text, current, changes, loaded = migrate(args.config, args.override or [])
    for warning in loaded.warnings:
        if "uses forms of older NEL versions" not in warning:
            print(warning, file=sys.stderr)
    if args.write:
        _write(Path(args.config), text)
        print(f"{args.config}: migrated ({len(changes)} changes) and valid", file=sys.stderr)
        return Exit.OK
    if _mask_secrets(current):
        text = render(current, changes, args.config)
    print(text, end="")
    print(f"{args.config}: {len(changes)} changes; the result is valid "
          f"(`evalprov migrate {args.config} --write` writes it)", file=sys.stderr)
    return Exit.OK


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="NEL config of any NEL version")
    p.add_argument("-o", "--override", action="append", metavar="KEY=VALUE",
                   help="override a field first (Hydra grammar: key=v, +key=v, ++key=v, ~key)")
    p.add_argument("--write", action="store_true", help="rewrite CONFIG in place")


COMMAND = Command(
    "migrate", "print a NEL config of any version in the current schema (comments on changes)",
    examples("evalprov migrate old_nel_config.yaml",
             "evalprov migrate old_nel_config.yaml --write"),
    arguments=_arguments, run=run)
