"""Stub GPU tools installed on the fake hosts (the only fakes in the testbed).

``nvidia-smi`` answers the queries evalprov makes for a configurable number of
GPUs; ``nvidia-container-runtime-hook`` exits 0 so that dockerd enables
``--gpus`` (dockerd registers its NVIDIA device driver only when the hook is on
its PATH) and the container sees ``NVIDIA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import uuid

GPU_NAME = "NVIDIA H100 80GB HBM3"
GPU_MEMORY_MIB = 81559
DRIVER_VERSION = "550.54.15"
CUDA_VERSION = "12.4"

HOOK = "#!/bin/sh\n# evalprov testbed stub: the real hook sets up GPU devices.\nexit 0\n"

_NVIDIA_SMI = r"""
import sys

FIELDS = {
    "index": lambda g: str(g["index"]),
    "name": lambda g: GPU_NAME,
    "uuid": lambda g: g["uuid"],
    "memory.total": lambda g: (str(GPU_MEMORY_MIB), " MiB"),
    "memory.used": lambda g: ("0", " MiB"),
    "memory.free": lambda g: (str(GPU_MEMORY_MIB), " MiB"),
    "utilization.gpu": lambda g: ("0", " %"),
    "utilization.memory": lambda g: ("0", " %"),
    "temperature.gpu": lambda g: "30",
    "power.draw": lambda g: ("70.00", " W"),
    "driver_version": lambda g: DRIVER_VERSION,
    "pci.bus_id": lambda g: "00000000:%02X:00.0" % (0x18 + g["index"]),
    "count": lambda g: str(len(GPUS)),
    "compute_cap": lambda g: "9.0",
    "persistence_mode": lambda g: "Enabled",
}
ALIASES = {"gpu_name": "name", "gpu_uuid": "uuid", "gpu_bus_id": "pci.bus_id"}


def table():
    out = ["+" + "-" * 77 + "+",
           "| NVIDIA-SMI %s   Driver Version: %s   CUDA Version: %s |"
           % (DRIVER_VERSION, DRIVER_VERSION, CUDA_VERSION),
           "+" + "-" * 77 + "+"]
    for g in GPUS:
        out.append("| %3d  %-30s | %6dMiB / %6dMiB |   0%%  Default |"
                   % (g["index"], GPU_NAME, 0, GPU_MEMORY_MIB))
    out.append("+" + "-" * 77 + "+")
    out.append("| Processes: none" + " " * 61 + "|")
    out.append("+" + "-" * 77 + "+")
    return "\n".join(out)


def main(argv):
    query = None
    fmt = ""
    ids = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-L", "--list-gpus"):
            for g in GPUS:
                print("GPU %d: %s (UUID: %s)" % (g["index"], GPU_NAME, g["uuid"]))
            return 0
        if a.startswith("--query-gpu="):
            query = a.split("=", 1)[1]
        elif a == "--query-gpu" and i + 1 < len(argv):
            i += 1
            query = argv[i]
        elif a.startswith("--format="):
            fmt = a.split("=", 1)[1]
        elif a == "--format" and i + 1 < len(argv):
            i += 1
            fmt = argv[i]
        elif a.startswith("--id=") or a.startswith("-i="):
            ids = a.split("=", 1)[1]
        elif a in ("-i", "--id") and i + 1 < len(argv):
            i += 1
            ids = argv[i]
        elif a in ("-h", "--help"):
            print("nvidia-smi (evalprov testbed stub)")
            return 0
        i += 1
    if not GPUS:
        print("No devices were found")
        return 6
    if query is None:
        print(table())
        return 0
    opts = {o.strip() for o in fmt.split(",") if o.strip()}
    if "csv" not in opts:
        print("ERROR: only --format=csv is supported by this stub", file=sys.stderr)
        return 2
    names = [ALIASES.get(f.strip(), f.strip()) for f in query.split(",") if f.strip()]
    for n in names:
        if n not in FIELDS:
            print('Field "%s" is not a valid field to query.' % n, file=sys.stderr)
            return 2
    gpus = GPUS
    if ids is not None:
        wanted = {x.strip() for x in ids.split(",")}
        gpus = [g for g in GPUS if str(g["index"]) in wanted or g["uuid"] in wanted]
        if not gpus:
            print("No devices were found", file=sys.stderr)
            return 6
    if "noheader" not in opts:
        hdr = []
        for n in names:
            v = FIELDS[n](GPUS[0])
            unit = v[1].strip() if isinstance(v, tuple) and "nounits" not in opts else ""
            hdr.append(n + (" [%s]" % unit if unit else ""))
        print(", ".join(hdr))
    for g in gpus:
        row = []
        for n in names:
            v = FIELDS[n](g)
            if isinstance(v, tuple):
                v = v[0] if "nounits" in opts else v[0] + v[1]
            row.append(v)
        print(", ".join(row))
    return 0


sys.exit(main(sys.argv[1:]))
"""


def gpu_uuids(hostname: str, count: int) -> list[str]:
    """Deterministic per-host GPU UUIDs (stable across runs)."""
    ns = uuid.UUID("6b1f1d2e-5a5c-4b8e-9d1f-3c0e7a5d2b10")
    return [f"GPU-{uuid.uuid5(ns, f'{hostname}/{i}')}" for i in range(count)]


def nvidia_smi(hostname: str, count: int) -> str:
    """Source of a stub ``nvidia-smi`` reporting ``count`` GPUs."""
    gpus = [{"index": i, "uuid": u} for i, u in enumerate(gpu_uuids(hostname, count))]
    header = (
        "#!/usr/bin/python3\n"
        f"# evalprov testbed stub nvidia-smi for {hostname}: {count} GPU(s)\n"
        f"GPU_NAME = {GPU_NAME!r}\n"
        f"GPU_MEMORY_MIB = {GPU_MEMORY_MIB}\n"
        f"DRIVER_VERSION = {DRIVER_VERSION!r}\n"
        f"CUDA_VERSION = {CUDA_VERSION!r}\n"
        f"GPUS = {gpus!r}\n"
    )
    return header + _NVIDIA_SMI
