"""Plan -> Ansible inventory variables: what `evalprov inventory` prints and what the roles
consume unchanged. Each variable carries the prefix of the role that reads it."""

from __future__ import annotations

from typing import Any

import yaml

from evalprov.check import pull_policy
from evalprov.plan import Instance, Plan, Proxy, TaskRun


def instance_vars(inst: Instance) -> dict[str, Any]:
    """An instance as the vllm role starts it: every value already in the form the module
    takes (entrypoint and command, volumes, device requests, labels)."""
    return {
        "name": inst.name,
        "index": inst.index,
        "port": inst.port,
        "gpus": list(inst.gpus),
        "argv": list(inst.argv),
        "entrypoint": list(inst.argv[:1]),
        "command": list(inst.argv[1:]),
        "image": inst.image,
        "model": {"kind": inst.model.kind, "ref": inst.model.ref},
        "volumes": [f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}" for m in inst.mounts],
        "device_requests": [{"driver": "nvidia", "device_ids": [str(g) for g in inst.gpus],
                             "capabilities": [["gpu"]]}] if inst.gpus else [],
        "labels": {"evalprov.managed": "true", "evalprov.instance": inst.name,
                   "evalprov.spec_hash": inst.spec_hash, "evalprov.port": str(inst.port)},
        "env": dict(inst.env),
        "env_names": list(inst.env_names),
        "spec_hash": inst.spec_hash,
        "label": f"{inst.name} port {inst.port} GPUs {','.join(map(str, inst.gpus)) or 'none'}",
        **(group_member_vars(inst) if inst.role != "single" else {}),
    }


def group_member_vars(inst: Instance) -> dict[str, Any]:
    """A node group member's part, beside its instance vars (a single instance has none of
    these keys): role head|worker, the group, its first rank, the group's hosts, the head's
    address and its rpc (data parallel) or master (pipeline parallel) port."""
    return {
        # a member that exits stays down: its group cannot take it back, the next apply
        # restarts the whole group
        "restart_policy": "no",
        "role": inst.role,
        "group": inst.group,
        "rank": inst.rank,
        "nodes": list(inst.nodes),
        "head_address": inst.head_address,
        "rpc_port": inst.rpc_port,
        "serves": inst.serves,
    }


def node_group_vars(plan: Plan, host: str) -> dict[str, Any]:
    """The node group a host is in (empty: none): what every member's roles need to meet
    the others (mode, the members and their addresses in rank order, the head, the port)
    and this host's part (role, rank, argv)."""
    for g in plan.groups:
        if host not in g.hosts:
            continue
        (inst,) = plan.host(host).instances
        return {
            "name": g.name,
            "mode": g.mode,
            "role": inst.role,
            "rank": inst.rank,
            "hosts": list(g.hosts),
            "addresses": list(g.addresses),
            "head": g.head,
            "head_address": g.head_address,
            "port": g.port,
            "gpus_per_host": g.gpus_per_host,
            "local_ranks": g.local,
            "api_port": inst.port,
            "argv": list(inst.argv),
        }
    return {}


def proxy_vars(proxy: Proxy, state_dir: str) -> dict[str, Any]:
    """The proxy as the vllm role runs it: haproxy in the foreground on its config file,
    supervised like a process-runtime instance (its state file beside theirs)."""
    config = f"{state_dir}/{proxy.name}.cfg"
    return {
        "name": proxy.name,
        "port": proxy.port,
        "stats_port": proxy.stats_port,
        "servers": [{"name": n, "port": p} for n, p in proxy.servers],
        "config": proxy.config,
        "config_path": config,
        "argv": ["haproxy", "-db", "-f", config],
        "spec_hash": proxy.spec_hash,
        "label": f"{proxy.name} port {proxy.port} in front of "
                 f"{', '.join(n for n, _ in proxy.servers)}",
    }


def task_vars(run: TaskRun) -> dict[str, Any]:
    return {
        "name": run.name,
        "task": run.task,
        "harness": run.harness,
        "container": run.container,
        "endpoint_type": run.endpoint_type,
        "instance": run.instance,
        "url": run.url,
        "env_names": list(run.env_names),
        "run_config": run.run_config,
        "volumes": list(run.volumes),
    }


# How the roles follow their long steps while they run (each look is an event the live view
# shows): seconds between looks at the background health wait, seconds one look at the
# running tasks waits for their end, and the eval role's default timeout of one task.
HEALTH_POLL = 1
EVAL_POLL_WAIT = 2.0
TASK_TIMEOUT = 86400


def follow_vars(plan: Plan, tasks: int) -> dict[str, Any]:
    """A host's bounds of those looks: the health wait's time limit a little above its
    timeout (so the module's own message wins), and enough looks at `tasks` tasks run
    eval_concurrency at a time for each to reach its timeout."""
    rounds = -(-tasks // max(1, plan.eval_concurrency))
    return {"evalprov_health_async": plan.health_timeout + 120,
            "evalprov_health_poll": HEALTH_POLL,
            "evalprov_eval_poll_wait": EVAL_POLL_WAIT,
            "evalprov_eval_polls": int((TASK_TIMEOUT * rounds + 600) / EVAL_POLL_WAIT) + 1}


def common_vars(plan: Plan) -> dict[str, Any]:
    """What every host's roles get from the plan before any fact is known (the same on every
    host): what the probe looks at and how the roles run."""
    process = plan.runtime == "process"
    state_dir = f"{plan.work_dir}/vllm"
    out: dict[str, Any] = {
        "evalprov_preflight_runtime": plan.runtime,
        "evalprov_preflight_image": plan.image,
        "evalprov_preflight_remote_digest": bool(plan.image) and pull_policy(plan) == "always",
        "evalprov_preflight_dirs": list(plan.checkpoints),
        "evalprov_preflight_disk_paths": list(plan.disk_paths),
        "evalprov_preflight_venvs": {"vllm": plan.vllm_venv, "harness": plan.harness_venv}
        if process else {},
        "evalprov_preflight_state_dir": state_dir,
        "evalprov_preflight_health_path": plan.health_path,
        "evalprov_preflight_served_model_name": plan.served_model_name,
        "evalprov_image_name": plan.image,
        "evalprov_vllm_runtime": plan.runtime,
        "evalprov_vllm_state_dir": state_dir,
        "evalprov_health_path": plan.health_path,
        "evalprov_health_timeout": plan.health_timeout,
        "evalprov_health_served_model_name": plan.served_model_name,
        "evalprov_health_runtime": plan.runtime,
        "evalprov_health_state_dir": state_dir,
        "evalprov_eval_runtime": plan.runtime,
        "evalprov_eval_concurrency": plan.eval_concurrency,
        "evalprov_eval_harness_venv": plan.harness_venv,
        "evalprov_eval_samples_dest": f"{plan.work_dir}/samples",
    }
    if process:
        out.update({"evalprov_vllm_venv": plan.vllm_venv,
                    "evalprov_vllm_package": plan.vllm_package,
                    "evalprov_vllm_cpu": plan.device == "cpu"})
    return out


def render(plan: Plan) -> dict[str, Any]:
    """The inventory as a dict (YAML inventory format): the common variables under all.vars,
    and per host what the plan puts there (its instances and tasks; `apply` turns them into
    actions against the probe's facts). Connection variables stay in the user's inventory."""
    hosts: dict[str, Any] = {}
    for hp in plan.hosts:
        hosts[hp.host] = {
            "evalprov_plan_gpus": hp.gpus_total,
            "evalprov_plan_instances": [instance_vars(i) for i in hp.instances],
            "evalprov_plan_tasks": [task_vars(t) for t in hp.tasks],
            **({"evalprov_plan_proxy": proxy_vars(hp.proxy, f"{plan.work_dir}/vllm")}
               if hp.proxy else {}),
            **({"evalprov_plan_node_group": node_group_vars(plan, hp.host)}
               if any(hp.host in g.hosts for g in plan.groups) else {}),
        }
    return {"all": {"vars": common_vars(plan), "hosts": hosts}}


class Unsafe(str):
    """A string Ansible must take as written: dumped with the !unsafe tag."""


def unsafe(data: Any) -> Any:
    """Every string in data (keys too) marked Unsafe: nothing evalprov hands Ansible is ever
    templated, whatever it contains (`{{ }}`, `{% %}`, a `#jinja2:` header)."""
    if isinstance(data, str):
        return Unsafe(data)
    if isinstance(data, dict):
        return {unsafe(k): unsafe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [unsafe(v) for v in data]
    return data


def ansible_vars(variables: dict[str, Any]) -> str:
    """Variables as an Ansible vars/extravars YAML file: names plain, every value unsafe."""
    return _dump({k: unsafe(v) for k, v in variables.items()})


def inventory_file(rendered: dict[str, Any]) -> str:
    """A rendered inventory as a file for Ansible: structure plain, every value unsafe."""
    a = rendered["all"]
    return _dump({"all": {
        "vars": {k: unsafe(v) for k, v in a.get("vars", {}).items()},
        "hosts": {h: {k: unsafe(v) for k, v in (hv or {}).items()}
                  for h, hv in a.get("hosts", {}).items()},
    }})


class _AnsibleDumper(yaml.SafeDumper):
    """YAML for Ansible to read; strings marked Unsafe are tagged ``!unsafe`` so Ansible uses
    them as written (a `--chat-template '{% for m in messages %}...'` argument reaches vLLM
    unchanged, and `{{ lookup('pipe', ...) }}` in a config runs nothing on the controller)."""

    def ignore_aliases(self, data: Any) -> bool:  # shared run configs are written out in full
        return True


def _represent_unsafe(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # ansible-core 2.19 resolves an !unsafe scalar's type again as if it were plain, quotes
    # ignored: !unsafe '8000' reads back as the int 8000, '' as None, 'true' as True. A string
    # that plain YAML would read as something else (a number, bool, null, timestamp) cannot
    # hold a template ({{, {%, {#, #jinja2:), so it goes out as an ordinary quoted string and
    # reads back as the same string in every ansible-core.
    text = str(value)
    if dumper.resolve(yaml.ScalarNode, text, (True, False)) != "tag:yaml.org,2002:str":
        return dumper.represent_str(text)
    return dumper.represent_scalar("!unsafe", text)


_AnsibleDumper.add_representer(Unsafe, _represent_unsafe)


def to_yaml(rendered: dict[str, Any]) -> str:
    """A rendered inventory as `evalprov inventory` prints it and Ansible reads it."""
    return inventory_file(rendered)


def _dump(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_AnsibleDumper, sort_keys=False, default_flow_style=False,
                     width=100)
