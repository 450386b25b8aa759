"""The one way evalprov/config reads YAML: a safe loader with bounds.

Every YAML text the config module reads (the user's file, the packaged defaults, the task
table, each ``-o key=value`` value) goes through :func:`load_text`, which refuses, as one
ConfigError line naming the field and the fix:

- a text larger than ``MAX_BYTES`` (read_bounded reads at most that plus one byte, so
  /dev/zero or a 10 GiB file never reaches memory);
- nesting deeper than ``MAX_DEPTH`` (checked on the event stream, before the composer
  recurses);
- anchors and aliases that expand to more than ``MAX_NODES`` values (a "billion laughs"),
  and an alias inside its own anchor (a recursive structure): checked on the composed node
  graph with the expanded size of every node memoised, so the check itself is linear;
- a key given twice in one mapping (NEL's loader refuses them; plain PyYAML keeps the last).

Syntax errors stay yaml.YAMLError for the caller to word; values PyYAML's constructors fail
on with a bare Python exception (a 5000-digit int, a date 2024-13-45) become ConfigError.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from evalprov.errors import ConfigError

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 100_000
_NODE_DEPTH = MAX_DEPTH + 1  # MAX_DEPTH collections, then the scalars inside the deepest

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE = "tag:yaml.org,2002:merge"
_START = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_END = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _line(node_or_mark: Any) -> int:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return (getattr(mark, "line", 0) or 0) + 1


def _key_text(node: Node) -> str:
    return str(node.value) if isinstance(node, ScalarNode) else "?"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class BoundedLoader(_Base):  # type: ignore[misc, valid-type]
    """SafeLoader (libyaml's when present) whose document is checked before it is built."""

    source = "config"
    prefix = ""  # dotted path the document sits at (an -o value), for error lines

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._check_graph(node)
        try:
            return self.construct_document(node)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # PyYAML's constructors fail in many ways (!!timestamp '')
            raise ConfigError(
                f"config: {self.source}: a value cannot be read ({_first_line(exc)}); quote it "
                "to make it a string"
            ) from None

    # ------------------------------------------------------------------ graph checks

    def _refuse(self, path: str, node: Node, what: str) -> ConfigError:
        return ConfigError(f"{path or self.prefix or 'config'}: {self.source} line "
                           f"{_line(node)}: {what}")

    def _children(self, node: Node, path: str) -> list[tuple[Node, str]]:
        if isinstance(node, SequenceNode):
            return [(child, _join(path, str(i))) for i, child in enumerate(node.value)]
        if isinstance(node, MappingNode):
            self._check_duplicates(node, path)
            out: list[tuple[Node, str]] = []
            for key, value in node.value:
                out.append((key, path))
                out.append((value, _join(path, _key_text(key))))
            return out
        return []

    def _check_duplicates(self, node: MappingNode, path: str) -> None:
        seen: dict[Any, Node] = {}
        for key, _value in node.value:
            if key.tag == _MERGE or not isinstance(key, ScalarNode):
                continue
            try:
                ident: Any = self.construct_object(key)
                hash(ident)
            except Exception:  # any key PyYAML cannot build: compare its text
                ident = (key.tag, key.value)
            if ident in seen:
                raise ConfigError(
                    f"{_join(path or self.prefix, _key_text(key))}: key given twice in "
                    f"{self.source} (lines {_line(seen[ident])} and {_line(key)}); keep one "
                    "of them (YAML would silently use the last)"
                )
            seen[ident] = key

    def _check_graph(self, root: Node) -> None:
        """Expanded size and depth of every node (memoised by identity, so shared alias
        targets are walked once), and no node inside itself. Iterative: no recursion."""
        size: dict[int, int] = {}
        height: dict[int, int] = {}
        on_path: set[int] = set()
        base = self.prefix
        # frame: [node, path, children, next child index, size so far, height so far]
        stack: list[list[Any]] = [[root, base, self._children(root, base), 0, 1, 0]]
        on_path.add(id(root))
        while stack:
            frame = stack[-1]
            node, path, children, i = frame[0], frame[1], frame[2], frame[3]
            if i < len(children):
                frame[3] = i + 1
                child, child_path = children[i]
                key = id(child)
                if key in on_path:
                    raise self._refuse(child_path, child, "an alias refers to an anchor it "
                                       "is inside of (a recursive structure); a config must "
                                       "be a tree, write the values out")
                if key not in size:
                    if len(stack) >= _NODE_DEPTH:
                        raise self._refuse(child_path, child, f"nests deeper than {MAX_DEPTH} "
                                           "levels; flatten the structure")
                    on_path.add(key)
                    stack.append([child, child_path, self._children(child, child_path), 0, 1, 0])
                    continue
                frame[4] += size[key]
                frame[5] = max(frame[5], height[key])
            else:
                stack.pop()
                on_path.discard(id(node))
                total, tall = frame[4], frame[5] + 1
                if total > MAX_NODES:
                    raise self._refuse(path, node, f"anchors and aliases expand to more than "
                                       f"{MAX_NODES} values (an alias bomb?); write the "
                                       "values out")
                if tall + len(stack) > _NODE_DEPTH:
                    raise self._refuse(path, node, f"nests deeper than {MAX_DEPTH} levels "
                                       "(through aliases); flatten the structure")
                size[id(node)], height[id(node)] = total, tall
                if stack:
                    stack[-1][4] += total
                    stack[-1][5] = max(stack[-1][5], tall)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0].split("; ")[0].split(": value has")[0] if lines else ""
    if len(text) > 100:
        text = text[:100].rsplit(" ", 1)[0] + " ..."
    return text or exc.__class__.__name__


def _check_events(text: str, source: str, prefix: str) -> None:
    """Depth on the event stream: libyaml's composer recurses in C (a million ``[`` crash
    it) and PyYAML's in Python, so depth is bounded before either composes."""
    depth = 0
    for event in yaml.parse(text, Loader=_Base):
        if isinstance(event, _START):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{prefix or 'config'}: {source} line {_line(event)}: nests "
                                  f"deeper than {MAX_DEPTH} levels; flatten the structure")
        elif isinstance(event, _END):
            depth -= 1


def load_text(text: str, source: str = "config", prefix: str = "") -> Any:
    """One YAML document, bounded as the module docstring says.

    ``source`` names where the text came from in error lines (a file, ``-o 'k=v'``);
    ``prefix`` is the dotted path the document sits at. Syntax errors are yaml.YAMLError;
    every refusal is a ConfigError."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{prefix or 'config'}: {source} is larger than "
                          f"{MAX_BYTES // (1024 * 1024)} MiB; a config is a few KiB")
    try:
        _check_events(text, source, prefix)
        loader = BoundedLoader(text)
    except RecursionError:
        raise ConfigError(f"{prefix or 'config'}: {source}: nests too deep; flatten the "
                          "structure") from None
    loader.source, loader.prefix = source, prefix
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{prefix or 'config'}: {source}: nests too deep; flatten the "
                          "structure") from None
    finally:
        loader.dispose()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_bounded(path: str | Path) -> str:
    """The text of a config file, read as at most MAX_BYTES + 1 bytes.

    Regular files and pipes (``<(...)``, /dev/stdin from a pipe) are read; devices
    (/dev/zero, a terminal) and sockets are refused without reading."""
    p = Path(path)
    shown = repr(str(p))
    if len(shown) > 200:
        shown = shown[:160] + "...'"
    try:
        mode = os.stat(p).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(str(p))
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise ConfigError(f"config: {shown} is {_kind(mode)}, not a file; give the path "
                              "of a YAML config")
        with open(p, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config: file {shown} not found; give the path of a YAML config")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config: cannot read {shown} ({exc.__class__.__name__}); "
                          "give a readable YAML file")
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"config: {shown} is larger than {MAX_BYTES // (1024 * 1024)} MiB; "
                          "a config is a few KiB (is it the right file?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config: cannot read {shown} (UnicodeDecodeError); "
                          "give a readable YAML file")
