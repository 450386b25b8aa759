"""Which hosts a run targets, and what is known of their GPUs before preflight.

Hosts come from an Ansible inventory (any format ansible-core reads; parsed by ansible-core
itself), or are `localhost` for `execution: local`. GPU counts, in order of precedence:
a facts file (`--facts`: host -> N, {gpus: N} or a list of GPUs as preflight reports them),
`--gpus N` for every host, the inventory variable `evalprov_gpu_count`, else unknown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from evalprov.errors import InventoryError
from evalprov.plan import HostFacts

GPU_COUNT_VAR = "evalprov_gpu_count"
LOCALHOST = "localhost"


class _Quiet:
    """Stands in for ansible-core's display while an inventory is parsed: keeps the reasons
    each plugin gave up (the user gets one line) instead of printing pages of warnings."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.failures: list[tuple[str, BaseException]] = []
        self.unparsed: list[str] = []

    def error_as_warning(self, msg: str, exception: BaseException, **_: Any) -> None:
        self.failures.append((msg, exception))

    def warning(self, msg: str, *_: Any, **__: Any) -> None:
        prefix, suffix = "Unable to parse ", " as an inventory source"
        if str(msg).startswith(prefix) and str(msg).endswith(suffix):
            self.unparsed.append(str(msg)[len(prefix):-len(suffix)])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _parse_failure(path: str, failures: list[tuple[str, BaseException]]) -> str:
    """The reason of the plugin that fits the file's suffix (else the first one), one line."""
    wanted = "yaml" if Path(path).suffix.lower() in (".yml", ".yaml", ".json") else "ini"
    chosen = next((e for m, e in failures if f"'{wanted}'" in m), None)
    if chosen is None and failures:
        chosen = failures[0][1]
    text = str(getattr(chosen, "message", "") or chosen or "").strip()
    return text.splitlines()[0] if text else "no inventory plugin accepted it"


def _is_host_list(path: str) -> bool:
    """`-i a,b,` : ansible-core's inline host list."""
    return "," in path and not Path(path).exists()


def read_inventory(
    path: str, limit: str | None = None
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """(host name -> its evalprov_* variables and ansible_host for the hosts --limit
    selects, host and group vars merged by ansible-core; the names of all hosts of the
    inventory)."""
    p = Path(path)
    if not p.exists() and not _is_host_list(path):
        raise InventoryError(f"inventory: {path!r} not found; give -i PATH of an Ansible inventory")
    import ansible.inventory.manager as manager
    from ansible import constants as C
    from ansible.errors import AnsibleError
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    C.INVENTORY_UNPARSED_IS_FAILED = True
    loader = DataLoader()
    quiet = _Quiet(manager.display)
    manager.display = quiet
    try:
        try:
            inventory = manager.InventoryManager(loader=loader, sources=[path])
        except AnsibleError:
            inventory = None
        if inventory is None or quiet.unparsed:
            # one file of a directory inventory failing is as much an error as the whole
            bad = quiet.unparsed[0] if quiet.unparsed else path
            reason = _parse_failure(bad, quiet.failures)
            raise InventoryError(f"inventory: {bad}: cannot be parsed ({reason}); fix it or see "
                                 "inventories/ for examples")
        everyone = {str(h.name) for h in inventory.get_hosts("all")}
        try:
            inventory.subset(limit)
            hosts = inventory.get_hosts("all")
        except AnsibleError as exc:
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            raise InventoryError(f"--limit {limit!r}: {first}; give a host pattern as for "
                                 "ansible --limit") from None
    finally:
        manager.display = quiet._real
    if not hosts and limit:
        raise InventoryError(
            f"--limit {limit!r}: matches no host of {path}; give host or group names of the "
            "inventory (`ansible-inventory -i PATH --graph` lists them)"
        )
    if not hosts:
        raise InventoryError(f"inventory: {path} has no hosts; add hosts under all: or a group")
    variables = VariableManager(loader=loader, inventory=inventory)
    out = {}
    for host in hosts:
        hv = variables.get_vars(host=host, include_hostvars=False)
        # str(): ansible-core hands out tagged str subclasses that yaml.safe_dump refuses.
        # ansible_host: where the other hosts reach it (a node group's inter-node address)
        out[str(host.name)] = {str(k): v for k, v in hv.items()
                               if k.startswith("evalprov_") or k == "ansible_host"}
    return out, everyone


def read_facts(path: str) -> dict[str, int]:
    """host -> GPU count from a facts file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InventoryError(f"--facts: {path!r} not found; give a YAML/JSON file host: gpus")
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"--facts: cannot read {path!r} ({exc.__class__.__name__}); give a "
                             "readable YAML/JSON file host: gpus")
    except yaml.YAMLError as exc:
        raise InventoryError(f"--facts: {path} is not valid YAML/JSON ({exc.__class__.__name__})")
    if not isinstance(data, dict):
        raise InventoryError(f"--facts: {path} must map host names to GPU counts, e.g. gpu1: 8")
    out = {}
    for host, value in data.items():
        if isinstance(value, dict):
            value = value.get("gpus", value.get("gpu_count"))
        if isinstance(value, list):
            value = len(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InventoryError(
                f"--facts: host {host}: GPU count {json.dumps(value, default=str)} is not a "
                "non-negative integer; write e.g. {host}: 8".replace("{host}", str(host))
            )
        out[str(host)] = value
    return out


def _gpu_var(host: str, value: Any) -> int | None:
    if value is None:
        return None
    count = -1
    if isinstance(value, int) and not isinstance(value, bool):
        count = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value.strip())
    if count < 0:
        raise InventoryError(f"inventory: host {host}: {GPU_COUNT_VAR}={value!r} is not a "
                             "non-negative integer; set it to the host's GPU count")
    return count


def host_facts(
    execution_type: str,
    inventory: str | None,
    gpus: int | None = None,
    facts: str | None = None,
    limit: str | None = None,
) -> list[HostFacts]:
    if execution_type == "slurm":
        return []  # the planner plans the allocation itself
    if execution_type == "local" and not inventory:
        host_vars: dict[str, dict[str, Any]] = {LOCALHOST: {}}
        everyone = {LOCALHOST}
    elif not inventory:
        raise InventoryError(
            f"inventory: execution {execution_type} needs -i INVENTORY (an Ansible inventory "
            "of the GPU hosts); or use execution: local for this machine"
        )
    else:
        host_vars, everyone = read_inventory(inventory, limit)
    known = read_facts(facts) if facts else {}
    unknown = sorted(set(known) - everyone)
    if unknown:
        raise InventoryError(f"--facts: host {unknown[0]} is not in the inventory; remove it or "
                             "add the host to the inventory")
    out = []
    for name, hv in host_vars.items():
        count = known.get(name)
        if count is None:
            count = gpus if gpus is not None else _gpu_var(name, hv.get(GPU_COUNT_VAR))
        address = hv.get("ansible_host")
        out.append(HostFacts(name, count, str(address) if address else None))
    return out
