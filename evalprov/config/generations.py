"""NEL's schema generations, normalised into the current one (legacy -> current).

    normalise(data) -> (data in the current schema, [Change, ...])

``data`` is a config as a user wrote it (before composition: ${...} are still text, so no
value read from the environment ever passes through here). Each rule below names the NEL
(nemo-evaluator-launcher) version that changed the schema and keeps the meaning NEL gave the
old form; each Change says what moved where, for `evalprov migrate`'s comments. A rule only
fires on the legacy form, so normalising a current config changes nothing (idempotent). The
planner sees only the result.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from evalprov.config.tasks import task_table

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OC_ENV = re.compile(r"\$\{\s*oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)\s*(,[^}]*)?\}")
_PLACEHOLDER = re.compile(r"<[^<>]*>")


@dataclass(frozen=True)
class Change:
    """``path``: where the field is now (current schema; "" when it was removed);
    ``was``: the legacy field; ``note``: what happened and which NEL version."""

    path: str
    was: str
    note: str
    legacy: bool = True  # False: a form evalprov reads as it is (migrate still rewrites it)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _tasks(data: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    ev = data.get("evaluation")
    tasks = ev.get("tasks") if isinstance(ev, dict) else None
    return [(i, t) for i, t in enumerate(tasks if isinstance(tasks, list) else [])
            if isinstance(t, dict)]


def _set_path(node: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _get_path(node: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def _flatten(node: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in node.items():
        key = _join(prefix, k)
        if isinstance(v, dict) and v:
            out += _flatten(v, key)
        else:
            out.append((key, v))
    return out


# --------------------------------------------------------------------------- evaluation


def _evaluation_list(data: dict[str, Any], changes: list[Change]) -> None:
    # NEL 0.1.0-0.2.6 configs/default.yaml: `evaluation: []`, a placeholder for the mapping.
    if data.get("evaluation") == []:
        data["evaluation"] = {}
        changes.append(Change("evaluation", "evaluation", "NEL's default.yaml placeholder "
                              "`evaluation: []` is the empty evaluation mapping"))


def _config_key(section: dict[str, Any], where: str, changes: list[Change]) -> None:
    # NEL 0.1.0-0.1.18 named the harness config `config`; 0.1.19 renamed it
    # `nemo_evaluator_config` and read `config` only while the new one is empty.
    if "config" not in section:
        return
    old = section.pop("config")
    if section.get("nemo_evaluator_config"):
        changes.append(Change("", _join(where, "config"), "removed: NEL 0.1.19+ ignores "
                              "`config` when nemo_evaluator_config is set"))
        return
    section["nemo_evaluator_config"] = old
    changes.append(Change(_join(where, "nemo_evaluator_config"), _join(where, "config"),
                          "renamed from `config` (NEL 0.1.19)"))


def _overrides(section: dict[str, Any], where: str, changes: list[Change]) -> list[str]:
    # NEL 0.1.0: dotted `overrides` (config.params.x: v), passed to the harness as
    # --overrides, so they win over the run config; NEL 0.1.47 refuses them (#540) in favour
    # of the nested nemo_evaluator_config.
    if "overrides" not in section:
        return []
    raw = section.pop("overrides")
    if not isinstance(raw, dict):
        section["overrides"] = raw  # not a mapping: the schema reports it
        return []
    target = section.get("nemo_evaluator_config")
    if not isinstance(target, dict):
        target = section["nemo_evaluator_config"] = {}
    keys = []
    if not raw:
        changes.append(Change("", _join(where, "overrides"), "removed the empty overrides "
                              "(NEL 0.1.47 refuses the field)"))
    for dotted, value in _flatten(raw):
        if isinstance(value, str):
            value = value.strip("\n")  # NEL 0.1.0 stripped newlines of override values
        _set_path(target, dotted.split("."), value)
        keys.append(dotted)
        changes.append(Change(_join(where, f"nemo_evaluator_config.{dotted}"),
                              _join(where, f"overrides.{dotted}"),
                              "was a dotted override (NEL 0.1.0; refused since 0.1.47)"))
    return keys


def _evaluation(data: dict[str, Any], changes: list[Change]) -> None:
    _evaluation_list(data, changes)
    ev = data.get("evaluation")
    if not isinstance(ev, dict):
        return
    _config_key(ev, "evaluation", changes)
    global_keys = _overrides(ev, "evaluation", changes)
    for i, task in _tasks(data):
        where = f"evaluation.tasks.{i}"
        _config_key(task, where, changes)
        own = set(_overrides(task, where, changes))
        # NEL 0.1.0: evaluation.overrides beat the task's config (they were --overrides).
        cfg = task.get("nemo_evaluator_config")
        for dotted in global_keys:
            parts = dotted.split(".")
            if dotted in own or not isinstance(cfg, dict) or _get_path(cfg, parts) is KeyError:
                continue
            _set_path(cfg, parts, copy.deepcopy(_get_path(ev["nemo_evaluator_config"], parts)))
            changes.append(Change(f"{where}.nemo_evaluator_config.{dotted}",
                                  f"evaluation.overrides.{dotted}",
                                  "set from evaluation.overrides, which beat the task's "
                                  "config in NEL 0.1.0"))


# --------------------------------------------------------------------------- env vars


def _execution_env_vars(data: dict[str, Any], changes: list[Change]) -> None:
    # NEL 0.1.0-0.1.88: execution.env_vars.{deployment,evaluation,export}; NEL 0.1.89 (#703)
    # moved them to deployment.env_vars, evaluation's and export.env_vars (keys already there
    # win, as in nel-migrate-config). The evaluation ones go to evaluation.env_vars, not the
    # top-level env_vars NEL's tool picks: top-level ones reach the deployment too.
    exe = data.get("execution")
    env = exe.get("env_vars") if isinstance(exe, dict) else None
    if not isinstance(env, dict):
        return
    targets = {"deployment": ("deployment",), "evaluation": ("evaluation",),
               "export": ("export",)}
    for sub, (section,) in targets.items():
        block = env.get(sub)
        if not isinstance(block, dict):
            continue
        env.pop(sub)
        if not block:
            changes.append(Change("", f"execution.env_vars.{sub}", f"removed the empty "
                                  f"execution.env_vars.{sub} (NEL 0.1.89 reads "
                                  f"{section}.env_vars, #703)"))
            continue
        if not isinstance(data.get(section), dict):
            data[section] = {}
        dest = data[section].get("env_vars")
        if not isinstance(dest, dict):
            dest = data[section]["env_vars"] = {}
        for name, value in block.items():
            if name in dest:
                changes.append(Change(f"{section}.env_vars.{name}",
                                      f"execution.env_vars.{sub}.{name}",
                                      f"execution.env_vars.{sub}.{name} dropped: "
                                      f"{section}.env_vars sets it (it won in NEL 0.1.x)"))
                continue
            dest[name] = value
            changes.append(Change(f"{section}.env_vars.{name}", f"execution.env_vars.{sub}.{name}",
                                  f"moved from execution.env_vars.{sub} (NEL 0.1.89, #703)"))
    if not env:
        exe.pop("env_vars")


_BARE_NOTE = "a bare name is read on the host (NEL 0.1.89 writes host:)"


def env_value(raw: Any) -> tuple[Any, str]:
    """(the value in the current form, why it changed or "")."""
    if isinstance(raw, (bool, int, float)):
        # NEL <=0.1.88 exported numbers as they were; nel-migrate-config (0.1.89): lit:
        return f"lit:{raw}", "a number is a literal (NEL 0.1.89 writes lit:)"
    if not isinstance(raw, str):
        return raw, ""
    text = raw  # not stripped: "NAME\n" is refused, not read as NAME
    for prefix in ("host:", "lit:", "runtime:"):
        if text.startswith("$" + prefix):
            # NEL's docs for 0.2.0-0.2.3 wrote $host:/$lit:/$runtime: (fixed in #837)
            return text[1:], f"`${prefix}` as NEL 0.2.0's docs wrote it is `{prefix}` (#837)"
    if text.startswith(("host:", "lit:", "runtime:")):
        return raw, ""
    m = _OC_ENV.fullmatch(text)
    if m:
        # NEL <=0.1.88 resolved it into the config; 0.1.89 refuses it, migrating to host:
        dropped = "; its default is not used: host: needs the variable set" if m.group(2) else ""
        return f"host:{m.group(1)}", f"${{oc.env:...}} is host: since NEL 0.1.89{dropped}"
    if text.isdigit():
        return f"lit:{text}", "a number is a literal (NEL 0.1.89 writes lit:)"
    if text.startswith("$") and _NAME.fullmatch(text[1:]):
        return f"host:{text[1:]}", "$NAME reads NAME on the host (NEL 0.1.89 writes host:)"
    if _NAME.fullmatch(text):
        # NEL <=0.1.88: a bare NAME is read from the launching machine; 0.1.89 needs host:
        return f"host:{text}", _BARE_NOTE
    return raw, ""


def _env_maps(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for where, section in (("", data), ("deployment", data.get("deployment")),
                           ("evaluation", data.get("evaluation")),
                           ("export", data.get("export"))):
        if isinstance(section, dict) and isinstance(section.get("env_vars"), dict):
            out.append((_join(where, "env_vars"), section["env_vars"]))
    for i, task in _tasks(data):
        if isinstance(task.get("env_vars"), dict):
            out.append((f"evaluation.tasks.{i}.env_vars", task["env_vars"]))
    aux = data.get("auxiliary_deployments")
    for name, dep in (aux.items() if isinstance(aux, dict) else ()):
        if isinstance(dep, dict) and isinstance(dep.get("env_vars"), dict):
            out.append((f"auxiliary_deployments.{name}.env_vars", dep["env_vars"]))
    return out


def _env_values(data: dict[str, Any], changes: list[Change]) -> None:
    for where, env in _env_maps(data):
        for name, raw in list(env.items()):
            value, why = env_value(raw)
            if why:
                env[name] = value
                changes.append(Change(f"{where}.{name}", f"{where}.{name}", why,
                                      legacy=why != _BARE_NOTE))


# --------------------------------------------------------------------------- deployment


def _multiple_instances(data: dict[str, Any], changes: list[Change]) -> None:
    # NEL 0.1.29-0.1.93: deployment.multiple_instances: true served one instance per node
    # (num_nodes of them behind HAProxy); NEL 0.2.0 replaced it with execution.num_instances
    # and refuses it.
    dep = data.get("deployment")
    if not isinstance(dep, dict) or "multiple_instances" not in dep:
        return
    value = dep.pop("multiple_instances")
    if value is True:
        exe = data.setdefault("execution", {})
        if isinstance(exe, dict) and "num_instances" not in exe:
            exe["num_instances"] = "${execution.num_nodes}"
            changes.append(Change("execution.num_instances", "deployment.multiple_instances",
                                  "multiple_instances: true was one instance per node "
                                  "(NEL 0.2.0 uses num_instances)"))
            return
    changes.append(Change("", "deployment.multiple_instances",
                          f"removed deployment.multiple_instances: {value!r} (NEL 0.2.0 "
                          "replaced it with execution.num_instances)"))


def _api_key_placeholder(data: dict[str, Any], changes: list[Change]) -> None:
    # NEL 0.1.0-0.2.6 configs/default.yaml ships api_key_name: "<YOUR_API_KEY_NAME>".
    target = data.get("target")
    ep = target.get("api_endpoint") if isinstance(target, dict) else None
    name = ep.get("api_key_name") if isinstance(ep, dict) else None
    if isinstance(name, str) and _PLACEHOLDER.fullmatch(name.strip()):
        ep["api_key_name"] = None
        changes.append(Change("target.api_endpoint.api_key_name",
                              "target.api_endpoint.api_key_name",
                              f"{name} is NEL default.yaml's unfilled placeholder: no API key"))


def _username(data: dict[str, Any], changes: list[Change]) -> None:
    # NEL 0.1.0-0.2.6 slurm/default.yaml: username: ${oc.env:USER}; where USER is unset (a
    # container, CI) NEL stops; evalprov lets ssh use its configured user.
    exe = data.get("execution")
    if isinstance(exe, dict) and isinstance(exe.get("username"), str) and re.fullmatch(
            r"\$\{\s*oc\.env:\s*USER\s*\}", exe["username"].strip()):
        exe["username"] = "${oc.env:USER,null}"
        changes.append(Change("execution.username", "execution.username",
                              "an unset USER leaves the SSH user to ssh's config"))


def _walltime(data: dict[str, Any], changes: list[Change]) -> None:
    # YAML 1.1 reads an unquoted 02:00:00 as the integer 7200 (NEL 0.1.0-0.2.6 refuses it;
    # evalprov reads it as that time): written as the quoted time it means.
    exe = data.get("execution")
    for key in ("walltime", "max_walltime"):
        value = exe.get(key) if isinstance(exe, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            h, rest = divmod(value, 3600)
            exe[key] = f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"
            changes.append(Change(f"execution.{key}", f"execution.{key}",
                                  "quoted: YAML 1.1 reads an unquoted time as seconds",
                                  legacy=False))


# --------------------------------------------------------------------------- task names


# Names NEL users wrote that its task table later renamed (only applied to a name the
# current table does not have).
RENAMED_TASKS = {
    # NEL 0.1.44 (#522, 25.11 containers)
    "aa_scicode": ("scicode_aa_v2", "NEL 0.1.44"),
    # NEL 0.1.79: the chat variants got a chat suffix
    "mbpp": ("mbpp-chat", "NEL 0.1.79"),
    "mbppplus": ("mbppplus-chat", "NEL 0.1.79"),
    "mmlu_prox": ("mmlu_prox_chat", "NEL 0.1.79"),
    "mgsm_cot": ("mgsm_cot_chat", "NEL 0.1.79"),
}
# NEL 0.1.50 (#523, task metadata from the containers): harness safety-harness -> safety_eval
RENAMED_HARNESSES = {"safety-harness": ("safety_eval", "NEL 0.1.50")}


def renamed_task(name: str) -> tuple[str, str] | None:
    table = task_table()
    if table.candidates(name):
        return None
    harness, dot, bare = name.rpartition(".")
    if dot and (harness in table.harnesses or harness in RENAMED_HARNESSES):
        new_h, since = RENAMED_HARNESSES.get(harness, (harness, ""))
        new_t, since_t = RENAMED_TASKS.get(bare, (bare, ""))
        if (new_h, new_t) != (harness, bare) and any(
                t.harness == new_h for t in table.candidates(new_t)):
            return f"{new_h}.{new_t}", " and ".join(s for s in (since, since_t) if s)
        return None
    if name in RENAMED_TASKS:
        return RENAMED_TASKS[name]
    return None


def _task_names(data: dict[str, Any], changes: list[Change]) -> None:
    for i, task in _tasks(data):
        name = task.get("name")
        found = renamed_task(name) if isinstance(name, str) else None
        if found:
            task["name"] = found[0]
            changes.append(Change(f"evaluation.tasks.{i}.name", f"evaluation.tasks.{i}.name",
                                  f"task {name} is {found[0]} since {found[1]}"))


# --------------------------------------------------------------------------- all rules


RULES = (_evaluation, _execution_env_vars, _env_values, _multiple_instances,
         _api_key_placeholder, _username, _walltime, _task_names)


def normalise(data: dict[str, Any]) -> tuple[dict[str, Any], list[Change]]:
    """The config in the current schema, and what changed."""
    out = copy.deepcopy(data)
    changes: list[Change] = []
    for rule in RULES:
        rule(out, changes)
    return out, changes
