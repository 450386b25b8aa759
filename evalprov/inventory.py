"""Plan -> Ansible inventory variables: what `evalprov inventory` prints and what the roles
consume unchanged. Each variable carries the prefix of the role that reads it."""

from __future__ import annotations

from typing import Any

import yaml

from evalprov.plan import Instance, Plan, TaskRun

# Where Ansible would start a template in a string (its default Jinja delimiters).
JINJA_MARKERS = ("{{", "{%", "{#")


def instance_vars(inst: Instance) -> dict[str, Any]:
    return {
        "name": inst.name,
        "index": inst.index,
        "port": inst.port,
        "gpus": list(inst.gpus),
        "argv": list(inst.argv),
        "image": inst.image,
        "model": {"kind": inst.model.kind, "ref": inst.model.ref},
        "mounts": [
            {"source": m.source, "target": m.target, "read_only": m.read_only}
            for m in inst.mounts
        ],
        # the same mounts and GPUs in the forms docker_container takes
        "volumes": [f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}" for m in inst.mounts],
        "device_ids": [str(g) for g in inst.gpus],
        "env": dict(inst.env),
        "env_names": list(inst.env_names),
        "spec_hash": inst.spec_hash,
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


def render(plan: Plan) -> dict[str, Any]:
    """The inventory as a dict (YAML inventory format): group vars under all.vars, per-host
    plan under all.hosts. Connection variables stay in the user's own inventory."""
    images = sorted({i.image for i in plan.instances})
    common: dict[str, Any] = {
        "evalprov_runtime": plan.runtime,
        "evalprov_image_name": images[0] if images and plan.runtime == "docker" else None,
        "evalprov_health_path": plan.health_path,
        "evalprov_health_timeout": plan.health_timeout,
        "evalprov_health_served_model_name": plan.served_model_name,
        "evalprov_eval_concurrency": plan.eval_concurrency,
        "evalprov_eval_work_dir": plan.work_dir,
    }
    if plan.runtime == "process":
        common.update({
            "evalprov_vllm_state_dir": f"{plan.work_dir}/vllm",
            "evalprov_vllm_venv": plan.vllm_venv,
            "evalprov_vllm_package": plan.vllm_package,
            "evalprov_vllm_cpu": plan.device == "cpu",
            "evalprov_eval_harness_venv": plan.harness_venv,
        })
    if plan.sample_data:
        common["evalprov_eval_sample_data"] = True
    hosts: dict[str, Any] = {}
    for hp in plan.hosts:
        checkpoints = sorted({i.model.ref for i in hp.instances if i.model.kind == "checkpoint"})
        hosts[hp.host] = {
            "evalprov_vllm_instances": [instance_vars(i) for i in hp.instances],
            "evalprov_preflight_gpus_required": (
                max((g for i in hp.instances for g in i.gpus), default=-1) + 1
            ),
            "evalprov_preflight_ports": [i.port for i in hp.instances],
            "evalprov_preflight_gpus_expected": hp.gpus_total,
            "evalprov_preflight_checkpoints": checkpoints,
            "evalprov_preflight_disk_paths": sorted(
                {m.source for i in hp.instances for m in i.mounts if not m.read_only}
            ),
            "evalprov_eval_tasks": [task_vars(t) for t in hp.tasks],
        }
    return {"all": {"vars": common, "hosts": hosts}}


class _AnsibleDumper(yaml.SafeDumper):
    """YAML for Ansible to read: a string that looks like a Jinja template is tagged
    ``!unsafe`` so Ansible uses it as written instead of templating it (a
    `--chat-template '{% for m in messages %}...'` argument reaches vLLM unchanged, and
    `{{ lookup('pipe', ...) }}` in a config runs nothing on the controller)."""

    def ignore_aliases(self, data: Any) -> bool:  # shared run configs are written out in full
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if any(m in value for m in JINJA_MARKERS):
        return dumper.represent_scalar("!unsafe", value)
    return dumper.represent_str(value)


_AnsibleDumper.add_representer(str, _represent_str)


def to_yaml(data: dict[str, Any]) -> str:
    """The rendered inventory as an Ansible YAML inventory file (see _AnsibleDumper).
    Whatever hands render() to Ansible, or prints it as an inventory, should write it so."""
    return yaml.dump(data, Dumper=_AnsibleDumper, sort_keys=False, default_flow_style=False,
                     width=100)
