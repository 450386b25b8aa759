"""`evalprov apply` on a real fleet: network-namespace hosts with sshd and dockerd, the
stand-in vLLM image from the local registry, stub GPUs (8, 4 and 2 of them).

Each test asserts real state on the hosts (containers, argv, GPUs, labels, ports) and, for
idempotence, runner stats — never grepped stdout."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evalprov import apply
from evalprov.config.loader import load_config
from evalprov.hosts import host_facts
from tests.testbed import STANDIN_IMAGE
from tests.testbed.util import http_request

pytestmark = pytest.mark.fleet

SERVED = "llama-standin"
SECRET = "hf_evalprov_fleet_secret_6e1f0c"  # grepped for in every file evalprov writes


def write_config(tmp_path: Path, **over) -> Path:
    cfg = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "vllm"}, "_self_"],
        "execution": {"output_dir": str(tmp_path / "out"), "instances_per_host": "auto",
                      "health_check_timeout": 60},
        "deployment": {"image": STANDIN_IMAGE, "hf_model_handle": "meta-llama/Llama-3.1-8B",
                       "served_model_name": SERVED, "tensor_parallel_size": 2,
                       "extra_args": "--max-model-len 4096"},
        # provisioning only: evaluation through apply is tests/fleet/test_eval.py
        "evaluation": {"tasks": []},
    }
    for dotted, value in over.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_apply(config: Path, inventory: Path, *overrides: str, **opts):
    playbook = opts.pop("playbook", "site.yml")
    loaded = load_config(config, overrides, default_execution="baremetal")
    hosts = host_facts("baremetal", str(inventory), limit=opts.get("limit"))
    options = apply.Options(str(inventory), **opts)
    plan, result, run_dir = apply.run(loaded, hosts, options, playbook)
    text, code = apply.summary(result, options.check)
    return plan, result, run_dir, code, text


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evalprov.cli", *args], capture_output=True,
                          text=True, timeout=600)


def _out(proc) -> str:
    return proc.stdout.decode(errors="replace")


def on_host(fleet, host: str, port: int, path: str) -> str:
    """GET http://127.0.0.1:port/path from inside the host (the API is loopback-only)."""
    code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{port}{path}', timeout=10).read().decode())")
    return _out(fleet.exec(host, ["python3", "-c", code]))


def containers(fleet, host: str) -> dict[str, dict]:
    out = _out(fleet.docker(host, "ps", "-a", "--filter", "label=evalprov.managed=true",
                            "--format", "{{.Names}}")).split()
    found = {}
    for name in out:
        info = json.loads(_out(fleet.docker(host, "inspect", name)))[0]
        found[name] = {
            "id": info["Id"],
            "running": info["State"]["Running"],
            "argv": [*(info["Config"]["Entrypoint"] or []), *(info["Config"]["Cmd"] or [])],
            "labels": info["Config"]["Labels"],
            "devices": [d["DeviceIDs"] for d in info["HostConfig"]["DeviceRequests"] or []],
            "env": info["Config"]["Env"],
            "network": info["HostConfig"]["NetworkMode"],
            "ipc": info["HostConfig"]["IpcMode"],
            "binds": info["HostConfig"]["Binds"],
        }
    return found


def snapshot(fleet) -> dict:
    """Everything apply could change on the hosts: containers (ids, state, labels), images,
    and evalprov's files."""
    snap = {}
    for h in fleet.hosts:
        ps = _out(fleet.docker(h.name, "ps", "-a", "--no-trunc", "--format",
                               "{{.ID}} {{.Names}} {{.Status}} {{.Labels}}"))
        status_free = sorted(" ".join(line.split()[:2]) for line in ps.splitlines())
        images = sorted(_out(fleet.docker(h.name, "images", "-q", "--no-trunc")).split())
        files = _out(fleet.exec(h.name, ["sh", "-c", "find /var/lib/evalprov 2>/dev/null | sort"],
                                check=False))
        snap[h.name] = {"containers": status_free, "images": images, "files": files}
    return snap


@pytest.fixture
def fleet3(fleet_factory, standin_image, tmp_path):
    f = fleet_factory((8, 4, 2), docker=True)
    inv = f.write_inventory(tmp_path / "inventory.yml")
    yield f, inv
    for h in f.hosts:  # leave clean hosts for the next test
        for name in containers(f, h.name):
            f.docker(h.name, "rm", "-f", name, check=False)


def test_apply_serves_every_planned_instance_with_its_argv_gpus_and_labels(fleet3, tmp_path):
    fleet, inv = fleet3
    config = write_config(tmp_path)
    plan, result, _, code, text = run_apply(config, inv)
    assert code == 0, text
    assert {h.host: len(h.instances) for h in plan.hosts} == {"h1": 4, "h2": 2, "h3": 1}
    for hp in plan.hosts:
        found = containers(fleet, hp.host)
        assert sorted(found) == sorted(i.name for i in hp.instances)
        for inst in hp.instances:
            c = found[inst.name]
            assert c["running"]
            assert c["argv"] == list(inst.argv)
            assert c["devices"] == [[str(g) for g in inst.gpus]]
            assert c["labels"]["evalprov.spec_hash"] == inst.spec_hash
            assert c["network"] == "host" and c["ipc"] == "host"
            assert c["binds"] == ["/var/lib/evalprov/hf-cache:/root/.cache/huggingface:rw"]
            # the API answers on the host itself (loopback), not from the controller
            seen = json.loads(on_host(fleet, hp.host, inst.port, "/evalprov/argv"))
            assert seen["argv"] == list(inst.argv)
            assert seen["env"]["NVIDIA_VISIBLE_DEVICES"] == ",".join(map(str, inst.gpus))
            assert SERVED in on_host(fleet, hp.host, inst.port, "/v1/models")
            with pytest.raises(OSError):
                http_request(fleet.url(hp.host, inst.port, "/v1/models"))
    assert all(r.changed > 0 for r in result.hosts.values())


def test_second_apply_changes_nothing_and_check_changes_nothing(fleet3, tmp_path):
    fleet, inv = fleet3
    config = write_config(tmp_path)
    assert run_apply(config, inv)[3] == 0
    before = snapshot(fleet)

    _, again, _, code, text = run_apply(config, inv)
    assert code == 0, text
    assert {h: r.changed for h, r in again.hosts.items()} == {"h1": 0, "h2": 0, "h3": 0}
    assert snapshot(fleet) == before

    # --check with a changed extra_args: reports every instance (and the proxy in front of
    # a host's several instances, whose spec follows theirs), changes nothing
    _, checked, _, code, text = run_apply(config, inv, "deployment.extra_args=--max-model-len 2048",
                                          check=True, diff=True)
    assert code == 0, text
    assert snapshot(fleet) == before
    would = {h: r.would_change for h, r in checked.hosts.items()}
    proxies = {h: [w for w in would[h] if "Start the proxy" in w] for h in would}
    assert {h: len(p) for h, p in proxies.items()} == {"h1": 1, "h2": 1, "h3": 0}
    assert {h: len(would[h]) - len(proxies[h]) for h in would} == {"h1": 4, "h2": 2, "h3": 1}
    assert "evalprov-vllm-3 port 8003 GPUs 6,7" in " ".join(would["h1"])
    assert "would change on h3" in text


def test_changed_spec_recreates_only_the_affected_instances(fleet3, tmp_path):
    fleet, inv = fleet3
    config = write_config(tmp_path)
    assert run_apply(config, inv)[3] == 0
    ids = {h.name: {n: c["id"] for n, c in containers(fleet, h.name).items()} for h in fleet.hosts}

    # new extra_args on h3 only: h3's container is recreated, h1 and h2 untouched
    _, result, _, code, text = run_apply(config, inv, "deployment.extra_args=--max-model-len 2048",
                                         limit="h3")
    assert code == 0, text
    assert set(result.hosts) == {"h3"}
    after = {h.name: {n: c["id"] for n, c in containers(fleet, h.name).items()}
             for h in fleet.hosts}
    assert after["h1"] == ids["h1"] and after["h2"] == ids["h2"]
    assert after["h3"]["evalprov-vllm-0"] != ids["h3"]["evalprov-vllm-0"]
    assert containers(fleet, "h3")["evalprov-vllm-0"]["argv"][-1] == "2048"

    # one instance per host instead of auto: instance 0 keeps its spec, the others go
    code = run_apply(write_config(tmp_path, execution__instances_per_host=1), inv,
                     limit="h1")[3]
    assert code == 0
    left = containers(fleet, "h1")
    assert list(left) == ["evalprov-vllm-0"]
    assert left["evalprov-vllm-0"]["id"] == ids["h1"]["evalprov-vllm-0"]


def test_host_with_too_few_gpus_fails_preflight_and_no_host_changes(fleet3, tmp_path):
    fleet, inv = fleet3
    before = snapshot(fleet)
    config = write_config(tmp_path, execution__instances_per_host=1,
                          deployment__tensor_parallel_size=4)
    proc = cli("apply", str(config), "-i", str(inv))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "host h3: has 2 GPUs" in proc.stdout and "needs 4" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert snapshot(fleet) == before


def test_unhealthy_server_fails_with_the_log_tail_saved(fleet3, tmp_path):
    _fleet, inv = fleet3
    config = write_config(tmp_path, execution__health_check_timeout=4,
                          execution__instances_per_host=1,
                          deployment__env_vars={"STANDIN_NEVER_HEALTHY": "lit:1"})
    _, _, run_dir, code, out = run_apply(config, inv, limit="h2")
    assert code == 1
    assert "instance evalprov-vllm-0 not healthy after 4 s" in out
    log = run_dir / "logs" / "h2" / "evalprov-vllm-0.log"
    assert log.exists() and str(log) in out
    assert log.stat().st_mode & 0o777 == 0o600
    assert log.read_text().strip(), "the container's log tail was saved"

    # a server that exits fails fast, long before the timeout
    config = write_config(tmp_path, execution__health_check_timeout=90,
                          execution__instances_per_host=1,
                          deployment__env_vars={"STANDIN_EXIT_AFTER": "lit:1",
                                                "STANDIN_NEVER_HEALTHY": "lit:1"})
    _, _, _, code, out = run_apply(config, inv, limit="h3")
    assert code == 1
    assert "stopped before it became healthy" in out
    assert "not healthy after" not in out, out  # it did not wait out the 90 s


def test_secret_env_reaches_the_server_and_no_file_evalprov_writes(fleet3, tmp_path,
                                                                   monkeypatch):
    fleet, inv = fleet3
    monkeypatch.setenv("EVALPROV_TEST_HF_TOKEN", SECRET)
    config = write_config(tmp_path, execution__instances_per_host=1,
                          deployment__env_vars={"HF_TOKEN": "host:EVALPROV_TEST_HF_TOKEN"})
    _, _, _run_dir, code, text = run_apply(config, inv, limit="h3")
    assert code == 0, text
    # the server's process has it; the container's config (docker inspect) does not
    environ = _out(fleet.docker("h3", "exec", "evalprov-vllm-0", "cat", "/proc/1/environ"))
    assert f"HF_TOKEN={SECRET}" in environ.split("\0")
    assert SECRET not in _out(fleet.docker("h3", "inspect", "evalprov-vllm-0"))
    assert SECRET not in text
    leaked = [p for p in (tmp_path / "out").rglob("*")
              if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    # the host side: evalprov's files, dockerd's state on disk and the process list; the
    # value is in one root-only file in memory, which the container mounts
    held = "/run/evalprov/evalprov-vllm-0.secrets.json"
    found = _out(fleet.exec("h3", ["sh", "-c", f"grep -rlF -- {SECRET} /var/lib/evalprov "
                                   "/var/lib/docker /run /root /tmp 2>/dev/null; true"]))
    assert found.split() == [held]
    assert _out(fleet.exec("h3", ["stat", "-c", "%a %U", held])).split() == ["600", "root"]
    assert SECRET not in _out(fleet.exec("h3", ["ps", "auxww"]))
    # destroy removes the file with the container
    assert cli("destroy", str(config), "-i", str(inv), "--limit", "h3").returncode == 0
    assert _out(fleet.exec("h3", ["sh", "-c", f"ls {held} 2>&1; true"])).strip().endswith(
        "No such file or directory")


def test_missing_secret_is_an_error_before_anything_starts(fleet3, tmp_path, monkeypatch):
    fleet, inv = fleet3
    monkeypatch.delenv("EVALPROV_TEST_UNSET", raising=False)
    config = write_config(tmp_path, deployment__env_vars={"HF_TOKEN": "EVALPROV_TEST_UNSET"})
    before = snapshot(fleet)
    proc = cli("apply", str(config), "-i", str(inv))
    assert proc.returncode == 2
    assert "EVALPROV_TEST_UNSET" in proc.stderr and "not set" in proc.stderr
    assert snapshot(fleet) == before
    assert not (tmp_path / "out").exists()


def test_destroy_removes_what_apply_made(fleet3, tmp_path):
    fleet, inv = fleet3
    config = write_config(tmp_path)
    assert run_apply(config, inv)[3] == 0
    proc = cli("destroy", str(config), "-i", str(inv))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(containers(fleet, h.name) == {} for h in fleet.hosts)


def test_template_and_shell_payloads_reach_vllm_as_written_and_run_nothing(fleet3, tmp_path):
    """Values are data over SSH too: payloads of every kind in extra_args and a plain env
    literal go through apply --check and apply; the container gets them verbatim, and no
    marker appears on the controller or any host."""
    fleet, inv = fleet3
    mark = "/tmp/evalprov-hostile-mark"
    payload = (f"{{{{ lookup('pipe', 'touch {mark}-jinja') }}}} "
               f"{{% set x = lookup('pipe', 'touch {mark}-stmt') %}} "
               f"$(touch {mark}-subst) `touch {mark}-tick` x; touch {mark}-chain")
    header = f"#jinja2:variable_start_string:'[[' [[ lookup('pipe', 'touch {mark}-hdr') ]]"
    config = write_config(
        tmp_path, deployment__extra_args=(f"--max-model-len 4096 --chat-template "
                                          f"{shlex.quote(payload)} --x-note {shlex.quote(header)}"),
        deployment__env_vars={"PLAIN_NOTE": f"lit:{header}"})

    def marks() -> list[str]:
        found = [str(p) for p in Path("/tmp").glob("evalprov-hostile-mark*")]
        for h in fleet.hosts:
            out = fleet.exec(h.name, ["sh", "-c", f"ls {mark}* 2>/dev/null || true"])
            found += _out(out).split()
        return found

    for check in (True, False):
        _, _, _, code, text = run_apply(config, inv, check=check)
        assert code == 0, text
        assert marks() == [], text
    argv = containers(fleet, "h3")["evalprov-vllm-0"]["argv"]
    assert argv[argv.index("--chat-template") + 1] == payload
    assert argv[argv.index("--x-note") + 1] == header
    assert f"PLAIN_NOTE={header}" in containers(fleet, "h3")["evalprov-vllm-0"]["env"]


def test_a_moved_image_digest_is_pulled_and_recreates_the_instance(fleet3, tmp_path):
    """image_pull_policy always: a new image pushed under the same tag is pulled on the next
    apply and the instance is recreated on it; one more apply without a push changes
    nothing."""
    import secrets

    fleet, inv = fleet3
    reg = fleet.registry
    tag = f"evalprov-moving-{secrets.token_hex(4)}"
    ref = f"{reg.addr}/vllm/vllm-openai:{tag}"

    def push(label: str) -> str:
        """A new image (the stand-in with another label) under the same tag, pushed from h1;
        its digest in the registry."""
        fleet.docker("h1", "pull", f"{reg.addr}/{STANDIN_IMAGE}", timeout=300)
        ctr = f"evalprov-moving-{label}"
        fleet.docker("h1", "create", "--name", ctr, f"{reg.addr}/{STANDIN_IMAGE}")
        try:
            fleet.docker("h1", "commit", "--change", f"LABEL evalprov.test.build={label}", ctr,
                         ref)
            fleet.docker("h1", "push", ref, timeout=300)
        finally:
            fleet.docker("h1", "rm", "-f", ctr, check=False)
            fleet.docker("h1", "rmi", ref, f"{reg.addr}/{STANDIN_IMAGE}", check=False)
        return reg.manifest_digest("vllm/vllm-openai", tag)

    def image_of(name: str = "evalprov-vllm-0") -> tuple[str, str]:
        info = json.loads(_out(fleet.docker("h3", "inspect", name)))[0]
        return info["Id"], info["Image"]

    first = push("1")
    config = write_config(tmp_path, execution__instances_per_host=1,
                          execution__image_pull_policy="always",
                          deployment__image=f"vllm/vllm-openai:{tag}")
    _, result, _, code, text = run_apply(config, inv, limit="h3")
    assert code == 0, text
    ctr1, img1 = image_of()
    digests = json.loads(_out(fleet.docker("h3", "image", "inspect", img1)))[0]["RepoDigests"]
    assert any(d.endswith(first) for d in digests)

    _, again, _, code, text = run_apply(config, inv, limit="h3")
    assert code == 0, text
    assert again.hosts["h3"].changed == 0, text
    assert image_of() == (ctr1, img1)

    moved = push("2")
    assert moved != first
    _, result, _, code, text = run_apply(config, inv, limit="h3")
    assert code == 0, text
    assert result.hosts["h3"].changed > 0
    ctr2, img2 = image_of()
    assert ctr2 != ctr1 and img2 != img1
    digests = json.loads(_out(fleet.docker("h3", "image", "inspect", img2)))[0]["RepoDigests"]
    assert any(d.endswith(moved) for d in digests)
    assert containers(fleet, "h3")["evalprov-vllm-0"]["running"]

    _, steady, _, code, text = run_apply(config, inv, limit="h3")
    assert code == 0, text
    assert steady.hosts["h3"].changed == 0, text
    assert image_of() == (ctr2, img2)
