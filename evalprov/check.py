"""check(plan, facts): the probe's raw facts of each host against the plan -> the problems
and, per host, the actions the roles carry out. Pure: no I/O, no Ansible.

The probe only reports what it sees (GPUs, docker, listening ports, paths, disk, venvs, the
image present and each instance evalprov made with its labels and health). Every decision
made from those facts is made here, once: does the host fit, which instances to (re)create,
which to remove, which to wait for, whether to pull or install, and whether the host is
converged (then the serve play skips it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evalprov.plan import PROXY_NAME, Instance, Plan, Proxy

# Free GiB required in each directory that receives weights and in docker's root dir.
MIN_DISK_GIB = 1.0


@dataclass(frozen=True)
class Unit:
    """An instance evalprov made on a host, as the probe found it."""

    name: str
    spec_hash: str
    running: bool
    serving: bool
    port: int | None = None
    image_id: str = ""


@dataclass(frozen=True)
class HostFacts:
    """Raw facts of one host (the probe's return value, parsed)."""

    gpu_count: int
    gpu_error: str = ""
    docker_present: bool = False
    docker_running: bool = False
    nvidia_runtime: bool = False
    docker_root: str = "/var/lib/docker"
    image_id: str = ""  # the local image of the planned name ("" when absent)
    image_digests: tuple[str, ...] = ()  # its repo digests
    remote_digest: str = ""  # what the registry serves for the name now ("" unknown)
    listening: frozenset[int] = frozenset()
    dirs: dict[str, bool] = field(default_factory=dict)  # path -> is a directory
    disk_free_gib: dict[str, float | None] = field(default_factory=dict)
    units: dict[str, Unit] = field(default_factory=dict)
    venvs: dict[str, bool] = field(default_factory=dict)
    local: bool = False  # Ansible reaches it with connection: local
    proxy: Unit | None = None  # the proxy evalprov started (serving: every server up)
    haproxy: str = ""  # the haproxy program on the host ("" none)

    @classmethod
    def from_probe(cls, res: dict[str, Any], local: bool = False) -> HostFacts:
        g = res.get("gpus") or {}
        d = res.get("docker") or {}
        img = d.get("image") or {}
        units = {}
        for name, u in (res.get("units") or {}).items():
            port = u.get("port")
            units[name] = Unit(name, str(u.get("spec_hash") or ""), bool(u.get("running")),
                               bool(u.get("serving")),
                               int(port) if isinstance(port, int | str) and str(port).isdigit()
                               else None, str(u.get("image_id") or ""))
        px = res.get("proxy")
        proxy = Unit(PROXY_NAME, str(px.get("spec_hash") or ""), bool(px.get("running")),
                     bool(px.get("serving")),
                     int(px["port"]) if str(px.get("port") or "").isdigit() else None
                     ) if isinstance(px, dict) else None
        return cls(
            proxy=proxy, haproxy=str(res.get("haproxy") or ""),
            gpu_count=int(g.get("count") or 0), gpu_error=str(g.get("error") or ""),
            docker_present=bool(d.get("present")), docker_running=bool(d.get("running")),
            nvidia_runtime=bool(d.get("nvidia_runtime")),
            docker_root=str(d.get("root_dir") or "/var/lib/docker"),
            image_id=str(img.get("id") or ""),
            image_digests=tuple(img.get("digests") or ()),
            remote_digest=str(d.get("remote_digest") or ""),
            listening=frozenset(int(p) for p in res.get("listening") or ()),
            dirs={str(k): bool(v) for k, v in (res.get("dirs") or {}).items()},
            disk_free_gib=dict(res.get("disk_free_gib") or {}),
            units=units,
            venvs={str(k): bool(v) for k, v in (res.get("venvs") or {}).items()},
            local=local,
        )


@dataclass(frozen=True)
class HostActions:
    """What the roles do on one host. Empty lists: nothing to do."""

    host: str
    start: tuple[Instance, ...] = ()  # (re)create these, in this order
    remove: tuple[str, ...] = ()  # instances evalprov made that the plan no longer has
    wait: tuple[Instance, ...] = ()  # wait for /health and the model on these
    pull: bool = False
    install_vllm: bool = False
    install_harness: bool = False
    reasons: tuple[str, ...] = ()  # one line per action, for --check and the log
    tasks: int = 0
    proxy_start: Proxy | None = None  # (re)start the proxy with this spec
    proxy_remove: bool = False  # stop the proxy evalprov started (the plan has none)
    proxy_wait: Proxy | None = None  # wait until every server behind it is up
    # node group members to stop before any member of any group starts again (a play of
    # its own, so that no new member meets an old one)
    group_stop: tuple[str, ...] = ()

    @property
    def converged(self) -> bool:
        return not (self.start or self.remove or self.wait or self.pull or self.install_vllm
                    or self.install_harness or self.tasks or self.proxy_start
                    or self.proxy_remove or self.proxy_wait)


@dataclass(frozen=True)
class Checked:
    problems: tuple[str, ...]
    hosts: dict[str, HostActions]


def pull_policy(plan: Plan) -> str:
    """missing: pull when the host lacks the image; always: every apply asks the registry
    (the default for a :latest or untagged image, whose content moves)."""
    if plan.image_pull_policy in ("missing", "always"):
        return plan.image_pull_policy
    image = plan.image or ""
    name = image.rsplit("/", 1)[-1]
    if "@" in image:
        return "missing"
    return "always" if ":" not in name or name.endswith(":latest") else "missing"


def problems_of(plan: Plan, host: str, f: HostFacts, fit: bool = True) -> list[str]:
    """One sentence per problem: the host, the value, and the fix. ``fit``: also whether the
    host has the GPUs the plan gives it (False: that is reported already, by the planner)."""
    hp = plan.host(host)
    out = []
    need = max((g for i in hp.instances for g in i.gpus), default=-1) + 1
    if fit and need > f.gpu_count:
        seen = f.gpu_error or "nvidia-smi"
        out.append(f"host {host}: has {f.gpu_count} GPUs ({seen}) but the plan needs {need}; "
                   "lower tensor/pipeline/data parallel sizes or instances_per_host, or drop "
                   "the host from the inventory")
    elif fit and hp.gpus_total is not None and hp.gpus_total != f.gpu_count and (
            plan.gpus_per_instance):
        out.append(f"host {host}: has {f.gpu_count} GPUs but the inventory says "
                   f"{hp.gpus_total} (evalprov_gpu_count); fix the inventory or drop the "
                   "variable to use the count nvidia-smi reports")
    docker = plan.runtime == "docker" and bool(hp.instances)
    # the harness runs in a container too: a host with tasks and no instance needs docker
    why = "" if hp.instances else " (its evaluation tasks run in containers)"
    if plan.runtime == "docker" and (hp.instances or hp.tasks):
        if not f.docker_present:
            out.append(f"host {host}: docker is not installed{why}; install docker")
        elif not f.docker_running:
            out.append(f"host {host}: docker is installed but dockerd does not answer{why}; "
                       "start it")
    if need > 0 and docker and f.docker_running and not f.nvidia_runtime:
        out.append(f"host {host}: docker has no NVIDIA runtime (nvidia-container-runtime-hook "
                   "not on PATH); install nvidia-container-toolkit and restart dockerd")
    ours = {u.port for u in f.units.values() if u.running and u.port is not None}
    ports = [i.port for i in hp.instances if i.serves]  # a group's worker has no API port
    if hp.proxy:
        ports += [hp.proxy.port, hp.proxy.stats_port]
        if f.proxy and f.proxy.running and f.proxy.port is not None:
            ours |= {f.proxy.port, f.proxy.port + 1}
        if not f.haproxy:
            out.append(f"host {host}: haproxy is not installed, and {len(hp.instances)} "
                       "instances serve behind one endpoint there; install it (apt-get "
                       "install haproxy) or set execution.proxy.type: none")
    busy = sorted(p for p in ports if p in f.listening and p not in ours)
    if busy:
        out.append(f"host {host}: port(s) {', '.join(map(str, busy))} already in use by "
                   "something evalprov did not start; stop it or set deployment.port")
    for inst in hp.instances:  # a group head's rpc / master port: its workers dial it
        unit = f.units.get(inst.name)
        if (inst.role == "head" and inst.rpc_port in f.listening
                and not (unit is not None and unit.running)):
            out.append(f"host {host}: port {inst.rpc_port}, node group {inst.group}'s "
                       f"{'rpc' if '--data-parallel-rpc-port' in inst.argv else 'master'} "
                       "port on its head, is already in use by something evalprov did not "
                       "start; stop it")
    for path in plan.checkpoints:
        if hp.instances and not f.dirs.get(path, False):
            out.append(f"host {host}: checkpoint_path {path} is not a directory on the host; "
                       "copy the weights there or fix deployment.checkpoint_path")
    disk = [*plan.disk_paths, f.docker_root] if docker else list(plan.disk_paths)
    for path in sorted(set(disk)):
        free = f.disk_free_gib.get(path)
        if hp.instances and free is not None and free < MIN_DISK_GIB:
            out.append(f"host {host}: {path} has {free} GiB free, less than {MIN_DISK_GIB} "
                       "GiB; free space there")
    return out


def unit_change(plan: Plan, inst: Instance, f: HostFacts, pull: bool) -> str | None:
    """Why this instance must be (re)created on its host, None when it can stay (``pull``:
    the host pulls the image now; a digest it moved to recreates the instance)."""
    u = f.units.get(inst.name)
    docker = plan.runtime == "docker"
    moved = pull and bool(f.remote_digest) and bool(f.image_id)
    if u is None:
        return "not there"
    if u.spec_hash != inst.spec_hash:
        return f"spec changed ({u.spec_hash or 'none'} -> {inst.spec_hash})"
    if not u.running:
        return "not running"
    if docker and f.image_id and u.image_id and u.image_id != f.image_id:
        return f"runs an older image ({u.image_id[:19]}, host has {f.image_id[:19]})"
    if moved:
        return f"image {plan.image} moved to {f.remote_digest[:19]}"
    if pull and not f.remote_digest:
        return "image pulled again (its digest decides)"
    return None


def image_pull(plan: Plan, host: str, f: HostFacts) -> tuple[bool, str]:
    """Whether the host pulls the image, and why ("" no pull)."""
    hp = plan.host(host)
    if not (plan.runtime == "docker" and hp.instances and plan.image):
        return False, ""
    if not f.image_id:
        return True, f"pull {plan.image} (not on the host)"
    if pull_policy(plan) == "always" and (
            not f.remote_digest or f.remote_digest not in f.image_digests):
        return True, (f"pull {plan.image} (image_pull_policy always; registry digest "
                      f"{f.remote_digest or 'unknown'})")
    return False, ""


def group_changes(plan: Plan, facts: dict[str, HostFacts]) -> dict[str, str]:
    """Node group name -> why every member is (re)created: a group starts and stops as one
    (the head waits for every rank; a worker cannot rejoin a head that lost it), so one
    member to recreate recreates them all."""
    out: dict[str, str] = {}
    for g in plan.groups:
        for h in g.hosts:
            f = facts.get(h)
            if f is None:
                continue
            pull, _ = image_pull(plan, h, f)
            for inst in plan.host(h).instances:
                why = unit_change(plan, inst, f, pull) if inst.group == g.name else None
                if why and g.name not in out:
                    out[g.name] = f"{inst.name} on {h} {why}"
    return out


def actions_of(plan: Plan, host: str, f: HostFacts, groups: dict[str, str] | None = None
               ) -> HostActions:
    """``groups``: group_changes of the plan (the node groups to recreate, and why)."""
    hp = plan.host(host)
    groups = groups or {}
    reasons: list[str] = []
    pull, why_pull = image_pull(plan, host, f)
    if pull:
        reasons.append(why_pull)
    start, wait = [], []
    for inst in hp.instances:
        u = f.units.get(inst.name)
        why = unit_change(plan, inst, f, pull)
        if inst.group and inst.group in groups:
            why = why or f"its node group {inst.group} restarts ({groups[inst.group]})"
        if why:
            start.append(inst)
            wait.append(inst)  # a group's worker: until its head serves, or the group fails
            reasons.append(f"recreate {inst.name}: {why}")
        elif u is not None and not u.serving and inst.serves:
            wait.append(inst)
            reasons.append(f"wait for {inst.name}: running but not serving yet")
    planned = {i.name for i in hp.instances}
    remove = tuple(sorted(n for n in f.units if n not in planned))
    reasons.extend(f"remove {n}: not in the plan" for n in remove)
    process = plan.runtime == "process"
    install_vllm = process and bool(hp.instances) and not f.venvs.get("vllm", False)
    install_harness = process and bool(hp.tasks) and not f.venvs.get("harness", False)
    if install_vllm:
        reasons.append(f"install {plan.vllm_package} into {plan.vllm_venv}")
    if install_harness:
        reasons.append(f"install the harness into {plan.harness_venv}")
    proxy_start, proxy_remove, proxy_wait = None, False, None
    if hp.proxy:
        u = f.proxy
        why = ("not there" if u is None else
               f"spec changed ({u.spec_hash or 'none'} -> {hp.proxy.spec_hash})"
               if u.spec_hash != hp.proxy.spec_hash else "not running" if not u.running
               else None)
        if why:
            proxy_start = proxy_wait = hp.proxy
            reasons.append(f"start {hp.proxy.name}: {why}")
        elif start or wait or not u.serving:
            proxy_wait = hp.proxy
            reasons.append(f"wait for {hp.proxy.name}: every instance behind it up")
    elif f.proxy is not None:
        proxy_remove = True
        reasons.append(f"remove {PROXY_NAME}: not in the plan")
    reasons.extend(f"run task {t.name}" for t in hp.tasks)
    group_stop = tuple(i.name for i in start if i.group and i.name in f.units)
    return HostActions(host, tuple(start), remove, tuple(wait), pull, install_vllm,
                       install_harness, tuple(reasons), len(hp.tasks), proxy_start,
                       proxy_remove, proxy_wait, group_stop)


def check(plan: Plan, facts: dict[str, HostFacts], fitted: frozenset[str] = frozenset()
          ) -> Checked:
    """Every problem of every host the plan has facts for, and each such host's actions.
    ``fitted``: hosts whose GPU fit the planner has reported already (not said twice)."""
    problems: list[str] = []
    hosts: dict[str, HostActions] = {}
    groups = group_changes(plan, facts)
    for hp in plan.hosts:
        f = facts.get(hp.host)
        if f is None:
            continue
        problems.extend(problems_of(plan, hp.host, f, fit=hp.host not in fitted))
        hosts[hp.host] = actions_of(plan, hp.host, f, groups)
    return Checked(tuple(problems), hosts)
