"""The Slurm job driver: what one evalprov job does on its compute node. ONE job serves the
model once and runs every task against it (NEL submits one job per task):

    start vLLM (docker on the node, or `vllm serve` from a venv) -> wait for /health within
    the readiness timeout (a server that dies ends the job at once, quoting its log) -> run
    the tasks, `concurrency` at a time -> stop the server -> exit 0 (all succeeded) or 1

The job may serve several instances (execution.num_instances, NEL's topology: num_nodes /
num_instances nodes each) and an instance may span nodes (a head and headless workers):
every member off the batch node is an srun step of the job running this driver with
--member; haproxy on the batch node spreads the tasks' requests over the instances, and the
servers are watched while the tasks run (a lost one ends them at once, named first).

Started by the job script as
    python3 -m ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_job JOB_DIR
with JOB_DIR/lib on PYTHONPATH. Everything it does comes from JOB_DIR/job.json, written by
evalprov: no value is ever read by a shell. Secret values come from JOB_DIR/secrets.json
(0600), read and deleted before anything starts; they reach vLLM and the harness only
through the environment (a server container reads them from a root-only file in memory,
never from its config).

Progress is JOB_DIR/state.json (rewritten atomically), read by evalprov_slurm on the login
node. SIGUSR1 (the time limit is near) and SIGTERM (scancel, preemption, the limit itself) stop the
harness and the server this job started, mark the unfinished tasks failed and keep the
finished ones. A task that succeeded in an
earlier job of the same run (auto-resume, --rerun) is not run again. When the job was given
resumes left, it first submits its successor (`--dependency=afternotok`), which continues
with the unfinished tasks if this one ends early, and cancels it when every task is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    ENV_FROM_FILE,
    SECRETS_IN_CONTAINER,
    decisive_line,
    haproxy_path,
    health,
    proxy_mark,
    proxy_requests,
    proxy_servers,
    read_pid,
    remove_file,
    secret_file_path,
    stop_group,
    write_json,
    write_pid,
    write_secret_file,
)
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_tasks import (
    ServerWatch,
    beside_facts,
    pool_map,
    run_one,
    tail,
)


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def take_secrets(job_dir):
    """The secret values, once: the file is deleted as soon as it is read."""
    path = os.path.join(job_dir, "secrets.json")
    data = read_json(path, {})
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return data if isinstance(data, dict) else {}


def memory_dir():
    """Where this job keeps its server containers' secrets: a directory of the job's user
    in memory (/run/user/UID when the node has it, else /dev/shm)."""
    uid = os.getuid()
    base = f"/run/user/{uid}" if os.path.isdir(f"/run/user/{uid}") else "/dev/shm"
    return os.path.join(base, f"evalprov-{uid}")


def visible_gpus(planned):
    """The planned GPU indices are positions in the job's allocation (CUDA_VISIBLE_DEVICES
    as Slurm set it); the devices themselves are what the runtime is given."""
    alloc = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    return [alloc[i] if i < len(alloc) else str(i) for i in planned]


DRIVER_MODULE = "ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_job"


class Job:
    def __init__(self, job_dir, worker=False):
        self.dir = job_dir
        self.spec = read_json(os.path.join(job_dir, "job.json"))
        if not isinstance(self.spec, dict):
            raise SystemExit(f"evalprov job: {job_dir}/job.json is missing or not JSON")
        self.job_id = os.environ.get("SLURM_JOB_ID", "")
        if worker:  # the head read the file: a worker's come on its stdin, one JSON line
            line = sys.stdin.readline()
            self.secrets = {"deployment_env": json.loads(line) if line.strip() else {}}
        else:
            self.secrets = take_secrets(job_dir)
        self.stopping = threading.Event()
        self.timed_out = False
        self.lock = threading.Lock()
        self.servers = []  # Started: the servers on this node
        self.steps = []  # (instance index, member, node, srun Popen): members elsewhere
        self.heads = []  # (instance vars, host): each instance's API, as reached from here
        self.addresses = {}  # node index -> its address (the nodes the job looked up)
        self.proxy = None  # haproxy's Popen, in front of the instances
        self.state = {"job": self.job_id, "node": os.uname().nodename, "phase": "starting",
                      "message": "", "tasks": {}, "started": time.time()}
        for t in self.spec["tasks"]:
            done = read_json(os.path.join(t["dir"], "evalprov-task.json"), {})
            if done.get("status") == "succeeded":
                self.state["tasks"][t["name"]] = "succeeded"
            else:
                self.state["tasks"][t["name"]] = "pending"

    # -------------------------------------------------------------------- state
    def save(self, **changes):
        with self.lock:
            if changes.get("phase") and changes["phase"] != self.state.get("phase"):
                # the job's timeline (the node's clock): when each phase began
                self.state.setdefault("phases", []).append(
                    {"phase": changes["phase"], "at": round(time.time(), 3)})
            self.state.update(changes)
            self.state["updated"] = time.time()
            write_json(os.path.join(self.dir, f"state-{self.job_id or 'local'}.json"), self.state)
            write_json(os.path.join(self.dir, "state.json"), self.state)

    def task_state(self, name, status):
        with self.lock:
            self.state["tasks"][name] = status
        self.save()

    # --------------------------------------------------------------- the chain
    def submit_successor(self):
        """Auto-resume: the next job of the chain waits for this one to end early."""
        left = int(self.spec.get("resumes_left", 0)) - self.position()
        if left <= 0 or not self.job_id:
            return None
        argv = [*self.spec["sbatch_argv"], f"--dependency=afternotok:{self.job_id}",
                os.path.join(self.dir, "job.sbatch")]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if proc.returncode != 0:
            self.save(message=f"could not submit the resume job: {proc.stderr.strip()[:200]}")
            return None
        successor = proc.stdout.strip().split(";")[0]
        with open(os.path.join(self.dir, "jobs"), "a") as f:
            f.write(successor + "\n")
        return successor

    def position(self):
        """How many jobs of this chain came before this one."""
        try:
            with open(os.path.join(self.dir, "jobs")) as f:
                ids = [line.strip() for line in f if line.strip()]
        except OSError:
            return 0
        return ids.index(self.job_id) if self.job_id in ids else 0

    # ------------------------------------------------------------------ server
    def start_server(self, inst, member=""):
        """Start one server on this node. member: "" an instance (or a group's head) whose
        log is INSTANCE.log; "w<N>" a group's worker N of its instance."""
        runtime = self.spec["runtime"]
        suffix = f".{member}" if member else ""
        log_path = os.path.join(self.dir, f"{inst['name']}{suffix}.log")
        secret = {k: str(v) for k, v in (self.secrets.get("deployment_env") or {}).items()}
        if runtime == "process":
            venv = self.spec["vllm_venv"]
            env = {"PATH": os.path.join(venv, "bin") + ":/usr/local/bin:/usr/bin:/bin",
                   "HOME": os.environ.get("HOME", "/root"), "VIRTUAL_ENV": venv,
                   "LANG": "C.UTF-8"}
            env.update({k: str(v) for k, v in inst["env"].items()})
            if self.spec.get("device") == "gpu":
                env["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus(inst["gpus"]))
            env.update(secret)
            argv = [os.path.join(venv, "bin", inst["argv"][0]), *inst["argv"][1:]]
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, cwd=self.dir, start_new_session=True, close_fds=True)
            write_pid(os.path.join(self.dir, f"{inst['name']}{suffix}.pid"), proc.pid)
            self.servers.append(Started(inst, proc, log_path))
            return
        docker = shutil.which("docker") or "docker"
        name = f"evalprov-slurm-{self.job_id or os.getpid()}-{inst['name']}"
        name += f"-{member}" if member else ""
        # the secrets: a root-only file in memory the container reads (never its config)
        entry = [inst["entrypoint"][0]]
        secret_file = ""
        if secret:
            secret_file = secret_file_path(name, memory_dir())
            try:
                write_secret_file(secret_file, secret)
            except ValueError as exc:  # no directory in memory: the value stays off the disk
                raise RuntimeError(str(exc)) from None
            entry = ["python3", "-c", ENV_FROM_FILE, SECRETS_IN_CONTAINER, *entry]
        argv = [docker, "run", "-d", "--name", name, "--network", "host", "--ipc", "host",
                "--entrypoint", entry[0]]
        if secret:
            argv += ["-v", f"{secret_file}:{SECRETS_IN_CONTAINER}:ro"]
        for key, value in sorted(inst["labels"].items()):
            argv += ["--label", f"{key}={value}"]
        argv += ["--label", f"evalprov.slurm_job={self.job_id}"]
        if inst["gpus"] and self.spec.get("device") == "gpu":
            argv += ["--gpus", '"device={}"'.format(",".join(visible_gpus(inst["gpus"])))]
        for vol in inst["volumes"]:
            argv += ["-v", vol]
        env = dict(os.environ)
        env.update({k: str(v) for k, v in inst["env"].items()})
        for key in sorted(inst["env"]):
            argv += ["-e", key]  # the value comes from this process's environment
        argv += [inst["image"], *entry[1:], *inst["command"]]
        started = Started(inst, None, log_path, secret_file)
        self.servers.append(started)  # its secret file goes with it, whatever happens next
        with open(log_path, "ab") as log:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, env=env,
                                  check=False, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"docker run {inst['image']} failed (exit {proc.returncode}): "
                               + tail(log_path, 3).replace("\n", " ")[:300])
        started.handle = name

    def start_servers(self):
        """Every instance of the job: one on a node other than this one (the batch node) is
        an srun step of this job running this driver in member mode there, and so is each
        worker of an instance over several nodes; the rest start here. The workers of an
        instance start before its head; an address goes into a member's argv at the places
        evalprov left for it (its head's, its own)."""
        total = int(self.spec.get("nodes") or 1)
        nodes = job_nodes() if total > 1 else [os.uname().nodename]
        if len(nodes) < total:
            raise RuntimeError(f"the job has {len(nodes)} node(s) ({', '.join(nodes)}) but the "
                               f"deployment needs {total}")
        addresses = {}

        def address(j):
            if j not in addresses:
                addresses[j] = node_address(nodes[j])
            return addresses[j]

        for i, e in enumerate(self.spec["instances"]):
            inst, start, group = e["instance"], int(e["node"]), e.get("group")
            api = address(start) if start else "127.0.0.1"  # its API, as reached from here
            head = address(start) if group else api  # where its members reach its head
            if group:
                self.save(message=f"starting {inst['label']} over {group['nodes']} nodes ("
                          f"{', '.join(nodes[start:start + int(group['nodes'])])}; head {head})")
            for w in (group or {}).get("workers") or []:
                self.start_step(i, int(w["node"]), nodes[start + int(w["node"])], head)
            if start:
                self.start_step(i, 0, nodes[start], head)
            else:
                self.start_server(member_vars(e, 0, head))
            self.heads.append((inst, api))
        self.addresses = addresses

    def start_step(self, index, w, node, head):
        """Member w (0 the head) of instance `index` on `node`, as an srun step."""
        inst = self.spec["instances"][index]["instance"]
        argv = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--overlap",
                "--export=ALL", "--kill-on-bad-exit=0", sys.executable, "-m", DRIVER_MODULE,
                self.dir, "--member", str(index), str(w), head]
        with open(os.path.join(self.dir, f"{member_log(inst, w)}.srun.log"), "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out,
                                    stderr=subprocess.STDOUT, close_fds=True)
        # the secrets on the step's stdin (srun hands it to the member), never in an
        # environment or argv another user's ps could read; the pipe stays open: its end
        # tells the member to stop (srun turns a signal into SIGKILL of the step, which
        # would leave the member's container running)
        secret = json.dumps({k: str(v) for k, v in
                             (self.secrets.get("deployment_env") or {}).items()})
        with contextlib.suppress(OSError):
            proc.stdin.write(secret.encode() + b"\n")
            proc.stdin.flush()
        self.steps.append((index, w, node, proc))

    def dead_member(self):
        """The first member whose srun step or server ended, as a sentence with its log's
        decisive line (None: every one runs)."""
        for index, w, node, proc in self.steps:
            if proc.poll() is None:
                continue
            e = self.spec["instances"][index]
            text = tail(os.path.join(self.dir, f"{member_log(e['instance'], w)}.log"), 40)
            cause = decisive_line(text) or text.replace("\n", " ")[-300:]
            who = f"{'worker of ' if w else ''}{e['instance']['name']} ({member_part(e, w)})"
            return (f"{who} on node {node} exited ({proc.returncode}) before the deployment "
                    f"served: {cause}")
        for started in self.servers:
            if not started.alive():
                text = started.output()
                cause = decisive_line(text)
                which = (f" ({started.inst['name']})" if len(self.spec["instances"]) > 1
                         else "")
                head = f"vLLM{which} stopped before it became healthy on {self.state['node']}"
                return f"{head}: {cause}" if cause else f"{head}; log tail: {text[-500:]}"
        return None

    def stop_server(self):
        """Every member: the steps' stop when their stdin ends (a step still there after
        that is signalled); then the servers here, their output kept in their logs."""
        steps, self.steps = self.steps, []
        for _i, _w, _node, proc in steps:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for _i, _w, _node, proc in steps:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            stop_group(proxy.pid, grace=3.0)
            proxy.wait()
        servers, self.servers = self.servers, []
        for started in servers:
            started.stop()

    def wait_healthy(self):
        """Until every instance's head serves (asked where the proxy asks it), a member
        dies, the readiness timeout passes or the job is stopped: None, or why not."""
        deadline = time.monotonic() + int(self.spec["health_timeout"])
        served = self.spec.get("served_model_name")
        key = (self.secrets.get("deployment_env") or {}).get("VLLM_API_KEY")
        waiting = list(self.heads)
        while not self.stopping.is_set():
            waiting = [(inst, host) for inst, host in waiting
                       if not health(inst["port"], self.spec["health_path"], served, key,
                                     host=host)[0]]
            if not waiting:
                return None
            dead = self.dead_member()
            if dead:
                return dead
            if time.monotonic() > deadline:
                inst, host = waiting[0]
                log = os.path.join(self.dir, f"{inst['name']}.log")
                return (f"vLLM ({inst['name']} at {host}:{inst['port']}) was not healthy "
                        f"within {self.spec['health_timeout']} s "
                        "(execution.endpoint_readiness_timeout); log tail: "
                        + tail(log, 5).replace("\n", " ")[-400:])
            self.stopping.wait(2.0)
        return "the job was stopped while vLLM was loading"

    def start_proxy(self):
        """haproxy on this node in front of every instance (its config evalprov rendered;
        the other nodes' addresses in its environment): None once it sees every one up."""
        px = self.spec["proxy"]
        haproxy = haproxy_path()
        if not haproxy:
            return (f"haproxy is not installed on node {self.state['node']}, and the "
                    f"{len(px['servers'])} instances need it in front of them; install "
                    "haproxy on the compute nodes or set execution.proxy.type: none")
        cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(px["config"])
        env = {"PATH": "/usr/sbin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        env.update({f"{px['node_env']}{j}": addr for j, addr in self.addresses.items()})
        log_path = os.path.join(self.dir, "haproxy.log")
        with open(log_path, "ab") as log:
            self.proxy = subprocess.Popen([haproxy, "-db", "-f", cfg], env=env,
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=self.dir,
                                          start_new_session=True, close_fds=True)
        deadline = time.monotonic() + 60
        while not self.stopping.is_set():
            if self.proxy.poll() is not None:
                text = tail(log_path, 20)
                return f"the proxy (haproxy) exited: {decisive_line(text) or text[-300:]}"
            up = proxy_servers(px["stats_port"])
            if up and all(up.get(n, (False, 0))[0] for n in px["servers"]):
                proxy_mark(self.dir, px["stats_port"])
                return None
            if time.monotonic() > deadline:
                down = [n for n in px["servers"] if not up.get(n, (False, 0))[0]]
                return (f"the proxy (haproxy) does not see {', '.join(down)} up within 60 s, "
                        f"though each answered {self.spec['health_path']} here")
            self.stopping.wait(1.0)
        return "the job was stopped while the proxy was starting"

    def health_urls(self):
        """What the tasks' servers are watched at while they run: each instance's head."""
        return [f"http://{host}:{inst['port']}{self.spec['health_path']}"
                for inst, host in self.heads]

    # ------------------------------------------------------------------- tasks
    def run_task(self, task, servers=None):
        if self.stopping.is_set() or self.state["tasks"].get(task["name"]) == "succeeded":
            return None
        self.task_state(task["name"], "running")
        p = {"runtime": self.spec["runtime"], "timeout": int(self.spec["task_timeout"]),
             "log_lines": 40, "env": self.secrets.get("task_env") or {}}
        # the servers the job started, where it reaches them (the plan cannot know the
        # nodes' addresses)
        meta = run_one(p, {**task, "health_urls": self.health_urls()}, servers)
        status = meta["status"] if not self.stopping.is_set() else (
            "succeeded" if meta["rc"] == 0 else "failed")
        self.task_state(task["name"], status)
        return meta

    def stop_tasks(self):
        """The harness processes (their process groups) and containers of this job."""
        for t in self.spec["tasks"]:
            pid = read_pid(os.path.join(t["dir"], "harness.pid")).get("pid")
            if pid and self.state["tasks"].get(t["name"]) == "running":
                stop_group(pid, grace=2.0)
        if self.spec["runtime"] == "docker":
            docker = shutil.which("docker") or "docker"
            names = [t["container_name"] for t in self.spec["tasks"]]
            subprocess.run([docker, "rm", "-f", *names], capture_output=True, check=False,
                           timeout=60)

    def on_signal(self, signum, frame):
        """SIGUSR1 is Slurm's warning that the time limit is near (--signal=B:USR1@N): stop,
        and leave the auto-resume successor to continue. SIGTERM without that warning is a
        cancel (scancel, preemption): stop, and the successor is cancelled too."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.timed_out = signum == signal.SIGUSR1
        why = ("the job's time limit is near" if self.timed_out
               else f"signal {signal.Signals(signum).name}: the job was cancelled")
        self.save(phase="stopping", message=why)
        threading.Thread(target=self._stop_all, daemon=True).start()

    def _stop_all(self):
        self.stop_tasks()
        self.stop_server()

    # --------------------------------------------------------------------- run
    def run(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        # the time limit, kept by the job itself too (Slurm checks limits only about every
        # 30 s, so its warning can come that much early or late)
        budget = int(self.spec.get("walltime", 0)) - int(self.spec.get("signal_lead", 0))
        if budget > 0:
            timer = threading.Timer(budget, self.on_signal, (signal.SIGUSR1, None))
            timer.daemon = True
            timer.start()
        self.save()
        successor = self.submit_successor()
        pending = [t for t in self.spec["tasks"] if self.state["tasks"][t["name"]] != "succeeded"]
        code = 0
        try:
            if pending:
                code = self._serve_and_evaluate(pending)
        finally:
            self.stop_server()
        unfinished = [n for n, s in self.state["tasks"].items() if s != "succeeded"]
        for name in unfinished:
            if self.state["tasks"][name] in ("pending", "running"):
                self.state["tasks"][name] = "failed"
        # the successor continues only a run this job could not finish in its time
        if successor and (not unfinished or not self.timed_out):
            subprocess.run(["scancel", successor], capture_output=True, check=False, timeout=60)
        final = "done" if not unfinished else "failed"
        # tasks that failed on their own (the job served them to the end): each record says
        # why; the job's message is for how the job itself ended
        own = self.state.get("phase") == "evaluating" and not self.stopping.is_set()
        self.save(phase=final, ended=time.time(), **({"message": ""} if own else {}))
        return 143 if self.stopping.is_set() else (code or (1 if unfinished else 0))

    def _serve_and_evaluate(self, pending):
        entries = self.spec.get("instances") or []
        if entries:
            self.save(phase="loading", message="starting " + ", ".join(
                e["instance"]["label"] for e in entries))
            try:
                self.start_servers()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                self.save(phase="failed", message=str(exc)[:500])
                return 1
            problem = self.wait_healthy()
            if not problem and self.spec.get("proxy"):
                problem = self.start_proxy()
            if problem:
                self.save(phase="failed", message=problem)
                return 1
        self.save(phase="evaluating", message=f"{len(pending)} task(s)")
        # the servers watched while the tasks run (a lost one ends its tasks at once, named
        # first); the reproducibility record's facts of this node (image, /version, model,
        # harness), read beside the tasks as the eval module does on a host
        with ServerWatch(set(self.health_urls())).running() as servers:
            _, record = beside_facts(self.spec.get("provenance"), lambda: pool_map(
                lambda t: self.run_task(t, servers), pending, self.spec["concurrency"]))
        if record is not None:
            self.save(provenance=record)
        if self.spec.get("proxy"):  # the requests each instance answered
            write_json(os.path.join(self.dir, "proxy-requests.json"),
                       proxy_requests(self.dir))
        return 0


class Started:
    """A server this driver started on its node: a Popen (process runtime) or a container
    name (docker; None until `docker run` answered), its log, its secret file in memory."""

    def __init__(self, inst, handle, log_path, secret_file=""):
        self.inst, self.handle, self.log_path, self.secret_file = (inst, handle, log_path,
                                                                     secret_file)

    def alive(self):
        if isinstance(self.handle, subprocess.Popen):
            return self.handle.poll() is None
        docker = shutil.which("docker") or "docker"
        out = subprocess.run([docker, "inspect", "-f", "{{.State.Running}}", self.handle],
                             capture_output=True, text=True, check=False, timeout=30)
        return out.stdout.strip() == "true"

    def output(self, lines=40):
        if isinstance(self.handle, str):
            docker = shutil.which("docker") or "docker"
            out = subprocess.run([docker, "logs", "--tail", str(lines), self.handle],
                                 capture_output=True, text=True, check=False, timeout=30)
            return (out.stdout + out.stderr)[-20000:]
        return tail(self.log_path, lines)

    def stop(self):
        if isinstance(self.handle, subprocess.Popen):
            stop_group(self.handle.pid, grace=3.0)
            self.handle.wait()
        elif self.handle:
            docker = shutil.which("docker") or "docker"
            with open(self.log_path, "ab") as log:  # the container's own output, first
                subprocess.run([docker, "logs", "--tail", "2000", self.handle], stdout=log,
                               stderr=subprocess.STDOUT, check=False, timeout=60)
            subprocess.run([docker, "rm", "-f", self.handle], capture_output=True,
                           check=False, timeout=60)
        if self.secret_file:
            remove_file(self.secret_file)


def job_nodes():
    """The allocation's nodes, the batch node (this one) first."""
    out = subprocess.run(["scontrol", "show", "hostnames", os.environ.get("SLURM_JOB_NODELIST",
                                                                          "")],
                         capture_output=True, text=True, check=False, timeout=60)
    nodes = out.stdout.split()
    here = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    return [here] + [n for n in nodes if n != here] if here in nodes else nodes


def node_address(node):
    """Where the other nodes reach this one: Slurm's NodeAddr of it, as an IP address."""
    out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True,
                         text=True, check=False, timeout=60).stdout
    addr = next((w.split("=", 1)[1] for w in out.split() if w.startswith("NodeAddr=")), node)
    try:
        return socket.getaddrinfo(addr, None, socket.AF_INET)[0][4][0]
    except OSError:
        return addr


def member_vars(entry, w, head):
    """Member w (0 the head) of a job's instance as it runs: its own argv, with the head's
    address and its own where evalprov left places for them, and its GPUs."""
    inst, group = entry["instance"], entry.get("group")
    if w == 0:
        argv = list(group["head_argv"] if group else inst["argv"])
        if group:
            argv[int(group["address_at"])] = head
        if entry.get("host_at") is not None:  # the head of an instance off the batch node
            argv[int(entry["host_at"])] = head
    else:
        (spec,) = [x for x in group["workers"] if int(x["node"]) == w]
        argv = list(spec["argv"])
        argv[int(spec["address_at"])] = head
    gpus = group["gpus"] if group else inst["gpus"]
    return {**inst, "argv": argv, "entrypoint": argv[:1], "command": argv[1:], "gpus": gpus}


def member_log(inst, w):
    """A member's log name in the job directory (without .log)."""
    return f"{inst['name']}.w{w}" if w else inst["name"]


def member_part(entry, w):
    """What member w of an instance is: its head, or its worker's ranks."""
    if w == 0:
        return "its head"
    (spec,) = [x for x in entry["group"]["workers"] if int(x["node"]) == w]
    return spec.get("part") or f"data-parallel ranks from {spec['rank']}"


def run_member(job_dir, index, w, head):
    """One member on its node (an srun step of the batch node's job): member w (0 an
    instance's head, else a worker of its group) of instance `index`; start its server,
    stay while it runs, stop it when its stdin ends or it is signalled (the job stopping)."""
    job = Job(job_dir, worker=True)
    entry = job.spec["instances"][int(index)]
    inst, w = entry["instance"], int(w)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, lambda *_: stop.set())
    log_path = os.path.join(job_dir, f"{member_log(inst, w)}.log")
    with open(log_path, "a") as log:
        log.write(f"evalprov job {'worker ' + str(w) if w else 'member'} on node "
                  f"{os.uname().nodename}: {member_part(entry, w)}, head {head}\n")

    def head_gone():  # the batch node closes this step's stdin when it stops the job
        sys.stdin.read()
        stop.set()

    threading.Thread(target=head_gone, daemon=True).start()
    try:
        job.start_server(member_vars(entry, w, head), f"w{w}" if w else "")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        with open(log_path, "a") as log:
            log.write(f"ERROR: evalprov job member {member_log(inst, w)} could not start: "
                      f"{exc}\n")
        job.stop_server()
        return 3
    try:
        while not stop.is_set() and all(s.alive() for s in job.servers):
            stop.wait(1.0)
    finally:
        job.stop_server()  # the container's own output goes into log_path first
    return 0 if stop.is_set() else 3


def main(argv):
    if len(argv) == 6 and argv[2] == "--member":
        return run_member(argv[1], argv[3], argv[4], argv[5])
    if len(argv) != 2:
        print("usage: evalprov_job JOB_DIR [--member INSTANCE N HEAD_ADDRESS]",
              file=sys.stderr)
        return 2
    return Job(argv[1]).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
