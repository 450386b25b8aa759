"""evalprov_vllm on a fleet host with 4 GPUs: exactly the planned containers run, each with the
planned argv (as its process sees it), its GPUs (NVIDIA_VISIBLE_DEVICES), its spec-hash
label and the secret from evalprov_secrets_file in its environment, which its config (docker
inspect) does not hold: the container reads it from a root-only file in memory."""

import json
import os
from pathlib import Path

import pytest
import yaml

HOST_VARS = yaml.safe_load(
    (Path(__file__).resolve().parents[9] / "tests/molecule/host_vars.yml").read_text()
)
INSTANCES = HOST_VARS["evalprov_molecule_instances"]


def secrets() -> dict:
    path = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "secrets.json")
    return json.loads(path.read_text())["deployment_env"]


def process(host, container: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the container's main process (PID 1 in the container)."""
    argv = host.check_output(f"docker exec {container} cat /proc/1/cmdline").rstrip("\0")
    env = host.check_output(f"docker exec {container} cat /proc/1/environ").rstrip("\0")
    return argv.split("\0"), dict(item.split("=", 1) for item in env.split("\0") if "=" in item)


def test_exactly_the_planned_containers_exist(host):
    names = host.check_output(
        "docker ps -a --filter label=evalprov.managed=true --format '{{.Names}}'"
    ).split()
    assert sorted(names) == sorted(i["name"] for i in INSTANCES)


@pytest.mark.parametrize("inst", INSTANCES, ids=lambda i: i["name"])
def test_container_runs_the_planned_argv_gpus_and_spec_hash(host, inst):
    info = json.loads(host.check_output(f"docker inspect {inst['name']}"))[0]
    assert info["State"]["Running"]
    secret_file = f"/run/evalprov/{inst['name']}.secrets.json"
    # the secrets' reader, then the planned argv
    entry = info["Config"]["Entrypoint"]
    assert entry[:2] == ["python3", "-c"] and entry[3] == "/run/evalprov-secrets.json"
    assert [*entry[4:], *info["Config"]["Cmd"]] == inst["argv"]
    assert info["Config"]["Image"] == inst["image"]
    labels = info["Config"]["Labels"]
    assert labels["evalprov.spec_hash"] == inst["spec_hash"]
    assert labels["evalprov.managed"] == "true" and labels["evalprov.instance"] == inst["name"]
    wanted = [inst["device_requests"][0]["device_ids"]]
    assert [d["DeviceIDs"] for d in info["HostConfig"]["DeviceRequests"]] == wanted
    assert info["HostConfig"]["NetworkMode"] == "host"
    assert info["HostConfig"]["Binds"] == [*inst["volumes"],
                                           f"{secret_file}:/run/evalprov-secrets.json:ro"]
    for value in secrets().values():
        assert value not in json.dumps(info)
    assert host.file(secret_file).mode == 0o600 and host.file(secret_file).user == "root"
    assert "tmpfs" in host.check_output("stat -f -c %T /run/evalprov")

    argv, env = process(host, inst["name"])
    # the stand-in's `vllm` launcher execs python on server.py with vllm's own arguments
    assert argv[3:] == inst["argv"][1:]
    assert env["NVIDIA_VISIBLE_DEVICES"] == ",".join(inst["device_requests"][0]["device_ids"])
    for name, value in secrets().items():
        assert env[name] == value
