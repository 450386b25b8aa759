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


def read_inventory(path: str, limit: str | None = None) -> dict[str, dict[str, Any]]:
    """host name -> its evalprov_* variables (host and group vars merged by ansible-core)."""
    p = Path(path)
    if not p.exists():
        raise InventoryError(f"inventory: {path!r} not found; give -i PATH of an Ansible inventory")
    from ansible import constants as C
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    C.INVENTORY_UNPARSED_IS_FAILED = True
    loader = DataLoader()
    try:
        inventory = InventoryManager(loader=loader, sources=[str(p)])
    except AnsibleError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InventoryError(f"inventory: {path}: cannot be parsed ({first}); fix it or see "
                             "inventories/ for examples") from None
    hosts = inventory.get_hosts(limit or "all")
    if not hosts:
        what = f" matching --limit {limit!r}" if limit else ""
        raise InventoryError(
            f"inventory: {path} has no hosts{what}; add hosts under all: or a group"
        )
    variables = VariableManager(loader=loader, inventory=inventory)
    out = {}
    for host in hosts:
        hv = variables.get_vars(host=host, include_hostvars=False)
        out[host.name] = {k: v for k, v in hv.items() if k.startswith("evalprov_")}
    return out


def read_facts(path: str) -> dict[str, int]:
    """host -> GPU count from a facts file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InventoryError(f"--facts: {path!r} not found; give a YAML/JSON file host: gpus")
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
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0 or isinstance(value, bool):
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
        host_vars = {LOCALHOST: {}}
    elif not inventory:
        raise InventoryError(
            f"inventory: execution {execution_type} needs -i INVENTORY (an Ansible inventory "
            "of the GPU hosts); or use execution: local for this machine"
        )
    else:
        host_vars = read_inventory(inventory, limit)
    known = read_facts(facts) if facts else {}
    unknown = sorted(set(known) - set(host_vars))
    if unknown:
        raise InventoryError(f"--facts: host {unknown[0]} is not in the inventory; remove it or "
                             "add the host to the inventory")
    out = []
    for name, hv in host_vars.items():
        count = known.get(name)
        if count is None:
            count = gpus if gpus is not None else _gpu_var(name, hv.get(GPU_COUNT_VAR))
        out.append(HostFacts(name, count))
    return out
