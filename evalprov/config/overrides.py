"""``-o`` overrides in NEL's (Hydra's) grammar.

    key=value     set the field (created when the config does not have it yet)
    +key=value    add a field the config does not have (an error when it has it)
    ++key=value   set the field whether or not the config has it
    ~key          delete the field; ~key=value deletes it only when it holds that value
    execution=OPTION / deployment=OPTION   choose a defaults-list option (Hydra's group
                  override), e.g. -o execution=slurm/default

Values are typed as YAML (``-o x.y=false`` is a real False, ``key=`` an empty string); they
are data: nothing in them is run or templated beyond the config's own ${...} interpolation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from evalprov.config.safeyaml import MAX_DEPTH, load_text
from evalprov.errors import ConfigError

_DOTTED = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
GROUPS = ("execution", "deployment")
_ABSENT = object()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Override:
    text: str
    op: str  # set | add | force | delete
    keys: tuple[str, ...]
    value: Any = None
    has_value: bool = True

    @property
    def dotted(self) -> str:
        return ".".join(self.keys)

    @property
    def group_choice(self) -> bool:
        """``execution=slurm/default``: a defaults-list choice, not a field value."""
        return (self.op in ("set", "force") and len(self.keys) == 1 and self.keys[0] in GROUPS
                and isinstance(self.value, str) and bool(_OPTION.fullmatch(self.value)))

    @property
    def chooses_defaults(self) -> bool:
        return self.group_choice or self.keys[0] == "defaults"


def parse(text: str) -> Override:
    body, op = text, "set"
    if body.startswith("++"):
        body, op = body[2:], "force"
    elif body.startswith("+"):
        body, op = body[1:], "add"
    elif body.startswith("~"):
        body, op = body[1:], "delete"
    key, sep, raw = body.partition("=")
    key = key.strip()
    if (not sep and op != "delete") or not key or not _DOTTED.fullmatch(key):
        raise ConfigError(
            f"-o {_short(text)}: an override is key.path=value, e.g. -o deployment.port=8001 "
            "(Hydra's +key=value, ++key=value and ~key too)"
        )
    parts = tuple(key.split("."))
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"-o {_short(text)}: the key path has {len(parts)} parts; a config "
                          f"field is at most {MAX_DEPTH} levels deep")
    if not sep:
        return Override(text, op, parts, None, has_value=False)
    try:
        value = load_text(raw, source=f"-o {_short(text)}", prefix=key) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return Override(text, op, parts, value)


def _indices(node: list[Any]) -> str:
    if not node:
        return "the list is empty; add the items in the config file"
    return f"use 0..{len(node) - 1}"


def _parent(data: dict[str, Any], path: tuple[str, ...], text: str, create: bool) -> Any:
    """The container holding path[-1] (created on the way when ``create``), or _ABSENT."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"-o {_short(text)}: {'.'.join(path[:i + 1])} is not an index "
                                  f"of a list of {len(node)}; {_indices(node)}")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"-o {_short(text)}: {'.'.join(path[:i])} is not a mapping")
        if part not in node or node[part] is None:
            if not create:
                return _ABSENT
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    return node


def get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at path, or _ABSENT."""
    node: Any = data
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _ABSENT
    return node


def has(data: dict[str, Any], path: tuple[str, ...]) -> bool:
    return get(data, path) is not _ABSENT


def set_value(data: dict[str, Any], path: tuple[str, ...], value: Any, text: str) -> None:
    node = _parent(data, path, text, create=True)
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"-o {_short(text)}: {'.'.join(path)} is not an index of a list of "
                              f"{len(node)}; {_indices(node)}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"-o {_short(text)}: {'.'.join(path[:-1])} is not a mapping")


def delete(data: dict[str, Any], ov: Override, strict: bool) -> None:
    node = _parent(data, ov.keys, ov.text, create=False)
    last = ov.keys[-1]
    current = get(data, ov.keys)
    if current is _ABSENT:
        if strict:
            raise ConfigError(f"-o {_short(ov.text)}: {ov.dotted} is not in the config; nothing "
                              "to delete (check the key path)")
        return
    if ov.has_value and current != ov.value:
        if strict:
            raise ConfigError(f"-o {_short(ov.text)}: {ov.dotted} does not hold that value, so "
                              "it is not deleted; give its value or just ~key")
        return
    if isinstance(node, list):
        del node[int(last)]
    else:
        del node[last]


def choose_option(user: dict[str, Any], ov: Override) -> None:
    """``execution=OPTION``: the user's defaults list picks OPTION for that group."""
    group = ov.keys[0]
    entries = user.get("defaults")
    entries = list(entries) if isinstance(entries, list) else []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and len(entry) == 1:
            (key, _), = entry.items()
            if str(key).removeprefix("override ").strip() == group:
                entries[i] = {group: ov.value}
                break
    else:
        entries.insert(0, {group: ov.value})
    user["defaults"] = entries
    section = user.get(group)
    if isinstance(section, dict) and "type" in section:
        section.pop("type")  # the chosen option brings its own type


def apply(data: dict[str, Any], ov: Override, strict: bool) -> None:
    """One override on ``data``. ``strict`` (the composed config): + refuses a field that
    exists, ~ one that does not, as Hydra does."""
    if ov.op == "delete":
        delete(data, ov, strict)
        return
    if ov.op == "add" and strict and has(data, ov.keys):
        raise ConfigError(f"-o {_short(ov.text)}: {ov.dotted} is already in the config; use "
                          f"{ov.text[1:]} to change it (or ++ to set it either way)")
    set_value(data, ov.keys, ov.value, ov.text)
