"""How a plan and the task table look to a person (text) and to a program (YAML/JSON)."""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from evalprov.config.tasks import TaskTable
from evalprov.plan import Instance, NodeGroup, Plan
from evalprov.records import TaskRecord
from evalprov.runner import RunResult


def _gpus(gpus: tuple[int, ...]) -> str:
    if not gpus:
        return "none"
    if list(gpus) == list(range(gpus[0], gpus[-1] + 1)) and len(gpus) > 2:
        return f"{gpus[0]}-{gpus[-1]}"
    return ",".join(map(str, gpus))


def plan_text(plan: Plan) -> str:
    lines = [
        f"execution: {plan.execution}   deployment: {plan.deployment}   runtime: {plan.runtime}"
    ]
    if plan.deployment == "vllm":
        lines.append(
            f"model: {plan.served_model_name}   GPUs per instance: {plan.gpus_per_instance}   "
            f"health: {plan.health_path} (timeout {plan.health_timeout}s)"
        )
    total_i = len([i for i in plan.instances if i.serves])
    lines.append(f"{len(plan.hosts)} host(s), {total_i} instance(s), "
                 f"{len(plan.task_runs)} task run(s)")
    for g in plan.groups:
        lines.extend(_group_lines(plan, g))
    if plan.groups:
        lines.append("note: inter-node traffic (vLLM's rpc, torch.distributed) is "
                     "unauthenticated: keep these addresses on an isolated network")
    for hp in plan.hosts:
        gpus = ("CPU" if plan.device == "cpu" else "GPUs unknown until preflight"
                if hp.gpus_total is None else f"{hp.gpus_total} GPUs")
        lines.append("")
        lines.append(f"host {hp.host} ({gpus})")
        for inst in hp.instances:
            lines.append(_instance_line(plan, inst))
            if plan.runtime == "docker":
                lines.append(f"    image: {inst.image}")
            else:
                lines.append(f"    venv: {plan.vllm_venv} ({plan.vllm_package}), "
                             f"supervised process")
            if inst.model.kind == "checkpoint" and plan.runtime != "docker":
                src = f"checkpoint {inst.model.ref} (read from the host)"
            elif inst.model.kind == "checkpoint":
                src = f"checkpoint {inst.model.ref} mounted read-only at {inst.model.serve_as}"
            else:
                cache = next((m for m in inst.mounts if not m.read_only), None)
                src = f"HF id {inst.model.ref}" + (
                    f" (HF cache {cache.source} mounted at {cache.target})" if cache else "")
            lines.append(f"    model: {src}")
            lines.append(f"    argv: {shlex.join(inst.argv)}")
            if inst.env and inst.role != "single":  # VLLM_HOST_IP (pipeline parallel)
                lines.append(f"    env set: {', '.join(f'{k}={v}' for k, v in inst.env)}")
            if inst.env_names:
                lines.append(f"    env: {', '.join(inst.env_names)}")
        if hp.proxy:
            lines.append(f"  proxy {hp.proxy.name}  haproxy on {hp.proxy.listen}:{hp.proxy.port} "
                         f"(stats 127.0.0.1:{hp.proxy.stats_port})  leastconn over "
                         f"{', '.join(f'{n}:{p}' for n, p in hp.proxy.servers)}  "
                         f"spec {hp.proxy.spec_hash}")
        if plan.groups and not hp.instances:  # a group's members all have one
            lines.append("  no instance: in no node group (see the notes)")
        if not hp.tasks:
            lines.append("  tasks: none")
        for t in hp.tasks:
            env = f"  env: {', '.join(t.env_names)}" if t.env_names else ""
            where = (f"image {t.container}" if plan.runtime == "docker"
                     else f"harness venv {plan.harness_venv}")
            lines.append(f"  task {t.name} ({t.harness}, {t.endpoint_type}) -> {t.url}  "
                         f"{where}{env}")
    for aux in plan.auxiliary:
        lines.append("")
        lines.append(f"auxiliary {aux.name} (planned, not served by evalprov yet): "
                     f"{aux.served_model_name}  GPUs per instance {aux.gpus}  port {aux.port}")
        lines.append(f"  image: {aux.image}")
        lines.append(f"  argv: {shlex.join(aux.argv)}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _ranks(g: NodeGroup, first: int) -> str:
    return f"rank {first}" if g.local == 1 else f"ranks {first}-{first + g.local - 1}"


def _group_lines(plan: Plan, g: NodeGroup) -> list[str]:
    """A node group: its mode, head, port, and each member with its address and part."""
    where = ", ".join(f"{h} ({a})" if a != h else h
                      for h, a in zip(g.hosts, g.addresses, strict=True))
    port = f"rpc port {g.port}" if g.mode == "data-parallel" else f"master port {g.port}"
    lines = [f"node group {g.name}: {g.mode} over {where}; {g.gpus_per_host} GPUs each; "
             f"head {g.head}; {port} on {g.head_address}"]
    members = {i.host: i for i in plan.instances if i.group == g.name}
    if g.mode == "data-parallel":
        lines.append(f"  mode: {g.label}: {g.local * len(g.hosts)} data-parallel ranks, "
                     f"{g.local} per host")
    else:
        lines.append(f"  mode: {g.label}: one world of {g.gpus_per_host * len(g.hosts)} GPUs "
                     f"over {len(g.hosts)} hosts")
    for h, a in zip(g.hosts, g.addresses, strict=True):
        inst = members[h]
        part = ([f"API port {inst.port}"] if inst.role == "head" else
                ["headless, no API"])
        part.append(f"data-parallel {_ranks(g, inst.rank)}" if g.mode == "data-parallel"
                    else f"node rank {inst.rank}")
        lines.append(f"  {inst.role} {h} at {a}: {', '.join(part)}; GPUs {_gpus(inst.gpus)}")
    return lines


def _instance_line(plan: Plan, inst: Instance) -> str:
    gpus = f"GPUs {_gpus(inst.gpus)}  spec {inst.spec_hash}"
    if inst.role == "single":
        where = ""
        if any(i.node for i in plan.instances):  # Slurm, instances on their own nodes
            where = (f"  on node {inst.node}" + (" (the batch node, loopback)" if not inst.node
                                                 else " (its address, key required)"))
        return f"  instance {inst.name}  port {inst.port}{where}  {gpus}"
    if inst.role == "head":
        return f"  instance {inst.name} (head of {inst.group})  port {inst.port}  {gpus}"
    (g,) = [g for g in plan.groups if g.name == inst.group]
    ranks = (f", {_ranks(g, inst.rank)}" if g.mode == "data-parallel" else
             f", node rank {inst.rank}")
    return f"  instance {inst.name} (worker of {inst.group}{ranks})  no API port  {gpus}"


def plan_data(plan: Plan) -> dict[str, Any]:
    data = asdict(plan)
    return data


def tasks_text(table: TaskTable, harness: str | None = None) -> str:
    rows = [t for t in table.tasks if harness is None or t.harness == harness]
    primary = {}
    for t in table.tasks:
        primary.setdefault(t.name, t.harness)
    width = max((len(t.name) for t in rows), default=4)
    hw = max((len(t.harness) for t in rows), default=7)
    out = [f"{'task':<{width}}  {'harness':<{hw}}  {'endpoint':<11}  container"]
    for t in rows:
        mark = "" if primary[t.name] == t.harness else f"  (use {t.qualified})"
        out.append(f"{t.name:<{width}}  {t.harness:<{hw}}  {','.join(t.endpoint_types):<11}  "
                   f"{t.container}{mark}")
    out.append(f"{len(rows)} tasks; a bare name runs on the first harness listed for it")
    return "\n".join(out)


def _when(ts: float | None) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def status_text(run, deployments, tasks: Iterable[TaskRecord | Any], usage: Any = None) -> str:
    """A run from the ledger: header, instances, then every task attempt (TaskRecords, or
    ledger task_runs rows); with usage (usage.gpu_hours), GPU-hours per task and run."""
    from evalprov.usage import fmt

    records = [t if isinstance(t, TaskRecord) else TaskRecord.from_row(t) for t in tasks]
    lines = [f"run {run['run_id']}  {run['status']}  started {_when(run['started'])}  "
             f"finished {_when(run['finished'])}  config {run['config']}"]
    if deployments:
        lines.append("")
        lines.append(f"{'host':<20} {'instance':<18} {'port':>5}  {'status':<8} spec")
        for d in deployments:
            lines.append(f"{d['host']:<20} {d['instance']:<18} {d['port']:>5}  "
                         f"{d['status']:<8} {d['spec_hash']}")
    lines.append("")
    lines.append(f"{'host':<20} {'task':<24} {'state':<12} {'try':>3} {'start':>8} "
                 f"{'secs':>7} {'score':>7}" + (f" {'gpu-h':>8}" if usage else "") + "  error")
    for t in records:
        secs = f"{t.seconds:.1f}" if t.seconds is not None else "-"
        score = f"{t.score:.4f}" if t.score is not None else "-"
        err = (t.error or "")[:120]
        attempt = "-" if t.attempt is None else t.attempt
        gpu_h = f" {fmt(usage.task(t.host, t.task)):>8}" if usage else ""
        lines.append(f"{t.host:<20} {t.task:<24} {t.status:<12} {attempt:>3} "
                     f"{_when(t.started):>8} {secs:>7} {score:>7}{gpu_h}  {err}")
    if not records:
        lines.append("(no task ran in this run)")
    if usage:
        held = "unknown" if usage.gpus is None else usage.gpus
        lines.append(f"gpu-hours: {fmt(usage.gpu_hours)} ({held} GPU(s) held for "
                     f"{usage.seconds or 0:.1f} s{'' if run['finished'] else ', so far'})")
    return "\n".join(lines)


def run_summary(result: RunResult, check: bool) -> tuple[str, int]:
    """The closing text of apply/destroy (per-host table from runner stats, results, what
    --check would do, errors) and the exit code."""
    from evalprov.errors import Exit
    from evalprov.results import render as render_results

    rows = [f"{'host':<24} {'ok':>4} {'changed':>8} {'failed':>7} {'unreach':>8} "
            f"{'skipped':>8}  status"]
    for host in sorted(result.hosts):
        r = result.hosts[host]
        bad = r.failed or r.unreachable
        status = "FAILED" if bad else ("would change" if check and r.changed else
                                       "changed" if r.changed else "ok")
        rows.append(f"{host:<24} {r.ok:>4} {r.changed:>8} {r.failed:>7} {r.unreachable:>8} "
                    f"{r.skipped:>8}  {status}")
    failed = result.failed_hosts
    bad_tasks = [t for t in result.tasks if t["status"] != "succeeded"]
    if result.tasks:
        rows.append("")
        rows.append(render_results({"tasks": result.tasks}, "table"))
    for host, counts in sorted(result.proxy_requests.items()):
        each = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
        rows.append(f"proxy on {host}: {sum(counts.values())} request(s) over "
                    f"{len(counts)} instance(s): {each}")
    if check:
        decided = (result.decision or {}).get("hosts") or {}
        for host in sorted(decided):  # why, in evalprov's words (the decision)
            for reason in decided[host].get("evalprov_actions") or []:
                rows.append(f"would {reason} on {host}")
        for host in sorted(result.hosts):
            for item in result.hosts[host].would_change:
                rows.append(f"would change on {host}: {item}")
    if result.interrupted:
        rows.append("interrupted: state saved; next: `evalprov apply --rerun failed` finishes "
                    "the run")
        code = Exit.INTERRUPTED
    elif failed:
        for host in failed:
            errors = result.hosts[host].errors or ["failed"]
            rows.append(f"error: {host}: {errors[-1]}")
        code = Exit.FAILED
    elif bad_tasks:
        code = Exit.FAILED
    elif result.status != "successful":
        rows.append(f"error: ansible run ended {result.status} (rc {result.rc}); see "
                    f"{result.private_data_dir}/artifacts")
        code = Exit.FAILED
    else:
        code = Exit.OK
    rows.append(f"{len(result.hosts)} host(s) in {result.seconds:.1f}s; ansible artifacts: "
                f"{result.private_data_dir}")
    return "\n".join(rows), int(code)
