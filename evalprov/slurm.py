"""Slurm execution: the job evalprov submits and the decision around it. Pure, no I/O.

ONE job per config serves the model once and runs every task against it (NEL submits a job
per task, so it loads the model once per task). The job script is rendered from a Jinja2
template in which every value is a shell word by construction (the environment's finalize
quotes each expression and refuses control characters); what the job does is in its
job.json, read by the driver (evalprov.fleet's module_utils/evalprov_job.py) on the node.

    the plan (one "host": the cluster)  ->  the tasks to run now (the ledger)
      -> job directory, sbatch options, script, job.json      (also what --check shows)
      -> the login node's facts (sbatch --test-only, paths)   -> problems, or the job
"""

from __future__ import annotations

import importlib.resources
import re
import shlex
from dataclasses import dataclass
from typing import Any

import jinja2

from evalprov import __version__
from evalprov.check import Checked
from evalprov.config.models import SlurmExecution
from evalprov.errors import PlanError
from evalprov.inventory import instance_vars

TEMPLATE = "job.sbatch.j2"
DRIVER = "ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_job"
# sbatch options evalprov sets itself: a flag in execution.sbatch_extra_flags may not
MANAGED_FLAGS = frozenset({"job-name", "account", "partition", "nodes", "ntasks-per-node",
                           "gres", "time", "output", "error", "no-requeue", "requeue",
                           "parsable", "test-only", "wrap", "dependency", "comment", "chdir",
                           "export", "signal"})
FLAG = re.compile(r"[a-z][a-z0-9-]{0,40}")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_RESUMES = 50


def walltime_seconds(text: str) -> int:
    """Slurm's [D-]HH:MM:SS (and MM:SS, MM) as seconds."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return (int(days) if days else 0) * 86400 + h * 3600 + m * 60 + s


def job_dir(exe: SlurmExecution, run_id: str) -> str:
    """Where the run lives on the cluster (NEL: execution.output_dir is a cluster path)."""
    return f"{exe.output_dir.rstrip('/')}/{run_id}"


def job_name(exe: SlurmExecution, owner: str) -> str:
    return f"{exe.subproject}.evalprov-{owner}"


def resumes(exe: SlurmExecution) -> int:
    """Auto-resume: how many more jobs may continue a run whose walltime ran out (NEL's
    chain, capped by max_walltime)."""
    if not exe.max_walltime:
        return 0
    per = walltime_seconds(exe.walltime)
    return max(0, min(MAX_RESUMES, walltime_seconds(exe.max_walltime) // max(per, 1) - 1))


def signal_lead(exe: SlurmExecution) -> int:
    """Seconds before the time limit that Slurm warns the job (it checks limits about every
    30 s): a quarter of the walltime, at most two minutes."""
    return max(10, min(120, walltime_seconds(exe.walltime) // 4))


def sbatch_options(exe: SlurmExecution, directory: str, name: str, device: str) -> list[str]:
    opts = [f"--job-name={name}", f"--account={exe.account}", f"--partition={exe.partition}",
            f"--nodes={exe.num_nodes}", f"--ntasks-per-node={exe.ntasks_per_node}",
            f"--time={exe.walltime}", f"--output={directory}/slurm-%j.out", "--no-requeue",
            # the driver's warning that the time limit is near: it stops what it started
            # and leaves the rest to the auto-resume successor
            f"--signal=B:USR1@{signal_lead(exe)}"]
    if device == "gpu" and exe.gpus_per_node:
        opts.append(f"--gres={exe.gres}")
    if exe.sbatch_comment:
        opts.append(f"--comment={exe.sbatch_comment}")
    for key, value in sorted(exe.sbatch_extra_flags.items()):
        flag = str(key).replace("_", "-")
        where = f"execution.sbatch_extra_flags.{key}"
        if not FLAG.fullmatch(flag):
            raise PlanError(f"{where}: {str(key)!r} is not an sbatch option name; use its long "
                            "name without dashes, e.g. exclusive or mem")
        if flag in MANAGED_FLAGS:
            raise PlanError(f"{where}: evalprov sets --{flag} itself; remove it (use the "
                            "execution field of that name where there is one)")
        if value is False or value is None:
            continue
        if isinstance(value, (dict, list)):
            raise PlanError(f"{where}: {value!r} is not a value of an option; give a string, "
                            "a number or true")
        opts.append(f"--{flag}" if value is True else f"--{flag}={value}")
    for opt in opts:
        if CONTROL.search(opt):
            raise PlanError(f"execution: the sbatch option {opt!r} contains a control "
                            "character; remove it")
    return opts


def shell_word(value: Any) -> str:
    """finalize of the script template: every value becomes one quoted shell word."""
    text = str(value)
    if CONTROL.search(text):
        raise PlanError(f"execution: {text!r} cannot go into a job script (it contains a "
                        "control character); remove it")
    return shlex.quote(text)


def render_script(context: dict[str, Any]) -> str:
    source = (importlib.resources.files("evalprov") / "data" / "slurm" / TEMPLATE).read_text()
    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined,  # noqa: S701 - shell, not HTML
                             finalize=shell_word, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(**context)


@dataclass(frozen=True)
class Job:
    """What evalprov submits: the job directory on the cluster, sbatch's argv (without the
    script), the script and the driver's job.json."""

    dir: str
    name: str
    sbatch_argv: tuple[str, ...]
    script: str
    spec: dict[str, Any]

    @property
    def lib(self) -> str:
        return f"{self.dir}/lib"


def make_job(p, exe: SlurmExecution, inputs, tasks: list[dict[str, Any]],
             facts: dict[str, Any] | None = None) -> Job:
    """p: the plan (its one host is the cluster), tasks: the task actions to run now,
    facts: what the driver reads on its node for the reproducibility record
    (decide.provenance_spec)."""
    directory = job_dir(exe, inputs.run_id)
    name = job_name(exe, inputs.owner)
    argv = ("sbatch", "--parsable", *sbatch_options(exe, directory, name, p.device))
    spec = {
        "runtime": p.runtime, "device": p.device, "vllm_venv": p.vllm_venv,
        "health_path": p.health_path, "served_model_name": p.served_model_name,
        "health_timeout": min(p.health_timeout, walltime_seconds(exe.walltime)),
        "task_timeout": walltime_seconds(exe.max_walltime or exe.walltime),
        "concurrency": p.eval_concurrency,
        "nodes": exe.num_nodes,
        "instances": job_instances(p, exe, inputs.config.deployment),
        "proxy": job_proxy(p),
        "tasks": tasks, "sbatch_argv": list(argv), "resumes_left": resumes(exe),
        "walltime": walltime_seconds(exe.walltime), "signal_lead": signal_lead(exe),
        "provenance": facts or {},
    }
    script = render_script({
        "options": argv[2:], "job_dir": directory, "lib": f"{directory}/lib",
        "driver": DRIVER, "python": "python3", "version": __version__,
        "served": p.served_model_name or "(deployment none)", "n_tasks": len(tasks),
    })
    return Job(directory, name, argv, script, spec)


def paths_to_check(p, exe: SlurmExecution) -> dict[str, str]:
    """What must exist on the cluster before anything is submitted, by the field naming it."""
    out = {}
    for inst in p.instances[:1]:
        if inst.model.kind == "checkpoint":
            out["deployment.checkpoint_path"] = inst.model.ref
    if p.runtime == "process":  # each program, and the python its venv runs it with
        if p.instances:
            out["execution.vllm_venv"] = f"{p.vllm_venv}/bin/vllm"
            out["execution.vllm_venv (its python)"] = f"{p.vllm_venv}/bin/python"
        if any(h.tasks for h in p.hosts):
            out["execution.harness_venv"] = f"{p.harness_venv}/bin/nemo-evaluator"
            out["execution.harness_venv (its python)"] = f"{p.harness_venv}/bin/python"
    return out


def check_facts(host: str, exe: SlurmExecution, job: Job, facts: dict[str, Any],
                paths: dict[str, str]) -> list[str]:
    """The login node's raw facts against the job: every problem, one line each."""
    problems = []
    if not facts.get("sbatch"):
        return [f"host {host}: sbatch is not on the login node's PATH; give "
                "execution.hostname of a Slurm login node"]
    test = facts.get("test_only") or {}
    if not test.get("ok"):
        problems.append(
            f"host {host}: sbatch --test-only refused the job (account {exe.account!r}, "
            f"partition {exe.partition!r}, gres {exe.gres!r}, walltime {exe.walltime}): "
            f"{test.get('message') or 'no answer'}; fix the execution field it names")
    seen = facts.get("paths") or {}
    for what, path in paths.items():
        if not (seen.get(what) or {}).get("exists"):
            fix = {"deployment.checkpoint_path": "give a directory the compute nodes can read",
                   "execution.vllm_venv": "install vLLM into that venv on the cluster's "
                   "shared filesystem, or use runtime: docker",
                   "execution.harness_venv": "install nemo-evaluator with nvidia-lm-eval and "
                   "nvidia-simple-evals there, or use runtime: docker"}[what.split(" ")[0]]
            problems.append(f"host {host}: {what}: {path} does not exist on the cluster; {fix}")
    live = [j for j in facts.get("jobs") or [] if j.get("state") in ("PENDING", "RUNNING",
                                                                      "CONFIGURING")]
    if live:
        ids = ", ".join(f"{j['id']} {j['state']}" for j in live)
        problems.append(f"host {host}: a job of this deployment ({job.name}) is still queued "
                        f"or running ({ids}); wait for it, or `evalprov destroy` cancels it")
    return problems


def check_supported(exe: SlurmExecution, dep: Any = None) -> None:
    """What a Slurm job can serve: num_instances instances of num_nodes / num_instances
    nodes each (NEL's topology), an instance over several of them as vLLM's multi-node data
    parallel (whole data-parallel ranks per node) or pipeline parallel; several instances
    behind the proxy on the batch node."""
    from evalprov.plan import slurm_nodes_per_instance

    per = slurm_nodes_per_instance(exe)
    if per > 1:
        group_shape(exe, dep, per)


def group_shape(exe: SlurmExecution, dep: Any, n: int | None = None) -> tuple[str, int, int]:
    """An instance over n nodes (default num_nodes): (mode, data-parallel ranks per node,
    GPUs per node the job uses).
    Whole data-parallel ranks per node when they fit a node ("data-parallel"); else one
    rank over the nodes, TP inside a node and PP across them ("pipeline-parallel", vLLM's
    multi-node multiprocessing); PlanError naming the fields when neither does."""
    from evalprov.config.models import VllmDeployment

    n = n or exe.num_nodes
    where = f"execution.num_nodes: {exe.num_nodes}" + (
        f" over num_instances {exe.num_instances} ({n} nodes each)" if n != exe.num_nodes else "")
    if exe.instances_per_host != 1:
        raise PlanError(f"{where} with execution.instances_per_host "
                        f"{exe.instances_per_host}: an instance over several nodes is the "
                        "only one on them; remove instances_per_host")
    if not isinstance(dep, VllmDeployment):
        raise PlanError(f"{where} — only a vLLM deployment is served over several nodes; use "
                        "num_nodes: 1")
    tp, pp, dp = dep.tensor_parallel_size, dep.pipeline_parallel_size, dep.data_parallel_size
    gpus = exe.gpus_per_node
    if dp == 1 and pp % n == 0 and (gpus is None or tp * pp // n <= gpus):
        return "pipeline-parallel", 0, tp * pp // n
    if dp % n:
        raise PlanError(f"{where} with deployment.data_parallel_size {dp} x "
                        f"pipeline_parallel_size {pp}: evalprov spreads a deployment over "
                        "Slurm nodes as whole data-parallel ranks per node, or as pipeline "
                        "stages across nodes (data_parallel_size 1); make data_parallel_size "
                        "or pipeline_parallel_size a multiple of num_nodes"
                        + (f" / num_instances ({n})" if n != exe.num_nodes else ""))
    local = dp // n
    if gpus is not None and local * tp * pp > gpus:
        raise PlanError(f"{where}: each node runs {local} data-parallel rank(s) of tensor x "
                        f"pipeline parallel {tp}x{pp} = {local * tp * pp} GPUs but has {gpus} "
                        "(execution.gres); raise num_nodes or lower the parallel sizes")
    return "data-parallel", local, local * tp * pp


def group_spec(exe: SlurmExecution, dep: Any, inst: Any) -> dict[str, Any] | None:
    """An instance's part of the job over its num_nodes / num_instances nodes (None for one
    node): its head serves the API; each other node runs `vllm serve --headless`, started
    by the job with srun: data parallel, with its own ranks; pipeline parallel, with its
    --node-rank of the one world. Worker "node"s count from the instance's head node. The
    head's address is known only on the node: the driver puts it at argv[address_at]."""
    from evalprov.plan import DP_RPC_PORT, MASTER_PORT, slurm_nodes_per_instance, vllm_argv

    n = slurm_nodes_per_instance(exe)
    if n <= 1:
        return None
    mode, local, used = group_shape(exe, dep, n)
    if mode == "data-parallel":
        port, what = DP_RPC_PORT, "data-parallel rpc port"
        tail = ["--data-parallel-address", "", "--data-parallel-rpc-port", str(port)]
        head = [*inst.argv, "--data-parallel-size-local", str(local), *tail]
    else:
        port, what = MASTER_PORT, "torch.distributed master port"
        tail = ["--master-addr", "", "--master-port", str(port)]
        head = [*inst.argv, "--nnodes", str(n), "--node-rank", "0", *tail]
    if port == dep.port:
        raise PlanError(f"deployment.port: {port} is the {what} of the job's head node; pick "
                        "another deployment.port")
    workers = []
    for node in range(1, n):
        if mode == "data-parallel":
            argv = [*vllm_argv(dep, inst.model, None), "--headless",
                    "--data-parallel-size-local", str(local), "--data-parallel-start-rank",
                    str(node * local), *tail]
            part = f"data-parallel ranks from {node * local}"
        else:
            argv = [*vllm_argv(dep, inst.model, None), "--headless", "--nnodes", str(n),
                    "--node-rank", str(node), *tail]
            part = f"node rank {node}"
        workers.append({"node": node, "rank": node * local if local else node, "part": part,
                        "argv": argv, "address_at": len(argv) - 3})
    return {"nodes": n, "mode": mode, "local": local, "rpc_port": port,
            "gpus": list(range(used)), "head_argv": head, "address_at": len(head) - 3,
            "workers": workers}


def job_instances(p, exe: SlurmExecution, dep: Any) -> list[dict[str, Any]]:
    """Each instance the job serves: its vars, the node its head runs on, its group (over
    several nodes) and where its argv takes its node's address (host_at; None: loopback)."""
    from evalprov.plan import SLURM_NODE_ADDRESS

    out = []
    for inst in p.instances:
        argv = list(inst.argv)
        out.append({"instance": instance_vars(inst), "node": inst.node,
                    "group": group_spec(exe, dep, inst),
                    "host_at": argv.index(SLURM_NODE_ADDRESS) if SLURM_NODE_ADDRESS in argv
                    else None})
    return out


def job_proxy(p) -> dict[str, Any] | None:
    """The proxy on the batch node in front of the job's instances (two or more): its config
    (the other nodes' addresses in its environment, plan.NODE_ENV), ports and servers."""
    from evalprov.plan import NODE_ENV

    proxy = p.hosts[0].proxy if p.hosts else None
    if proxy is None:
        return None
    return {"name": proxy.name, "port": proxy.port, "stats_port": proxy.stats_port,
            "config": proxy.config, "node_env": NODE_ENV,
            "servers": [name for name, _ in proxy.servers]}


def job_vars(job: Job, state: str, samples_src: str, sample_data: bool) -> dict[str, Any]:
    """The variables of the Slurm role: the job, and only that."""
    return {
        "evalprov_state": state,
        "evalprov_actions": [f"submit {job.name}"] if state == "pending" else [],
        "evalprov_slurm_dir": job.dir,
        "evalprov_slurm_lib": job.lib,
        "evalprov_slurm_script": job.script,
        "evalprov_slurm_spec": job.spec,
        "evalprov_slurm_sbatch_argv": list(job.sbatch_argv),
        "evalprov_slurm_samples": f"{job.dir}/samples" if sample_data else "",
        "evalprov_slurm_samples_src": samples_src,
    }


def job_summary(job: dict[str, Any]) -> str:
    """The job chain in a few words, e.g. "job 12 TIMEOUT, job 13 COMPLETED"."""
    jobs = job.get("jobs") or []
    text = ", ".join(f"job {j.get('id')} {j.get('state')}" for j in jobs) or "no job"
    return f"{text}: {job['message']}" if job.get("message") else text


ENDED_EARLY = ("TIMEOUT", "CANCELLED", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE")


def explain_missing(records: list[dict[str, Any]], job: dict[str, Any]) -> None:
    """A task that did not succeed in a job that ended early (time limit, scancel,
    preemption, a dead node) failed because of how the job ended: say so first, then what
    the task itself left (a task that brought nothing home is failed, not "missing")."""
    ended = [j for j in job.get("jobs") or [] if j.get("state") in ENDED_EARLY
             and j.get("ran", True) and j.get("reason") != "DependencyNeverSatisfied"]
    # the driver's own account: warned of the time limit, cancelled, or the server died
    ended += [job] if job.get("phase") in ("failed", "stopping") and job.get("message") else []
    for rec in records:
        if rec.get("status") == "succeeded":
            continue
        own, missing = rec.get("error"), rec.get("status") == "missing"
        if missing or ended:
            why = f"the Slurm job ended before the task finished ({job_summary(job)})"
            rec["status"] = "failed"
            rec["error"] = why if missing or not own else f"{why}; {own}"


def empty_checked(problems: list[str]) -> Checked:
    return Checked(tuple(problems), {})


__all__ = ["Job", "check_facts", "job_dir", "make_job", "render_script", "sbatch_options"]
