"""Running evaluation tasks with NVIDIA's harness exactly as evalprov planned them, shared by
the evalprov_run_tasks module (a host of the fleet) and the Slurm job driver (evalprov_job,
on a compute node): the directory, container name, adapter address, run config, environment
and command all come in the task; each task's results and log are packed into one archive.

Secret values reach the harness only through its own environment. The process runtime starts
it with them. In a container they would be part of the container's config (`docker run -e`
puts every value there, for `docker inspect` to show), and the docker CLI would hold them in
its environment: instead they go to the container on stdin (`docker run -i`, one JSON line)
and a fixed python3 line in the container puts them into the environment and execs the
harness's command. Nothing is written to disk, and `--rm` leaves no stopped container."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time

from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    stop_group,
    write_pid,
)


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


def run_one(p, task):
    """Run one task (p: runtime, env, timeout, log_lines) and pack its directory."""
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
    with open(log_path, "wb") as log:
        try:
            # its own process group, recorded: evalprov_stop_tasks stops it and all it started
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True,
                                    stdin=subprocess.DEVNULL if stdin is None
                                    else subprocess.PIPE)
            write_pid(os.path.join(tdir, "harness.pid"), proc.pid)
            if stdin is not None:
                try:
                    proc.stdin.write(stdin)
                    proc.stdin.close()
                except OSError:  # it exited already: its log says why
                    pass
            try:
                rc = proc.wait(timeout=p["timeout"])
            except subprocess.TimeoutExpired:
                stop_group(proc.pid)
                proc.wait()
                rc = 124
                log.write(f"\nevalprov: task timed out after {p['timeout']} s\n".encode())
        except OSError as exc:
            rc = 127
            log.write(f"\nevalprov: cannot start the harness: {exc}\n".encode())
    seconds = round(time.time() - start, 2)
    meta = {"name": task["name"], "slug": task["slug"], "rc": rc, "seconds": seconds,
            "started": start, "status": "succeeded" if rc == 0 else "failed"}
    with open(os.path.join(tdir, "evalprov-task.json"), "w") as f:
        json.dump(meta, f)
    archive = tdir + ".tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tdir, arcname=task["slug"])
    meta["archive"] = archive
    if rc != 0:
        meta["log_tail"] = tail(log_path, p["log_lines"])
    return meta
