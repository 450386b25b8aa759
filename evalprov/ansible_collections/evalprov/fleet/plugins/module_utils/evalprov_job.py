"""The Slurm job driver: what one evalprov job does on its compute node. ONE job serves the
model once and runs every task against it (NEL submits one job per task):

    start vLLM (docker on the node, or `vllm serve` from a venv) -> wait for /health within
    the readiness timeout (a server that dies ends the job at once, quoting its log) -> run
    the tasks, `concurrency` at a time -> stop the server -> exit 0 (all succeeded) or 1

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
    health,
    read_pid,
    remove_file,
    secret_file_path,
    stop_group,
    write_json,
    write_pid,
    write_secret_file,
)
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_tasks import (
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
        self.server = None  # Popen (process runtime) or container name (docker)
        self.secret_file = ""  # the server container's secrets, in memory (docker)
        self.server_log_path = ""  # where its output is kept once it stops
        self.workers = []  # (worker spec, node, srun Popen): the other nodes of a group
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
        """member: "" the job's one server or a group's head; "w<N>" a group's worker."""
        runtime = self.spec["runtime"]
        log_path = os.path.join(self.dir, f"{inst['name']}{'.' + member if member else ''}.log")
        self.server_log_path = log_path
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
                self.server = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, cwd=self.dir, start_new_session=True, close_fds=True)
            write_pid(os.path.join(self.dir, f"vllm{'.' + member if member else ''}.pid"),
                      self.server.pid)
            return
        docker = shutil.which("docker") or "docker"
        name = f"evalprov-slurm-{self.job_id or os.getpid()}-{inst['name']}"
        name += f"-{member}" if member else ""
        # the secrets: a root-only file in memory the container reads (never its config)
        entry = [inst["entrypoint"][0]]
        if secret:
            self.secret_file = secret_file_path(name, memory_dir())
            try:
                write_secret_file(self.secret_file, secret)
            except ValueError as exc:  # no directory in memory: the value stays off the disk
                raise RuntimeError(str(exc)) from None
            entry = ["python3", "-c", ENV_FROM_FILE, SECRETS_IN_CONTAINER, *entry]
        argv = [docker, "run", "-d", "--name", name, "--network", "host", "--ipc", "host",
                "--entrypoint", entry[0]]
        if secret:
            argv += ["-v", f"{self.secret_file}:{SECRETS_IN_CONTAINER}:ro"]
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
        with open(log_path, "ab") as log:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, env=env,
                                  check=False, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"docker run {inst['image']} failed (exit {proc.returncode}): "
                               + tail(log_path, 3).replace("\n", " ")[:300])
        self.server = name

    def server_alive(self):
        if isinstance(self.server, subprocess.Popen):
            return self.server.poll() is None
        docker = shutil.which("docker") or "docker"
        out = subprocess.run([docker, "inspect", "-f", "{{.State.Running}}", self.server],
                             capture_output=True, text=True, check=False, timeout=30)
        return out.stdout.strip() == "true"

    def server_log(self, inst, lines=40):
        if isinstance(self.server, str):
            docker = shutil.which("docker") or "docker"
            out = subprocess.run([docker, "logs", "--tail", str(lines), self.server],
                                 capture_output=True, text=True, check=False, timeout=30)
            return (out.stdout + out.stderr)[-20000:]
        return tail(os.path.join(self.dir, f"{inst['name']}.log"), lines)

    def start_group(self, inst, group):
        """A deployment over the allocation's nodes: the workers first (srun, one step per
        other node, each running this driver in worker mode), then the head here. The head's
        address goes into every member's argv at the place evalprov left for it."""
        nodes = job_nodes()
        if len(nodes) < int(group["nodes"]):
            raise RuntimeError(f"the job has {len(nodes)} node(s) ({', '.join(nodes)}) but the "
                               f"deployment needs {group['nodes']}")
        addr = node_address(nodes[0])
        self.save(message=f"starting {inst['label']} over {group['nodes']} nodes "
                          f"({', '.join(nodes[:int(group['nodes'])])}; head {addr})")
        secret = json.dumps({k: str(v) for k, v in
                             (self.secrets.get("deployment_env") or {}).items()})
        for w in group["workers"]:
            node = nodes[int(w["node"])]
            argv = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--overlap",
                    "--export=ALL", "--kill-on-bad-exit=0", sys.executable, "-m", DRIVER_MODULE,
                    self.dir, "--worker", str(w["node"]), addr]
            log = os.path.join(self.dir, f"{inst['name']}.w{w['node']}.srun.log")
            with open(log, "ab") as out:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out,
                                        stderr=subprocess.STDOUT, close_fds=True)
            # the secrets on the step's stdin (srun hands it to the worker), never in an
            # environment or argv another user's ps could read; the pipe stays open: its
            # end tells the worker to stop (srun turns a signal into SIGKILL of the step,
            # which would leave the worker's container running)
            with contextlib.suppress(OSError):
                proc.stdin.write(secret.encode() + b"\n")
                proc.stdin.flush()
            self.workers.append((w, node, proc))
        head = list(group["head_argv"])
        head[int(group["address_at"])] = addr
        self.start_server(member(inst, head, group["gpus"]))

    def dead_worker(self, inst):
        """The first worker whose srun step ended, as a sentence with its log's decisive
        line (None: every worker runs)."""
        for w, node, proc in self.workers:
            if proc.poll() is None:
                continue
            text = tail(os.path.join(self.dir, f"{inst['name']}.w{w['node']}.log"), 40)
            cause = decisive_line(text) or text.replace("\n", " ")[-300:]
            part = w.get("part") or f"data-parallel ranks from {w['rank']}"
            return (f"worker on node {node} ({part}) exited "
                    f"({proc.returncode}) before the group served: {cause}")
        return None

    def stop_workers(self):
        """Each worker stops its server when its stdin ends; a step still there after
        that is signalled."""
        workers, self.workers = self.workers, []
        for _w, _node, proc in workers:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for _w, _node, proc in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def stop_server(self):
        self.stop_workers()
        server, self.server = self.server, None
        if isinstance(server, subprocess.Popen):
            stop_group(server.pid, grace=3.0)
            server.wait()
        elif server:
            docker = shutil.which("docker") or "docker"
            if self.server_log_path:  # the container's own output, before it goes
                with open(self.server_log_path, "ab") as log:
                    subprocess.run([docker, "logs", "--tail", "2000", server], stdout=log,
                                   stderr=subprocess.STDOUT, check=False, timeout=60)
            subprocess.run([docker, "rm", "-f", server], capture_output=True, check=False,
                           timeout=60)
        if self.secret_file:
            remove_file(self.secret_file)
            self.secret_file = ""

    def wait_healthy(self, inst):
        deadline = time.monotonic() + int(self.spec["health_timeout"])
        served = self.spec.get("served_model_name")
        while not self.stopping.is_set():
            ok, _detail = health(inst["port"], self.spec["health_path"], served)
            if ok:
                return None
            dead = self.dead_worker(inst)
            if dead:
                return dead
            if not self.server_alive():
                text = self.server_log(inst)
                cause = decisive_line(text)
                head = f"vLLM stopped before it became healthy on {self.state['node']}"
                return f"{head}: {cause}" if cause else f"{head}; log tail: {text[-500:]}"
            if time.monotonic() > deadline:
                return (f"vLLM was not healthy within {self.spec['health_timeout']} s "
                        "(execution.endpoint_readiness_timeout); log tail: "
                        + self.server_log(inst, 5).replace("\n", " ")[-400:])
            self.stopping.wait(2.0)
        return "the job was stopped while vLLM was loading"

    # ------------------------------------------------------------------- tasks
    def run_task(self, task):
        if self.stopping.is_set() or self.state["tasks"].get(task["name"]) == "succeeded":
            return None
        self.task_state(task["name"], "running")
        p = {"runtime": self.spec["runtime"], "timeout": int(self.spec["task_timeout"]),
             "log_lines": 40, "env": self.secrets.get("task_env") or {}}
        meta = run_one(p, task)
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
        self.save(phase=final, ended=time.time())
        return 143 if self.stopping.is_set() else (code or (1 if unfinished else 0))

    def _serve_and_evaluate(self, pending):
        inst = self.spec.get("instance")
        if inst:
            self.save(phase="loading", message=f"starting {inst['label']}")
            try:
                group = self.spec.get("group")
                if group:
                    self.start_group(inst, group)
                else:
                    self.start_server(inst)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                self.save(phase="failed", message=str(exc)[:500])
                return 1
            problem = self.wait_healthy(inst)
            if problem:
                self.save(phase="failed", message=problem)
                return 1
        self.save(phase="evaluating", message=f"{len(pending)} task(s)")
        # the reproducibility record's facts of this node (image, /version, model, harness),
        # read beside the tasks as the eval module does on a host
        _, record = beside_facts(self.spec.get("provenance"), lambda: pool_map(
            self.run_task, pending, self.spec["concurrency"]))
        if record is not None:
            self.save(provenance=record)
        return 0


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


def member(inst, argv, gpus):
    """The instance as one group member runs it: its own argv and GPUs."""
    return {**inst, "argv": argv, "entrypoint": argv[:1], "command": argv[1:], "gpus": gpus}


def run_worker(job_dir, index, addr):
    """One group worker on its node (an srun step of the head's job): start its headless
    server, stay while it runs, stop it when its stdin ends or it is signalled (the head
    stopping)."""
    job = Job(job_dir, worker=True)
    inst, group = job.spec["instance"], job.spec["group"]
    (w,) = [w for w in group["workers"] if int(w["node"]) == int(index)]
    argv = list(w["argv"])
    argv[int(w["address_at"])] = addr
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, lambda *_: stop.set())
    log_path = os.path.join(job_dir, f"{inst['name']}.w{index}.log")
    with open(log_path, "a") as log:
        log.write(f"evalprov job worker {index} on node {os.uname().nodename}: "
                  f"{w.get('part') or 'data-parallel ranks from ' + str(w['rank'])}, "
                  f"head {addr}\n")

    def head_gone():  # the head closes this step's stdin when it stops the group
        sys.stdin.read()
        stop.set()

    threading.Thread(target=head_gone, daemon=True).start()
    try:
        job.start_server(member(inst, argv, group["gpus"]), f"w{index}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        with open(log_path, "a") as log:
            log.write(f"ERROR: evalprov job worker {index} could not start: {exc}\n")
        return 3
    try:
        while not stop.is_set() and job.server_alive():
            stop.wait(1.0)
    finally:
        job.stop_server()  # the container's own output goes into log_path first
    return 0 if stop.is_set() else 3


def main(argv):
    if len(argv) == 5 and argv[2] == "--worker":
        return run_worker(argv[1], argv[3], argv[4])
    if len(argv) != 2:
        print("usage: evalprov_job JOB_DIR [--worker N HEAD_ADDRESS]", file=sys.stderr)
        return 2
    return Job(argv[1]).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
