"""What `evalprov apply` costs on a real fleet, beside a hand-written Ansible baseline.

For 1, 3 and 8 fake GPU hosts (tests/testbed: network-namespace hosts with sshd and dockerd,
8 stub GPUs each, the stand-in vLLM image from the local registry) this measures evalprov's
real code path, the CLI in a subprocess (``python -m evalprov.cli apply CONFIG -i INVENTORY``):

  (a) first apply: GPU facts, pull, start every planned instance, wait for health
  (b) no-op apply: the same again; nothing changes (median of --repeat runs)
  (c) ``apply --check`` in that converged state (median of --repeat runs)

each beside a BASELINE in the same invocation: plain ``ansible-playbook`` of a hand-written,
read-only playbook with one stat/command/uri probe per thing evalprov checks (nvidia-smi query,
docker info, image inspect, docker ps of evalprov's containers, each planned container's
inspect, each planned port with ss, the HF-cache/checkpoint dirs with stat, df, /health and
/v1/models per instance with uri), with evalprov's own Ansible settings (runner.ansible_env:
pipelining, ControlPersist, gathering explicit) and forks = hosts. For (a) the baseline runs on
the fresh hosts just before the first apply (it is the floor, not the same work).
evalprov runs with ``--forks HOSTS`` too (``--evalprov-forks default`` leaves Ansible's 5).

CPU is measured with cgroup cpuacct (v1; cpu.stat on a pure v2 machine), read before and after
each run and sampled every 50 ms during it:
  controller: the measured command starts inside a bench cgroup, so it counts everything it
              spawns, including ssh ControlPersist masters that daemonise (RUSAGE_CHILDREN
              misses those; it is kept in the JSON as a cross-check).
  hosts:      every process of each fake host's PID namespace (tini, sshd and all it runs,
              dockerd, containerd, shims) is moved into a per-host bench cgroup once the host is
              up; children inherit it. Containers live in the cgroup-parent dockerd gives them,
              read as well.
CPU-s per host = (controller + all hosts) / hosts. "other" = CPU the machine spent outside
those groups during the run (/proc/stat): other test suites sharing the 2 cores show up there;
they inflate wall time and, less, CPU time, so trust rows with a low other%.
SSH masters are closed before every measured run, so each run pays its own connections.

    python bench/fleet.py [--quick] [--hosts 1,3,8] [--repeat 3] [--net 81] [--json OUT]

Needs root and ``Fleet(net=...)``; never uses net 77 (test suite) or 79 (molecule).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_CPU_PER_HOST = 1.5  # CPU-s a no-op apply may cost per host (the issue)
TARGET_WALL_RATIO = 1.0  # ... and no more wall time than the baseline
RESERVED_NETS = {77: "the test suite", 79: "molecule"}
DEFAULT_NET = 81
SAMPLE_INTERVAL = 0.05
TICK = os.sysconf("SC_CLK_TCK")
# Actions that run on the controller only (no module run on the host).
LOCAL_ACTIONS = {"validate_argument_spec", "fail", "assert", "set_fact", "debug", "group_by",
                 "meta", "include_role", "include_tasks", "import_role", "add_host"}


class BenchError(RuntimeError):
    pass


class Interrupted(BaseException):  # SIGTERM, handled like KeyboardInterrupt
    pass


# ------------------------------------------------------------------------- CPU accounting
class CgroupCpu:
    """Per-run CPU of the controller (the measured command and all it spawns) and of each
    fake host, from cgroup usage counters (nanoseconds)."""

    def __init__(self, name: str):
        v1 = Path("/sys/fs/cgroup/cpuacct")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "cpuacct.usage").exists():
            self.base, self.v2 = v1, False
            self.method = "cgroup v1 cpuacct.usage"
        elif (v2 / "cgroup.controllers").exists():
            self.base, self.v2 = v2, True
            self.method = "cgroup v2 cpu.stat usage_usec"
        else:
            raise BenchError("no cgroup cpuacct (v1) or unified v2 hierarchy: cannot account "
                             "host-side CPU")
        self.root = self.base / name
        self.ctl = self.root / "ctl"
        self.hosts: dict[str, list[Path]] = {}  # host name -> [bench group, docker parent]

    def setup(self, host_groups: dict[str, str]) -> None:
        """``host_groups``: host name -> the cgroup-parent its dockerd uses."""
        self.remove()
        self.ctl.mkdir(parents=True, exist_ok=True)
        for name, docker_parent in host_groups.items():
            (self.root / name).mkdir(exist_ok=True)
            self.hosts[name] = [self.root / name, self.base / docker_parent]

    def _group_of(self, pid: int) -> str | None:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            _, ctrls, path = line.split(":", 2)
            if (self.v2 and ctrls == "") or (not self.v2 and "cpuacct" in ctrls.split(",")):
                return path
        return None

    def adopt(self, host: str, pids: list[int]) -> int:
        """Move the host's processes that sit in the root group into its bench group."""
        moved = 0
        procs = self.root / host / "cgroup.procs"
        for pid in pids:
            if self._group_of(pid) != "/":
                continue  # containers (dockerd's groups), or already ours
            with contextlib.suppress(OSError):
                procs.write_text(f"{pid}\n")
                moved += 1
        return moved

    def _usage(self, path: Path) -> int:
        try:
            if self.v2:
                for line in (path / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) * 1000
                return 0
            return int((path / "cpuacct.usage").read_text())
        except (OSError, ValueError):
            return 0  # a docker parent that does not exist (yet)

    def ctl_ns(self) -> int:
        return self._usage(self.ctl)

    def host_ns(self, host: str) -> int:
        return sum(self._usage(p) for p in self.hosts[host])

    def hosts_ns(self) -> int:
        return sum(self.host_ns(h) for h in self.hosts)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` started inside the controller group (children and daemons stay in it)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.ctl / "cgroup.procs"),
                *argv]

    def remove(self, timeout: float = 10.0) -> None:
        if not self.root.exists():
            return
        from tests.testbed.util import rmdir_tree

        rmdir_tree(self.root, time.monotonic() + timeout)


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


class Sampler:
    """(wall time, controller ns, hosts ns) every SAMPLE_INTERVAL while a run goes on, to
    split a run's CPU by phase."""

    def __init__(self, cpu: CgroupCpu):
        self.cpu = cpu
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _take(self) -> None:
        self.samples.append((time.time(), self.cpu.ctl_ns(), self.cpu.hosts_ns()))

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self._take()

    def __enter__(self) -> Sampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._take()

    def at(self, t: float) -> tuple[float, float]:
        """Controller and host CPU seconds consumed by time ``t`` (linear interpolation)."""
        s = self.samples
        if not s:
            return 0.0, 0.0
        if t <= s[0][0]:
            return s[0][1] / 1e9, s[0][2] / 1e9
        for a, b in itertools.pairwise(s):
            if a[0] <= t <= b[0]:
                k = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 1.0
                return ((a[1] + k * (b[1] - a[1])) / 1e9, (a[2] + k * (b[2] - a[2])) / 1e9)
        return s[-1][1] / 1e9, s[-1][2] / 1e9

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        c0, h0 = self.at(t0)
        c1, h1 = self.at(t1)
        return c1 - c0, h1 - h0


# ------------------------------------------------------------------------------ one run
@dataclass
class Run:
    label: str
    argv: list[str]
    rc: int = 0
    wall: float = 0.0
    ctl_cpu: float = 0.0
    host_cpu: dict[str, float] = field(default_factory=dict)
    rusage_children: float = 0.0
    machine_busy: float = 0.0
    bench_self: float = 0.0
    t_start: float = 0.0
    t_end: float = 0.0
    stdout: str = ""
    stderr: str = ""
    sampler: Sampler | None = None
    out_dir: Path | None = None

    @property
    def hosts_cpu(self) -> float:
        return sum(self.host_cpu.values())

    @property
    def total_cpu(self) -> float:
        return self.ctl_cpu + self.hosts_cpu

    @property
    def other_cpu(self) -> float:
        return max(0.0, self.machine_busy - self.total_cpu - self.bench_self)

    def per_host(self, n: int) -> float:
        return self.total_cpu / n

    def json(self) -> dict[str, Any]:
        return {
            "label": self.label, "argv": self.argv, "rc": self.rc, "wall_s": round(self.wall, 3),
            "controller_cpu_s": round(self.ctl_cpu, 3),
            "host_cpu_s": {h: round(v, 3) for h, v in self.host_cpu.items()},
            "rusage_children_cpu_s": round(self.rusage_children, 3),
            "machine_busy_cpu_s": round(self.machine_busy, 3),
            "other_cpu_s": round(self.other_cpu, 3), "bench_self_cpu_s": round(self.bench_self, 3),
        }


def _rusage_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _rusage_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.cpu = CgroupCpu(f"evalprov-bench-n{args.net}-{os.getpid()}")
        self.fleet = None
        self.current: subprocess.Popen | None = None

    # ------------------------------------------------------------------ fleet
    def fleet_up(self, n: int):
        from tests.testbed import Fleet, ensure_standin_image

        fleet = Fleet([self.args.gpus] * n, docker=True, net=self.args.net,
                      workdir=self.workdir / f"fleet-{n}")
        self.fleet = fleet
        fleet.up()
        image = ensure_standin_image(fleet)
        self.cpu.setup({h.name: h.cgroup_parent for h in fleet.hosts})
        self.adopt()
        return fleet, image

    def adopt(self) -> None:
        from tests.testbed.util import pids_in_ns

        for h in self.fleet.hosts:
            if h.pidns is not None:
                self.cpu.adopt(h.name, pids_in_ns("pid", h.pidns))

    def fleet_down(self) -> None:
        fleet, self.fleet = self.fleet, None
        if fleet is not None:
            try:
                fleet.down()
            finally:
                self.cpu.remove()

    def idle_host_cpu(self, seconds: float = 2.0) -> float:
        """CPU-s per second the fleet burns doing nothing (dockerd, containerd, servers)."""
        h0, t0 = self.cpu.hosts_ns(), time.monotonic()
        time.sleep(seconds)
        return (self.cpu.hosts_ns() - h0) / 1e9 / (time.monotonic() - t0)

    # -------------------------------------------------------------------- run
    def measure(self, label: str, argv: list[str], env: dict[str, str],
                out_dir: Path | None = None) -> Run:
        self.fleet.close_ssh_masters()
        self.adopt()
        time.sleep(0.2)  # let the hosts' sshds finish closing
        run = Run(label, argv, out_dir=out_dir)
        hosts = list(self.cpu.hosts)
        c0 = self.cpu.ctl_ns()
        h0 = {h: self.cpu.host_ns(h) for h in hosts}
        r0, m0, s0 = _rusage_children(), machine_busy_s(), _rusage_self()
        sampler = Sampler(self.cpu)
        with sampler:
            run.t_start = time.time()
            t0 = time.monotonic()
            proc = subprocess.Popen(self.cpu.wrap(argv), env=env, cwd=str(ROOT),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, start_new_session=True, text=True)
            self.current = proc
            try:
                out, err = proc.communicate(timeout=self.args.timeout)
            except subprocess.TimeoutExpired:
                self.kill_current()
                raise BenchError(f"{label}: no result after {self.args.timeout}s: "
                                 f"{' '.join(argv)}") from None
            finally:
                self.current = None
            run.wall = time.monotonic() - t0
            run.t_end = time.time()
        run.ctl_cpu = (self.cpu.ctl_ns() - c0) / 1e9
        run.host_cpu = {h: (self.cpu.host_ns(h) - h0[h]) / 1e9 for h in hosts}
        run.rusage_children = _rusage_children() - r0
        run.machine_busy = machine_busy_s() - m0
        run.bench_self = _rusage_self() - s0
        run.rc, run.stdout, run.stderr = proc.returncode, out, err
        run.sampler = sampler
        return run

    def kill_current(self) -> None:
        proc = self.current
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


# ------------------------------------------------------------------- inputs for the runs
def write_config(path: Path, out_dir: Path, image: str, instances: str | int) -> Path:
    cfg = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "vllm"}, "_self_"],
        "execution": {"output_dir": str(out_dir), "instances_per_host": instances,
                      "health_check_timeout": 120},
        "deployment": {"image": image, "hf_model_handle": "meta-llama/Llama-3.1-8B",
                       "served_model_name": "llama-standin", "tensor_parallel_size": 2,
                       "extra_args": "--max-model-len 4096"},
        # provisioning only: no evaluation tasks
        "evaluation": {"tasks": []},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def planned_vars(config: Path, inventory: Path, gpus: int) -> dict[str, Any]:
    """evalprov's own plan (same config, known GPU counts) as inventory variables."""
    from evalprov.config.loader import load_config
    from evalprov.hosts import host_facts
    from evalprov.inventory import render
    from evalprov.plan import HostFacts, plan

    loaded = load_config(config, (), default_execution="baremetal")
    hosts = [HostFacts(h.name, gpus) for h in host_facts("baremetal", str(inventory))]
    return render(plan(loaded.config, hosts))


BASELINE_PLAYBOOK = r"""---
# Hand-written, read-only: one module run per thing evalprov checks. Nothing changes.
- name: Baseline probe
  hosts: all
  gather_facts: false
  check_mode: false
  tasks:
    - name: GPUs (nvidia-smi query)
      ansible.builtin.command:
        argv: [nvidia-smi, "--query-gpu=index,name,memory.total,uuid",
               "--format=csv,noheader,nounits"]
      changed_when: false

    - name: Docker daemon (docker info)
      ansible.builtin.command:
        argv: [docker, info, --format, !unsafe "{{json .}}"]
      changed_when: false

    - name: Image present (docker image inspect)
      ansible.builtin.command:
        argv: [docker, image, inspect, --format, !unsafe "{{.Id}}", "{{ bench_image }}"]
      changed_when: false
      failed_when: false

    - name: Containers evalprov made (docker ps)
      ansible.builtin.command:
        argv: [docker, ps, -a, --filter, label=evalprov.managed=true,
               --format, !unsafe "{{.Names}}"]
      changed_when: false

    - name: Each planned container (docker inspect)
      ansible.builtin.command:
        argv: [docker, inspect, --type, container, --format, !unsafe "{{json .}}",
               "{{ item.name }}"]
      loop: "{{ bench_instances }}"
      loop_control: {label: "{{ item.name }}"}
      changed_when: false
      failed_when: false

    - name: Each planned port (ss)
      ansible.builtin.command:
        argv: [ss, -Hltn, "sport = :{{ item.port }}"]
      loop: "{{ bench_instances }}"
      loop_control: {label: "{{ item.port }}"}
      changed_when: false

    - name: Checkpoint / HF cache directories (stat)
      ansible.builtin.stat:
        path: "{{ item }}"
        get_checksum: false
      loop: "{{ bench_paths }}"

    - name: Disk free (df)
      ansible.builtin.command:
        argv: "{{ ['df', '-P'] + bench_disk_paths }}"
      changed_when: false
      failed_when: false

    - name: Each instance's /health (uri)
      ansible.builtin.uri:
        url: "http://127.0.0.1:{{ item.port }}{{ bench_health_path }}"
        timeout: 3
      loop: "{{ bench_instances }}"
      loop_control: {label: "{{ item.port }}"}
      failed_when: false

    - name: Each instance's /v1/models (uri)
      ansible.builtin.uri:
        url: "http://127.0.0.1:{{ item.port }}/v1/models"
        timeout: 3
      loop: "{{ bench_instances }}"
      loop_control: {label: "{{ item.port }}"}
      failed_when: false
"""


def baseline_inventory(path: Path, rendered: dict[str, Any]) -> tuple[Path, int]:
    """The baseline's variables per host (what to probe), from evalprov's plan. Returns the
    file and the module runs per host of the baseline playbook."""
    common = rendered["all"]["vars"]
    hosts, runs = {}, 0
    for name, hv in rendered["all"]["hosts"].items():
        insts = [{"name": i["name"], "port": i["port"]} for i in hv["evalprov_plan_instances"]]
        paths = sorted(set(common["evalprov_preflight_dirs"])
                       | set(common["evalprov_preflight_disk_paths"]))
        hosts[name] = {
            "bench_image": common["evalprov_image_name"],
            "bench_health_path": common["evalprov_health_path"],
            "bench_instances": insts,
            "bench_paths": paths,
            "bench_disk_paths": [*common["evalprov_preflight_disk_paths"], "/var/lib/docker"],
        }
        runs = max(runs, 5 + 4 * len(insts) + len(paths))
    path.write_text(yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=False))
    return path, runs


def clean_env() -> dict[str, str]:
    """The caller's environment minus Ansible settings; the interpreter's bin dir first on
    PATH (ansible-runner finds ansible-playbook there, not behind a pyenv shim)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONSTARTUP", None)
    return env


# --------------------------------------------------------------------------- results
ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S.*)$")
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


def evalprov_changed(run: Run) -> dict[str, int]:
    out = {}
    for line in run.stdout.splitlines():
        m = ROW.match(line)
        if m and m.group(1) != "host":
            if int(m.group(4)) or int(m.group(5)):
                raise BenchError(f"{run.label}: host {m.group(1)} failed:\n{_tail(run)}")
            out[m.group(1)] = int(m.group(3))
    return out


def baseline_changed(run: Run) -> dict[str, int]:
    out = {}
    for line in run.stdout.splitlines():
        m = RECAP.match(line)
        if m:
            if int(m.group(4)) or int(m.group(5)):
                raise BenchError(f"{run.label}: host {m.group(1)} failed:\n{_tail(run)}")
            out[m.group(1)] = int(m.group(3))
    return out


def _tail(run: Run) -> str:
    return (run.stdout[-3000:] + "\n" + run.stderr[-2000:]).strip()


def expect(run: Run, hosts: list[str], changed: str, parse) -> None:
    """rc 0, every host reported, and changed counts as expected ("none" or "some")."""
    if run.rc != 0:
        raise BenchError(f"{run.label}: exit {run.rc}\n{_tail(run)}")
    got = parse(run)
    if sorted(got) != sorted(hosts):
        raise BenchError(f"{run.label}: results for {sorted(got)}, expected {hosts}\n"
                         f"{_tail(run)}")
    if changed == "none" and any(got.values()):
        raise BenchError(f"{run.label}: expected no change, got {got}\n{_tail(run)}")
    if changed == "some" and not all(got.values()):
        raise BenchError(f"{run.label}: expected changes on every host, got {got}")


# ------------------------------------------------------------------- where time goes
def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def runner_runs(out_dir: Path) -> list[dict[str, Any]]:
    """The ansible-runner runs of one evalprov invocation, in order: spawn time (artifacts
    'command' file), end time ('rc' file), and their job events."""
    found = []
    for cmd in out_dir.glob("*/**/artifacts/*/command"):
        art = cmd.parent
        events = []
        for f in (art / "job_events").glob("*.json"):
            with contextlib.suppress(ValueError, OSError):
                events.append(json.loads(f.read_text()))
        events.sort(key=lambda e: e.get("counter", 0))
        rc = art / "rc"
        playbook = next((e["event_data"].get("playbook") for e in events
                         if e.get("event") == "playbook_on_start"), "?")
        found.append({"spawn": cmd.stat().st_mtime,
                      "end": rc.stat().st_mtime if rc.exists() else None,
                      "events": events, "playbook": Path(str(playbook)).name})
    return sorted(found, key=lambda r: r["spawn"])


def breakdown(run: Run, nhosts: int) -> list[dict[str, Any]]:
    """Phases of an evalprov run: wall, controller CPU, host CPU, module runs per host."""
    rows: list[dict[str, Any]] = []
    s = run.sampler

    def add(name: str, t0: float, t1: float, modules: float | None = None,
            skipped: float | None = None) -> None:
        ctl, host = s.between(t0, t1)
        rows.append({"phase": name, "wall": max(0.0, t1 - t0), "ctl": ctl, "host": host,
                     "modules_per_host": modules, "skipped_per_host": skipped})

    runs = runner_runs(run.out_dir) if run.out_dir else []
    prev, prev_name = run.t_start, "evalprov: python start-up, config, inventory, runner prep"
    for r in runs:
        ev = r["events"]
        starts = [e for e in ev if e.get("event") == "playbook_on_start"]
        stats = [e for e in ev if e.get("event") == "playbook_on_stats"]
        if not starts or not stats:
            continue
        pb = r["playbook"]
        add(prev_name, prev, r["spawn"])
        play0, play1 = _ts(starts[0]["created"]), _ts(stats[0]["created"])
        add(f"{pb}: ansible-playbook start-up (imports, inventory, playbook)", r["spawn"], play0)
        tasks = [e for e in ev if e.get("event") == "playbook_on_task_start"]
        bounds = [_ts(e["created"]) for e in tasks] + [play1]
        if tasks and bounds[0] > play0:
            add(f"{pb}: play start", play0, bounds[0])
        # Under `strategy: free` a task starts once per host: every slice of time between two
        # task starts goes to the task that started last, summed per task.
        slices: dict[str, list[tuple[float, float]]] = {}
        first: dict[str, dict[str, Any]] = {}
        for i, t in enumerate(tasks):
            d = t["event_data"]
            uuid = d.get("task_uuid") or d.get("uuid")
            slices.setdefault(uuid, []).append((bounds[i], bounds[i + 1]))
            first.setdefault(uuid, d)
        for uuid, d in first.items():
            action = d.get("task_action", "")
            remote = action.rsplit(".", 1)[-1] not in LOCAL_ACTIONS
            mods = skips = 0
            for e in ev:
                ed = e.get("event_data") or {}
                if ed.get("task_uuid") != uuid:
                    continue
                kind = e.get("event", "")
                if kind in ("runner_item_on_ok", "runner_item_on_failed"):
                    mods += remote
                elif kind in ("runner_on_ok", "runner_on_failed") and remote:
                    mods += not (ed.get("res") or {}).get("results")
                elif kind in ("runner_on_skipped", "runner_item_on_skipped"):
                    skips += 1
            name = d.get("task") or action
            wall = ctl = host = 0.0
            for t0, t1 in slices[uuid]:
                c, h = s.between(t0, t1)
                wall, ctl, host = wall + t1 - t0, ctl + c, host + h
            rows.append({"phase": f"{pb}: {name} [{action}]", "wall": wall, "ctl": ctl,
                         "host": host, "modules_per_host": mods / nhosts,
                         "skipped_per_host": skips / nhosts})
        end = r["end"] or play1
        add(f"{pb}: ansible-playbook exit, runner stats", play1, end)
        prev, prev_name = end, "evalprov: plan, render the inventory, start the next run"
    add("evalprov: summary, exit" if runs else prev_name, prev, run.t_end)
    return rows


def print_breakdown(title: str, rows: list[dict[str, Any]], out) -> None:
    print(f"\n{title}", file=out)
    print(f"  {'phase':<86} {'wall s':>7} {'ctl CPU':>8} {'host CPU':>9} {'mods/host':>9}",
          file=out)
    for r in rows:
        mods = "" if r["modules_per_host"] is None else f"{r['modules_per_host']:.0f}"
        if r["skipped_per_host"]:
            mods += f" +{r['skipped_per_host']:.0f}sk"
        print(f"  {r['phase'][:86]:<86} {r['wall']:7.2f} {r['ctl']:8.2f} {r['host']:9.2f} "
              f"{mods:>9}", file=out)
    tot = {k: sum(r[k] for r in rows) for k in ("wall", "ctl", "host")}
    print(f"  {'total':<86} {tot['wall']:7.2f} {tot['ctl']:8.2f} {tot['host']:9.2f}", file=out)


# ---------------------------------------------------------------------------- one size
def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.wall)[len(runs) // 2]


def bench_size(b: Bench, n: int, out) -> dict[str, Any]:
    args = b.args
    t_up = time.monotonic()
    fleet, image = b.fleet_up(n)
    up_s = time.monotonic() - t_up
    d = b.workdir / f"n{n}"
    d.mkdir(parents=True, exist_ok=True)
    inv = fleet.write_inventory(d / "inventory.yml")
    from tests.testbed import STANDIN_IMAGE

    instances = "auto" if args.instances is None else args.instances
    config = write_config(d / "config.yaml", d / "out" / "unused", STANDIN_IMAGE, instances)
    rendered = planned_vars(config, inv, args.gpus)
    base_inv, base_mods = baseline_inventory(d / "baseline-vars.yml", rendered)
    playbook = d / "baseline.yml"
    playbook.write_text(BASELINE_PLAYBOOK)
    per_host = {h: len(v["evalprov_plan_instances"]) for h, v in rendered["all"]["hosts"].items()}
    hosts = [h.name for h in fleet.hosts]
    made = "built" if image.get("built") else "cached"
    print(f"\n== {n} host(s): fleet up in {up_s:.1f}s (image {made}), "
          f"{sum(per_host.values())} instance(s) planned "
          f"({per_host[hosts[0]]}/host), baseline {base_mods} module runs/host", file=out,
          flush=True)

    env = clean_env()
    ev_env = {**env, **dict(kv.split("=", 1) for kv in args.env)}
    from evalprov.runner import ansible_env

    base_env = {**env, **ansible_env(d / "baseline", n)}
    (d / "baseline" / "tmp").mkdir(parents=True, exist_ok=True)
    ansible_playbook = str(Path(sys.executable).parent / "ansible-playbook")
    if not os.access(ansible_playbook, os.X_OK):
        ansible_playbook = shutil.which("ansible-playbook", path=env["PATH"]) or "ansible-playbook"

    def baseline(label: str, check: bool = False) -> Run:
        argv = [ansible_playbook, "-i", str(inv), "-i", str(base_inv), str(playbook)]
        if check:
            argv.append("--check")
        r = b.measure(label, argv, base_env)
        expect(r, hosts, "none", baseline_changed)
        return r

    counter = iter(range(1, 1000))

    def evalprov(label: str, check: bool = False) -> Run:
        out_dir = d / "out" / f"{next(counter):02d}-{label.split()[0]}"
        argv = [sys.executable, "-m", "evalprov.cli", "apply", str(config), "-i", str(inv),
                "-o", f"execution.output_dir={out_dir}"]
        if args.evalprov_forks == "hosts":
            argv += ["--forks", str(n)]
        if check:
            argv.append("--check")
        return b.measure(label, argv, ev_env, out_dir)

    idle = b.idle_host_cpu(1.0)
    results: dict[str, Any] = {"hosts": n, "instances_per_host": per_host[hosts[0]],
                               "baseline_module_runs_per_host": base_mods,
                               "idle_host_cpu_per_s_fresh": round(idle, 4), "cases": {}}

    # (a) first apply, beside the baseline probe of the fresh hosts
    first_what = "" if args.skip_baseline else ", after the baseline on the fresh hosts"
    print(f"  (a) first apply{first_what} ...", file=out, flush=True)
    base_a = [] if args.skip_baseline else [baseline("baseline fresh")]
    first = evalprov("first apply")
    expect(first, hosts, "some", evalprov_changed)
    running = {h: len(fleet.docker(h, "ps", "-q", "--filter", "label=evalprov.managed=true",
                                   "--filter", "status=running").stdout.split()) for h in hosts}
    if running != per_host:
        raise BenchError(f"first apply: running containers {running}, planned {per_host}")
    b.adopt()
    results["idle_host_cpu_per_s_served"] = round(b.idle_host_cpu(1.0), 4)
    results["cases"]["first"] = {"evalprov": [first], "baseline": base_a}

    # (b) no-op and (c) --check: interleaved, median of --repeat
    for case, check in (("noop", False), ("check", True)):
        ev, bs = [], []
        what = "" if args.skip_baseline else f" + {args.repeat} x baseline, interleaved"
        print(f"  ({'b' if case == 'noop' else 'c'}) {case}: {args.repeat} x evalprov{what} ...",
              file=out, flush=True)
        for i in range(args.repeat):
            r = evalprov(f"{case} {i + 1}", check)
            expect(r, hosts, "none", evalprov_changed)
            if check and "would change" in r.stdout:
                raise BenchError(f"{r.label}: --check reports changes\n{_tail(r)}")
            ev.append(r)
            if not args.skip_baseline:
                bs.append(baseline(f"baseline {case} {i + 1}", check))
        results["cases"][case] = {"evalprov": ev, "baseline": bs}

    results["breakdown_noop"] = breakdown(median_run(results["cases"]["noop"]["evalprov"]), n)
    results["breakdown_check"] = breakdown(median_run(results["cases"]["check"]["evalprov"]), n)
    return results


# ---------------------------------------------------------------------------- report
CASES = (("first", "(a) first apply"), ("noop", "(b) no-op apply"), ("check", "(c) --check"))


NCPU = os.cpu_count() or 1


def summarize(runs: list[Run], n: int) -> dict[str, float]:
    if not runs:  # --skip-baseline
        return dict.fromkeys(("wall", "cpu", "cpu_host", "ctl_host", "hosts_host", "other_pct"),
                             float("nan"))
    return {
        "wall": statistics.median(r.wall for r in runs),
        "cpu": statistics.median(r.total_cpu for r in runs),
        "cpu_host": statistics.median(r.per_host(n) for r in runs),
        "ctl_host": statistics.median(r.ctl_cpu / n for r in runs),
        "hosts_host": statistics.median(r.hosts_cpu / n for r in runs),
        "other_pct": statistics.median(100 * r.other_cpu / (r.wall * NCPU) for r in runs),
    }


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares total CPU = fixed + per_host * hosts."""
    if len({n for n, _ in points}) < 2:
        return None
    mx = statistics.fmean(n for n, _ in points)
    my = statistics.fmean(c for _, c in points)
    slope = (sum((n - mx) * (c - my) for n, c in points)
             / sum((n - mx) ** 2 for n, _ in points))
    return my - slope * mx, slope


def print_table(all_results: list[dict[str, Any]], args, out) -> None:
    print("\n" + "=" * 118, file=out)
    print("evalprov apply vs hand-written baseline probe playbook "
          f"(median of {args.repeat} runs for (b) and (c); CPU-s per host = "
          "(controller + hosts) / hosts)", file=out)
    head = (f"{'hosts':>5} {'case':<16} {'wall s':>7} {'base s':>7} {'ratio':>6}  "
            f"{'CPU-s/host':>10} {'(ctl+host)':>11} {'base':>6} {'ratio':>6}  "
            f"{'other% e/b':>10}  target (no-op): <= 1.5 CPU-s/host, wall <= base")
    print(head, file=out)
    print("-" * len(head), file=out)
    for res in all_results:
        n = res["hosts"]
        for key, name in CASES:
            ev = summarize(res["cases"][key]["evalprov"], n)
            bs = summarize(res["cases"][key]["baseline"], n)
            wr = ev["wall"] / bs["wall"]
            cr = ev["cpu_host"] / bs["cpu_host"]
            if key == "noop":
                ok_cpu = ev["cpu_host"] <= TARGET_CPU_PER_HOST
                ok_wall = wr <= TARGET_WALL_RATIO
                wall = "n/a" if wr != wr else "PASS" if ok_wall else "MISS"
                verdict = f"CPU {'PASS' if ok_cpu else 'MISS'}, wall {wall}"
            elif key == "first":
                verdict = "(base: probe of fresh hosts)"
            else:
                verdict = ""
            split = f"{ev['ctl_host']:.2f}+{ev['hosts_host']:.2f}"
            other = f"{ev['other_pct']:.0f}/{bs['other_pct']:.0f}"
            print(f"{n:>5} {name:<16} {ev['wall']:7.2f} {bs['wall']:7.2f} {wr:6.2f}  "
                  f"{ev['cpu_host']:10.2f} {split:>11} {bs['cpu_host']:6.2f} {cr:6.2f}  "
                  f"{other:>10}  {verdict}", file=out)
    print("-" * len(head), file=out)
    for key, name in CASES[1:]:
        parts = []
        for who in ("evalprov", "baseline"):
            f = fit([(r["hosts"], summarize(r["cases"][key][who], r["hosts"])["cpu"])
                     for r in all_results])
            if f and f[0] == f[0]:  # not nan
                parts.append(f"{who} {f[0]:.2f} CPU-s per run + {f[1]:.2f} per host")
        if parts:
            print(f"fit {name}: " + "; ".join(parts), file=out)
    print(f"other% e/b = share of the machine's {NCPU} cores busy outside the controller and "
          "fleet groups during the evalprov / baseline runs (other test suites): above ~30% it "
          "inflates wall time a lot and CPU time too (shared caches); compare rows with low "
          "other%.", file=out)


def method_text(b: Bench, args) -> str:
    return (
        f"method: fleet net {args.net} (10.213.{args.net}.0/24), {args.gpus} stub GPUs/host, "
        f"docker on; CPU from {b.cpu.method} ({b.cpu.root}): controller = the measured "
        "command's group (with its ssh ControlPersist masters), hosts = each fake host's PID "
        "namespace moved into a bench group + the cgroup-parent of its containers; SSH masters "
        "closed before every run; evalprov = `python -m evalprov.cli apply` "
        f"(instances_per_host: {'auto' if args.instances is None else args.instances}, "
        f"forks: {'= hosts' if args.evalprov_forks == 'hosts' else 'Ansible default'}); "
        "baseline = `ansible-playbook` with evalprov's ansible_env(), forks = hosts."
        + (f" evalprov env: {' '.join(args.env)}." if args.env else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 and 3 hosts only")
    p.add_argument("--hosts", default="1,3,8", help="host counts (default 1,3,8)")
    p.add_argument("--gpus", type=int, default=8, help="stub GPUs per host (default 8)")
    p.add_argument("--repeat", type=int, default=3, help="runs per no-op/check median")
    p.add_argument("--net", type=int,
                   default=int(os.environ.get("EVALPROV_TESTBED_NET") or DEFAULT_NET),
                   help=f"third octet of the fleet's subnet (default $EVALPROV_TESTBED_NET "
                        f"or {DEFAULT_NET})")
    p.add_argument("--instances", type=int, default=None,
                   help="instances_per_host (default auto: evalprov gathers GPU facts first)")
    p.add_argument("--evalprov-forks", choices=("hosts", "default"), default="hosts")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the evalprov runs (e.g. ANSIBLE_* settings to "
                        "measure a variant)")
    p.add_argument("--skip-baseline", action="store_true",
                   help="evalprov runs only (to compare variants of evalprov)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per measured run")
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--keep", action="store_true", help="keep the work dir (run artifacts)")
    args = p.parse_args(argv)
    out = sys.stdout

    sizes = [1, 3] if args.quick else [int(x) for x in args.hosts.split(",") if x.strip()]
    if args.net in RESERVED_NETS:
        print(f"net {args.net} belongs to {RESERVED_NETS[args.net]}; use another (default "
              f"{DEFAULT_NET})", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("the test fleet needs root", file=sys.stderr)
        return 2
    from tests.testbed import Fleet

    if "net" not in inspect.signature(Fleet).parameters:
        print("tests.testbed.Fleet has no net= parameter yet: refusing to start a fleet on the "
              "test suite's net", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    workdir = Path(tempfile.mkdtemp(prefix=f"evp-bench{args.net}-", dir="/tmp"))
    b = Bench(args, workdir)
    all_results, code = [], 0
    print(method_text(b, args), file=out, flush=True)
    try:
        for n in sizes:
            try:
                res = bench_size(b, n, out)
            finally:
                b.kill_current()
                t0 = time.monotonic()
                b.fleet_down()
                print(f"  fleet down in {time.monotonic() - t0:.1f}s", file=out, flush=True)
            all_results.append(res)
            print_breakdown(f"where a no-op evalprov apply spends time and CPU, {n} host(s) "
                            "(median run; CPU-s summed over controller / all hosts)",
                            res["breakdown_noop"], out)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({str(exc) or 'Ctrl-C'}): fleet torn down", file=sys.stderr)
        code = 130
    except BenchError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # teardown is not interruptible
        b.kill_current()
        with contextlib.suppress(Exception):
            b.fleet_down()
        b.cpu.remove()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if all_results:
        print_table(all_results, args, out)
    if args.json and all_results:
        data = {"method": method_text(b, args), "targets": {
            "noop_cpu_s_per_host": TARGET_CPU_PER_HOST, "noop_wall_ratio": TARGET_WALL_RATIO},
            "sizes": [{**{k: v for k, v in r.items() if k != "cases"},
                       "cases": {c: {w: [x.json() for x in runs] for w, runs in v.items()}
                                 for c, v in r["cases"].items()}} for r in all_results]}
        Path(args.json).write_text(json.dumps(data, indent=2))
    if args.keep:
        print(f"work dir kept: {workdir}", file=out)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
