"""Preflight on a fleet host with 4 stub GPUs: the probe reported the host's real GPUs, and
preflight (read-only) left the host as it found it."""

import json
import os
from pathlib import Path


def test_probe_reported_the_four_gpus_nvidia_smi_lists(host):
    reported = json.loads(
        Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "preflight_gpus.json").read_text()
    )
    smi = host.run("nvidia-smi --query-gpu=index,uuid --format=csv,noheader")
    assert smi.rc == 0, smi.stderr
    real = [tuple(line.split(", ")) for line in smi.stdout.strip().splitlines()]
    assert len(real) == 4
    assert reported["present"] and reported["count"] == 4
    assert [(str(d["index"]), d["uuid"]) for d in reported["devices"]] == real


def test_preflight_changed_nothing_on_the_host(host):
    assert host.run("docker ps -aq").stdout.split() == []
    assert host.run("docker images -q").stdout.split() == []
    assert not host.file("/var/lib/evalprov/hf-cache").exists
