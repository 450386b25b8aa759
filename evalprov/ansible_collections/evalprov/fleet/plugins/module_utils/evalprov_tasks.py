"""Running evaluation tasks with NVIDIA's harness exactly as evalprov planned them, shared by
the evalprov_run_tasks module (a host of the fleet) and the Slurm job driver (evalprov_job,
on a compute node): the directory, container name, adapter address, run config, environment
and command all come in the task; each task's results and log are packed into one archive.

Secret values reach the harness only through its own environment. The process runtime starts
it with them. In a container they would be part of the container's config (`docker run -e`
puts every value there, for `docker inspect` to show), and the docker CLI would hold them in
its environment: instead they go to the container on stdin (`docker run -i`, one JSON line)
and a fixed python3 line in the container puts them into the environment and execs the
harness's command. Nothing is written to disk, and `--rm` leaves no stopped container.

A host's tasks can also run detached from the module that starts them (`start`), so that the
controller follows them with short `poll` calls (each one a retry event it shows): the
detached runner writes progress.json (per task: status, samples done / total, seconds) as
the harness logs its requests, and result.json when every task has ended."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    http_answer,
    poll_detached,
    provenance,
    start_detached,
    stop_group,
    write_json,
    write_pid,
)

PID, PROGRESS, RESULT = "run_tasks.pid", "progress.json", "result.json"
# nemo-evaluator's adapter logs one line per request it answered; tqdm (lm-eval, simple-evals
# on a terminal) writes "12/50 [" with its own total
_REQUEST_DONE = re.compile(rb"Request completed status_code=")
_TQDM = re.compile(rb"(\d+)/(\d+) \[")


def tail(path, lines):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# Run in the task's container before its command when it has secret values: read them from
# stdin (one JSON line), put them into the environment, exec the command (argv[1:]).
ENV_FROM_STDIN = ("import json, os, sys; os.environ.update(json.loads(sys.stdin.readline())); "
                  "os.execvp(sys.argv[1], sys.argv[1:])")


def command(p, task, values):
    """argv, env, cwd and stdin data for one task, as planned; secret values only in the
    harness's environment (in a container: through its stdin)."""
    env = dict(os.environ)
    env.update(task["env"])
    if p["runtime"] == "docker":
        docker = shutil.which("docker") or "docker"
        argv = [docker, "run", "--rm", "--name", task["container_name"], "--network", "host",
                "-v", f"{task['dir']}:/work"]
        for key, value in sorted(task["labels"].items()):
            argv += ["--label", f"{key}={value}"]
        for vol in task.get("volumes") or []:
            argv += ["-v", vol]
        for key in sorted(task["env"]):
            argv += ["-e", key]  # the (non-secret) value comes from this process's environment
        if not values:
            return [*argv, task["container"], *task["argv"]], env, task["cwd"], None
        return ([*argv, "-i", task["container"], "python3", "-c", ENV_FROM_STDIN,
                 *task["argv"]], env, task["cwd"], (json.dumps(values) + "\n").encode())
    env.update(values)
    if task.get("path_prepend"):
        env["PATH"] = task["path_prepend"] + os.pathsep + env.get("PATH", os.defpath)
    return list(task["argv"]), env, task["cwd"], None


def remove_stale_containers(owner):
    """This deployment's harness containers that an interrupted run left behind (the
    controller stopped, the container went on); never another deployment's."""
    docker = shutil.which("docker") or "docker"
    found = subprocess.run([docker, "ps", "-aq", "--filter", "label=evalprov.managed=eval",
                            "--filter", f"label=evalprov.owner={owner}"],
                           capture_output=True, text=True, check=False).stdout.split()
    if found:
        subprocess.run([docker, "rm", "-f", *found], capture_output=True, check=False)


LOST_RC = 125  # a task ended (or never started) because its server stopped answering


def end_task(p, task, proc):
    """Stop a running task: its container (docker) and the process group it leads."""
    if p["runtime"] == "docker":
        docker = shutil.which("docker") or "docker"
        subprocess.run([docker, "rm", "-f", task["container_name"]], capture_output=True,
                       check=False)
    stop_group(proc.pid)


def run_one(p, task, servers=None):
    """Run one task (p: runtime, env, timeout, log_lines) and pack its directory. servers
    (ServerWatch): when the task's server stops serving, the task is ended (or not started)
    and its record names that first; so does a task that failed while its server was down."""
    urls = task.get("health_urls") or []

    def lost():
        return servers.reason(urls) if servers else None

    tdir = task["dir"]
    logs = os.path.join(tdir, "logs")
    for d in (os.path.join(tdir, "results"), logs):
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(tdir, "run_config.yml"), "w") as f:
        json.dump(task["run_config"], f, indent=1)  # JSON is YAML: no PyYAML on the host
    values = dict((p["env"] or {}).get(task["name"]) or {})
    argv, env, cwd, stdin = command(p, task, values)
    log_path = os.path.join(logs, "harness.log")
    start = time.time()
    reason = lost()
    with open(log_path, "wb") as log:
        if reason:
            rc = LOST_RC
            log.write(f"evalprov: not started: {reason}\n".encode())
        else:
            rc, reason = _run_harness(p, task, argv, env, cwd, stdin, log, lost)
            if rc != 0 and not reason and servers:  # its own exit first: was it the server?
                reason = servers.confirm(urls)
    seconds = round(time.time() - start, 2)
    meta = {"name": task["name"], "slug": task["slug"], "rc": rc, "seconds": seconds,
            "started": start, "status": "succeeded" if rc == 0 else "failed"}
    if reason:
        meta["server_lost"] = reason
    with open(os.path.join(tdir, "evalprov-task.json"), "w") as f:
        json.dump(meta, f)
    archive = tdir + ".tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tdir, arcname=task["slug"])
    meta["archive"] = archive
    if rc != 0:
        meta["log_tail"] = tail(log_path, p["log_lines"])
    return meta


def _run_harness(p, task, argv, env, cwd, stdin, log, lost):
    """The harness's exit code, and why its server was lost when that ended it."""
    try:
        # its own process group, recorded: evalprov_stop_tasks stops it and all it started
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True,
                                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE)
    except OSError as exc:
        log.write(f"\nevalprov: cannot start the harness: {exc}\n".encode())
        return 127, None
    write_pid(os.path.join(task["dir"], "harness.pid"), proc.pid)
    if stdin is not None:
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except OSError:  # it exited already: its log says why
            pass
    deadline = time.monotonic() + p["timeout"]
    while True:
        try:
            return proc.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic()))), None
        except subprocess.TimeoutExpired:
            pass
        reason = lost()
        if reason or time.monotonic() >= deadline:
            end_task(p, task, proc)
            proc.wait()
            if reason:
                log.write(f"\nevalprov: task ended: {reason}\n".encode())
                return LOST_RC, reason
            log.write(f"\nevalprov: task timed out after {p['timeout']} s\n".encode())
            return 124, None


def limit_of(task):
    """The samples a task runs when its run config limits them (else unknown: None)."""
    params = ((task.get("run_config") or {}).get("config") or {}).get("params") or {}
    limit = params.get("limit_samples")
    return limit if isinstance(limit, int) and limit > 0 else None


class LogProgress:
    """Samples done so far, read incrementally off a task's harness.log."""

    def __init__(self, path, total=None):
        self.path, self.total, self.done, self.offset = path, total, 0, 0
        self._rest = b""

    def read(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(4 << 20)
        except OSError:
            return self.done
        self.offset += len(chunk)
        text = self._rest + chunk
        cut = max(text.rfind(b"\n"), text.rfind(b"\r"))
        whole, self._rest = (text[:cut + 1], text[cut + 1:]) if cut >= 0 else (b"", text)
        self._rest = self._rest[-4096:]
        bars = _TQDM.findall(whole)
        if bars:  # the harness's own count and total win over counted requests
            done, total = bars[-1]
            self.done, self.total = int(done), int(total) or self.total
        else:
            self.done += len(_REQUEST_DONE.findall(whole))
        return self.done


def pool_map(fn, items, concurrency):
    with ThreadPoolExecutor(max_workers=max(1, int(concurrency))) as pool:
        return list(pool.map(fn, items))


def beside_facts(spec, work):
    """work() while the record's facts of this host are read beside it (provenance(spec));
    returns (work's result, the record: None without a spec, {"error": ...} when it could
    not be read: a record is never worth failing the tasks for)."""
    with ThreadPoolExecutor(max_workers=1) as side:
        facts = side.submit(provenance, spec) if spec else None
        out = work()
        try:
            record = facts.result() if facts else None
        except Exception as exc:
            record = {"error": f"{type(exc).__name__}: {exc}"}
    return out, record


class ServerWatch:
    """Each server the tasks call, asked for its health every `interval` seconds while they
    run: `misses` answers in a row that are not 200 (a server that died, a node group that
    lost a member) make it lost; reason(urls) says so once every server a task calls (one,
    or each behind a proxy) is lost, and the tasks calling them end."""

    def __init__(self, urls, interval=2.0, misses=3, timeout=10.0):
        self.urls, self.interval = sorted(urls), interval
        self.misses, self.timeout = misses, timeout
        self.count, self.lost, self.lock = dict.fromkeys(self.urls, 0), {}, threading.Lock()

    def reason(self, urls):
        """Why the servers at urls are lost (None while one of them serves, or no urls)."""
        if urls and all(u in self.lost for u in urls):
            return self.lost[urls[0]]
        return None

    def confirm(self, urls):
        """Whether the servers at urls are down, each asked now up to `misses` times (a task
        failed: were its servers the cause?); the reason, or None when one answers 200."""
        for url in urls:
            if url in self.lost:
                continue
            for i in range(self.misses):
                if i:
                    time.sleep(self.interval)
                if self.ask(url):
                    return None
        return self.reason(urls)

    def ask(self, url):
        """One look at url; True when it answered 200 (a miss counts toward lost)."""
        status, what = http_answer(url, self.timeout)
        with self.lock:
            if status == 200:
                self.count[url] = 0
                return True
            self.count[url] = self.count.get(url, 0) + 1
            if self.count[url] >= self.misses and url not in self.lost:
                answer = (f"answered HTTP {status}" + (f": {what}" if what else "") if status
                          else f"did not answer ({what})")
                self.lost[url] = (f"its server stopped serving: {url} {answer}, "
                                  f"{self.misses} times in a row while the tasks ran")
            return False

    def look(self):
        for url in self.urls:
            if url not in self.lost:
                self.ask(url)

    def run(self, stop):
        while not stop.wait(self.interval):
            self.look()

    @contextlib.contextmanager
    def running(self):
        """The watch, in a thread of its own while the block runs."""
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


def run_all(p, every=1.0):
    """Every task of p (at most p["concurrency"] at a time), the record's facts read beside
    them, progress.json rewritten every `every` seconds; returns what the module returns."""
    run_dir = p["run_dir"]
    views = {t["name"]: {"status": "pending", "done": 0, "total": limit_of(t), "seconds": 0.0}
             for t in p["tasks"]}
    readers, started, lock, stop = {}, {}, threading.Lock(), threading.Event()

    def look():
        with lock:
            for name, reader in readers.items():
                view = views[name]
                view["done"], view["total"] = reader.read(), reader.total
                if view["status"] == "running":
                    view["seconds"] = round(time.time() - started[name], 1)
            write_json(os.path.join(run_dir, PROGRESS), views)

    def watch():
        while not stop.wait(every):
            look()

    def one(task):
        name = task["name"]
        with lock:
            started[name] = time.time()
            views[name]["status"] = "running"
            readers[name] = LogProgress(os.path.join(task["dir"], "logs", "harness.log"),
                                        limit_of(task))
        meta = run_one(p, task, servers)
        with lock:
            views[name].update(status=meta["status"], seconds=meta["seconds"])
        return meta

    servers = ServerWatch({u for t in p["tasks"] for u in t.get("health_urls") or []},
                          **p.get("server_watch", {}))
    look()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with servers.running():
            done, record = beside_facts(p.get("provenance"),
                                        lambda: pool_map(one, p["tasks"], p["concurrency"]))
    finally:
        stop.set()
        watcher.join()
    look()
    return {"changed": bool(done), "tasks": done, "provenance": record,
            "failed_tasks": [t["name"] for t in done if t["rc"] != 0]}


def start(p):
    """Start run_all(p) detached from the calling process (its own session, no inherited
    descriptors; secret values only in its memory and its children's environment); returns
    once its pid file is written, with its pid."""
    return start_detached(p["run_dir"], (PID, PROGRESS, RESULT), lambda: run_all(p),
                          "the task runner")


def poll(run_dir, wait=2.0, interval=0.2):
    """The detached runner's state, waiting up to `wait` seconds for it to end: running
    (with evalprov_eval_progress), or its result; failed when it stopped without one."""
    return {**poll_detached(run_dir, (PID, PROGRESS, RESULT), "evalprov_eval_progress",
                            "the task runner on the host stopped without a result; see the "
                            f"task logs under {run_dir}", wait, interval),
            "changed": False}  # the start made the change
