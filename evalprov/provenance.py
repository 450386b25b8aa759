"""The reproducibility record of a run: what it takes to run it again and get the same
numbers. It goes into `<run>/summary.json` (key "record"), the ledger (runs.record) and the
report.

    evalprov version, the exact argv (secrets on the command line shown as ***), the config
    source and the resolved config (values read from the environment shown as
    ${oc.env:NAME}, env vars as host:NAME / lit:<literal>: never a value), its hash, and per
    host: the vLLM image as `docker image inspect` shows it (id, repo digests), the vLLM
    version the server reports (/version), the model source (a checkpoint's content hash or
    the HF id and the revision the HF cache resolved), the harness package versions.

A fact the run could not read is null with a "..._reason" next to it; nothing is guessed.
The host facts come from the eval module (read while the tasks ran, after the serve); a host
that ran no task in this run has only what the probe saw before the run changed anything."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from evalprov import __version__
from evalprov.config.envvars import EnvVarSpec
from evalprov.redact import MASK, redact_argv

MIN_SECRET = 4  # shorter values are not masked inside other strings (they would be noise)


class _Forms(Mapping[str, str]):
    """An environment in which every variable is set to its own ${oc.env:NAME} form."""

    def __getitem__(self, name: str) -> str:
        return "${oc.env:" + name + "}"

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _paths(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))
    else:
        yield path, node


def _set(node: Any, path: tuple, value: Any) -> bool:
    if not path:
        return False
    for key in path[:-1]:
        if not _has(node, key):
            return False
        node = node[key]
    if _has(node, path[-1]):
        node[path[-1]] = value
        return True
    return False


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node)


def _env_specs(config: Any) -> list[tuple[str, EnvVarSpec]]:
    specs: list[tuple[str, EnvVarSpec]] = []
    holders = [config, config.evaluation, config.execution, getattr(config, "deployment", None),
               *config.evaluation.tasks]
    for holder in holders:
        for name, spec in (getattr(holder, "env_vars", None) or {}).items():
            if isinstance(spec, EnvVarSpec):
                specs.append((name, spec))
    return specs


def secret_values(loaded: Any, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every value of this config that must not be written: what ${oc.env:...} read, what
    host:NAME env vars read, and every lit: literal whose name says it is a secret."""
    from evalprov.config.loader import interpolate
    from evalprov.secrets import is_secret

    environ = os.environ if environ is None else environ
    found: list[tuple[str, str]] = []
    composed = getattr(loaded, "composed", None)
    if composed:
        with contextlib.suppress(Exception):  # it loaded before; a failure finds no value
            interpolate(composed, environ, found)
    values = [v for _, v in found]
    for name, spec in _env_specs(loaded.config):
        if spec.source == "host" and spec.ref in environ:
            values.append(environ[spec.ref])
        elif spec.source == "lit" and is_secret(name, spec):
            values.append(spec.ref)
    return sorted({v for v in values if len(v) >= MIN_SECRET}, key=len, reverse=True)


def scrub(node: Any, values: list[str]) -> Any:
    """node with every occurrence of a secret value replaced by ***."""
    if isinstance(node, dict):
        return {scrub(k, values): scrub(v, values) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [scrub(v, values) for v in node]
    if isinstance(node, str):
        for v in values:
            if v in node:
                node = node.replace(v, MASK)
    return node


def record_config(loaded: Any) -> dict[str, Any]:
    """The resolved config as the record shows it (see the module docstring)."""
    from evalprov.config.loader import interpolate, resolved_dict

    data = json.loads(json.dumps(resolved_dict(loaded), default=str))
    composed = getattr(loaded, "composed", None)
    if composed:
        try:
            forms = interpolate(composed, _Forms())
        except Exception:
            forms = {}
        for path, value in _paths(forms):
            if isinstance(value, str) and "${oc.env:" in value:
                _set(data, path, value)
    return scrub(data, secret_values(loaded))


def _image(host_prov: dict[str, Any], facts: dict[str, Any], name: str | None
           ) -> dict[str, Any]:
    """The vLLM image a host served from: what its instances run (eval module), else what
    the probe saw under the planned name before the run."""
    images = host_prov.get("images") or {}
    ids = [i.get("image_id") for i in (host_prov.get("instances") or {}).values()
           if i.get("image_id")]
    if ids:
        info = images.get(ids[0]) or {}
        return {"name": name, "id": ids[0], "repo_digests": info.get("repo_digests"),
                "repo_tags": info.get("repo_tags"), "source": "the running instances"}
    if name and name in images and images[name].get("id"):
        info = images[name]
        return {"name": name, "id": info["id"], "repo_digests": info.get("repo_digests"),
                "repo_tags": info.get("repo_tags"), "source": "docker image inspect"}
    img = ((facts.get("docker") or {}).get("image") or {})
    if img.get("id"):
        return {"name": name, "id": img["id"], "repo_digests": None,
                "digests": list(img.get("digests") or []),
                "source": "the probe, before this run changed anything",
                "repo_digests_reason": "no task ran on this host in this run"}
    return {"name": name, "id": None, "repo_digests": None,
            "reason": "the host had no such image when probed and ran no task in this run"}


def host_record(plan: Any, host: str, host_prov: dict[str, Any] | None,
                facts: dict[str, Any] | None) -> dict[str, Any]:
    prov = host_prov or {}
    facts = facts or {}
    out: dict[str, Any] = {}
    docker = plan.runtime == "docker"
    why_none = ("no task ran on this host in this run (the facts are read while tasks run)"
                if host_prov is None else "")
    if prov.get("error"):
        why_none = f"reading the host's facts failed: {prov['error']}"
    if docker and plan.deployment == "vllm":
        out["image"] = _image(prov, facts, plan.image)
    versions = {n: i.get("vllm_version") for n, i in (prov.get("instances") or {}).items()}
    found = sorted({v for v in versions.values() if v})
    out["vllm_version"] = found[0] if len(found) == 1 else None
    if len(found) > 1:
        out["vllm_version_reason"] = f"the instances report different versions: {found}"
    elif not found:
        reasons = [i.get("vllm_version_reason") for i in (prov.get("instances") or {}).values()]
        out["vllm_version_reason"] = (next((r for r in reasons if r), None) or why_none
                                      or "no vLLM instance on this host")
    out["instances"] = prov.get("instances") or {}
    out["model"] = prov.get("model")
    if out["model"] is None:
        out["model_reason"] = why_none or "no vLLM instance on this host"
    harness = prov.get("harness") or {}
    out["harness"] = harness or None
    if not harness:
        out["harness_reason"] = why_none or "no task ran on this host"
    return out


def model_source(plan: Any) -> dict[str, Any] | None:
    inst = next(iter(plan.instances), None)
    if inst is None:
        return None
    return {"kind": inst.model.kind, "ref": inst.model.ref, "served_as": inst.model.serve_as}


def build(loaded: Any, plan: Any, facts: dict[str, Any], host_prov: dict[str, Any],
          argv: list[str] | None = None) -> dict[str, Any]:
    """The run's record (see the module docstring). facts: the probe's raw facts per host;
    host_prov: what the eval module read per host (timeline.Timeline.provenance)."""
    config = record_config(loaded)
    secrets = secret_values(loaded)
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    hosts = {hp.host: host_record(plan, hp.host, host_prov.get(hp.host), facts.get(hp.host))
             for hp in plan.hosts}
    found = sorted({h["vllm_version"] for h in hosts.values() if h.get("vllm_version")})
    record = {
        "evalprov_version": __version__,
        "argv": redact_argv(list(sys.argv if argv is None else argv)),
        "config_source": loaded.source,
        "config_sha256": hashlib.sha256(blob).hexdigest(),
        "config": config,
        "served_model_name": plan.served_model_name,
        "runtime": plan.runtime,
        "image": plan.image,
        "model_source": model_source(plan),
        "vllm_version": found[0] if len(found) == 1 else None,
        "hosts": hosts,
    }
    if len(found) != 1:
        record["vllm_version_reason"] = (f"hosts report different versions: {found}" if found
                                         else "no host reported one (see hosts)")
    return scrub(record, secrets)
