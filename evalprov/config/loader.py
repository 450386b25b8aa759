"""Load a NEL config of any NEL version: normalise, compose, override, interpolate, validate.

    read_yaml(file)                      ->  dict   the user's file (bounded, safe YAML)
    normalise(dict)                      ->  dict   NEL's older schemas in the current one
                                                    (generations.py)
    compose(dict, default_execution)     ->  dict   the defaults list with OmegaConf
                                                    (compose.py)
    -o overrides (Hydra grammar)                    (overrides.py)
    interpolate(dict, environ)           ->  dict   ${path}, ${oc.env:VAR[,default]}
    validate(dict, user)                 ->  LoadedConfig(config, warnings)

Every problem becomes one line naming the field, the value and the fix (ConfigError); no line
and no printed config shows a value read from the environment.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from evalprov.config import overrides
from evalprov.config.compose import (  # noqa: F401  (the loader's public names)
    MISSING,
    SUPPORTED,
    UNSUPPORTED,
    compose,
    interpolate,
)
from evalprov.config.generations import Change, normalise
from evalprov.config.models import NOT_ACTED_ON, Config
from evalprov.config.safeyaml import load_text, read_bounded
from evalprov.config.tasks import task_table
from evalprov.errors import ConfigError


@dataclass
class LoadedConfig:
    config: Config
    warnings: list[str] = field(default_factory=list)
    source: str = ""
    changes: list[Change] = field(default_factory=list)  # legacy forms normalised
    # values read through ${oc.env:NAME}: (NAME, value), and field path -> the form written
    env_reads: list[tuple[str, str]] = field(default_factory=list)
    env_forms: dict[str, str] = field(default_factory=dict)
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


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` (or +, ++, ~ forms) -> (key path, YAML-typed value)."""
    ov = overrides.parse(text)
    return list(ov.keys), ov.value


def apply_override(data: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    overrides.set_value(data, tuple(path), value, text)


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
    elif len(parts) > 2 and parts[0] == "auxiliary_deployments" and parts[2] in ("vllm", "none"):
        del parts[2]
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


def _lookup(root: Any, dotted: str) -> Any:
    value = overrides.get(root, tuple(dotted.split(".")))
    if value is overrides._ABSENT:
        raise KeyError(dotted)
    return value


def _not_acted_on(dotted: str, nel: str) -> str:
    return f"warning: {dotted} is accepted but not acted on by evalprov yet; NEL {nel}"


def _warnings(user: dict[str, Any], config: Config | None = None) -> list[str]:
    """One line per field given that evalprov does not act on, saying what NEL does."""
    out = []
    for dotted, empty, nel in NOT_ACTED_ON:
        try:
            value = _lookup(user, dotted)
        except KeyError:
            continue
        if value != empty:
            out.append(_not_acted_on(dotted, nel))
    evaluation = user.get("evaluation")
    tasks = evaluation.get("tasks") if isinstance(evaluation, dict) else None
    for i, task in enumerate(tasks if isinstance(tasks, list) else []):
        if isinstance(task, dict):
            for key in ("pre_cmd", "post_cmd"):
                if task.get(key):
                    out.append(_not_acted_on(f"evaluation.tasks.{i}.{key}",
                                             f"runs it in the task's container {key[:-4]} "
                                             "the evaluation"))
    for name, aux in (config.auxiliary_deployments.items() if config else ()):
        if aux.type != "none":
            out.append(f"warning: auxiliary_deployments.{name} is validated as a second vLLM "
                       f"deployment ({aux.served_model_name}) but not served by evalprov yet; "
                       "NEL serves it beside the model under test on its own Slurm node(s) "
                       f"and tasks reach it at auxiliary_deployments.{name}.chat_url")
    return out


def _legacy_warning(changes: list[Change], source: str) -> list[str]:
    fields = list(dict.fromkeys(c.was for c in changes if c.legacy))
    if not fields:
        return []
    shown = ", ".join(fields[:3]) + (f" and {len(fields) - 3} more" if len(fields) > 3 else "")
    return [f"warning: {source} uses forms of older NEL versions ({shown}), read as NEL read "
            f"them; `evalprov migrate {source}` prints it in the current schema"]


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
    return LoadedConfig(config=config, warnings=_warnings(user, config))


def _env_forms(node: Any, where: str = "") -> dict[str, str]:
    """Field path -> the ${oc.env:...} text written there (what output shows instead)."""
    if isinstance(node, dict):
        return {p: f for k, v in node.items() for p, f in _env_forms(v, _join(where, k)).items()}
    if isinstance(node, list):
        return {p: f for i, v in enumerate(node) for p, f in _env_forms(v, _join(where, i)).items()}
    if isinstance(node, str) and "oc.env" in node and "${" in node:
        return {where: node}
    return {}


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _strict_base(user: dict[str, Any], ovs: list[overrides.Override],
                 default_execution: str) -> dict[str, Any] | None:
    """The composed config without -o, for Hydra's + and ~ checks (None: not needed)."""
    if not any(ov.op in ("add", "delete") for ov in ovs):
        return None
    try:
        return normalise(compose(normalise(user)[0], default_execution))[0]
    except ConfigError:
        return None


def _check_strict(base: dict[str, Any] | None, ov: overrides.Override) -> None:
    if base is None:
        return
    if ov.op == "add" and overrides.has(base, ov.keys):
        raise ConfigError(f"-o {_short(ov.text)}: {ov.dotted} is already in the config; use "
                          f"{ov.text[1:]} to change it (or ++ to set it either way)")
    if ov.op == "delete" and not overrides.has(base, ov.keys):
        raise ConfigError(f"-o {_short(ov.text)}: {ov.dotted} is not in the config; nothing "
                          "to delete (check the key path)")
    if ov.op == "delete" and ov.has_value and overrides.get(base, ov.keys) != ov.value:
        raise ConfigError(f"-o {_short(ov.text)}: {ov.dotted} does not hold that value, so "
                          "it is not deleted; give its value or just ~key")


def load_user(
    user: dict[str, Any],
    override_texts: list[str] | tuple[str, ...] = (),
    default_execution: str = "local",
    environ=None,
    source: str = "config",
) -> LoadedConfig:
    """Normalise, compose, override, interpolate and validate a config read as data."""
    ovs = [overrides.parse(text) for text in override_texts]
    base = _strict_base(user, ovs, default_execution)
    user = copy.deepcopy(user)
    for ov in ovs:  # first on the file: a choice of defaults (or a type) shapes composition
        if ov.group_choice:
            overrides.choose_option(user, ov)
        else:
            overrides.apply(user, ov, strict=False)
    user, changes = normalise(user)
    composed = compose(user, default_execution=default_execution)
    for ov in ovs:  # then on the composed config: command-line values win over every layer
        if not ov.chooses_defaults:
            _check_strict(base, ov)
            overrides.apply(composed, ov, strict=False)
    composed, late = normalise(composed)  # a legacy key given with -o
    secrets: list[tuple[str, str]] = []
    forms = _env_forms(composed)
    try:
        data = interpolate(composed, environ, secrets)
        loaded = validate(data, user)
    except ConfigError as exc:
        raise ConfigError(*scrub(exc.lines, secrets)) from None
    loaded.source = source
    loaded.composed = composed
    loaded.changes = changes + [c for c in late if c not in changes]
    read = {name for name, _ in secrets}
    loaded.env_reads = secrets
    loaded.env_forms = {path: form for path, form in forms.items()
                        if any(f"oc.env:{name}" in form.replace(" ", "") for name in read)}
    loaded.warnings = _legacy_warning(loaded.changes, source) + loaded.warnings
    return loaded


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    default_execution: str = "local",
    environ=None,
) -> LoadedConfig:
    """Read, normalise, compose, override, interpolate and validate one config file."""
    return load_user(read_yaml(path), overrides, default_execution, environ, str(path))


def _mask(node: Any, forms: dict[str, str], reads: list[tuple[str, str]],
          where: str = "") -> Any:
    """Output data without any value read from the environment: a field written as
    ${oc.env:...} shows that text; any other string holding an env value shows the
    reference instead; a field named like a secret shows <secret>."""
    from evalprov.secrets import SECRET_NAME

    if where in forms and not isinstance(node, (dict, list)):
        return forms[where]
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            path = _join(where, k)
            secretish = (isinstance(k, str) and SECRET_NAME.search(k)
                         and not k.endswith("_name") and "env_vars" not in where)
            if secretish and isinstance(v, str) and v and path not in forms:
                out[k] = "<secret>"
            else:
                out[k] = _mask(v, forms, reads, path)
        return out
    if isinstance(node, list):
        return [_mask(v, forms, reads, _join(where, i)) for i, v in enumerate(node)]
    if isinstance(node, str):
        for name, value in sorted(reads, key=lambda r: -len(r[1])):
            if value and (value in node if len(value) >= 4 else value == node):
                node = node.replace(value, f"${{oc.env:{name}}}")
    return node


def resolved_dict(loaded: LoadedConfig) -> dict[str, Any]:
    """The resolved config as plain data: env_vars by source only, and no value read from
    the environment (see _mask)."""
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

    return _mask(clean(data), loaded.env_forms, loaded.env_reads)
