#!/usr/bin/python
"""One read-only probe of a host, in one module run: raw facts only (GPUs from nvidia-smi,
docker and its NVIDIA runtime, the image present and what the registry serves for it,
listening ports, directories, free disk, venvs, and each instance evalprov made with its
labels and health). It decides nothing: evalprov's check() does, on the controller."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_probe
short_description: Read-only raw facts about a GPU host for evalprov
description:
  - Gathers GPUs, container runtime, image, listening ports, directories, disk, venvs and
    the state of evalprov's instances in a single run. Changes nothing; supports check mode.
options:
  runtime:
    description: docker (containers) or process (vllm serve from a venv).
    type: str
    default: docker
  image:
    description: Container image whose local id and digests are reported.
    type: str
  remote_digest:
    description: Also ask dockerd what digest the registry serves for the image now.
    type: bool
    default: false
  dirs:
    description: Paths reported as directory or not.
    type: list
    elements: str
    default: []
  disk_paths:
    description: Directories whose free space is reported (the nearest existing parent).
    type: list
    elements: str
    default: []
  venvs:
    description: Venvs reported usable or not, name (vllm, harness) -> path.
    type: dict
    default: {}
  state_dir:
    description: Where the process runtime keeps its instances' state files.
    type: path
    default: /var/lib/evalprov/vllm
  health_path:
    description: Health endpoint path of the instances.
    type: str
    default: /health
  served_model_name:
    description: Name /v1/models must list for an instance to count as serving.
    type: str
  api_key:
    description: The deployment's API key, sent to /v1/models when its servers require one.
    type: str
author: evalprov
"""

import os
import shutil
import subprocess

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    PROXY_NAME,
    containers,
    docker_api,
    haproxy_path,
    health,
    is_ours,
    listening_ports,
    proxy_servers,
    quote,
    read_state,
    state_names,
)

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


def docker_state(image, remote):
    state = {"present": bool(shutil.which("docker")) or os.path.exists("/var/run/docker.sock"),
             "running": False, "nvidia_runtime": False, "root_dir": "/var/lib/docker",
             "image": {"id": "", "digests": []}, "remote_digest": ""}
    status, info = docker_api("/info")
    if status != 200 or not isinstance(info, dict):
        return state
    state["running"] = True
    state["root_dir"] = info.get("DockerRootDir") or state["root_dir"]
    state["nvidia_runtime"] = "nvidia" in (info.get("Runtimes") or {}) or bool(
        shutil.which("nvidia-container-runtime-hook"))
    if image:
        status, img = docker_api(f"/images/{quote(image)}/json")
        if status == 200 and isinstance(img, dict):
            state["image"] = {"id": img.get("Id", ""), "digests": [
                d.rsplit("@", 1)[-1] for d in img.get("RepoDigests") or []]}
        if remote:
            status, dist = docker_api(f"/distribution/{quote(image)}/json", timeout=30)
            if status == 200 and isinstance(dist, dict):
                state["remote_digest"] = (dist.get("Descriptor") or {}).get("digest", "")
    return state


def docker_units():
    units = {}
    for c in containers("evalprov.managed=true"):
        name = (c.get("Names") or ["/"])[0].lstrip("/")
        labels = c.get("Labels") or {}
        units[name] = {"spec_hash": labels.get("evalprov.spec_hash", ""),
                       "port": labels.get("evalprov.port"),
                       "running": c.get("State") == "running",
                       "status": c.get("State", ""), "image_id": c.get("ImageID", "")}
    return units


def process_units(state_dir):
    units = {}
    for name in state_names(state_dir):
        if name == PROXY_NAME:
            continue
        rec = read_state(state_dir, name)
        running = bool(rec) and is_ours(rec)
        units[name] = {"spec_hash": rec.get("spec_hash", ""), "port": rec.get("port"),
                       "running": running, "status": "running" if running else "exited",
                       "image_id": ""}
    return units


def proxy_unit(state_dir):
    """The proxy evalprov started on this host (None: none), and whether its every backend
    server is up."""
    rec = read_state(state_dir, PROXY_NAME)
    if not rec:
        return None
    running = is_ours(rec)
    servers = proxy_servers(rec["stats_port"]) if running and rec.get("stats_port") else {}
    return {"spec_hash": rec.get("spec_hash", ""), "port": rec.get("port"),
            "running": running, "serving": bool(servers) and all(up for up, _ in servers.values())}


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


def main():
    module = AnsibleModule(
        argument_spec={
            "runtime": {"type": "str", "default": "docker"},
            "image": {"type": "str"},
            "remote_digest": {"type": "bool", "default": False},
            "dirs": {"type": "list", "elements": "str", "default": []},
            "disk_paths": {"type": "list", "elements": "str", "default": []},
            "venvs": {"type": "dict", "default": {}},
            "state_dir": {"type": "path", "default": "/var/lib/evalprov/vllm"},
            "health_path": {"type": "str", "default": "/health"},
            "served_model_name": {"type": "str"},
            "api_key": {"type": "str", "no_log": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    docker = p["runtime"] == "docker"
    dstate = docker_state(p["image"] if docker else None, p["remote_digest"])
    units = docker_units() if docker and dstate["running"] else (
        {} if docker else process_units(p["state_dir"]))
    for u in units.values():
        port = u.get("port")
        u["serving"] = bool(u["running"] and port and str(port).isdigit() and health(
            int(port), p["health_path"], p["served_model_name"], p["api_key"])[0])
    disk = list(p["disk_paths"]) + ([dstate["root_dir"]] if docker else [])
    module.exit_json(
        changed=False,
        evalprov_facts=True,
        gpus=gpus(),
        docker=dstate,
        listening=listening_ports(),
        dirs={d: os.path.isdir(d) for d in p["dirs"]},
        disk_free_gib={d: free_gib(d) for d in disk},
        venvs=venv_state(p["venvs"]),
        units=units,
        proxy=proxy_unit(p["state_dir"]),
        haproxy=haproxy_path(),
    )


if __name__ == "__main__":
    main()
