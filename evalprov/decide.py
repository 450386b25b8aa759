"""decide(inputs, facts): the one place where an apply's actions are decided, in-process and
pure. It runs inside the single ansible-playbook run of `evalprov apply` (the controller-side
action plugin evalprov.fleet.evalprov_decide calls it between the probe and the roles) and
again in evalprov itself on the same inputs and facts, so both see the same Decision.

    inputs (config, hosts, ledger snapshot, run id)  +  raw facts of each probed host
      -> plan (GPU counts from the facts for instances_per_host: auto)
      -> tasks to run now (the ledger: finished ones are reused)
      -> check: problems, and per host the actions
      -> the variables each role gets (no arithmetic, naming or policy left for Ansible)
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from typing import Any

from evalprov.check import Checked, HostActions, HostFacts, check, pull_policy
from evalprov.config.models import Config, SlurmExecution
from evalprov.errors import PlanError
from evalprov.harness import HARNESS_ENV
from evalprov.inventory import follow_vars, instance_vars, proxy_vars, task_vars
from evalprov.plan import HostFacts as PlanHost
from evalprov.plan import Plan, TaskRun, plan, slug

# Where a task's directory is mounted in its harness container.
CONTAINER_WORK = "/work"


@dataclass(frozen=True)
class Inputs:
    """Everything decide needs besides the facts; evalprov builds it before the run."""

    config: Config
    hosts: tuple[PlanHost, ...]  # inventory hosts, GPU counts as the inventory/cache know them
    run_id: str
    owner: str  # who this deployment is (labels its harness containers)
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)  # ledger, by attempt_id
    rerun: str | None = None  # None | "failed" | "all"
    evaluate: bool = True  # false: --skip-tags eval, or destroy
    destroy: bool = False
    samples_src: str = ""  # the controller's sample data (shipped to remote hosts)
    cached_gpus: dict[str, int] = field(default_factory=dict)  # earlier runs' facts
    api_key_id: str = ""  # the fingerprint of the deployment's API key ("" none; apikey.py)


@dataclass(frozen=True)
class Attempt:
    host: str
    task: str
    key: str
    instance: str | None


@dataclass
class Decision:
    plan: Plan
    checked: Checked
    to_run: list[Attempt]
    reused: list[dict[str, Any]]
    host_vars: dict[str, dict[str, Any]]

    @property
    def problems(self) -> tuple[str, ...]:
        return self.checked.problems


def attempt_id(host: str, task: str, key: str) -> str:
    return f"{host}\x00{task}\x00{key}"


def task_key(run: TaskRun, instance_hash: str | None) -> str:
    from evalprov.ledger import task_key as ledger_key

    return ledger_key(task_vars(run), instance_hash)


def plan_hosts(inputs: Inputs, facts: dict[str, HostFacts]) -> list[PlanHost]:
    """GPU counts: the inventory's (checked against the probe), else the probe's, else an
    earlier run's."""
    out = []
    for h in inputs.hosts:
        count = h.gpus
        if count is None and h.name in facts:
            count = facts[h.name].gpu_count
        if count is None:
            count = inputs.cached_gpus.get(h.name)
        out.append(dataclasses.replace(h, gpus=count))
    return out


def select_tasks(the_plan: Plan, previous: dict[str, dict[str, Any]], rerun: str | None
                 ) -> tuple[Plan, list[Attempt], list[dict[str, Any]]]:
    """Which planned tasks run now. A task that succeeded before with the same key is reused
    (unless --rerun all); one that failed is reused as failed unless --rerun failed|all;
    never-finished ones run."""
    hashes = {(i.host, i.name): i.spec_hash for i in the_plan.instances}
    hashes.update({(h.host, h.proxy.name): h.proxy.spec_hash
                   for h in the_plan.hosts if h.proxy})
    hosts, to_run, reused = [], [], []
    for hp in the_plan.hosts:
        keep = []
        for t in hp.tasks:
            key = task_key(t, hashes.get((hp.host, t.instance)))
            prev = None if rerun == "all" else previous.get(attempt_id(hp.host, t.name, key))
            done = prev is not None and (prev["status"] == "succeeded" or (
                prev["status"] == "failed" and rerun is None))
            if done:
                reused.append(reused_record(prev))
                continue
            keep.append(t)
            to_run.append(Attempt(hp.host, t.name, key, t.instance))
        hosts.append(dataclasses.replace(hp, tasks=tuple(keep)))
    return dataclasses.replace(the_plan, hosts=tuple(hosts)), to_run, reused


def reused_record(row: dict[str, Any]) -> dict[str, Any]:
    """The summary entry of a task done in an earlier run (records.TaskRecord.reused)."""
    from evalprov.records import TaskRecord

    return TaskRecord.reused(row).to_dict()


def adapter_host(index: int) -> str:
    """A loopback address of its own for each task's run_eval adapter proxy (ADAPTER_HOST).
    run_eval picks the adapter's port by binding, closing and binding again later, so two
    tasks started together can pick the same port on one address; on distinct addresses of
    127.0.0.0/8 they cannot collide."""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


def task_action(p: Plan, t: TaskRun, index: int, inputs: Inputs, f: HostFacts | None,
                run_dir: str | None = None, samples_dir: str | None = None) -> dict[str, Any]:
    """Everything the eval module needs to run one task: its directory on the host, the
    container's name and labels, the adapter address, the output dir inside the run config,
    the environment (non-secret; secrets arrive by name), and the command. A Slurm job
    gives its own run and samples directories (on the cluster's shared filesystem)."""
    name = slug(t.name)
    host_dir = f"{run_dir or f'{p.work_dir}/runs/{inputs.run_id}'}/{name}"
    docker = p.runtime == "docker"
    run_config = dict(t.run_config)
    run_config["config"] = {**(run_config.get("config") or {}),
                            "output_dir": f"{CONTAINER_WORK}/results" if docker
                            else f"{host_dir}/results"}
    env = {**dict(t.env), **HARNESS_ENV, "ADAPTER_HOST": adapter_host(index)}
    samples = ""
    if p.sample_data:
        samples = samples_dir or (inputs.samples_src if f is not None and f.local
                                  else f"{p.work_dir}/samples")
    if docker:
        argv = ["nemo-evaluator", "run_eval", "--run_config",
                f"{CONTAINER_WORK}/run_config.yml"]
    else:
        argv = [f"{p.harness_venv}/bin/nemo-evaluator", "run_eval", "--run_config",
                f"{host_dir}/run_config.yml"]
        env.update({"VIRTUAL_ENV": p.harness_venv,
                    "NLTK_DATA": f"{samples or host_dir}/nltk_data"})
    return {
        **task_vars(t),
        "slug": name,
        "dir": host_dir,
        "run_config": run_config,
        "container_name": f"evalprov-eval-{name}-{inputs.run_id}"[:120],
        "labels": {"evalprov.managed": "eval", "evalprov.owner": inputs.owner,
                   "evalprov.run": inputs.run_id},
        "env": env,
        "path_prepend": "" if docker else f"{p.harness_venv}/bin",
        "cwd": host_dir if docker or not samples else samples,
        "argv": argv,
        # the servers the task calls, watched while it runs (when all of them stop serving,
        # its tasks end at once, named as the cause); none for an endpoint not ours
        "health_urls": health_urls(p, t),
    }


def health_urls(p: Plan, t: TaskRun) -> list[str]:
    """The health checks of the servers behind a task's endpoint: its instance's, or each
    instance's behind the host's proxy (asked directly: through the proxy, the checks would
    count as requests the instances answered)."""
    from urllib.parse import urlsplit

    if t.instance is None:
        return []
    hp = p.host(t.host)
    if hp.proxy is not None and t.instance == hp.proxy.name:
        return [f"{i.base_url}{p.health_path}" for i in hp.instances if i.serves]
    parts = urlsplit(t.url)
    return [f"{parts.scheme}://{parts.netloc}{p.health_path}"]


def provenance_spec(p: Plan, hp: Any) -> dict[str, Any]:
    """What the eval module reads on a host for the run's reproducibility record: each
    instance's /version and image, the images' digests, the model's content hash (a
    checkpoint) or HF revision, the harness versions (the task images or the venv)."""
    if not hp.tasks:
        return {}
    docker = p.runtime == "docker"
    model: dict[str, Any] = {}
    if hp.instances:
        inst = hp.instances[0]
        cache = dict(inst.env).get("HF_HOME") or next(
            (m.source for m in inst.mounts if not m.read_only), "")
        model = {"kind": inst.model.kind, "ref": inst.model.ref,
                 "hf_cache": cache or f"{p.work_dir}/hf-cache"}
    return {
        "runtime": p.runtime,
        # the instances on the node the tasks run on (Slurm: the batch node's)
        "instances": [{"name": i.name, "port": i.port} for i in hp.instances if not i.node],
        "images": [p.image] if docker and p.image and hp.instances else [],
        "model": model,
        "hash_cache": f"{p.work_dir}/checkpoint-hashes.json",
        "harness_venv": "" if docker else p.harness_venv,
        "harness_images": sorted({t.container for t in hp.tasks}) if docker else [],
    }


def role_vars(p: Plan, a: HostActions, inputs: Inputs, f: HostFacts) -> dict[str, Any]:
    """The per-host variables of the serve play's roles: actions only."""
    hp = p.host(a.host)
    ship = p.sample_data and bool(hp.tasks) and not f.local
    return {
        "evalprov_state": "converged" if a.converged else "pending",
        "evalprov_actions": list(a.reasons),
        "evalprov_image_pull": a.pull,
        "evalprov_vllm_start": [instance_vars(i) for i in a.start],
        "evalprov_vllm_remove": list(a.remove),
        "evalprov_vllm_group_stop": list(a.group_stop),
        "evalprov_vllm_install": a.install_vllm,
        "evalprov_vllm_proxy_start": proxy_start(a, p, f),
        "evalprov_vllm_proxy_remove": a.proxy_remove,
        "evalprov_health_wait": [wait_vars(i) for i in a.wait],
        "evalprov_health_group": group_wait(p, a, inputs.run_id),
        "evalprov_health_proxy": {
            "name": a.proxy_wait.name, "stats_port": a.proxy_wait.stats_port,
            "servers": [n for n, _ in a.proxy_wait.servers]} if a.proxy_wait else {},
        "evalprov_eval_install": a.install_harness,
        "evalprov_eval_ship_samples": ship,
        "evalprov_eval_run_dir": f"{p.work_dir}/runs/{inputs.run_id}",
        "evalprov_eval_tasks": [task_action(p, t, k, inputs, f) for k, t in enumerate(hp.tasks)],
        "evalprov_eval_provenance": provenance_spec(p, hp),
        "evalprov_eval_proxy_stats_port": hp.proxy.stats_port if hp.proxy and hp.tasks else 0,
        **follow_vars(p, len(hp.tasks)),
    }


def wait_vars(inst: Any) -> dict[str, Any]:
    """An instance the health role waits for: a single instance or a group's head until it
    serves; a group's worker while its process runs, until its head serves."""
    out = {"name": inst.name, "port": inst.port}
    if inst.role != "single":
        out.update(role=inst.role, group=inst.group, rank=inst.rank, head=inst.nodes[0])
    return out


def group_wait(p: Plan, a: HostActions, run_id: str) -> dict[str, Any]:
    """How the members of a node group this host waits in tell one another: the head,
    once it serves, marks the group ready on each worker; a member that fails marks the
    group failed on every other member, whose wait then ends at once. Marks are files in
    each member's state directory named after the group, holding this run's id."""
    inst = next((i for i in a.wait if i.group), None)
    if inst is None:
        return {}
    (g,) = [g for g in p.groups if g.name == inst.group]
    return {"name": g.name, "run": run_id, "role": inst.role, "rank": inst.rank,
            "head": g.head, "workers": list(g.hosts[1:]),
            "others": [h for h in g.hosts if h != a.host]}


def proxy_start(a: HostActions, p: Plan, f: HostFacts) -> dict[str, Any]:
    """The proxy to (re)start, as the vllm role runs it: the host's own haproxy program."""
    if a.proxy_start is None:
        return {}
    out = proxy_vars(a.proxy_start, f"{p.work_dir}/vllm")
    out["argv"] = [f.haproxy or "haproxy", *out["argv"][1:]]
    return out


def destroy_vars(f: HostFacts) -> dict[str, Any]:
    proxy = [f.proxy.name] if f.proxy else []
    return {"evalprov_state": "pending" if f.units or proxy else "converged",
            "evalprov_actions": [f"remove {n}" for n in sorted(f.units) + proxy],
            "evalprov_vllm_remove": sorted(f.units),
            "evalprov_vllm_proxy_remove": bool(proxy)}


def plan_or_every_problem(inputs: Inputs, facts: dict[str, HostFacts]) -> Plan:
    """The plan; when it cannot be made for some hosts (e.g. too few GPUs for one
    instance), a PlanError with those hosts' lines AND every problem the check finds on
    every probed host (those hosts planned as if their GPU count were unknown), so one run
    names everything to fix."""
    hosts = plan_hosts(inputs, facts)
    try:
        return plan(inputs.config, hosts, inputs.api_key_id)
    except PlanError as exc:
        if not exc.hosts:
            raise
        failed = frozenset(exc.hosts)
        try:
            rest = plan(inputs.config, [dataclasses.replace(h, gpus=None) if h.name in failed
                                        else h for h in hosts], inputs.api_key_id)
        except PlanError:
            raise exc from None
        if inputs.evaluate:
            rest = select_tasks(rest, inputs.previous, inputs.rerun)[0]
        else:
            rest = dataclasses.replace(rest, hosts=tuple(
                dataclasses.replace(h, tasks=()) for h in rest.hosts))
        raise PlanError(*exc.lines, *check(rest, facts, fitted=failed).problems,
                        hosts=exc.hosts) from None


def decide(inputs: Inputs, facts: dict[str, HostFacts]) -> Decision:
    """Raises PlanError when the plan cannot be made (e.g. a host too small for one
    instance), with every other problem of every host; problems found by the check are in
    Decision.problems."""
    if inputs.destroy:
        the_plan = plan(inputs.config, plan_hosts(inputs, facts), inputs.api_key_id)
    else:
        the_plan = plan_or_every_problem(inputs, facts)
    if inputs.destroy:
        empty = Checked((), {})
        return Decision(the_plan, empty, [], [], {h: destroy_vars(f) for h, f in facts.items()})
    if not inputs.evaluate:
        the_plan = dataclasses.replace(the_plan, hosts=tuple(
            dataclasses.replace(h, tasks=()) for h in the_plan.hosts))
        to_run, reused = [], []
    else:
        the_plan, to_run, reused = select_tasks(the_plan, inputs.previous, inputs.rerun)
    checked = check(the_plan, facts)
    host_vars = {h: role_vars(the_plan, a, inputs, facts[h]) for h, a in checked.hosts.items()}
    return Decision(the_plan, checked, to_run, reused, host_vars)


def decide_slurm(inputs: Inputs, raw: dict[str, dict[str, Any]]) -> Decision:
    """Slurm: the plan's one host is the cluster (reached through its login node); the
    action is one job that serves once and runs every task still to run. ``raw``: the login
    node's probe (empty before the run: the job the probe tests)."""
    from evalprov import slurm

    exe = inputs.config.execution
    assert isinstance(exe, SlurmExecution)
    slurm.check_supported(exe, inputs.config.deployment)
    the_plan = plan(inputs.config, [])
    host = the_plan.hosts[0].host
    directory = slurm.job_dir(exe, inputs.run_id)
    if inputs.destroy or not inputs.evaluate:
        the_plan = dataclasses.replace(the_plan, hosts=tuple(
            dataclasses.replace(h, tasks=()) for h in the_plan.hosts))
        to_run, reused = [], []
    else:
        the_plan, to_run, reused = select_tasks(the_plan, inputs.previous, inputs.rerun)
    tasks = [task_action(the_plan, t, k, inputs, None, run_dir=f"{directory}/tasks",
                         samples_dir=f"{directory}/samples")
             for k, t in enumerate(the_plan.hosts[0].tasks)]
    facts = provenance_spec(the_plan, the_plan.hosts[0])
    if facts:  # the job's user writes beside its results, not in the hosts' work_dir
        facts["hash_cache"] = f"{exe.output_dir}/checkpoint-hashes.json"
    job = slurm.make_job(the_plan, exe, inputs, tasks, facts)
    paths = slurm.paths_to_check(the_plan, exe)
    problems = []
    if host in raw and not inputs.destroy:
        problems = slurm.check_facts(host, exe, job, raw[host], paths)
    state = "pending" if tasks or inputs.destroy else "converged"
    host_vars = {host: {**slurm.job_vars(job, state, inputs.samples_src,
                                         the_plan.sample_data and bool(tasks)),
                        "evalprov_slurm_job_name": job.name,
                        "evalprov_slurm_paths": paths}}
    return Decision(the_plan, slurm.empty_checked(problems), to_run, reused, host_vars)


def safe_decide(inputs: Inputs, facts: dict[str, HostFacts],
                raw: dict[str, dict[str, Any]] | None = None
                ) -> tuple[Decision | None, list[str]]:
    """decide, with a plan that cannot be made turned into problems (raw: the probe's own
    results, what a Slurm decision reads)."""
    try:
        if isinstance(inputs.config.execution, SlurmExecution):
            d = decide_slurm(inputs, raw or {})
        else:
            d = decide(inputs, facts)
    except PlanError as exc:
        return None, list(exc.lines)
    return d, list(d.problems)


__all__ = ["Decision", "HostFacts", "Inputs", "decide", "pull_policy", "safe_decide"]


# ----------------------------------------------------------------------------- the channel


def dump_inputs(inputs: Inputs) -> bytes:
    """Inputs for the action plugin; they travel in evalprov's in-memory file (never a
    file on disk) to the ansible-playbook it starts, the same program on the same host."""
    return pickle.dumps(inputs)


def load_inputs(path: str) -> Inputs:
    with open(path, "rb") as f:
        inputs = pickle.loads(f.read())  # noqa: S301 - our own process wrote it, in memory
    if not isinstance(inputs, Inputs):
        raise TypeError(f"{path}: not evalprov decide inputs")
    return inputs


def parse_facts(probed: dict[str, tuple[dict[str, Any], bool]]) -> dict[str, HostFacts]:
    return {h: HostFacts.from_probe(res, local) for h, (res, local) in probed.items()}


def decide_in_ansible(path: str, probed: dict[str, tuple[dict[str, Any], bool]]
                      ) -> dict[str, Any]:
    """What evalprov_decide returns: each host's variables, or failed with every problem."""
    inputs = load_inputs(path)
    slurm = isinstance(inputs.config.execution, SlurmExecution)
    d, problems = safe_decide(inputs, {} if slurm else parse_facts(probed),
                              {h: res for h, (res, _) in probed.items()})
    out: dict[str, Any] = {"evalprov_decision": True, "hosts": d.host_vars if d else {},
                           "problems": problems,
                           "local": {h: local for h, (_, local) in probed.items()}}
    if problems:
        out.update(failed=True, msg="; ".join(problems))
    return out
