"""Load a NEL-style config: defaults list, -o overrides, interpolation, validation.

    compose(file, overrides)  ->  dict   (packaged defaults merged with the user's file)
    load_config(file, ...)    ->  LoadedConfig(config, warnings)

Every problem becomes one line naming the field, the value and the fix (ConfigError).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from evalprov.config.models import NOT_ACTED_ON, Config
from evalprov.config.safeyaml import MAX_DEPTH, load_text, read_bounded
from evalprov.config.tasks import task_table
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
_INTERP = re.compile(r"\$\{([^${}]+)\}")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
# Interpolation may copy subtrees (${path}) and concatenate strings: bound the work.
MAX_RESOLUTIONS = 10_000
MAX_INTERP_NODES = 200_000
MAX_INTERP_STRING = 1024 * 1024


@dataclass
class LoadedConfig:
    config: Config
    warnings: list[str] = field(default_factory=list)
    source: str = ""
    # the composed config before interpolation (the run's record shows ${oc.env:NAME} forms)
    composed: dict[str, Any] | None = None


# --------------------------------------------------------------------------- reading


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    text = read_bounded(p)
    try:
        data = load_text(text, source=str(p))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        start = getattr(exc, "context_mark", None)
        context = getattr(exc, "context", None)
        if context and start and (not mark or start.line != mark.line):
            problem += f" {context} started at line {start.line + 1}"
        raise ConfigError(f"config: {p}{where}: invalid YAML ({problem}); fix the syntax there")
    if data is None:
        raise ConfigError(f"config: {p} is empty; start from examples/ or the README")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config: {p} holds a {type(data).__name__}, not a mapping; the top level must have "
            "keys such as deployment:, execution:, evaluation:"
        )
    return data


def _packaged(group: str, option: str) -> dict[str, Any]:
    parts = f"{option}.yaml".split("/")
    ref = resources.files("evalprov.config").joinpath("defaults", group, *parts)
    return load_text(ref.read_text(), source=f"packaged defaults {'/'.join(parts)}") or {}


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` with YAML typing of the value (``-o x.y=false`` is a real False)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not _DOTTED.fullmatch(key):
        raise ConfigError(
            f"-o {_short(text)}: an override is key.path=value, e.g. -o deployment.port=8001"
        )
    parts = key.split(".")
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"-o {_short(text)}: the key path has {len(parts)} parts; a config "
                          f"field is at most {MAX_DEPTH} levels deep")
    try:
        value = load_text(raw, source=f"-o {_short(text)}", prefix=key) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _indices(node: list[Any]) -> str:
    if not node:
        return "the list is empty; add the items in the config file"
    return f"use 0..{len(node) - 1}"


def apply_override(data: dict[str, Any], path: list[str], value: Any, text: str) -> None:
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
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
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


# --------------------------------------------------------------------------- composition


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value == MISSING and key in out:
            continue  # as OmegaConf: a missing value merged onto a set one leaves it set
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _defaults_entries(raw: Any) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(
            "defaults: must be a list such as [{execution: local}, {deployment: vllm}, _self_]"
        )
    return raw


def _choose(group: str, option: Any, where: str = "defaults") -> str:
    option = str(option)
    if option in SUPPORTED[group]:
        return option
    if option in UNSUPPORTED[group] or option.split("/")[0] in UNSUPPORTED[group]:
        raise ConfigError(
            f"{group}: {_short(option)} is unsupported by evalprov; supported: "
            f"{', '.join(SUPPORTED[group])}"
        )
    close = difflib.get_close_matches(option, SUPPORTED[group], n=1)
    hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(SUPPORTED[group])}"
    raise ConfigError(f"{where}: unknown {group} {_short(option)}; {hint}")


def compose(user: dict[str, Any], default_execution: str = "local") -> dict[str, Any]:
    """Merge packaged defaults and the user's dict in defaults-list order (``_self_`` last
    unless placed elsewhere)."""
    user = copy.deepcopy(user)
    entries = _defaults_entries(user.get("defaults"))
    choices: dict[str, str] = {}
    order: list[str] = []
    for entry in entries:
        if entry == "_self_":
            order.append("_self_")
            continue
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(
                f"defaults: entry {_short(entry)} must be _self_ or one group: option, e.g. "
                "{deployment: vllm}"
            )
        (group, option), = entry.items()
        group = str(group).removeprefix("override ").strip()
        if group not in SUPPORTED:
            raise ConfigError(
                f"defaults: unknown group {_short(group)}; evalprov composes execution and "
                "deployment"
            )
        choices[group] = _choose(group, option)
        order.append(group)
    # A section that states its own type picks its group option when the list does not.
    for group in SUPPORTED:
        section = user.get(group)
        if isinstance(section, str):
            option = section if re.fullmatch(r"[\w/.-]+", section) else "OPTION"
            raise ConfigError(
                f"{group}: got {_short(section)}, a name, where a mapping of fields belongs; "
                f"choose the option in the defaults list (defaults: [{{{group}: {option}}}, "
                f"_self_]) and keep {group}: for its fields"
            )
        if not isinstance(section, dict) or "type" not in section:
            continue
        typ = str(section["type"])
        chosen = _choose(group, _TYPE_TO_OPTION.get(typ, typ), where=f"{group}.type")
        if group in choices and choices[group] != chosen:
            raise ConfigError(
                f"{group}.type: {_short(typ)} contradicts the defaults list entry {group}: "
                f"{choices[group]}; change one of them (or drop {group}.type)"
            )
        choices[group] = chosen
    choices.setdefault("execution", default_execution)
    if "deployment" not in choices:
        section = user.get("deployment")
        fields = sorted(str(k) for k in section if k != "type") if isinstance(section, dict) else []
        if fields:
            raise ConfigError(
                f"deployment: fields {', '.join(fields)} are given but no deployment is chosen "
                "(the default is none); add '- deployment: vllm' to the defaults list or set "
                "deployment.type: vllm"
            )
        choices["deployment"] = "none"
    if "_self_" not in order:
        order.append("_self_")
    for group in SUPPORTED:
        if group not in order:
            order.insert(0, group)

    root = _packaged("", "default")
    root.pop("defaults", None)
    user_body = {k: v for k, v in user.items() if k != "defaults"}
    composed = root
    for step in order:
        if step == "_self_":
            composed = deep_merge(composed, user_body)
        else:
            composed = deep_merge(composed, {step: _packaged(step, choices[step])})
    composed["defaults"] = [{g: choices[g]} for g in SUPPORTED] + ["_self_"]
    return composed


# --------------------------------------------------------------------------- interpolation


def _lookup(root: dict[str, Any], dotted: str) -> Any:
    node: Any = root
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


class _Budget:
    """Work interpolation may do: resolutions, values built, characters per string."""

    def __init__(self) -> None:
        self.resolutions = 0
        self.nodes = 0

    def resolve(self, where: str) -> None:
        self.resolutions += 1
        if self.resolutions > MAX_RESOLUTIONS:
            raise ConfigError(f"{where}: interpolation resolves more than {MAX_RESOLUTIONS} "
                              "references; the references multiply, write the values out")

    def node(self, where: str) -> None:
        self.nodes += 1
        if self.nodes > MAX_INTERP_NODES:
            raise ConfigError(f"{where or 'config'}: interpolation expands the config to more "
                              f"than {MAX_INTERP_NODES} values; the ${{path}} references "
                              "multiply, write the values out")


def _resolve_one(expr: str, root: dict[str, Any], where: str, environ,
                 secrets: list[tuple[str, str]] | None = None) -> tuple[Any, bool]:
    """(value, read from the environment). An environment value is a plain string: as in
    OmegaConf, a resolver's output is not interpolated again."""
    expr = expr.strip()
    if expr.startswith("oc.env:"):
        name, comma, default = expr[len("oc.env:"):].partition(",")
        name = name.strip()
        if name in environ:
            value = str(environ[name])
            if secrets is not None:
                secrets.append((name, value))
            return value, True
        if comma:
            return default.strip().strip("'\""), True
        raise ConfigError(
            f"{where}: ${{oc.env:{name}}} reads {name} from the environment, which is not set; "
            f"export {name} or give a default as ${{oc.env:{name},default}}"
        )
    if _DOTTED.fullmatch(expr):
        try:
            return _lookup(root, expr), False
        except KeyError:
            raise ConfigError(f"{where}: ${{{expr}}} refers to a field that does not exist; "
                              "fix the reference") from None
    raise ConfigError(
        f"{where}: interpolation ${{{expr}}} is not supported; evalprov resolves "
        "${oc.env:VAR[,default]} and ${path.to.field}"
    )


def interpolate(root: dict[str, Any], environ=None,
                secrets: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """``root`` with every ``${...}`` resolved. Each value read from the environment is
    appended to ``secrets`` as (name, value), so error lines can avoid echoing it."""
    environ = os.environ if environ is None else environ
    budget = _Budget()

    def resolve(expr: str, where: str, depth: int) -> Any:
        budget.resolve(where)
        value, from_env = _resolve_one(expr, root, where, environ, secrets)
        return value if from_env else walk(value, where, depth + 1)

    def walk(node: Any, where: str, depth: int = 0) -> Any:
        budget.node(where)
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k), depth) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}.{i}", depth) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            if depth > 8:
                raise ConfigError(f"{where}: interpolation nests too deep; remove the cycle")
            whole = _INTERP.fullmatch(node.strip())
            if whole:
                return resolve(whole.group(1), where, depth)
            pieces, pos, length = [], 0, 0
            for m in _INTERP.finditer(node):
                piece = str(resolve(m.group(1), where, depth))
                pieces += [node[pos:m.start()], piece]
                pos = m.end()
                length += len(pieces[-2]) + len(piece)
                if length > MAX_INTERP_STRING:
                    raise ConfigError(f"{where}: interpolation builds a string longer than "
                                      f"{MAX_INTERP_STRING // 1024} KiB; shorten the value")
            pieces.append(node[pos:])
            return "".join(pieces)
        return node

    return walk(root, "")


# --------------------------------------------------------------------------- checks


def _placeholder_paths(node: Any, where: str = "") -> list[str]:
    if isinstance(node, dict):
        return [
            e for k, v in node.items()
            for e in _placeholder_paths(v, f"{where}.{k}" if where else str(k))
        ]
    if isinstance(node, list):
        return [e for i, v in enumerate(node) for e in _placeholder_paths(v, f"{where}.{i}")]
    return [where] if node == MISSING else []


def _placeholder_line(where: str) -> str:
    return (f"{where}: required value missing (??? placeholder); set it in the config or "
            f"with -o {where}=VALUE")


def _drop_placeholders(node: Any) -> Any:
    """The data with every ``???`` mapping value removed, so the schema reports only the
    other problems (a removed required field comes back as its placeholder line)."""
    if isinstance(node, dict):
        return {k: _drop_placeholders(v) for k, v in node.items() if v != MISSING}
    if isinstance(node, list):
        return [_drop_placeholders(v) for v in node]
    return node


_TAGGED = {"deployment": "type", "execution": "type"}


def _loc(loc: tuple[Any, ...]) -> str:
    """Dotted field path; drops the tag pydantic inserts after a discriminated union."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in _TAGGED:
        del parts[1]
    return ".".join(parts)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _fields_at(parts: list[str], data: dict[str, Any]) -> list[str]:
    """Field names valid at a dotted path, for "did you mean" hints."""
    from evalprov.config import models as m

    by_type = {
        "deployment": {"vllm": m.VllmDeployment, "none": m.NoneDeployment},
        "execution": {"slurm": m.SlurmExecution, "local": m.LocalExecution,
                      "baremetal": m.BaremetalExecution},
    }
    model: type[BaseModel] | None = Config
    for i, part in enumerate(parts):
        if model is None:
            return []
        if part.isdigit():
            continue
        if i == 0 and part in by_type:
            typ = (data.get(part) or {}).get("type") if isinstance(data.get(part), dict) else None
            model = by_type[part].get(typ)
            continue
        fld = model.model_fields.get(part)
        model = _submodel(fld.annotation) if fld else None
    return list(model.model_fields) if model else []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class _Problem:
    path: str
    line: str
    kind: str = ""
    meant: str | None = None  # for an unknown field: the path of the field it is close to


_MAPPING_KINDS = {"model_type", "dict_type", "model_attributes_type"}


def _problems(exc: ValidationError, data: dict[str, Any]) -> list[_Problem]:
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _loc(loc)
        kind = err["type"]
        value = err.get("input")
        if kind == "extra_forbidden":
            key = str(loc[-1])
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            names = _fields_at(parent.split(".") if parent else [], data)
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "remove it (see examples/)"
            meant = (f"{parent}.{close[0]}" if parent else close[0]) if close else None
            out.append(_Problem(path or key, f"{path or key}: unknown field; {hint}", kind, meant))
            continue
        if kind == "missing":
            out.append(_Problem(path, f"{path}: required field missing; set it in the config or "
                                f"with -o {path}=VALUE", kind))
            continue
        msg = err["msg"]
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if kind.startswith("value_error"):
            line = f"{path or 'config'}: {msg}"
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            line = f"{path}: got {_short(value)}; use one of {expected}"
        elif kind in _MAPPING_KINDS:
            example = (f", e.g. `- name: {value}`" if isinstance(value, str)
                       and re.fullmatch(r"evaluation\.tasks\.\d+", path) else "")
            line = f"{path}: got {_short(value)}; write a mapping of fields here{example}"
        else:
            line = f"{path}: got {_short(value)}: {msg[:1].lower()}{msg[1:]}"
        out.append(_Problem(path, line, kind))
    return out


def _report(problems: list[_Problem]) -> list[str]:
    """One line per problem; a field reported missing is not repeated when an unknown key
    next to it is its likely misspelling (the "did you mean" line says it all)."""
    meant = {p.meant for p in problems if p.meant}
    kept = [p for p in problems if not (p.kind in ("missing", MISSING) and p.path in meant)]
    return list(dict.fromkeys(p.line for p in kept))


def format_validation_error(exc: ValidationError, data: dict[str, Any]) -> list[str]:
    return _report(_problems(exc, data))


def _warnings(user: dict[str, Any]) -> list[str]:
    out = []
    for dotted, empty in NOT_ACTED_ON:
        try:
            value = _lookup(user, dotted)
        except KeyError:
            continue
        if value != empty:
            out.append(f"warning: {dotted} is accepted but not acted on by evalprov yet")
    evaluation = user.get("evaluation")
    tasks = evaluation.get("tasks") if isinstance(evaluation, dict) else None
    for i, task in enumerate(tasks if isinstance(tasks, list) else []):
        if isinstance(task, dict):
            for key in ("pre_cmd", "post_cmd"):
                if task.get(key):
                    out.append(f"warning: evaluation.tasks.{i}.{key} is accepted but not acted on "
                               "by evalprov yet")
    return out


def _check_tasks(config: Config) -> None:
    table = task_table()
    errors = []
    for i, task in enumerate(config.evaluation.tasks):
        try:
            table.resolve(task.name, task.container, f"evaluation.tasks.{i}.name")
        except ConfigError as exc:
            errors.extend(exc.lines)
    if errors:
        raise ConfigError(*errors)


def _nul_lines(node: Any, where: str = "") -> list[str]:
    """A NUL in any key or string: the OS refuses it in paths, argv and the environment."""
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            path = f"{where}.{k}" if where else str(k)
            if isinstance(k, str) and "\0" in k:
                out.append(f"{where or 'config'}: key {_short(k)} contains a NUL character; "
                           "remove it")
            out += _nul_lines(v, path)
        return out
    if isinstance(node, list):
        return [e for i, v in enumerate(node) for e in _nul_lines(v, f"{where}.{i}")]
    if isinstance(node, str) and "\0" in node:
        return [f"{where}: {_short(node)} contains a NUL character; remove it"]
    return []


def _windows(value: str, size: int = 8) -> set[str]:
    head = value[:65536]
    return {head[i:i + size] for i in range(max(0, len(head) - size + 1))}


def scrub(lines: list[str], secrets: list[tuple[str, str]]) -> list[str]:
    """Error lines with every value read from the environment replaced by "the value of
    ${oc.env:NAME}" (it may be a secret); a line that would still show part of one is
    replaced by a line naming the field and the variable only."""
    out = []
    for line in lines:
        for name, value in secrets:
            if not value:
                continue
            label = f"the value of ${{oc.env:{name}}}"
            forms = [repr(value), _short(value)]
            if len(value) >= 4:
                forms += [repr(value)[1:-1], value]
            for form in sorted(set(forms), key=len, reverse=True):
                line = line.replace(form, label)
            if len(value) >= 8 and any(w in line for w in _windows(value)):
                field_ = line.split(": ", 1)[0]
                line = (f"{field_}: the value of ${{oc.env:{name}}} is not valid there; "
                        f"check {name} in the environment")
        out.append(line)
    return list(dict.fromkeys(out))


def validate(data: dict[str, Any], user: dict[str, Any]) -> LoadedConfig:
    """Every problem at once: ``???`` placeholders left in, then schema errors elsewhere."""
    nul = _nul_lines(data)
    if nul:
        raise ConfigError(*nul)
    missing = _placeholder_paths(data)
    problems = [_Problem(p, _placeholder_line(p), MISSING) for p in missing]
    config = None
    try:
        config = Config.model_validate(_drop_placeholders(data) if missing else data)
    except ValidationError as exc:
        under = tuple(f"{p}." for p in missing)
        problems += [
            p for p in _problems(exc, data)
            if p.path not in missing and not p.path.startswith(under)
        ]
    if problems or config is None:
        raise ConfigError(*_report(problems))
    _check_tasks(config)
    return LoadedConfig(config=config, warnings=_warnings(user))


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    default_execution: str = "local",
    environ=None,
) -> LoadedConfig:
    """Read, compose, override, interpolate and validate one config file."""
    user = read_yaml(path)
    parsed = [(text, *parse_override(text)) for text in overrides]
    for text, keys, value in parsed:
        apply_override(user, keys, value, text)
    composed = compose(user, default_execution=default_execution)
    for text, keys, value in parsed:  # command-line values win over every defaults entry
        if keys[0] != "defaults":
            apply_override(composed, keys, copy.deepcopy(value), text)
    secrets: list[tuple[str, str]] = []
    data = interpolate(composed, environ, secrets)
    try:
        loaded = validate(data, user)
    except ConfigError as exc:
        raise ConfigError(*scrub(exc.lines, secrets)) from None
    loaded.source = str(path)
    loaded.composed = composed
    return loaded


def resolved_dict(loaded: LoadedConfig) -> dict[str, Any]:
    """The resolved config as plain data, env values shown by source only."""
    data = loaded.config.model_dump(mode="python")

    def clean(node: Any) -> Any:
        from evalprov.config.envvars import EnvVarSpec

        if isinstance(node, EnvVarSpec):
            return node.describe()
        if isinstance(node, dict):
            if "source" in node and "ref" in node and len(node) == 2:
                return EnvVarSpec(node["source"], node["ref"]).describe()
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    return clean(data)
