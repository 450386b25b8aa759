"""The planner: Config + host facts -> Plan. Pure functions, no I/O.

Every decision is made here and handed to Ansible as variables: which GPUs, which port, the
container name, the exact `vllm serve` argv (a list, never a shell string), which host runs
which task, and a content hash of each instance's spec for idempotence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field

from evalprov import apikey
from evalprov.config.loader import deep_merge
from evalprov.config.models import (
    Config,
    NoneDeployment,
    SlurmExecution,
    Task,
    VllmDeployment,
    _matches,
    vllm_option,
)
from evalprov.config.tasks import TaskInfo, task_table
from evalprov.errors import PlanError
from evalprov.harness import ENDPOINT_TYPES, PARAM_KEYS, run_config
from evalprov.secrets import plain_literals, secret_specs

# Where a task's directory is seen by the harness in its container; the role rewrites
# config.output_dir for the process runtime.
TASK_RESULTS_DIR = "/work/results"

CHECKPOINT_MOUNT = "/checkpoint"
LOOPBACK = "127.0.0.1"
HF_CACHE_MOUNT = "/root/.cache/huggingface"
DP_RPC_PORT = 29550  # vLLM's --data-parallel-rpc-port default
MASTER_PORT = 29501  # vLLM's --master-port default (multi-node multiprocessing)
# what evalprov sets on a node group's members, or would contradict how it spreads them
GROUP_OPTIONS = ("--data-parallel-size-local", "--data-parallel-address",
                 "--data-parallel-rpc-port", "--data-parallel-start-rank", "--headless",
                 "--distributed-executor-backend", "--data-parallel-backend",
                 "--data-parallel-hybrid-lb", "--data-parallel-external-lb", "--nnodes",
                 "--node-rank", "--master-addr", "--master-port")
PROXY_NAME = "evalprov-lb"
PROXY_PORT = 5009  # NEL's haproxy_port


@dataclass(frozen=True)
class HostFacts:
    """What the planner knows of a host: its name and GPU count (None: not known yet;
    the preflight of `apply` measures it and the plan is checked again)."""

    name: str
    gpus: int | None = None
    address: str | None = None  # where the other hosts reach it (inventory ansible_host)

    @property
    def reach(self) -> str:
        return self.address or self.name


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "checkpoint" (a host directory, mounted) or "hf" (an id, HF cache mounted)
    ref: str  # the host path or the HF id
    serve_as: str  # what `vllm serve` is given


@dataclass(frozen=True)
class Instance:
    host: str
    index: int
    name: str
    port: int
    gpus: tuple[int, ...]
    argv: tuple[str, ...]
    image: str
    model: ModelSource
    mounts: tuple[Mount, ...]
    env_names: tuple[str, ...]
    spec_hash: str
    env: tuple[tuple[str, str], ...] = ()  # non-secret env (runtime's own, plain literals)
    # a deployment over a node group of hosts (NodeGroup): this host's part of it
    role: str = "single"  # single | head (serves the API) | worker (no API: port 0)
    group: str = ""  # the node group's name ("" for a single instance)
    rank: int = 0  # data parallel: the host's first DP rank; pipeline: its --node-rank
    nodes: tuple[str, ...] = ()  # the group's hosts, head first
    head_address: str | None = None  # where the members reach the head
    rpc_port: int = 0  # on the head: vLLM's --data-parallel-rpc-port, or its --master-port
    # Slurm: the node of the job's allocation the instance (its head) runs on, 0 the batch
    # node (the harness and the proxy are there); on another node it listens on the
    # node's address (argv's --host, SLURM_NODE_ADDRESS until the node fills it in)
    node: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def serves(self) -> bool:
        """It answers the API (a single instance or a group's head)."""
        return self.role != "worker"


@dataclass(frozen=True)
class NodeGroup:
    """One instance over several hosts of equal GPU counts: the head serves the API, the
    workers join it. mode "data-parallel": vLLM's native multi-node data parallel (headless
    workers, `local` ranks per host); "pipeline-parallel": one TP x PP world over the
    hosts, TP inside a host and PP across hosts, on vLLM's multi-node multiprocessing
    backend (--nnodes, --node-rank, --master-addr; headless workers)."""

    name: str
    mode: str
    hosts: tuple[str, ...]  # head first
    addresses: tuple[str, ...]  # the inter-node address of each host
    gpus_per_host: int
    port: int  # the rpc port (data parallel) or the torch.distributed master port
    local: int = 0  # data-parallel ranks per host

    @property
    def head(self) -> str:
        return self.hosts[0]

    @property
    def head_address(self) -> str:
        return self.addresses[0]

    @property
    def label(self) -> str:
        return ("data-parallel (vLLM multi-node data parallel, headless workers)"
                if self.mode == "data-parallel" else
                "pipeline-parallel (tensor parallel inside a host, pipeline parallel "
                "across hosts; vLLM multi-node multiprocessing, headless workers)")


@dataclass(frozen=True)
class TaskRun:
    name: str  # as written in the config
    task: str  # the harness's task name
    harness: str
    container: str
    endpoint_type: str
    host: str
    instance: str | None  # instance name, None for deployment: none
    url: str  # the endpoint the harness calls
    env_names: tuple[str, ...]
    run_config: dict = field(default_factory=dict, compare=False)  # nemo-evaluator --run_config
    volumes: tuple[str, ...] = ()  # dataset_dir mounted read-only at dataset_mount_path
    env: tuple[tuple[str, str], ...] = ()  # plain (non-secret) literal env of the task

    @property
    def id(self) -> str:
        return f"{self.harness}.{self.task}"

    @property
    def slug(self) -> str:
        return slug(self.name)


def slug(name: str) -> str:
    """A task's directory and archive name, on the host and on the controller."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclass(frozen=True)
class Proxy:
    """HAProxy in front of a host's instances (two or more): the one endpoint its tasks call,
    spreading their requests over every instance (NEL's proxy, port 5009 by default). A host
    process (Debian's haproxy) whatever the runtime; its config is rendered here from checked
    values (evalprov.lb)."""

    host: str
    port: int
    stats_port: int
    listen: str
    servers: tuple[tuple[str, int], ...]  # (instance name, port), on 127.0.0.1
    config: str  # the complete haproxy.cfg
    spec_hash: str
    name: str = PROXY_NAME

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class HostPlan:
    host: str
    gpus_total: int | None
    instances: tuple[Instance, ...]
    tasks: tuple[TaskRun, ...]
    proxy: Proxy | None = None


@dataclass(frozen=True)
class AuxPlan:
    """An auxiliary deployment (e.g. a judge model served beside the model under test, NEL's
    auxiliary_deployments): planned like the main one, not served by evalprov yet."""

    name: str
    served_model_name: str
    gpus: int  # per instance, tp x pp x dp
    port: int
    argv: tuple[str, ...]
    image: str
    model: ModelSource


@dataclass(frozen=True)
class Plan:
    execution: str
    deployment: str
    runtime: str
    served_model_name: str | None
    gpus_per_instance: int
    health_path: str
    health_timeout: int
    hosts: tuple[HostPlan, ...]
    notes: tuple[str, ...] = field(default=())
    eval_concurrency: int = 1
    work_dir: str = "/var/lib/evalprov"
    device: str = "gpu"
    vllm_venv: str = "/opt/evalprov/vllm-venv"
    vllm_package: str = "vllm"
    harness_venv: str = "/opt/evalprov/harness-venv"
    sample_data: bool = False
    image: str | None = None  # the docker runtime's image (None: process runtime)
    image_pull_policy: str | None = None  # missing | always | None: by the tag (check.py)
    checkpoints: tuple[str, ...] = ()  # host directories the instances serve from
    disk_paths: tuple[str, ...] = ()  # host directories that receive weights
    auxiliary: tuple[AuxPlan, ...] = ()  # planned, not served yet (a warning says so)
    groups: tuple[NodeGroup, ...] = ()  # deployments over several hosts

    def host(self, name: str) -> HostPlan:
        for h in self.hosts:
            if h.host == name:
                return h
        raise KeyError(name)

    @property
    def instances(self) -> list[Instance]:
        return [i for h in self.hosts for i in h.instances]

    @property
    def task_runs(self) -> list[TaskRun]:
        return [t for h in self.hosts for t in h.tasks]


# --------------------------------------------------------------------------- pieces


def gpus_per_instance(dep: VllmDeployment, device: str = "gpu") -> int:
    if device == "cpu":
        return 0
    return dep.tensor_parallel_size * dep.pipeline_parallel_size * dep.data_parallel_size


def model_source(dep: VllmDeployment, runtime: str = "docker") -> ModelSource:
    """An absolute checkpoint_path is mounted (served from where it is by the process
    runtime); an org/name in either field is an HF id. (The models already rejected anything
    else.)"""
    if dep.hf_model_handle:
        return ModelSource("hf", dep.hf_model_handle, dep.hf_model_handle)
    path = dep.checkpoint_path or ""
    if path.startswith("/"):
        return ModelSource("checkpoint", path, CHECKPOINT_MOUNT if runtime == "docker" else path)
    return ModelSource("hf", path, path)


def vllm_argv(dep: VllmDeployment, model: ModelSource, port: int | None,
              bind: str | None = LOOPBACK) -> tuple[str, ...]:
    """NEL's base_command as a list: extra_args split with shell rules, never re-joined.
    `bind`: the address the API listens on (on a bare-metal or local host, loopback: every
    health check and task runs on the host itself); None keeps NEL's command as it is.
    `port` None: no API at all (a headless data-parallel worker): neither --port nor --host."""
    return (
        "vllm",
        "serve",
        model.serve_as,
        f"--tensor-parallel-size={dep.tensor_parallel_size}",
        f"--pipeline-parallel-size={dep.pipeline_parallel_size}",
        f"--data-parallel-size={dep.data_parallel_size}",
        *(("--port", str(port)) if port is not None else ()),
        *(("--host", bind) if bind and port is not None else ()),
        "--trust-remote-code",
        "--served-model-name",
        dep.served_model_name,
        "--gpu-memory-utilization",
        str(dep.gpu_memory_utilization),
        *shlex.split(dep.extra_args),
    )


def mounts_for(model: ModelSource, hf_cache_dir: str, runtime: str = "docker") -> tuple[Mount, ...]:
    if runtime != "docker":
        return ()
    if model.kind == "checkpoint":
        return (Mount(model.ref, CHECKPOINT_MOUNT, True),)
    return (Mount(hf_cache_dir, HF_CACHE_MOUNT, False),)


def spec_hash(**spec: object) -> str:
    blob = json.dumps(spec, sort_keys=True, default=list, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def instances_per_host(config: Config, gpus: int | None, need: int) -> int:
    wanted = config.execution.instances_per_host
    if wanted == "auto":
        return max(1, (gpus or need) // need) if need else 1
    if isinstance(wanted, bool) or wanted < 1:
        raise PlanError(f"execution.instances_per_host: {wanted!r} plans no vLLM instance; use "
                        "1 or more, or auto")
    return wanted


def check_host_fits(host: HostFacts, need: int, count: int, dep: VllmDeployment,
                    slurm: bool = False) -> None:
    if host.gpus is None or host.gpus >= need * count:
        return
    per = (
        f"tensor_parallel_size {dep.tensor_parallel_size} x pipeline_parallel_size "
        f"{dep.pipeline_parallel_size} x data_parallel_size {dep.data_parallel_size}"
    )
    if count > 1:
        raise PlanError(
            f"host {host.name}: has {host.gpus} GPUs but {count} instances of {need} GPUs "
            f"({per}) need {need * count}; lower execution.instances_per_host or use auto"
        )
    if slurm:
        raise PlanError(
            f"host {host.name}: execution.gres gives {host.gpus} GPUs but one instance needs "
            f"{need} ({per}); raise execution.gres to gpu:{need} or lower the parallel sizes"
        )
    raise PlanError(
        f"host {host.name}: has {host.gpus} GPUs but one instance needs {need} ({per}); "
        f"lower the parallel sizes to fit {host.gpus} GPUs or drop the host from the inventory"
    )


def process_env(config: Config, gpus: tuple[int, ...]) -> tuple[tuple[str, str], ...]:
    """What the process runtime sets for an instance (docker does it with --gpus and mounts):
    its GPUs, and the HF cache."""
    env = [("HF_HOME", config.execution.hf_cache_dir)]
    if config.execution.device == "gpu":
        env.append(("CUDA_VISIBLE_DEVICES", ",".join(map(str, gpus))))
    return tuple(env)


def container_name(index: int) -> str:
    return f"evalprov-vllm-{index}"


def _env_names(*maps: dict) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for m in maps:
        names.update(dict.fromkeys(m))
    return tuple(sorted(names))


def server_env(config: Config, dep: VllmDeployment
               ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], dict[str, str]]:
    """The servers' environment: every variable's name, the plain literals (name, value),
    and, as part of the spec, how their secrets travel (docker: in a root-only file in
    memory that the container mounts, never in its config)."""
    specs = {**config.env_vars, **dep.env_vars}
    names = _env_names(config.env_vars, dep.env_vars,
                       dict.fromkeys([apikey.VLLM_ENV] if apikey.needed(config) else []))
    literals = tuple(sorted(plain_literals(specs).items()))
    secret = bool(secret_specs(specs)) or apikey.needed(config)
    docker = config.execution.runtime == "docker"
    return names, literals, {"secrets": "memory-file"} if secret and docker else {}


def plan_instances(config: Config, host: HostFacts, api_key_id: str = ""
                   ) -> tuple[Instance, ...]:
    dep = config.deployment
    assert isinstance(dep, VllmDeployment)
    runtime = config.execution.runtime
    need = gpus_per_instance(dep, config.execution.device)
    count = instances_per_host(config, host.gpus, need)
    check_host_fits(host, need, count, dep, isinstance(config.execution, SlurmExecution))
    model = model_source(dep, runtime)
    mounts = mounts_for(model, config.execution.hf_cache_dir, runtime)
    env_names, literals, delivery = server_env(config, dep)
    out = []
    for i in range(count):
        port = dep.port + i
        if port > 65535:
            raise PlanError(
                f"host {host.name}: instance {i} would use port {port}; lower deployment.port "
                "or execution.instances_per_host"
            )
        gpus = tuple(range(i * need, (i + 1) * need))
        # the harness runs beside the server (on its host, or in the same Slurm job); the
        # API is bound to loopback unless deployment.host opens it
        argv = vllm_argv(dep, model, port, dep.host)
        name = container_name(i)
        env = (process_env(config, gpus) if runtime == "process" else ()) + literals
        digest = spec_hash(
            image=dep.image if runtime == "docker" else config.execution.vllm_pip_spec,
            argv=argv,
            env=env_names,
            mounts=[(m.source, m.target, m.read_only) for m in mounts],
            gpus=gpus,
            runtime=runtime,
            **({"process_env": env} if env else {}),
            **({"api_key": api_key_id} if api_key_id else {}),
            **delivery,
        )
        out.append(
            Instance(host.name, i, name, port, gpus, argv, dep.image, model, mounts,
                     env_names, digest, env)
        )
    return tuple(out)


def resolve_tasks(config: Config) -> list[tuple[Task, TaskInfo]]:
    table = task_table()
    return [
        (t, table.resolve(t.name, t.container, f"evaluation.tasks.{i}.name"))
        for i, t in enumerate(config.evaluation.tasks)
    ]


def endpoint_type(task: Task, info: TaskInfo) -> str:
    return task.endpoint_type or (info.endpoint_types[0] if info.endpoint_types else "chat")


def endpoint_path(dep: VllmDeployment, etype: str) -> str:
    """The path a task of this endpoint type calls. vlm requests are chat completions with
    images (vLLM has no separate VLM route)."""
    if etype in ("chat", "vlm"):
        return dep.endpoints.chat
    return getattr(dep.endpoints, etype, dep.endpoints.completions)


def _task_run(config: Config, task: Task, info: TaskInfo, host: str,
              inst: Instance | Proxy | None) -> TaskRun:
    etype = endpoint_type(task, info)
    if inst is None:
        url = config.target.api_endpoint.url or ""
    else:
        dep = config.deployment
        assert isinstance(dep, VllmDeployment)
        url = inst.base_url + endpoint_path(dep, etype)
    env = _env_names(config.env_vars, config.evaluation.env_vars, task.env_vars,
                     dict.fromkeys([apikey.HARNESS_ENV] if inst and apikey.keyed(config)
                                   else []))
    literals = tuple(sorted(plain_literals(
        {**config.env_vars, **config.evaluation.env_vars, **task.env_vars}).items()))
    volumes = (f"{task.dataset_dir}:{task.dataset_mount_path}:ro",) if task.dataset_dir else ()
    return TaskRun(task.name, info.name, info.harness, task.container or info.container, etype,
                   host, inst.name if inst else None, url, env,
                   task_run_config(config, task, info, etype, url), volumes, literals)


def task_run_config(config: Config, task: Task, info: TaskInfo, etype: str,
                    url: str) -> dict:
    """The harness's run config: generated (task, endpoint, model) with
    evaluation.nemo_evaluator_config and then the task's own merged over it (NEL's order)."""
    dep = config.deployment
    ep = config.target.api_endpoint
    model_id = dep.served_model_name if isinstance(dep, VllmDeployment) else ep.model_id
    key_name = ((apikey.HARNESS_ENV if apikey.keyed(config) else None)
                if isinstance(dep, VllmDeployment) else ep.api_key_name)
    base = run_config(info.name, info.harness, url, model_id or "", etype
                      if etype in ENDPOINT_TYPES else "chat", TASK_RESULTS_DIR,
                      api_key_name=key_name)
    merged = deep_merge(deep_merge(base, config.evaluation.nemo_evaluator_config),
                        task.nemo_evaluator_config)
    params = (merged.get("config") or {}).get("params") or {}
    unknown = sorted(set(params) - PARAM_KEYS) if isinstance(params, dict) else ["<not a map>"]
    if unknown:
        raise PlanError(
            f"task {task.name}: nemo_evaluator_config config.params.{unknown[0]} is not a "
            f"harness parameter; use one of {', '.join(sorted(PARAM_KEYS))} (harness-specific "
            "ones go under config.params.extra)"
        )
    return merged


def assign_tasks(config: Config, hosts: list[HostFacts],
                 instances: dict[str, tuple[Instance, ...] | tuple[Proxy]]
                 ) -> dict[str, list[TaskRun]]:
    """shard: task k goes to host k mod H (and within a host round-robin over what serves
    there: its instances, or the proxy in front of them); every_host: each host runs every
    task."""
    tasks = resolve_tasks(config)
    out: dict[str, list[TaskRun]] = {h.name: [] for h in hosts}
    if not hosts:
        return out
    if config.execution.placement == "every_host":
        # hosts with the same instance layout get the same task runs but for the host name:
        # build each (task, instance) once
        made: dict[tuple, TaskRun] = {}
        for h in hosts:
            insts = instances.get(h.name) or (None,)
            for k, (task, info) in enumerate(tasks):
                inst = insts[k % len(insts)]
                key = (k, inst.name if inst else None, inst.port if inst else None)
                if key not in made:
                    made[key] = _task_run(config, task, info, h.name, inst)
                out[h.name].append(dataclasses.replace(made[key], host=h.name))
        return out
    per_host_count = {h.name: 0 for h in hosts}
    for k, (task, info) in enumerate(tasks):
        h = hosts[k % len(hosts)]
        insts = instances.get(h.name) or (None,)
        inst = insts[per_host_count[h.name] % len(insts)]
        per_host_count[h.name] += 1
        out[h.name].append(_task_run(config, task, info, h.name, inst))
    return out


def slurm_hosts(execution: SlurmExecution) -> list[HostFacts]:
    """A Slurm run plans against its allocation as one host, the cluster, named by its login
    node, with the GPUs of the nodes one instance spans (num_nodes / num_instances of them:
    slurm.group_spec splits an instance over several into a head and headless workers)."""
    per = slurm_nodes_per_instance(execution)
    gpus = execution.gpus_per_node
    return [HostFacts(execution.hostname, gpus * per if gpus is not None else None)]


def slurm_nodes_per_instance(execution: SlurmExecution) -> int:
    """NEL's topology: num_instances instances of num_nodes / num_instances nodes each (each
    instance with its node(s) of its own)."""
    n, k = execution.num_nodes, execution.num_instances
    if n % k:
        raise PlanError(f"execution.num_nodes: {n} is not a multiple of execution.num_instances "
                        f"{k}: each instance runs on num_nodes / num_instances nodes; give "
                        f"num_nodes {k * max(1, n // k)} or num_instances a divisor of {n}")
    if k > 1 and execution.instances_per_host != 1:
        raise PlanError(f"execution.instances_per_host: {execution.instances_per_host} with "
                        f"execution.num_instances {k}: on Slurm each instance has its own "
                        "node(s); remove instances_per_host")
    return n // k


SLURM_NODE_ADDRESS = "<node address>"
NODE_ENV = "EVALPROV_NODE_"  # + the node's index: its address, in haproxy's environment


def slurm_instances(config: Config, planned: tuple[Instance, ...]) -> tuple[Instance, ...]:
    """execution.num_instances on Slurm: the planned instance once per num_nodes /
    num_instances nodes, instance i's head on node i x that. Every one has the same port
    (each on its own node); all but the batch node's listen on their node's address, for the
    proxy on the batch node (so they require the deployment's API key: apikey.needed)."""
    exe = config.execution
    assert isinstance(exe, SlurmExecution)
    per = slurm_nodes_per_instance(exe)  # one planned instance: instances_per_host is 1
    (first,) = planned
    out = [first]
    for i in range(1, exe.num_instances):
        argv = list(first.argv)
        argv[argv.index("--host") + 1] = SLURM_NODE_ADDRESS
        out.append(dataclasses.replace(
            first, index=i, name=container_name(i), argv=tuple(argv), node=i * per,
            spec_hash=spec_hash(instance=first.spec_hash, node=i * per)))
    return tuple(out)


def check_unique_hosts(hosts: list[HostFacts]) -> None:
    seen: set[str] = set()
    for h in hosts:
        if h.name in seen:
            raise PlanError(f"inventory: host {h.name} is listed twice; list each host once")
        if not re.match(r"^[A-Za-z0-9_.:/@-]+$", h.name):
            raise PlanError(f"inventory: host name {h.name!r} has characters evalprov does not "
                            "accept; use letters, digits and ._:-")
        seen.add(h.name)


def plan(config: Config, hosts: list[HostFacts], api_key_id: str = "") -> Plan:
    """The whole plan. ``hosts`` is ignored for slurm execution (the allocation is planned).
    ``api_key_id``: the fingerprint of the deployment's API key (apikey.fingerprint), part
    of each instance's spec (a new key recreates the servers that require the old one)."""
    if isinstance(config.execution, SlurmExecution):
        if isinstance(config.deployment, VllmDeployment) and config.deployment.exposed:
            raise PlanError(f"deployment.host: {config.deployment.host} opens the API, which "
                            "evalprov does not do on Slurm (the tasks run in the server's own "
                            "job); remove deployment.host")
        hosts = slurm_hosts(config.execution)
    if not hosts:
        raise PlanError("inventory: no hosts to plan for; give -i INVENTORY with at least one "
                        "host (or use execution: local)")
    check_unique_hosts(hosts)
    dep = config.deployment
    notes = []
    instances: dict[str, tuple[Instance, ...]] = {}
    if isinstance(dep, VllmDeployment):
        need = gpus_per_instance(dep, config.execution.device)
        grouped, groups, group_notes = node_groups(config, hosts, need, api_key_id)
        instances.update(grouped)
        notes.extend(group_notes)
        errors, failed = [], []
        for h in hosts:
            if h.name in grouped:
                continue
            try:
                instances[h.name] = plan_instances(config, h, api_key_id)
                if isinstance(config.execution, SlurmExecution) and \
                        config.execution.num_instances > 1:
                    instances[h.name] = slurm_instances(config, instances[h.name])
            except PlanError as exc:
                errors.extend(exc.lines)
                failed.append(h.name)
        if errors:
            raise PlanError(*errors, hosts=tuple(failed))
        if any(h.gpus is None for h in hosts):
            notes.append("GPU counts not given for some hosts: GPU fit is checked by the "
                         "preflight of `evalprov apply` (or pass --gpus N / --facts FILE)")
    else:
        need, groups = 0, ()
    proxies = {h.name: plan_proxy(config, h.name, instances.get(h.name, ())) for h in hosts}
    # tasks go to the hosts whose instances serve the API (not a group's workers, not a
    # host left out of the groups)
    serving = [h for h in hosts if not isinstance(dep, VllmDeployment)
               or any(i.serves for i in instances.get(h.name, ()))]
    assigned = {h.name: [] for h in hosts}
    assigned.update(assign_tasks(config, serving, {
        h: (proxies[h],) if proxies[h] else insts for h, insts in instances.items()}))
    idle = [h.name for h in serving if not assigned[h.name]]
    if idle and config.evaluation.tasks:
        notes.append(f"{len(idle)} host(s) get no task under placement shard "
                     f"({len(config.evaluation.tasks)} task(s) for {len(hosts)} hosts)")
    host_plans = tuple(
        HostPlan(h.name, h.gpus, instances.get(h.name, ()), tuple(assigned[h.name]),
                 proxies[h.name])
        for h in hosts
    )
    return Plan(
        execution=config.execution.type,
        deployment=dep.type,
        runtime=config.execution.runtime,
        served_model_name=dep.served_model_name if isinstance(dep, VllmDeployment) else None,
        gpus_per_instance=need,
        health_path=dep.endpoints.health if isinstance(dep, VllmDeployment) else "/health",
        health_timeout=config.execution.health_timeout,
        hosts=host_plans,
        notes=tuple(notes),
        eval_concurrency=config.execution.eval_concurrency,
        work_dir=config.execution.work_dir,
        device=config.execution.device,
        vllm_venv=config.execution.vllm_venv,
        vllm_package=config.execution.vllm_pip_spec,
        harness_venv=config.execution.harness_venv,
        sample_data=config.execution.sample_data,
        image=dep.image if isinstance(dep, VllmDeployment) and config.execution.runtime
        == "docker" else None,
        image_pull_policy=config.execution.image_pull_policy,
        checkpoints=tuple(sorted({i.model.ref for i in instances_list(instances)
                                  if i.model.kind == "checkpoint"})),
        disk_paths=tuple(sorted({m.source for i in instances_list(instances)
                                 for m in i.mounts if not m.read_only})),
        auxiliary=plan_auxiliary(config),
        groups=groups,
    )


def _parallel(dep: VllmDeployment) -> str:
    return (f"tensor_parallel_size {dep.tensor_parallel_size} x pipeline_parallel_size "
            f"{dep.pipeline_parallel_size} x data_parallel_size {dep.data_parallel_size}")


def group_shape(dep: VllmDeployment, gpus: int, names: str = "") -> tuple[str, int, int]:
    """How one instance spreads over hosts of `gpus` GPUs (`names`: those hosts, for the
    message): (mode, hosts per group, data-parallel ranks per host). PlanError when it
    cannot: a rank (tp x pp) that fits a host is data parallel across hosts, whole ranks per
    host; a larger one is one TP x PP world with TP inside a host and PP across hosts
    (vLLM's multi-node multiprocessing), dp 1."""
    tp, pp, dp = dep.tensor_parallel_size, dep.pipeline_parallel_size, dep.data_parallel_size
    per_rank = tp * pp
    where = f"hosts of {gpus} GPUs" + (f" ({names})" if names else "")
    if 0 < per_rank <= gpus:
        local = min(dp, gpus // per_rank)
        if dp % local:
            raise PlanError(
                f"deployment.data_parallel_size: {dp} does not split over {where}: each "
                f"holds {local} data-parallel rank(s) of tensor_parallel_size {tp} x "
                f"pipeline_parallel_size {pp}, and {dp} / {local} is not a whole number of "
                f"hosts; use a data_parallel_size that is a multiple of {local}")
        return "data-parallel", dp // local, local
    if dp > 1:
        raise PlanError(
            f"deployment.data_parallel_size: {dp} with tensor_parallel_size {tp} x "
            f"pipeline_parallel_size {pp} = {per_rank} GPUs per rank, more than one of the "
            f"{where} has: evalprov spreads one rank over hosts (pipeline parallel) or "
            "whole ranks over hosts (data parallel), not both; set data_parallel_size 1 or "
            "fit a rank in one host")
    if tp > gpus or gpus % tp or per_rank % gpus:
        stages = f"{per_rank // gpus}" if gpus and per_rank % gpus == 0 else "N"
        raise PlanError(
            f"deployment.tensor_parallel_size: {tp} with pipeline_parallel_size {pp} over "
            f"{where}: across hosts tensor parallelism stays inside a host and pipeline "
            f"parallelism spans hosts (vLLM's convention), so tensor_parallel_size must "
            f"divide {gpus} and tp x pp be a multiple of {gpus}; use tensor_parallel_size "
            f"{gpus} and pipeline_parallel_size {stages}")
    return "pipeline-parallel", per_rank // gpus, 0


def _hosts_text(hosts: list[HostFacts]) -> str:
    return ", ".join(f"{h.name} ({h.gpus} GPUs)" for h in hosts)


def node_groups(config: Config, hosts: list[HostFacts], need: int, api_key_id: str = ""
                ) -> tuple[dict[str, tuple[Instance, ...]], tuple[NodeGroup, ...], list[str]]:
    """When one instance needs more GPUs than a host has, and every host's GPU count is
    known, the hosts too small for it form node groups of equal GPU counts (inventory order),
    each group serving one instance. Hosts that fit an instance are planned as before.

    Once a group forms, every too small host in no group is left out (no instance, no task,
    a note says why). When none forms: with two or more hosts and none that fits an
    instance, PlanError naming the hosts and their GPU counts; otherwise the per-host check
    names each too small host, as for a plan without groups."""
    dep = config.deployment
    assert isinstance(dep, VllmDeployment)
    if (config.execution.device != "gpu" or not need or isinstance(
            config.execution, SlurmExecution) or any(h.gpus is None for h in hosts)):
        return {}, (), []
    small = [h for h in hosts if (h.gpus or 0) < need]
    if not small:
        return {}, (), []
    by_count: dict[int, list[HostFacts]] = {}
    for h in small:
        by_count.setdefault(h.gpus or 0, []).append(h)
    out: dict[str, tuple[Instance, ...]] = {}
    groups: list[NodeGroup] = []
    why: dict[int, str] = {}  # GPU count -> why its hosts (or some of them) are in no group
    short: dict[int, str] = {}  # the same for a note, where a group did form
    zero = by_count.pop(0, [])  # hosts without GPUs are in no group (named one by one)
    for gpus, members in by_count.items():
        try:
            mode, size, local = group_shape(dep, gpus, ", ".join(h.name for h in members))
        except PlanError as exc:
            why[gpus] = f"no node group of {gpus}-GPU hosts can serve it: {exc.lines[0]}"
            short[gpus] = f"{_parallel(dep)} does not spread over hosts of {gpus} GPUs"
            continue
        if len(members) < size:
            why[gpus] = (
                f"a node group needs {size} hosts of {gpus} GPUs and the inventory has "
                f"{len(members)} ({_hosts_text(small)}); add hosts with {gpus} GPUs, or lower "
                f"the parallel sizes to fit {gpus} GPUs")
            continue
        usable = len(members) - len(members) % size
        for k in range(0, usable, size):
            group, parts = plan_group(config, f"group-{len(groups)}", mode,
                                      members[k:k + size], gpus, local, api_key_id)
            groups.append(group)
            out.update(parts)
        if usable < len(members):
            why[gpus] = f"a node group needs {size} hosts of {gpus} GPUs"
    if not groups:
        if len(hosts) > 1 and not any((h.gpus or 0) >= need for h in hosts):
            lines = []
            for h in small:
                if h.gpus in why:
                    lines.append(f"host {h.name}: has {h.gpus} GPUs but one instance needs "
                                 f"{need} ({_parallel(dep)}); {why[h.gpus or 0]}")
                    continue
                try:  # no GPU at all: the per-host line
                    check_host_fits(h, need, 1, dep)
                except PlanError as exc:
                    lines.extend(exc.lines)
            raise PlanError(*lines, hosts=tuple(h.name for h in small))
        return {}, (), []
    wanted = config.execution.instances_per_host
    if wanted != "auto" and wanted != 1:
        raise PlanError(
            f"execution.instances_per_host: {wanted} with a deployment over node groups "
            f"({', '.join(g.name for g in groups)}): a group's hosts serve one instance "
            "together; use 1 or auto", hosts=tuple(h for g in groups for h in g.hosts))
    notes = [f"{g.name}: {a} is a name, not an IP address; vLLM's rpc and "
             "torch.distributed bind and dial it: set its ansible_host to the address the "
             "hosts reach each other at"
             for g in groups for a in g.addresses if not _is_ip(a)]
    if zero:
        why[0] = "they have no GPU"
        by_count[0] = zero
    for gpus, members in by_count.items():
        left = [h for h in members if h.name not in out]
        if not left:
            continue
        for h in left:
            out[h.name] = ()
        notes.append(f"{len(left)} host(s) with {gpus} GPUs left out of the node groups, no "
                     f"instance and no task ({', '.join(h.name for h in left)}): "
                     f"{short.get(gpus) or why.get(gpus, 'in no group')}")
    return out, tuple(groups), notes


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def plan_group(config: Config, name: str, mode: str, members: list[HostFacts], gpus: int,
               local: int, api_key_id: str) -> tuple[NodeGroup, dict[str, tuple[Instance, ...]]]:
    """The instance of one node group: each member's part (role, rank, GPUs, argv).

    data-parallel: the head runs `vllm serve` with the API and its `local` DP ranks; each
    worker runs `vllm serve --headless` with its own ranks; all dial the head's rpc port.
    pipeline-parallel: every member runs `vllm serve --nnodes N --node-rank R --master-addr
    HEAD --master-port P` (workers --headless, no API) with its GPUs of the one TP x PP
    world; VLLM_HOST_IP is each member's own address (vLLM's message queue binds it)."""
    dep = config.deployment
    assert isinstance(dep, VllmDeployment)
    runtime = config.execution.runtime
    model = model_source(dep, runtime)
    mounts = mounts_for(model, config.execution.hf_cache_dir, runtime)
    env_names, literals, delivery = server_env(config, dep)
    port = DP_RPC_PORT if mode == "data-parallel" else MASTER_PORT
    what = ("data-parallel rpc port" if mode == "data-parallel" else
            "torch.distributed master port")
    for token in shlex.split(dep.extra_args):
        opt = vllm_option(token)
        hit = _matches(opt, GROUP_OPTIONS) if opt else []
        if hit:
            raise PlanError(f"deployment.extra_args: {token!r} ({hit[0]}) is set by evalprov "
                            f"on the members of node group {name} ({mode}); remove it from "
                            "extra_args")
    # the head's other port is its API's (one instance per member: no proxy there)
    if port == dep.port:
        raise PlanError(f"deployment.port: {port} is node group {name}'s {what} on its head "
                        f"{members[0].name}; pick another deployment.port")
    group = NodeGroup(name, mode, tuple(h.name for h in members),
                      tuple(h.reach for h in members), gpus, port, local)
    head = group.head_address
    tp, pp = dep.tensor_parallel_size, dep.pipeline_parallel_size
    out: dict[str, tuple[Instance, ...]] = {}
    for index, h in enumerate(members):
        role = "head" if index == 0 else "worker"
        own: tuple[tuple[str, str], ...] = ()
        if mode == "data-parallel":
            rank = index * local
            used = local * tp * pp
            dp = ("--data-parallel-size-local", str(local), "--data-parallel-address", head,
                  "--data-parallel-rpc-port", str(port))
            argv = ((*vllm_argv(dep, model, dep.port, dep.host), *dp) if role == "head" else
                    (*vllm_argv(dep, model, None), "--headless", *dp[:2],
                     "--data-parallel-start-rank", str(rank), *dp[2:]))
        else:
            rank, used = index, gpus
            own = (("VLLM_HOST_IP", h.reach),)
            nodes = ("--nnodes", str(len(members)), "--node-rank", str(index),
                     "--master-addr", head, "--master-port", str(port))
            argv = ((*vllm_argv(dep, model, dep.port, dep.host), *nodes) if role == "head"
                    else (*vllm_argv(dep, model, None), "--headless", *nodes))
        gpu_ids = tuple(range(used))
        env = (process_env(config, gpu_ids) if runtime == "process" else ()) + tuple(
            sorted(literals + own))
        # the group's whole shape (its name, mode, every member and address) is in each
        # member's spec: a moved head or a changed group recreates every member
        digest = spec_hash(
            image=dep.image if runtime == "docker" else config.execution.vllm_pip_spec,
            argv=argv, env=env_names,
            mounts=[(m.source, m.target, m.read_only) for m in mounts], gpus=gpu_ids,
            runtime=runtime, group=[name, mode, *group.hosts, *group.addresses, port],
            role=role, rank=rank,
            **({"process_env": env} if env else {}),
            **({"api_key": api_key_id} if api_key_id else {}),
            **delivery,
        )
        out[h.name] = (Instance(
            h.name, 0, container_name(0), dep.port if role == "head" else 0, gpu_ids, argv,
            dep.image, model, mounts, env_names, digest, env, role=role, group=name,
            rank=rank, nodes=group.hosts, head_address=head, rpc_port=port),)
    return group, out


def proxy_settings(config: Config) -> tuple[str, int, str] | None:
    """execution.proxy as NEL writes it ({type: haproxy, config: {haproxy_port,
    health_check_path, health_check_status}}; absent: those defaults): (type, port, health
    path), or None for type none (tasks round-robin over a host's instances instead)."""
    dep = config.deployment
    assert isinstance(dep, VllmDeployment)
    raw = getattr(config.execution, "proxy", None) or {}
    if not isinstance(raw, dict):
        raise PlanError(f"execution.proxy: {raw!r} is not a map; write {{type: haproxy, "
                        "config: {haproxy_port: 5009}} or {type: none}")
    kind = raw.get("type", "haproxy")
    if kind == "none":
        return None
    if kind != "haproxy":
        raise PlanError(f"execution.proxy.type: {kind!r} is not a proxy evalprov runs; use "
                        "haproxy or none")
    conf = raw.get("config") or {}
    if not isinstance(conf, dict):
        raise PlanError(f"execution.proxy.config: {conf!r} is not a map; write "
                        "{haproxy_port: 5009, health_check_path: /health}")
    port = conf.get("haproxy_port", PROXY_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65534:
        raise PlanError(f"execution.proxy.config.haproxy_port: {port!r} is not a port; use "
                        "1-65534 (its stats listen on the next port)")
    path = conf.get("health_check_path", dep.endpoints.health)
    status = conf.get("health_check_status", 200)
    if status != 200:
        raise PlanError(f"execution.proxy.config.health_check_status: {status!r}; evalprov's "
                        "proxy checks for 200 (vLLM's /health); remove the field")
    return kind, port, path


def plan_proxy(config: Config, host: str, instances: tuple[Instance, ...]) -> Proxy | None:
    """The proxy in front of a host's instances, when there are two or more and
    execution.proxy is not type none."""
    from evalprov import lb

    instances = tuple(i for i in instances if i.serves)
    if len(instances) < 2 or not isinstance(config.deployment, VllmDeployment):
        return None
    settings = proxy_settings(config)
    if settings is None:
        return None
    _, port, path = settings
    taken = {i.port: i.name for i in instances}
    for p, what in ((port, "haproxy_port"), (port + 1, "haproxy_port + 1 (its stats)")):
        if p in taken:
            raise PlanError(f"execution.proxy.config.haproxy_port: {what} is {p}, the port of "
                            f"instance {taken[p]} on host {host}; pick a port outside "
                            f"{min(taken)}-{max(taken)}")
    listen = config.deployment.host or LOOPBACK
    servers = tuple((i.name, i.port) for i in instances)
    try:
        text = lb.render_haproxy_cfg(
            listen_host=listen, listen_port=port, stats_port=port + 1, health_path=path,
            servers=[lb.Server(i.name, lb.NodeAddress(f"{NODE_ENV}{i.node}") if i.node
                               else LOOPBACK, i.port) for i in instances])
    except lb.LbError as exc:
        raise PlanError(f"execution.proxy.config: {exc}") from None
    digest = spec_hash(config=text, members=[i.spec_hash for i in instances])
    return Proxy(host, port, port + 1, listen, servers, text, digest)


def plan_auxiliary(config: Config) -> tuple[AuxPlan, ...]:
    """Each vLLM auxiliary deployment as the main one is planned: its GPUs, port and exact
    argv (type none names an endpoint that already exists: nothing to plan)."""
    out = []
    runtime = config.execution.runtime
    for name, aux in sorted(config.auxiliary_deployments.items()):
        if not isinstance(aux, VllmDeployment):
            continue
        model = model_source(aux, runtime)
        out.append(AuxPlan(name, aux.served_model_name,
                           gpus_per_instance(aux, config.execution.device), aux.port,
                           vllm_argv(aux, model, aux.port, LOOPBACK), aux.image, model))
    return tuple(out)


def instances_list(instances: dict[str, tuple[Instance, ...]]) -> list[Instance]:
    return [i for insts in instances.values() for i in insts]


__all__ = ["HostFacts", "Instance", "NodeGroup", "NoneDeployment", "Plan", "TaskRun", "plan"]
