#!/usr/bin/python
"""evalprov's hands on a Slurm login node. Every command is an argv (no shell); every value
comes from evalprov's decision.

state=probe   raw facts, read-only (also under --check): where sbatch is, whether
              `sbatch --test-only` accepts the job as evalprov would submit it (account,
              partition, gres, time), which paths exist on the cluster, and the jobs of this
              deployment Slurm still knows.
state=secrets write the secret values the job reads (and deletes) to JOB_DIR/secrets.json,
              0600, from the module's no_log arguments (never a file on the controller).
state=submit  sbatch the job script already in the job directory; the job id is appended
              to JOB_DIR/jobs (an auto-resume chain adds its own).
state=poll    one look at the job chain: Slurm's state of each job (squeue, then scontrol,
              then sacct) and the driver's JOB_DIR/state.json. `running` is false once no
              job of the chain is pending or running.
state=cancel  scancel every job of the chain (or of `jobs`) and wait until none runs.
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_slurm
short_description: Probe, submit, follow and cancel evalprov's Slurm job
options:
  state:
    description: What to do.
    type: str
    choices: [probe, secrets, submit, poll, cancel]
    required: true
  job_dir:
    description: The run's job directory on the cluster.
    type: path
  sbatch_argv:
    description: sbatch and its options, without the script.
    type: list
    elements: str
    default: []
  script:
    description: The job script (probe only; sent to sbatch --test-only on stdin).
    type: str
  paths:
    description: Paths that must exist on the cluster, by what they are.
    type: dict
    default: {}
  job_name:
    description: Job name of this deployment (probe, cancel).
    type: str
  secrets:
    description: Secret values for the job (state=secrets), written 0600 to JOB_DIR/secrets.json.
    type: dict
    default: {}
  jobs:
    description: Job ids to cancel besides the chain's.
    type: list
    elements: str
    default: []
  timeout:
    description: Seconds cancel waits for the jobs to end.
    type: int
    default: 60
author: evalprov
"""

import json
import os
import shutil
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_tasks import (
    LogProgress,
    limit_of,
)

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED")


def run(argv, stdin=None, timeout=60):
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def chain(job_dir):
    try:
        with open(os.path.join(job_dir, "jobs")) as f:
            return [line.strip() for line in f if line.strip()]
    except OSError:
        return []


def job_state(job_id):
    """(state, reason, exit code) from squeue, then scontrol, then sacct (jobs leave the
    controller's memory after MinJobAge; sacct needs accounting)."""
    rc, out, _ = run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
    if rc == 0 and out.strip():
        state, _, reason = out.strip().splitlines()[0].partition("|")
        return state, reason, None
    rc, out, _ = run(["scontrol", "show", "job", "-o", job_id])
    if rc == 0 and "JobState=" in out:
        fields = dict(w.partition("=")[::2] for w in out.split())
        return fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""), fields.get("ExitCode")
    rc, out, _ = run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode,Reason"])
    if rc == 0 and out.strip():
        state, code, reason = ([*out.strip().splitlines()[0].split("|"), "", ""])[:3]
        return state.split()[0], reason, code
    return "UNKNOWN", "Slurm no longer knows the job", None


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def probe(p):
    sbatch = shutil.which("sbatch")
    out = {"evalprov_facts": True, "slurm": True, "sbatch": sbatch, "test_only": None,
           "paths": {}, "jobs": []}
    for what, path in (p["paths"] or {}).items():
        out["paths"][what] = {"path": path, "exists": os.path.exists(path),
                              "dir": os.path.isdir(path)}
    if not sbatch:
        return out
    rc, so, se = run([*p["sbatch_argv"], "--test-only"], stdin=p["script"] or "")
    message = (se.strip() or so.strip()).splitlines()
    out["test_only"] = {"ok": rc == 0, "message": message[-1][:300] if message else ""}
    if p["job_name"]:
        rc, so, _ = run(["squeue", "-h", "--name", p["job_name"], "-o", "%i|%T"])
        out["jobs"] = [dict(zip(("id", "state"), line.split("|"), strict=False))
                       for line in so.splitlines() if line.strip()]
    return out


def poll(p):
    ids = chain(p["job_dir"])
    jobs = []
    for job_id in ids:
        state, reason, code = job_state(job_id)
        # ran: its driver started (a successor cancelled before it ever ran did not)
        jobs.append({"id": job_id, "state": state, "reason": reason, "exit_code": code,
                     "ran": os.path.exists(os.path.join(p["job_dir"], f"state-{job_id}.json"))})
    live = [j for j in jobs if j["state"] not in ENDED and j["state"] != "UNKNOWN"]
    # a successor waiting on a job that completed can never start (DependencyNeverSatisfied)
    running = any(j["reason"] != "DependencyNeverSatisfied" for j in live)
    driver = read_json(os.path.join(p["job_dir"], "state.json"))
    tasks = driver.get("tasks") or {}
    spec = read_json(os.path.join(p["job_dir"], "job.json"))
    progress = {}  # samples done per task, off each harness log (the live view shows them)
    for t in spec.get("tasks") or []:
        log = LogProgress(os.path.join(t["dir"], "logs", "harness.log"), limit_of(t))
        progress[t["name"]] = {"status": tasks.get(t["name"], "pending"), "done": log.read(),
                               "total": log.total}
    counts = os.path.join(p["job_dir"], "proxy-requests.json")
    archives = [{"name": t["name"], "slug": t["slug"], "status": tasks.get(t["name"], "pending"),
                 "archive": t["dir"] + ".tar.gz"} for t in spec.get("tasks") or []
                if os.path.exists(t["dir"] + ".tar.gz")]
    return {"evalprov_slurm_state": True, "running": running, "jobs": jobs,
            "phase": driver.get("phase", "queued"), "message": driver.get("message", ""),
            "node": driver.get("node"), "tasks": tasks, "evalprov_eval_progress": progress,
            "archives": archives,
            # the requests each instance behind the job's proxy answered (when it had one)
            "proxy_requests": counts if os.path.exists(counts) else "",
            # the job's own timeline (the node's clock) and the node's facts for the record
            "timeline": {"started": driver.get("started"), "ended": driver.get("ended"),
                         "phases": driver.get("phases") or []},
            **({"provenance": driver["provenance"]}
               if isinstance(driver.get("provenance"), dict) else {})}


def cancel(p):
    ids = list(dict.fromkeys([*(chain(p["job_dir"]) if p["job_dir"] else []), *p["jobs"]]))
    if p["job_name"]:
        _rc, so, _ = run(["squeue", "-h", "--name", p["job_name"], "-o", "%i"])
        ids += [i for i in so.split() if i not in ids]
    if not ids:
        return {"changed": False, "cancelled": []}
    live = [i for i in ids if job_state(i)[0] not in ENDED]
    if live:
        run(["scancel", *live])
    deadline = time.monotonic() + p["timeout"]
    while live and time.monotonic() < deadline:
        live = [i for i in live if job_state(i)[0] not in ENDED]
        time.sleep(0.5)
    return {"changed": True, "cancelled": ids, "still_running": live}


def main():
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "choices": ["probe", "secrets", "submit", "poll",
                                                 "cancel"], "required": True},
            "secrets": {"type": "dict", "default": {}, "no_log": True},
            "job_dir": {"type": "path"},
            "sbatch_argv": {"type": "list", "elements": "str", "default": []},
            "script": {"type": "str"},
            "paths": {"type": "dict", "default": {}},
            "job_name": {"type": "str"},
            "jobs": {"type": "list", "elements": "str", "default": []},
            "timeout": {"type": "int", "default": 60},
        },
        supports_check_mode=True,
    )
    p = module.params
    state = p["state"]
    if state == "probe":
        module.exit_json(changed=False, **probe(p))
    if state == "poll":
        module.exit_json(changed=False, **poll(p))
    if module.check_mode:
        module.exit_json(changed=True, msg=f"would {state}")
    if state == "cancel":
        module.exit_json(**cancel(p))
    if state == "secrets":
        path = os.path.join(p["job_dir"], "secrets.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(p["secrets"], f)
        module.exit_json(changed=True, path=path)
    script = os.path.join(p["job_dir"], "job.sbatch")
    rc, out, err = run([*p["sbatch_argv"], script])
    if rc != 0:
        module.fail_json(msg=f"sbatch refused the job: {(err or out).strip()[:300]}")
    job_id = out.strip().split(";")[0]
    with open(os.path.join(p["job_dir"], "jobs"), "a") as f:
        f.write(job_id + "\n")
    module.exit_json(changed=True, job_id=job_id)


if __name__ == "__main__":
    main()
