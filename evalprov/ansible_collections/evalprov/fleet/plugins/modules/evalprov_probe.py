#!/usr/bin/python
"""One read-only probe of everything evalprov needs to know about a host, in one module run:
GPUs (nvidia-smi), docker and the NVIDIA container runtime, ports, disk, model paths, the
image, and the state of evalprov's own containers (spec hash label, running, health)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_probe
short_description: Read-only facts about a GPU host for evalprov
description:
  - Gathers GPU inventory, container runtime, port, disk, path, image and instance state in a
    single run. Changes nothing; supports check mode.
options:
  ports:
    description: Ports the planned instances use.
    type: list
    elements: int
    default: []
  paths:
    description: Checkpoint directories that must exist.
    type: list
    elements: str
    default: []
  image:
    description: Container image the instances run.
    type: str
  instances:
    description: Planned instances (name, port, spec_hash).
    type: list
    elements: dict
    default: []
  health_path:
    description: Health endpoint path.
    type: str
    default: /health
  served_model_name:
    description: Name /v1/models must list.
    type: str
  disk_paths:
    description: Directories whose free space is reported (the nearest existing parent).
    type: list
    elements: str
    default: []
  gpus_required:
    description: GPUs the plan uses on this host; fewer is a problem.
    type: int
    default: 0
  gpus_expected:
    description: GPU count the plan was made for (null when not known); a different count is a
      problem (the next apply re-plans with the count measured here).
    type: int
  min_disk_gib:
    description: Free GiB required in each disk path and docker's root dir.
    type: float
    default: 1
  runtime:
    description: docker (containers) or process (vllm serve from a venv).
    type: str
    default: docker
  state_dir:
    description: Where the process runtime keeps its instances' state files.
    type: path
    default: /var/lib/evalprov/vllm
  venvs:
    description: Venvs the process runtime needs, name -> path (reported present or not).
    type: dict
    default: {}
  fail_on_problems:
    description: Fail (with every problem in the message, and the facts) when there are any.
    type: bool
    default: false
  host:
    description: Host name used in problem messages.
    type: str
    default: this host
author: evalprov
"""

import http.client
import json
import os
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

from ansible.module_utils.basic import AnsibleModule

GPU_QUERY = ["--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"]


def run(argv, timeout=20):
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def gpus():
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"present": False, "count": 0, "devices": [], "error": "nvidia-smi not found"}
    rc, out, err = run([exe, *GPU_QUERY])
    if rc != 0:
        return {"present": False, "count": 0, "devices": [], "error": (err or out).strip()[:300]}
    devices = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            devices.append({"index": int(parts[0]), "name": parts[1],
                            "memory_mib": int(float(parts[2])),
                            "uuid": parts[3] if len(parts) > 3 else ""})
    return {"present": True, "count": len(devices), "devices": devices, "error": ""}


DOCKER_SOCK = "/var/run/docker.sock"


class _UnixHTTP(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(DOCKER_SOCK)


def docker_api(path):
    """GET on dockerd's API over its socket: (status, parsed JSON or None). Three calls
    answer what four docker CLI runs would, at a fraction of the CPU."""
    conn = _UnixHTTP("localhost", timeout=20)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, (json.loads(body) if body[:1] in (b"{", b"[") else None)
    finally:
        conn.close()


def docker_state(image, want_containers):
    state = {"present": bool(shutil.which("docker")) or os.path.exists(DOCKER_SOCK),
             "running": False, "nvidia_runtime": False, "root_dir": "/var/lib/docker",
             "image_present": False, "containers": {}, "managed": []}
    try:
        status, info = docker_api("/info")
    except OSError:
        return state
    if status != 200 or not isinstance(info, dict):
        return state
    state["running"] = True
    state["root_dir"] = info.get("DockerRootDir") or state["root_dir"]
    runtimes = info.get("Runtimes") or {}
    state["nvidia_runtime"] = "nvidia" in runtimes or bool(
        shutil.which("nvidia-container-runtime-hook"))
    if image:
        state["image_present"] = docker_api(
            "/images/" + urllib.parse.quote(image, safe="") + "/json")[0] == 200
    if want_containers:
        flt = urllib.parse.quote(json.dumps({"label": ["evalprov.managed=true"]}))
        status, found = docker_api(f"/containers/json?all=1&filters={flt}")
        for c in found if status == 200 and isinstance(found, list) else []:
            name = (c.get("Names") or ["/"])[0].lstrip("/")
            labels = c.get("Labels") or {}
            state["managed"].append(name)
            state["containers"][name] = {
                "spec_hash": labels.get("evalprov.spec_hash", ""),
                "running": c.get("State") == "running",
                "status": c.get("State", ""),
            }
        state["managed"].sort()
    return state


def port_busy(port):
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
        except OSError:
            return True
        finally:
            s.close()
    return False


def http_json(url, timeout=3):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            body = resp.read(65536)
            return resp.status, body
    except Exception:
        return 0, b""


def serving(port, health_path, served):
    status, _ = http_json(f"http://127.0.0.1:{port}{health_path}")
    if status != 200:
        return False
    status, body = http_json(f"http://127.0.0.1:{port}/v1/models")
    try:
        ids = [m.get("id") for m in json.loads(body or b"{}").get("data", [])]
    except ValueError:
        return False
    return status == 200 and (not served or served in ids)


def process_state(state_dir, instances):
    """The process runtime's instances from their state files (pid, start time, hash)."""
    state = {"containers": {}, "managed": []}
    try:
        names = sorted(f[:-5] for f in os.listdir(state_dir) if f.endswith(".json"))
    except OSError:
        names = []
    state["managed"] = names
    for name in names:
        try:
            with open(os.path.join(state_dir, name + ".json")) as f:
                rec = json.load(f)
            with open(f"/proc/{rec['pid']}/stat") as f:
                fields = f.read().split(") ", 1)[1].split()
            running = fields[0] not in ("Z", "X") and fields[19] == rec.get("start_time")
        except (OSError, ValueError, KeyError, IndexError):
            rec, running = {}, False
        state["containers"][name] = {"spec_hash": rec.get("spec_hash", ""),
                                     "running": running}
    return state


def venv_state(venvs):
    """name -> whether the venv has the command it is for (vllm / nemo-evaluator) and none of
    the CUDA packages the CPU build must not have."""
    out = {}
    for name, path in (venvs or {}).items():
        exe = {"vllm": "vllm", "harness": "nemo-evaluator"}.get(name, name)
        ok = os.access(os.path.join(path, "bin", exe), os.X_OK)
        if ok and name == "vllm":
            site = os.path.join(path, "lib")
            found = []
            for root, dirs, _ in os.walk(site):
                if root.endswith("site-packages"):
                    found = [d for d in dirs if d.endswith(".dist-info")]
                    break
            names = {d.split("-")[0].lower() for d in found}
            ok = "vllm" in names and not names & {"triton", "torchvision", "torchaudio",
                                                  "torchcodec"}
        out[name] = ok
    return out


def free_gib(path):
    p = path
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        return round(shutil.disk_usage(p or "/").free / 2**30, 1)
    except OSError:
        return None


def problems(p, facts):
    """One sentence per problem: the host, the value, and the fix."""
    host, out = p["host"], []
    g, d = facts["gpus"], facts["docker"]
    if p["gpus_expected"] is not None and p["gpus_expected"] != g["count"] and not (
            p["gpus_required"] > g["count"]):
        out.append(f"host {host}: has {g['count']} GPUs but the plan was made for "
                   f"{p['gpus_expected']} (an earlier run's facts or evalprov_gpu_count); run "
                   "evalprov apply again to plan for the GPUs it has now")
    if p["gpus_required"] > g["count"]:
        seen = g["error"] or "nvidia-smi"
        out.append(f"host {host}: has {g['count']} GPUs ({seen}) but the plan needs "
                   f"{p['gpus_required']}; lower tensor/pipeline/data parallel sizes or "
                   "instances_per_host, or drop the host from the inventory")
    docker_needed = p["runtime"] == "docker" and p["instances"]
    if docker_needed and not d["present"]:
        out.append(f"host {host}: docker is not installed; install docker")
    elif docker_needed and not d["running"]:
        out.append(f"host {host}: docker is installed but dockerd does not answer; start it")
    if p["gpus_required"] > 0 and docker_needed and d["running"] and not d["nvidia_runtime"]:
        out.append(f"host {host}: docker has no NVIDIA runtime (nvidia-container-runtime-hook "
                   "not on PATH); install nvidia-container-toolkit and restart dockerd")
    if facts["ports_busy"]:
        ports = ", ".join(map(str, facts["ports_busy"]))
        out.append(f"host {host}: port(s) {ports} already in use by something evalprov did "
                   "not start; stop it or set deployment.port")
    for path in facts["paths_missing"]:
        out.append(f"host {host}: checkpoint_path {path} is not a directory on the host; copy "
                   "the weights there or fix deployment.checkpoint_path")
    for path, free in sorted(facts["disk_free_gib"].items()):
        if free is not None and free < p["min_disk_gib"]:
            out.append(f"host {host}: {path} has {free} GiB free, less than "
                       f"{p['min_disk_gib']} GiB; free space there")
    return out


def main():
    module = AnsibleModule(
        argument_spec={
            "ports": {"type": "list", "elements": "int", "default": []},
            "paths": {"type": "list", "elements": "str", "default": []},
            "image": {"type": "str"},
            "instances": {"type": "list", "elements": "dict", "default": []},
            "health_path": {"type": "str", "default": "/health"},
            "served_model_name": {"type": "str"},
            "disk_paths": {"type": "list", "elements": "str", "default": []},
            "gpus_required": {"type": "int", "default": 0},
            "gpus_expected": {"type": "int"},
            "min_disk_gib": {"type": "float", "default": 1},
            "host": {"type": "str", "default": "this host"},
            "runtime": {"type": "str", "default": "docker"},
            "state_dir": {"type": "path", "default": "/var/lib/evalprov/vllm"},
            "venvs": {"type": "dict", "default": {}},
            "fail_on_problems": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    p = module.params
    docker = docker_state(p["image"] if p["runtime"] == "docker" else None,
                          p["runtime"] == "docker")
    units = docker if p["runtime"] == "docker" else process_state(p["state_dir"],
                                                                  p["instances"])
    ours = {i["port"] for i in p["instances"]
            if units["containers"].get(i["name"], {}).get("running")}
    instances = {}
    for inst in p["instances"]:
        c = units["containers"].get(inst["name"], {})
        up = bool(c.get("running")) and serving(inst["port"], p["health_path"],
                                                p["served_model_name"])
        instances[inst["name"]] = {
            "exists": bool(c),
            "running": bool(c.get("running")),
            "spec_hash": c.get("spec_hash", ""),
            "converged": bool(c) and c.get("spec_hash") == inst["spec_hash"]
            and bool(c.get("running")),
            "serving": up,
        }
    facts = {
        "gpus": gpus(),
        "docker": docker,
        "ports_busy": [port for port in p["ports"] if port not in ours and port_busy(port)],
        "paths_missing": [path for path in p["paths"] if not os.path.isdir(path)],
        "disk_free_gib": {d: free_gib(d) for d in p["disk_paths"] + [docker["root_dir"]]},
        "instances": instances,
        "managed": units["managed"],
        "venvs": venv_state(p["venvs"]),
    }
    planned = {i["name"] for i in p["instances"]}
    facts["converged"] = (
        all(i["converged"] and i["serving"] for i in instances.values())
        and set(units["managed"]) == planned
        and (p["runtime"] != "docker" or not p["image"] or docker["image_present"])
        and all(facts["venvs"].values()))
    found = problems(p, facts)
    if found and p["fail_on_problems"]:
        module.fail_json(msg="; ".join(found), problems=found, **facts)
    module.exit_json(changed=False, problems=found, **facts)


if __name__ == "__main__":
    main()
