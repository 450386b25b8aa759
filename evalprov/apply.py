"""`evalprov apply` and `evalprov destroy`: plan, render, run the playbook, summarise."""

from __future__ import annotations

import dataclasses
import json
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalprov.config.envvars import resolve_env
from evalprov.config.loader import LoadedConfig
from evalprov.config.models import SlurmExecution, VllmDeployment
from evalprov.errors import ConfigError, Exit
from evalprov.harness import SAMPLES_DIR
from evalprov.inventory import render, task_vars
from evalprov.ledger import Ledger, locked, task_key
from evalprov.plan import HostFacts, Plan, plan
from evalprov.results import collect, write_atomic, write_summary
from evalprov.results import render as render_results
from evalprov.runner import Progress, RunResult, run_playbook


@dataclass
class Options:
    inventory: str | None
    check: bool = False
    diff: bool = False
    limit: str | None = None
    tags: str | None = None
    forks: int | None = None
    rerun: str | None = None  # None: skip done tasks; "failed": redo failed; "all": redo all
    skip_tags: str | None = None


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def check_supported(loaded: LoadedConfig) -> None:
    config = loaded.config
    if isinstance(config.execution, SlurmExecution):
        raise ConfigError(
            "execution.type: 'slurm' can be validated and planned, but apply does not run on "
            "Slurm yet; use execution baremetal (-i INVENTORY) or local"
        )


def deployment_env(loaded: LoadedConfig) -> dict[str, str]:
    """Values for the server containers, read from the controller now (names in the plan)."""
    config = loaded.config
    specs = dict(config.env_vars)
    if isinstance(config.deployment, VllmDeployment):
        specs.update(config.deployment.env_vars)
    specs = {k: v for k, v in specs.items() if v.source != "runtime"}
    return resolve_env(specs, "deployment.env_vars")


def task_env(loaded: LoadedConfig) -> dict[str, dict[str, str]]:
    """Per task, the values of its env vars (top-level, then evaluation, then the task's own);
    every missing controller variable is an error naming it and the task, before anything
    starts."""
    config = loaded.config
    out, errors = {}, []
    for i, task in enumerate(config.evaluation.tasks):
        specs = {**config.env_vars, **config.evaluation.env_vars, **task.env_vars}
        specs = {k: v for k, v in specs.items() if v.source != "runtime"}
        try:
            values = resolve_env(specs, f"evaluation.tasks.{i} ({task.name})")
        except ConfigError as exc:
            errors.extend(exc.lines)
            continue
        if values:
            out[task.name] = values
    if errors:
        raise ConfigError(*errors)
    return out


def local_inventory(run_dir: Path) -> str:
    path = run_dir / "ansible" / "inventory" / "00-local.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "all:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
        f"      ansible_python_interpreter: {sys.executable}\n"
    )
    return str(path)


def output_root(loaded: LoadedConfig) -> Path:
    return Path(loaded.config.execution.output_dir).expanduser().resolve()


def needs_facts(loaded: LoadedConfig, hosts: list[HostFacts]) -> bool:
    """instances_per_host: auto needs each host's GPU count before planning."""
    config = loaded.config
    return (isinstance(config.deployment, VllmDeployment)
            and config.execution.instances_per_host == "auto"
            and any(h.gpus is None for h in hosts))


def cached_gpu_counts(out: Path) -> dict[str, int]:
    """GPU counts from the newest facts.json of earlier runs (every apply writes one from its
    probe); preflight checks them against nvidia-smi, so a stale count fails cleanly and the
    next apply re-plans with the fresh one."""
    counts: dict[str, int] = {}
    for facts in sorted(out.glob("*/facts.json")):
        try:
            data = json.loads(facts.read_text())
        except (OSError, ValueError):
            continue
        for host, f in data.items():
            count = (f.get("gpus") or {}).get("count") if isinstance(f, dict) else None
            if isinstance(count, int):
                counts[host] = count
    return counts


def gather_gpu_counts(run_dir: Path, inventories: list[str], hosts: list[HostFacts],
                      opts: Options) -> list[HostFacts]:
    """GPU counts for planning instances_per_host: auto: cached from earlier runs, else from
    the read-only facts playbook for just the hosts without one; hosts that do not answer
    keep an unknown count (the main run reports them)."""
    cached = cached_gpu_counts(run_dir.parent)
    hosts = [HostFacts(h.name, cached.get(h.name)) if h.gpus is None else h for h in hosts]
    missing = [h.name for h in hosts if h.gpus is None]
    if not missing:
        return hosts
    print(f"gathering GPU facts from {len(missing)} host(s) (instances_per_host: auto)",
          file=sys.stderr)
    result = run_playbook("facts.yml", run_dir / "facts", inventories, {}, None,
                          limit=",".join(missing), forks=opts.forks)
    counts = {h: (f.get("gpus") or {}).get("count") for h, f in result.facts.items()}
    return [HostFacts(h.name, counts.get(h.name, h.gpus)) for h in hosts]


def select_tasks(the_plan: Plan, ledger: Ledger, rerun: str | None
                 ) -> tuple[Plan, list[tuple[str, str, str, str | None]], list[dict[str, Any]]]:
    """Which planned tasks run now. A task that succeeded before with the same key is reused
    (unless --rerun all); one that failed is reused as failed unless --rerun failed|all;
    never-finished ones run. Returns the plan with only the tasks to run, the ledger rows to
    add, and the records of the reused ones."""
    hashes = {(i.host, i.name): i.spec_hash for i in the_plan.instances}
    hosts, to_run, reused = [], [], []
    for hp in the_plan.hosts:
        keep = []
        for t in hp.tasks:
            key = task_key(task_vars(t), hashes.get((hp.host, t.instance)))
            prev = None if rerun == "all" else ledger.latest(hp.host, t.name, key)
            done = prev is not None and (prev["status"] == "succeeded" or (
                prev["status"] == "failed" and rerun is None))
            if done:
                reused.append(reused_record(prev))
                continue
            keep.append(t)
            to_run.append((hp.host, t.name, key, t.instance))
        hosts.append(dataclasses.replace(hp, tasks=tuple(keep)))
    return dataclasses.replace(the_plan, hosts=tuple(hosts)), to_run, reused


def reused_record(row) -> dict[str, Any]:
    metric, _, name = (row["metric"] or "").partition(".")
    rec = {"host": row["host"], "task": row["task"], "status": row["status"],
           "seconds": row["seconds"], "samples": row["samples"], "dir": row["result_dir"],
           "scores": [], "primary": {"metric": metric, "name": name, "score": row["score"]}
           if row["metric"] else None, "reused_from": row["run_id"], "error": row["error"]}
    if row["status"] == "failed":
        rec["error"] = (f"failed in run {row['run_id']} (attempt {row['attempt']}): "
                        f"{row['error'] or ''}; rerun it with --rerun failed")
    return rec


class Interrupt:
    """SIGINT/SIGTERM ask ansible-runner to stop; the ledger is closed consistently."""

    def __init__(self) -> None:
        self.hit = False

    def __enter__(self) -> Interrupt:
        self.saved = {sig: signal.signal(sig, self._handle)
                      for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.hit = True
        print("\ninterrupted: stopping the run, saving state (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def run(loaded: LoadedConfig, hosts: list[HostFacts], opts: Options,
        playbook: str) -> tuple[Plan, RunResult, Path]:
    check_supported(loaded)
    secret = deployment_env(loaded)
    per_task = task_env(loaded) if playbook == "site.yml" else {}
    out = output_root(loaded)
    with locked(out):
        ledger = Ledger(out)
        try:
            return _run_locked(loaded, hosts, opts, playbook, secret, per_task, out, ledger)
        finally:
            ledger.close()


def _run_locked(loaded, hosts, opts, playbook, secret, per_task, out, ledger):
    run_id = new_run_id()
    run_dir = out / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    inventories = [opts.inventory] if opts.inventory else [local_inventory(run_dir)]
    inventories = [str(Path(i).resolve()) for i in inventories]
    if playbook == "site.yml" and needs_facts(loaded, hosts):
        hosts = gather_gpu_counts(run_dir, inventories, hosts, opts)
    the_plan = plan(loaded.config, hosts)
    if opts.forks is None:  # every host at once (Ansible's default of 5 runs waves)
        opts = dataclasses.replace(opts, forks=max(5, min(len(the_plan.hosts), 50)))
    evaluating = playbook == "site.yml" and "eval" not in (opts.skip_tags or "")
    to_run: list = []
    reused: list[dict[str, Any]] = []
    if evaluating:
        the_plan, to_run, reused = select_tasks(the_plan, ledger, opts.rerun)
    print(f"evalprov {playbook.removesuffix('.yml').replace('site', 'apply')}"
          f"{' --check' if opts.check else ''}: {len(the_plan.hosts)} host(s), "
          f"{len(the_plan.instances)} instance(s), {len(to_run)} task(s) to run"
          f"{f', {len(reused)} done before' if reused else ''}", file=sys.stderr)
    record = not opts.check and playbook == "site.yml"
    if record:
        ledger.start_run(run_id, loaded.source, opts.rerun)
        ledger.add_attempts(run_id, to_run)
    progress = Progress(check=opts.check, diff=opts.diff,
                        on_task_start=lambda host, task: ledger.mark_running(run_id, host)
                        if record and task.startswith("Eval | Run") else None)
    with Interrupt() as interrupt:
        try:
            result = run_playbook(
                playbook,
                run_dir,
                inventories,
                render(the_plan),
                {"evalprov_health_log_dir": str(run_dir / "logs"), "evalprov_eval_run_id": run_id,
                 "evalprov_eval_fetch_dir": str(run_dir / "fetch"),
                 "evalprov_eval_samples_src": str(SAMPLES_DIR)},
                check=opts.check,
                diff=opts.diff,
                limit=opts.limit,
                tags=opts.tags,
                skip_tags=opts.skip_tags,
                forks=opts.forks,
                secrets={"deployment_env": secret, "task_env": per_task} if secret or per_task
                else None,
                progress=progress,
                cancel=lambda: interrupt.hit,
            )
        except KeyboardInterrupt:  # Ctrl-C again: stop now, but leave no run 'running'
            if record:
                ledger.finish_run(run_id, "interrupted")
            raise
        result.interrupted = interrupt.hit
    if result.facts:
        write_atomic(run_dir / "facts.json", json.dumps(result.facts, indent=2, sort_keys=True))
    if record:
        failed_hosts = set(result.failed_hosts)
        for inst in the_plan.instances:
            ledger.record_deployment(run_id, inst.host, inst.name, inst.spec_hash, inst.port,
                                     "failed" if inst.host in failed_hosts else "serving")
    if record and (the_plan.task_runs or reused):
        tasks = {h.host: [task_vars(t) for t in h.tasks] for h in the_plan.hosts if h.tasks}
        unreachable = {h for h, r in result.hosts.items() if r.unreachable}
        ran = collect(run_dir, tasks, unreachable)
        for rec in ran:
            ledger.finish_task(run_id, rec)
        result.tasks = ran + reused
        write_summary(run_dir, run_id, result.tasks, {
            "config": loaded.source, "served_model_name": the_plan.served_model_name,
            "hosts": sorted(h.host for h in the_plan.hosts), "seconds": round(result.seconds, 1),
            "interrupted": result.interrupted})
    if record:
        status = ("interrupted" if result.interrupted else
                  "failed" if result.failed_hosts or any(
                      t["status"] != "succeeded" for t in result.tasks) else "succeeded")
        ledger.finish_run(run_id, status)
    return the_plan, result, run_dir


def summary(result: RunResult, check: bool) -> tuple[str, int]:
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
    if check:
        for host in sorted(result.hosts):
            for item in result.hosts[host].would_change:
                rows.append(f"would change on {host}: {item}")
    if failed:
        for host in failed:
            errors = result.hosts[host].errors or ["failed"]
            rows.append(f"error: {host}: {errors[-1]}")
        code = Exit.FAILED
    elif result.interrupted:
        rows.append("interrupted: state saved; `evalprov apply --rerun failed` finishes the run")
        code = Exit.INTERRUPTED
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
