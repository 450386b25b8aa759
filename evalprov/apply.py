"""`evalprov apply` and `evalprov destroy`: plan, render, run the playbook, summarise."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalprov import apikey, slurm
from evalprov.config.envvars import resolve_env
from evalprov.config.loader import LoadedConfig
from evalprov.config.models import SlurmExecution, VllmDeployment
from evalprov.decide import (
    Decision,
    Inputs,
    attempt_id,
    decide_slurm,
    dump_inputs,
    parse_facts,
    plan_hosts,
    safe_decide,
)
from evalprov.errors import ConfigError, PlanError
from evalprov.harness import SAMPLES_DIR
from evalprov.inventory import common_vars, inventory_file, task_vars
from evalprov.ledger import Ledger, busy, locked
from evalprov.plan import HostFacts, Plan, plan
from evalprov.results import collect, write_atomic, write_summary
from evalprov.runner import Progress, RunResult, run_playbook
from evalprov.secrets import secret_specs
from evalprov.show import run_summary as summary
from evalprov.timeline import Timeline


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
    exe = loaded.config.execution
    if isinstance(exe, SlurmExecution):
        try:
            slurm.check_supported(exe, loaded.config.deployment)
        except PlanError as exc:
            raise ConfigError(*exc.lines) from exc


def deployment_env(loaded: LoadedConfig) -> dict[str, str]:
    """Secret values for the servers, read from the controller now (names in the plan; plain
    literals are in the plan itself)."""
    config = loaded.config
    specs = dict(config.env_vars)
    if isinstance(config.deployment, VllmDeployment):
        specs.update(config.deployment.env_vars)
    return resolve_env(secret_specs(specs), "deployment.env_vars")


def task_env(loaded: LoadedConfig) -> dict[str, dict[str, str]]:
    """Per task, the secret values of its env vars (top-level, then evaluation, then the
    task's own);
    every missing controller variable is an error naming it and the task, before anything
    starts."""
    config = loaded.config
    out, errors = {}, []
    for i, task in enumerate(config.evaluation.tasks):
        specs = secret_specs({**config.env_vars, **config.evaluation.env_vars, **task.env_vars})
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


def api_key_id(loaded: LoadedConfig) -> str:
    """The fingerprint of the key apply gives the deployment ("" none), for the spec hashes
    that `evalprov plan` and `inventory` print: the same as apply's. A controller variable
    that is missing leaves it out here (apply refuses to start and names it)."""
    if not apikey.keyed(loaded.config):
        return ""
    try:
        env = deployment_env(loaded)
    except ConfigError:
        env = {}
    key = apikey.deployment_key(loaded.config, owner_id(output_root(loaded)), env)
    return apikey.fingerprint(key) if key else ""


def with_api_key(loaded: LoadedConfig, owner: str, secret: dict[str, str],
                 per_task: dict[str, dict[str, str]]
                 ) -> tuple[dict[str, str], dict[str, dict[str, str]], str | None]:
    """The deployment's API key (apikey.py) added to the secrets: vLLM reads it from
    VLLM_API_KEY, every task from the variable its run config names; None: no key."""
    key = apikey.deployment_key(loaded.config, owner, secret)
    if not key:
        return secret, per_task, None
    return ({**secret, apikey.VLLM_ENV: key},
            {t.name: {**per_task.get(t.name, {}), apikey.HARNESS_ENV: key}
             for t in loaded.config.evaluation.tasks}, key)


def local_inventory(run_dir: Path) -> str:
    path = run_dir / "ansible" / "inventory" / "00-local.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "all:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
        f"      ansible_python_interpreter: {sys.executable}\n"
    )
    return str(path)


def slurm_inventory(loaded: LoadedConfig, run_dir: Path) -> str:
    """The login node (execution.hostname, as execution.username); an inventory given with
    -i may say how to reach it (ansible_host, port, key)."""
    exe = loaded.config.execution
    assert isinstance(exe, SlurmExecution)
    path = run_dir / "ansible" / "inventory" / "00-slurm.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    host = {"ansible_user": exe.username} if exe.username else {}
    path.write_text(inventory_file({"all": {"hosts": {exe.hostname: host}}}))
    return str(path)


def output_root(loaded: LoadedConfig) -> Path:
    """The controller's directory of results and the ledger (on Slurm, output_dir is the
    cluster's: the controller's is execution.local_output_dir)."""
    exe = loaded.config.execution
    where = exe.local_output_dir if isinstance(exe, SlurmExecution) else exe.output_dir
    return Path(where).expanduser().resolve()


def cached_gpu_counts(out: Path) -> dict[str, int]:
    """GPU counts from the newest facts.json of earlier runs (every apply writes one from its
    probe): the plan a destroy or a --limit run makes for hosts it does not probe."""
    counts: dict[str, int] = {}
    for facts in sorted(out.glob("*/facts.json")):
        try:
            data = json.loads(facts.read_text())
        except (OSError, ValueError):
            continue
        for host, f in data.items() if isinstance(data, dict) else ():
            count = (f.get("gpus") or {}).get("count") if isinstance(f, dict) else None
            if isinstance(count, int):
                counts[host] = count
    return counts


def previous_attempts(ledger: Ledger) -> dict[str, dict[str, Any]]:
    """The newest attempt of every (host, task, key) in the ledger, for decide."""
    rows = ledger.db.execute(
        "SELECT * FROM task_runs WHERE id IN (SELECT MAX(id) FROM task_runs "
        "GROUP BY host, task, key)").fetchall()
    return {attempt_id(r["host"], r["task"], r["key"]): dict(r) for r in rows}


def owner_id(out: Path) -> str:
    """Who this deployment is: its output_dir on this controller."""
    return hashlib.sha256(f"{socket.gethostname()}:{out}".encode()).hexdigest()[:12]


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
    """prepare -> (one ansible-playbook run: facts -> decide -> roles) -> record."""
    check_supported(loaded)
    secret = deployment_env(loaded)
    per_task = task_env(loaded) if playbook == "site.yml" else {}
    out = output_root(loaded)
    key = None
    if playbook == "site.yml":
        secret, per_task, key = with_api_key(loaded, owner_id(out), secret, per_task)
    exe = loaded.config.execution
    if isinstance(exe, SlurmExecution) and playbook == "destroy.yml" and busy(out):
        # an apply follows the job and holds the output_dir: cancel the jobs (it sees them
        # end and records how), touch nothing of the ledger
        print(f"evalprov destroy: an evalprov apply holds {out} and follows the job; it "
              "records how the job ends", file=sys.stderr)
        run_dir = out / "destroy" / new_run_id()
        run_dir.mkdir(parents=True, exist_ok=True)
        inventories = [str(Path(i).resolve()) for i in
                       [*([opts.inventory] if opts.inventory else []),
                        slurm_inventory(loaded, run_dir)]]
        return destroy_slurm(loaded, owner_id(out), (), run_dir, inventories, opts, None)
    with locked(out):
        ledger = Ledger(out)
        try:
            return _run_locked(loaded, hosts, opts, playbook, secret, per_task, out, ledger,
                               key)
        finally:
            ledger.close()


def prepare(loaded: LoadedConfig, hosts: list[HostFacts], opts: Options, playbook: str,
            out: Path, ledger: Ledger, key: str | None = None
            ) -> tuple[Inputs, Plan, Path, list[str]]:
    """Everything decide needs besides the facts, a provisional plan (for the variables that
    do not depend on facts, and to refuse a plan that cannot be made before any host is
    touched), the run directory and the inventories."""
    run_id = new_run_id()
    run_dir = out / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(loaded.config.execution, SlurmExecution):
        inventories = [*([opts.inventory] if opts.inventory else []),
                       slurm_inventory(loaded, run_dir)]
    else:
        inventories = [opts.inventory] if opts.inventory else [local_inventory(run_dir)]
    inventories = [str(Path(i).resolve()) for i in inventories]
    inputs = Inputs(
        config=loaded.config, hosts=tuple(hosts), run_id=run_id, owner=owner_id(out),
        previous=previous_attempts(ledger), rerun=opts.rerun,
        evaluate=playbook == "site.yml" and "eval" not in (opts.skip_tags or ""),
        destroy=playbook == "destroy.yml", samples_src=str(SAMPLES_DIR),
        cached_gpus=cached_gpu_counts(out),
        api_key_id=apikey.fingerprint(key) if key else "")
    if isinstance(loaded.config.execution, SlurmExecution):
        try:
            provisional = decide_slurm(inputs, {}).plan
        except PlanError as exc:
            raise ConfigError(*exc.lines) from exc
    else:
        provisional = plan(loaded.config, plan_hosts(inputs, {}), inputs.api_key_id)
    return inputs, provisional, run_dir, inventories


def slurm_vars(d: Decision, host: str) -> dict[str, Any]:
    """What the login node's probe needs before the decision: the job as it would be
    submitted (sbatch --test-only tries it), the paths to look at, the deployment's job name."""
    hv = d.host_vars[host]
    return {k: hv[k] for k in ("evalprov_slurm_sbatch_argv", "evalprov_slurm_script",
                               "evalprov_slurm_paths", "evalprov_slurm_job_name")}


def poll_budget(exe: SlurmExecution, delay: int) -> int:
    """Looks at the job before evalprov stops following it: the whole chain's walltime
    (auto-resume included) and ten minutes of queueing."""
    chain = slurm.walltime_seconds(exe.walltime) * (1 + slurm.resumes(exe))
    return (chain + 600) // delay + 1


def _run_locked(loaded, hosts, opts, playbook, secret, per_task, out, ledger, key=None):
    inputs, provisional, run_dir, inventories = prepare(loaded, hosts, opts, playbook, out,
                                                        ledger, key)
    run_id = inputs.run_id
    exe = loaded.config.execution
    on_slurm = isinstance(exe, SlurmExecution)
    if on_slurm and inputs.destroy:
        return destroy_slurm(loaded, inputs.owner, provisional, run_dir, inventories, opts,
                             ledger)
    if on_slurm:
        pre = decide_slurm(inputs, {})
        playbook = "slurm.yml"
        opts = dataclasses.replace(opts, limit=exe.hostname, forks=1)
        plan_vars = {"all": {"vars": slurm_vars(pre, exe.hostname)}}
        extravars = {"evalprov_slurm_fetch_dir": str(run_dir / "fetch"),
                     "evalprov_slurm_poll_delay": SLURM_POLL_DELAY,
                     "evalprov_slurm_poll_retries": poll_budget(exe, SLURM_POLL_DELAY)}
        if opts.check:
            print(f"evalprov apply --check: the job script evalprov would submit on "
                  f"{exe.hostname} (sbatch --test-only tries it; nothing is submitted):",
                  file=sys.stderr)
            for line in pre.host_vars[exe.hostname]["evalprov_slurm_script"].splitlines():
                print(f"  | {line}", file=sys.stderr)
    else:
        if opts.forks is None:  # every host at once (Ansible's default of 5 runs waves)
            opts = dataclasses.replace(opts, forks=max(5, min(len(provisional.hosts), 50)))
        plan_vars = {"all": {"vars": common_vars(provisional)}}
        extravars = {"evalprov_health_log_dir": str(run_dir / "logs"),
                     "evalprov_eval_fetch_dir": str(run_dir / "fetch"),
                     "evalprov_eval_samples_src": str(SAMPLES_DIR),
                     "evalprov_eval_owner": inputs.owner}
    record = not opts.check and playbook in ("site.yml", "slurm.yml")
    verb = "destroy" if inputs.destroy else "apply"
    print(f"evalprov {verb}{' --check' if opts.check else ''}: {len(provisional.hosts)} "
          f"{'cluster' if on_slurm else 'host(s)'}; probing, then deciding", file=sys.stderr)
    decided: dict[str, Decision] = {}

    def on_decision(res: dict[str, Any]) -> None:
        """The decision is made (in ansible-playbook): make the same one here, from the same
        inputs and facts, and put its attempts in the ledger before any task starts."""
        facts = {} if on_slurm else parse_facts(
            {h: (progress.facts[h], bool(local)) for h, local in (res.get("local") or {}).items()
             if h in progress.facts})
        d, _ = safe_decide(inputs, facts, progress.facts)
        if d is None:
            return
        decided["d"] = d
        if inputs.destroy:
            gone = sum(len(v.get("evalprov_vllm_remove") or ()) for v in d.host_vars.values())
            print(f"evalprov destroy: {gone} instance(s) to remove on {len(d.host_vars)} "
                  "host(s)", file=sys.stderr)
        elif on_slurm:
            print(f"evalprov {verb}: {exe.hostname}: "
                  f"{'one job' if d.to_run else 'no job'}, {len(d.to_run)} task(s) to run"
                  f"{f', {len(d.reused)} done before' if d.reused else ''}", file=sys.stderr)
        else:
            print(f"evalprov {verb}: {len(d.plan.hosts)} host(s), {len(d.plan.instances)} "
                  f"instance(s), {len(d.to_run)} task(s) to run"
                  f"{f', {len(d.reused)} done before' if d.reused else ''}; "
                  f"{sum(not a.converged for a in d.checked.hosts.values())} host(s) to "
                  "change", file=sys.stderr)
        if record:
            ledger.start_run(run_id, loaded.source, opts.rerun)
            ledger.add_attempts(run_id, [(a.host, a.task, a.key, a.instance)
                                         for a in d.to_run])

    progress = Progress(check=opts.check, diff=opts.diff, on_decision=on_decision,
                        on_task_start=lambda host, action: ledger.mark_running(run_id, host)
                        if record and "d" in decided and action.endswith(
                            ("evalprov_run_tasks", "evalprov_slurm"))
                        else None)
    timeline = Timeline(progress)  # each host's phases and the record's host facts
    with Interrupt() as interrupt:
        try:
            result = run_playbook(
                playbook, run_dir, inventories, plan_vars, extravars,
                check=opts.check, diff=opts.diff, limit=opts.limit, tags=opts.tags,
                skip_tags=opts.skip_tags, forks=opts.forks,
                secrets={"deployment_env": secret, "task_env": per_task,
                         **({"api_key": key} if key else {})} if secret or per_task else None,
                inputs=dump_inputs(inputs), progress=timeline, cancel=lambda: interrupt.hit)
        except KeyboardInterrupt:  # Ctrl-C again: stop now, but leave no run 'running'
            if record and "d" in decided:
                ledger.finish_run(run_id, "interrupted")
            raise
        result.interrupted = interrupt.hit
    d = decided.get("d")
    if result.interrupted and d is not None and not opts.check:
        if on_slurm and d.plan.task_runs:
            stop_slurm(d, inputs, run_dir, inventories, opts, exe, progress)
        elif not on_slurm and (d.plan.task_runs
                               or any(a.pull for a in d.checked.hosts.values())):
            stop_tasks(d, inputs, run_dir, inventories, opts)
    if result.facts:
        write_atomic(run_dir / "facts.json", json.dumps(result.facts, indent=2, sort_keys=True))
    if d is None:  # nothing was decided: no host reached, or a problem stopped the run
        return provisional, result, run_dir
    if inputs.destroy and not opts.check:
        for host, v in d.host_vars.items():
            if host not in result.failed_hosts:
                ledger.mark_gone(host, list(v.get("evalprov_vllm_remove") or ()))
    if record:
        record_run(loaded, d, result, run_dir, run_id, ledger, timeline,
                   job=progress.slurm if on_slurm else None)
    return d.plan, result, run_dir


SLURM_POLL_DELAY = 3


def stop_slurm(d: Decision, inputs: Inputs, run_dir: Path, inventories: list[str],
               opts: Options, exe: SlurmExecution, progress: Progress) -> None:
    """After an interrupt: cancel the run's job chain (its driver stops vLLM and the
    harness) and fetch the results of the tasks that had finished."""
    print(f"interrupted: cancelling this run's Slurm job on {exe.hostname} and fetching the "
          "results that had finished", file=sys.stderr)
    try:
        run_playbook("slurm_stop.yml", run_dir, inventories, {}, {
            "evalprov_stop_job_dir": slurm.job_dir(exe, inputs.run_id),
            "evalprov_stop_job_name": slurm.job_name(exe, inputs.owner),
            "evalprov_stop_fetch_dir": str(run_dir / "fetch")}, limit=exe.hostname, forks=1,
            progress=progress)  # its last look at the job (cancelled) is what is recorded
    except KeyboardInterrupt:
        print("interrupted again: not waiting for the job to end", file=sys.stderr)


def destroy_slurm(loaded: LoadedConfig, owner: str, provisional: Plan | tuple, run_dir: Path,
                  inventories: list[str], opts: Options, ledger: Ledger | None
                  ) -> tuple[Plan, RunResult, Path]:
    """destroy on Slurm: scancel every job of this deployment (each stops what it started).
    provisional: the plan (its instances are marked gone), or () without a ledger."""
    exe = loaded.config.execution
    assert isinstance(exe, SlurmExecution)
    name = slurm.job_name(exe, owner)
    print(f"evalprov destroy{' --check' if opts.check else ''}: cancelling the jobs named "
          f"{name} on {exe.hostname}", file=sys.stderr)
    result = run_playbook("slurm_stop.yml", run_dir, inventories, {}, {
        "evalprov_stop_job_dir": "", "evalprov_stop_job_name": name,
        "evalprov_stop_fetch_dir": str(run_dir / "fetch")},
        check=opts.check, limit=exe.hostname, forks=1)
    if ledger is None or isinstance(provisional, tuple):
        return plan(loaded.config, []), result, run_dir
    if not opts.check and exe.hostname not in result.failed_hosts:
        ledger.mark_gone(exe.hostname, [i.name for i in provisional.instances])
    return provisional, result, run_dir


def stop_tasks(d: Decision, inputs: Inputs, run_dir: Path, inventories: list[str],
               opts: Options) -> None:
    """After an interrupt: stop the image pulls, harness processes and containers this run
    started on the hosts that had them, and fetch the results of the tasks that had
    finished."""
    pulls = {h for h, a in d.checked.hosts.items() if a.pull}
    hosts = sorted({h.host for h in d.plan.hosts if h.tasks} | pulls)
    what = "pulls and tasks" if pulls else "tasks"
    print(f"interrupted: stopping this run's {what} on {len(hosts)} host(s) and fetching the "
          "results that had finished", file=sys.stderr)
    try:
        run_playbook("stop.yml", run_dir, inventories, {}, {
            "evalprov_stop_run_dir": f"{d.plan.work_dir}/runs/{inputs.run_id}",
            "evalprov_stop_run_id": inputs.run_id, "evalprov_stop_owner": inputs.owner,
            "evalprov_stop_runtime": d.plan.runtime,
            "evalprov_stop_image": d.plan.image if pulls and d.plan.runtime == "docker" else "",
            "evalprov_stop_fetch_dir": str(run_dir / "fetch")},
            limit=",".join(hosts), forks=opts.forks)
    except KeyboardInterrupt:  # Ctrl-C during the stop: leave it, the ledger stays right
        print("interrupted again: not waiting for the hosts' tasks to stop", file=sys.stderr)


def record_run(loaded: LoadedConfig, d: Decision, result: RunResult, run_dir: Path,
               run_id: str, ledger: Ledger, timeline: Timeline | None = None,
               job: dict[str, Any] | None = None) -> None:
    """What really happened, into the ledger and summary.json (job: the last look at a
    Slurm job, whose server ends with it)."""
    failed_hosts = set(result.failed_hosts)
    for inst in d.plan.instances:
        if job is not None and d.to_run:
            ledger.record_deployment(run_id, inst.host, inst.name, inst.spec_hash, inst.port,
                                     "stopped (the Slurm job ended)", gpus=len(inst.gpus))
        elif inst.host in d.checked.hosts:
            ledger.record_deployment(run_id, inst.host, inst.name, inst.spec_hash, inst.port,
                                     "failed" if inst.host in failed_hosts else "serving",
                                     gpus=len(inst.gpus))
    if d.plan.task_runs or d.reused:
        tasks = {h.host: [{**task_vars(t), "slug": t.slug} for t in h.tasks]
                 for h in d.plan.hosts if h.tasks}
        unreachable = {h for h, r in result.hosts.items() if r.unreachable}
        result.proxy_requests = proxy_requests(run_dir, tasks)
        ran = collect(run_dir, tasks, unreachable)
        if job is not None:
            slurm.explain_missing(ran, job)
        for rec in ran:
            ledger.finish_task(run_id, rec)
        result.tasks = ran + d.reused
        write_summary(run_dir, run_id, result.tasks, {
            "config": loaded.source, "served_model_name": d.plan.served_model_name,
            "hosts": sorted(h.host for h in d.plan.hosts), "seconds": round(result.seconds, 1),
            "interrupted": result.interrupted,
            **({"proxy_requests": result.proxy_requests} if result.proxy_requests else {})})
    status = ("interrupted" if result.interrupted else
              "failed" if result.failed_hosts or any(
                  t["status"] != "succeeded" for t in result.tasks) else "succeeded")
    ledger.finish_run(run_id, status)
    record_seen(loaded, d, result, run_dir, run_id, ledger, timeline)


def proxy_requests(run_dir: Path, hosts: Iterable[str]) -> dict[str, dict[str, int]]:
    """What each host's eval role brought home from its proxy: the requests each instance
    behind it answered while the tasks ran."""
    out = {}
    for host in hosts:
        path = run_dir / "fetch" / host / "proxy-requests.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out[host] = {str(k): int(v) for k, v in data.items() if isinstance(v, int)}
    return out


def record_seen(loaded: LoadedConfig, d: Decision, result: RunResult, run_dir: Path,
                run_id: str, ledger: Ledger, timeline: Timeline | None) -> None:
    """The finished run as people see it: each host's timeline, the reproducibility record
    and GPU-hours, into the ledger and summary.json."""
    from evalprov import provenance, usage
    from evalprov.results import SUMMARY, load_summary

    if timeline is not None:
        ledger.record_phases(run_id, timeline.rows())
    try:
        rec = provenance.build(loaded, d.plan, result.facts,
                               timeline.provenance if timeline else {})
    except Exception as exc:  # the results matter more than their record
        rec = {"error": f"the record could not be built: {type(exc).__name__}: {exc}"}
        print(f"warning: {rec['error']}", file=sys.stderr)
    ledger.set_record(run_id, rec)
    use = usage.gpu_hours(ledger.run(run_id), ledger.deployments_of(run_id),
                          ledger.tasks_of(run_id))
    for entry in result.tasks:  # the closing table of apply shows them too
        if not entry.get("reused_from"):
            entry["gpu_hours"] = use.task(entry["host"], entry["task"])
    if not (run_dir / SUMMARY).exists():
        return
    data = load_summary(run_dir)
    for entry in data["tasks"]:
        if not entry.get("reused_from"):
            entry["gpu_hours"] = use.task(entry["host"], entry["task"])
    data["usage"] = use.to_dict()
    data["timeline"] = [{"host": r["host"], "phase": r["phase"], "started": r["started"],
                         "finished": r["finished"], "status": r["status"]}
                        for r in ledger.phases_of(run_id)]
    data["record"] = rec
    write_atomic(run_dir / SUMMARY, json.dumps(data, indent=2, default=str))


__all__ = ["Options", "output_root", "run", "summary"]
