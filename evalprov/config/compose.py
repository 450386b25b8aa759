"""Composition with OmegaConf, as NEL does under Hydra.

    compose(user, default_execution)  ->  dict   the defaults list applied: packaged options
                                                  merged with the user's body in list order
    interpolate(composed, environ)    ->  dict   every ${path} and ${oc.env:VAR[,default]}
                                                  resolved (relative and nested too)

The defaults list takes Hydra's entry forms: ``_self_``, ``group: option``, ``override group:
option``, ``group@package: option`` and a config path ``group/option@package`` (NEL's
``deployment/vllm@auxiliary_deployments.judge``). Merging is OmegaConf's (mappings merge,
lists and scalars are replaced, a ``???`` merged onto a set value leaves it set).

Interpolation is bounded before OmegaConf resolves anything (references may copy subtrees and
build strings: a few lines can otherwise ask for 2^40 values), and only ``oc.env`` is a
resolver here. A value read from the environment is a plain string: it is never interpolated
again, and each one is recorded so that no error line echoes it.
"""

from __future__ import annotations

import contextvars
import copy
import difflib
import os
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    GrammarParseError,
    InterpolationKeyError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from evalprov.config.safeyaml import load_text
from evalprov.errors import ConfigError

SUPPORTED = {
    "execution": ("baremetal", "local", "slurm/default"),
    "deployment": ("vllm", "none"),
}
# Options NEL has that evalprov does not run: an "unsupported" error, not "unknown".
UNSUPPORTED = {
    "execution": ("lepton", "lepton/default"),
    "deployment": ("sglang", "nim", "trtllm", "vllm_ray", "generic"),
}
_TYPE_TO_OPTION = {"slurm": "slurm/default", "lepton": "lepton/default"}
MISSING = "???"
AUX = "auxiliary_deployments"
_AUX_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# NEL's command templates use NEL's own resolvers (${select_not_null:...}); evalprov builds
# the argv itself, so they are kept as written (warned about, never resolved or run).
OPAQUE = ("base_command", "command")
# Interpolation may copy subtrees (${path}) and concatenate strings: bound the work.
MAX_INTERP_NODES = 200_000
MAX_INTERP_STRING = 1024 * 1024
MAX_INTERP_DEPTH = 8
_REF = re.compile(r"\$\{([^${}]*)\}")
_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.-]*)\s*:")
_PATH = re.compile(r"\.*[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


# --------------------------------------------------------------------------- packaged options


def packaged(group: str, option: str) -> dict[str, Any]:
    parts = [p for p in f"{group}/{option}.yaml".split("/") if p]
    ref = resources.files("evalprov.config").joinpath("defaults", *parts)
    return load_text(ref.read_text(), source=f"packaged defaults {'/'.join(parts)}") or {}


# --------------------------------------------------------------------------- defaults list


@dataclass(frozen=True)
class Entry:
    """One defaults-list entry: ``group`` None is ``_self_``; ``package`` is where the
    option's fields land (the group itself, or ``auxiliary_deployments.NAME``)."""

    group: str | None
    option: str = ""
    package: str = ""

    @property
    def aux_name(self) -> str | None:
        return self.package.split(".", 1)[1] if self.package.startswith(AUX + ".") else None

    def text(self) -> Any:
        if self.group is None:
            return "_self_"
        if self.package == self.group:
            return {self.group: self.option}
        return f"{self.group}/{self.option}@{self.package}"


def _bad_entry(entry: Any) -> ConfigError:
    return ConfigError(
        f"defaults: entry {_short(entry)} must be _self_ or one group: option, e.g. "
        "{deployment: vllm} (or a config path such as deployment/vllm@auxiliary_deployments."
        "judge)"
    )


def _package(group: str, package: str, entry: Any) -> str:
    package = package.strip().removeprefix("_global_.")
    if not package or package == group:
        return group
    if group == "deployment" and package.startswith(AUX + "."):
        name = package[len(AUX) + 1:]
        if _AUX_NAME.fullmatch(name):
            return package
    raise ConfigError(
        f"defaults: entry {_short(entry)} places {group} at {_short(package)}; evalprov "
        f"composes {group} options at {group}"
        + (" or auxiliary_deployments.NAME" if group == "deployment" else "")
    )


def parse_entry(entry: Any) -> Entry:
    if entry == "_self_":
        return Entry(None)
    if isinstance(entry, str):  # a config path: group/option[@package]
        path, _, package = entry.strip().lstrip("/").partition("@")
        group, slash, option = path.partition("/")
        if not slash or not option:
            raise _bad_entry(entry)
    elif isinstance(entry, dict) and len(entry) == 1:
        (key, option), = entry.items()
        if not isinstance(key, str) or not isinstance(option, (str, int, float)):
            raise _bad_entry(entry)
        group, _, package = key.removeprefix("override ").strip().partition("@")
        option = str(option)
    else:
        raise _bad_entry(entry)
    group = group.strip()
    if group not in SUPPORTED:
        raise ConfigError(
            f"defaults: unknown group {_short(group)}; evalprov composes execution and "
            "deployment"
        )
    return Entry(group, option.strip(), _package(group, package, entry))


def choose(group: str, option: Any, where: str = "defaults") -> str:
    option = str(option)
    if option in SUPPORTED[group]:
        return option
    if option in UNSUPPORTED[group] or option.split("/")[0] in UNSUPPORTED[group]:
        raise ConfigError(
            f"{group if where == 'defaults' else where}: {_short(option)} is unsupported by "
            "evalprov; supported: "
            f"{', '.join(SUPPORTED[group])}"
        )
    close = difflib.get_close_matches(option, SUPPORTED[group], n=1)
    hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(SUPPORTED[group])}"
    raise ConfigError(f"{where}: unknown {group} {_short(option)}; {hint}")


def _entries(raw: Any) -> list[Entry]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(
            "defaults: must be a list such as [{execution: local}, {deployment: vllm}, _self_]"
        )
    return [parse_entry(e) for e in raw]


def _section_type(user: dict[str, Any], group: str, chosen: dict[str, str]) -> None:
    """A section that states its own type picks its group option when the list does not."""
    section = user.get(group)
    if isinstance(section, str):
        option = section if re.fullmatch(r"[\w/.-]+", section) else "OPTION"
        raise ConfigError(
            f"{group}: got {_short(section)}, a name, where a mapping of fields belongs; "
            f"choose the option in the defaults list (defaults: [{{{group}: {option}}}, "
            f"_self_]) and keep {group}: for its fields"
        )
    if not isinstance(section, dict) or "type" not in section:
        return
    typ = str(section["type"])
    option = choose(group, _TYPE_TO_OPTION.get(typ, typ), where=f"{group}.type")
    if group in chosen and chosen[group] != option:
        raise ConfigError(
            f"{group}.type: {_short(typ)} contradicts the defaults list entry {group}: "
            f"{chosen[group]}; change one of them (or drop {group}.type)"
        )
    chosen[group] = option


def _aux_entries(user: dict[str, Any], listed: list[Entry]) -> list[Entry]:
    """Aux deployments of the list, then those whose section names a type (composed from
    that deployment option, as the primary deployment is from deployment.type)."""
    out = []
    for e in listed:
        out.append(Entry(e.group, choose("deployment", e.option, where=e.package), e.package))
    have = {e.package for e in out}
    sections = user.get(AUX)
    for name, section in (sections.items() if isinstance(sections, dict) else ()):
        package = f"{AUX}.{name}"
        if package in have or not isinstance(section, dict) or "type" not in section:
            continue
        if not isinstance(name, str) or not _AUX_NAME.fullmatch(name):
            continue  # the schema reports the name
        out.append(Entry("deployment", choose("deployment", section["type"],
                                              where=f"{package}.type"), package))
    return out


def plan_defaults(user: dict[str, Any], default_execution: str) -> tuple[list[Entry], dict]:
    """The composition order (entries, _self_ included) and the chosen primary options."""
    listed = _entries(user.get("defaults"))
    chosen: dict[str, str] = {}
    order: list[Entry] = []
    for e in listed:
        if e.group is None or e.aux_name is None:
            if e.group is not None:
                chosen[e.group] = choose(e.group, e.option)
            order.append(e)
    for group in SUPPORTED:
        _section_type(user, group, chosen)
    chosen.setdefault("execution", default_execution)
    if "deployment" not in chosen:
        section = user.get("deployment")
        fields = sorted(str(k) for k in section if k != "type") if isinstance(section, dict) else []
        if fields:
            raise ConfigError(
                f"deployment: fields {', '.join(fields)} are given but no deployment is chosen "
                "(the default is none); add '- deployment: vllm' to the defaults list or set "
                "deployment.type: vllm"
            )
        chosen["deployment"] = "none"
    aux = _aux_entries(user, [e for e in listed if e.aux_name is not None])
    # Hydra: the list's own order, _self_ last unless placed; groups not listed go first.
    order = [Entry(e.group, chosen[e.group], e.group) if e.group else e for e in order]
    listed_aux = {e.package for e in listed if e.aux_name is not None}
    for e in aux:
        if e.package in listed_aux:  # where the list put it
            idx = next(i for i, x in enumerate(listed) if x.package == e.package)
            before = sum(1 for x in listed[:idx] if x.aux_name is None)
            order.insert(min(before, len(order)), e)
    if not any(e.group is None for e in order):
        order.append(Entry(None))
    for e in aux:
        if e.package not in listed_aux:  # composed from its type: under the user's section
            self_at = next(i for i, x in enumerate(order) if x.group is None)
            order.insert(self_at, e)
    for group in reversed(tuple(SUPPORTED)):
        if not any(e.group == group and e.package == group for e in order):
            order.insert(0, Entry(group, chosen[group], group))
    return order, chosen


# --------------------------------------------------------------------------- OmegaConf


_KEY_TYPES = (str, int, float, bool)


def _check_keys(node: Any, where: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, _KEY_TYPES):
                raise ConfigError(f"{where or 'config'}: key {_short(k)} is not a name; quote "
                                  "it to make it a string")
            _check_keys(v, _join(where, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_keys(v, _join(where, i))


def _grammar_error(where: str, value: Any) -> ConfigError:
    return ConfigError(
        f"{where or 'config'}: {_short(value)} is not a valid interpolation; write "
        "${path.to.field} or ${oc.env:VAR}, or escape a literal $ as \\${"
    )


def _bad_string(node: Any, where: str = "") -> tuple[str, Any] | None:
    """The first string OmegaConf's grammar refuses (path, value), found by trying each."""
    if isinstance(node, dict):
        for k, v in node.items():
            found = _bad_string(v, _join(where, k))
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _bad_string(v, _join(where, i))
            if found:
                return found
    elif isinstance(node, str) and "${" in node:
        try:
            OmegaConf.create({"v": node})
        except GrammarParseError:
            return where, node
    return None


def to_omegaconf(data: dict[str, Any]) -> DictConfig:
    """A DictConfig of plain data; every refusal is one ConfigError line."""
    _check_keys(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return OmegaConf.create(data, flags={"allow_objects": True})
    except GrammarParseError:
        found = _bad_string(data)
        raise _grammar_error(*(found or ("config", "?"))) from None
    except (OmegaConfBaseException, ValueError, TypeError) as exc:
        raise ConfigError(f"config: cannot be composed ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:120]


def _container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def merge(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """OmegaConf's merge of the layers, in order (later wins)."""
    merged = to_omegaconf(layers[0])
    for layer in layers[1:]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merged = OmegaConf.merge(merged, to_omegaconf(layer))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"config: cannot be merged ({_first_line(exc)})") from None
    return _container(merged)  # type: ignore[arg-type]


def _at(package: str, value: dict[str, Any]) -> dict[str, Any]:
    for part in reversed(package.split(".")):
        value = {part: value}
    return value


def compose(user: dict[str, Any], default_execution: str = "local") -> dict[str, Any]:
    """Packaged defaults and the user's dict merged in defaults-list order."""
    user = copy.deepcopy(user)
    order, _ = plan_defaults(user, default_execution)
    root = packaged("", "default")
    root.pop("defaults", None)
    body = {k: v for k, v in user.items() if k != "defaults"}
    layers = [root]
    for e in order:
        if e.group is None:
            layers.append(body)
        else:
            layers.append(_at(e.package, packaged(e.group, e.option)))
    composed = merge(layers)
    composed["defaults"] = (
        [e.text() for e in order if e.group and e.package == e.group]
        + [e.text() for e in order if e.aux_name]
        + ["_self_"]
    )
    return composed


# --------------------------------------------------------------------------- interpolation


@dataclass
class _EnvContext:
    environ: Any
    secrets: list[tuple[str, str]]
    unset: list[str]


_ENV: contextvars.ContextVar[_EnvContext | None] = contextvars.ContextVar("evalprov_env",
                                                                           default=None)


def _oc_env(name: Any, *default: Any) -> Any:
    """``${oc.env:NAME[,default]}`` read from the loader's environment (not os.environ
    unless that is what the loader was given)."""
    ctx = _ENV.get()
    environ = os.environ if ctx is None else ctx.environ
    name = str(name).strip()
    if name in environ:
        value = str(environ[name])
        if ctx is not None:
            ctx.secrets.append((name, value))
        return value
    if default:
        value = default[0]
        return None if value is None else str(value)
    if ctx is not None:
        ctx.unset.append(name)
    raise KeyError(name)


OmegaConf.register_resolver("oc.env", _oc_env, replace=True)


def _resolvers(node: Any, where: str = "") -> None:
    """Only ${oc.env:...} and field references: other resolvers (oc.decode, oc.create, ...)
    could build config from an environment value."""
    if isinstance(node, dict):
        for k, v in node.items():
            _resolvers(v, _join(where, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _resolvers(v, _join(where, i))
    elif isinstance(node, str) and "${" in node:
        for m in _RESOLVER.finditer(node):
            if m.group(1) != "oc.env":
                expr = node[m.start() + 2:].split("}", 1)[0]
                raise ConfigError(
                    f"{where}: interpolation ${{{expr[:60]}}} is not supported; evalprov "
                    "resolves ${oc.env:VAR[,default]} and ${path.to.field}"
                )


def _index(node: Any, part: str) -> bool:
    """Whether ``part`` is an int key of a mapping or an index of a list in ``node``."""
    if isinstance(node, dict):
        return part.lstrip("-").isdigit() and int(part) in node
    return isinstance(node, list) and part.isdigit() and int(part) < len(node)


class _Cost:
    """What resolving would build, computed on the references alone (memoised): values
    per node and characters per string. Refuses cycles and blow-ups before OmegaConf."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.memo: dict[tuple[str, ...], tuple[int, int]] = {}
        self.active: set[tuple[str, ...]] = set()

    def lookup(self, path: tuple[str, ...]) -> Any:
        node: Any = self.root
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif _index(node, part):
                node = node[int(part)]
            else:
                raise KeyError(path)
        return node

    def target(self, expr: str, at: tuple[str, ...]) -> tuple[str, ...] | None:
        expr = expr.strip()
        if not _PATH.fullmatch(expr):
            return None
        dots = len(expr) - len(expr.lstrip("."))
        parts = tuple(expr.lstrip(".").split("."))
        if not dots:
            return parts
        base = at[:-1]  # the container of the referring node
        if dots > 1:
            base = base[: len(base) - (dots - 1)] if dots - 1 <= len(base) else ()
        return base + parts

    def cost(self, path: tuple[str, ...], node: Any, depth: int = 0) -> tuple[int, int]:
        """(values, characters) of ``node`` at ``path`` once resolved."""
        if path in self.memo:
            return self.memo[path]
        where = ".".join(path)
        if path in self.active or depth > MAX_INTERP_DEPTH * 8:
            raise ConfigError(f"{where or 'config'}: interpolation refers back to itself; "
                              "remove the cycle")
        self.active.add(path)
        if isinstance(node, dict):
            total, chars = 1, 0
            for k, v in node.items():
                n, c = self.cost((*path, str(k)), v, depth + 1)
                total, chars = total + n, chars + c
        elif isinstance(node, list):
            total, chars = 1, 0
            for i, v in enumerate(node):
                n, c = self.cost((*path, str(i)), v, depth + 1)
                total, chars = total + n, chars + c
        elif isinstance(node, str) and "${" in node:
            total, chars = 1, len(node)
            for m in _REF.finditer(node):
                ref = self.target(m.group(1), path)
                if ref is None:
                    continue
                try:
                    target = self.lookup(ref)
                except KeyError:
                    continue  # OmegaConf names the missing field
                n, c = self.cost(ref, target, depth + 1)
                total, chars = total + n, chars + c
            if chars > MAX_INTERP_STRING:
                raise ConfigError(f"{where}: interpolation builds a string longer than "
                                  f"{MAX_INTERP_STRING // 1024} KiB; shorten the value")
        else:
            total, chars = 1, len(node) if isinstance(node, str) else 8
        if total > MAX_INTERP_NODES:
            raise ConfigError(f"{where or 'config'}: interpolation expands the config to more "
                              f"than {MAX_INTERP_NODES} values; the ${{path}} references "
                              "multiply, write the values out")
        self.active.discard(path)
        self.memo[path] = (total, chars)
        return total, chars


def _raw(cfg: Any, key: Any) -> Any:
    node = cfg._get_node(key)
    return node._value() if node is not None else None


def _resolution_error(exc: Exception, where: str, raw: Any, ctx: _EnvContext) -> ConfigError:
    if ctx.unset:
        name = ctx.unset[-1]
        return ConfigError(
            f"{where}: ${{oc.env:{name}}} reads {name} from the environment, which is not set; "
            f"export {name} or give a default as ${{oc.env:{name},default}}"
        )
    if isinstance(exc, InterpolationKeyError):
        m = re.search(r"key '([^']*)'", str(exc))
        ref = m.group(1) if m else "?"
        return ConfigError(f"{where}: ${{{ref}}} refers to a field that does not exist; "
                           "fix the reference")
    if isinstance(exc, GrammarParseError):
        return _grammar_error(where, raw)
    if "Recursive interpolation" in str(exc):
        return ConfigError(f"{where}: interpolation refers back to itself; remove the cycle")
    return ConfigError(f"{where}: interpolation {_short(raw)} cannot be resolved "
                       f"({_first_line(exc)}); fix the reference")


def _resolve(cfg: Any, where: str, ctx: _EnvContext, depth: int = 0) -> Any:
    if depth > 2 * MAX_INTERP_DEPTH * 8:
        raise ConfigError(f"{where}: interpolation nests too deep; write the values out")
    keys = list(cfg.keys()) if isinstance(cfg, DictConfig) else range(len(cfg))
    out: Any = {} if isinstance(cfg, DictConfig) else []
    for key in keys:
        path = _join(where, key)
        try:
            value = cfg[key]
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            value = MISSING
        except (OmegaConfBaseException, KeyError, ValueError, TypeError, RecursionError) as exc:
            raise _resolution_error(exc, path, _raw(cfg, key), ctx) from None
        if isinstance(value, (DictConfig, ListConfig)):
            value = _resolve(value, path, ctx, depth + 1)
        if isinstance(out, dict):
            out[key] = value
        else:
            out.append(value)
    return out


def interpolate(root: dict[str, Any], environ=None,
                secrets: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """``root`` with every ``${...}`` resolved by OmegaConf. Each value read from the
    environment is appended to ``secrets`` as (name, value), so error lines can avoid
    echoing it. NEL's command templates (OPAQUE fields) are kept as written."""
    root = copy.deepcopy(root)
    kept = _take_opaque(root)
    _resolvers(root)
    _Cost(root).cost((), root)
    ctx = _EnvContext(os.environ if environ is None else environ,
                      [] if secrets is None else secrets, [])
    token = _ENV.set(ctx)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _resolve(to_omegaconf(root), "", ctx)
    finally:
        _ENV.reset(token)
    _put_opaque(out, kept)
    return out


def _deployments(root: dict[str, Any]) -> list[tuple[tuple[str, ...], dict]]:
    out = []
    if isinstance(root.get("deployment"), dict):
        out.append((("deployment",), root["deployment"]))
    aux = root.get(AUX)
    for name, dep in (aux.items() if isinstance(aux, dict) else ()):
        if isinstance(dep, dict):
            out.append(((AUX, name), dep))
    return out


def _take_opaque(root: dict[str, Any]) -> list[tuple[tuple[str, ...], str, Any]]:
    kept = []
    for path, dep in _deployments(root):
        for key in OPAQUE:
            if isinstance(dep.get(key), str):
                kept.append((path, key, dep.pop(key)))
    return kept


def _put_opaque(root: dict[str, Any], kept: list[tuple[tuple[str, ...], str, Any]]) -> None:
    for path, key, value in kept:
        node: Any = root
        for part in path:
            node = node[part]
        node[key] = value
