"""deployment.host and the deployment's API key: the field (what it accepts, the one-line
refusals), the plan it makes (vllm serve --host, VLLM_API_KEY by name, the key's fingerprint
in the spec hash, the harness told which variable holds the key), the key itself (derived
from a 0600 controller secret, stable per deployment, different between deployments), how
apply hands it out (vLLM's environment, each task's secret environment), the hosts' health
checks sending it to a server that requires it, and the harness receiving it on stdin, never
in the docker CLI's environment, its argv or the container's config."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evalprov import apikey
from evalprov.apply import with_api_key
from evalprov.config.loader import LoadedConfig
from evalprov.errors import ConfigError, PlanError
from evalprov.plan import HostFacts, plan
from tests.testbed.image import run_standin_locally
from tests.unit.collection import module

host_utils = module("module_utils.evalprov_host")
tasks_utils = module("module_utils.evalprov_tasks")


def opened(vllm_config, **kw):
    return vllm_config(deployment={"host": "0.0.0.0", **kw.pop("deployment", {})}, **kw)


# --------------------------------------------------------------------------- the field


def test_the_api_is_bound_to_loopback_by_default(vllm_config):
    config = vllm_config()
    assert config.deployment.host == "127.0.0.1" and not config.deployment.exposed
    (inst,) = plan(config, [HostFacts("h", 8)]).instances
    assert inst.argv[inst.argv.index("--host") + 1] == "127.0.0.1"
    assert "VLLM_API_KEY" not in inst.env_names
    assert not apikey.needed(config) and not apikey.keyed(config)


@pytest.mark.parametrize("addr", ["0.0.0.0", "::"])
def test_deployment_host_opens_the_api_on_every_interface(vllm_config, addr):
    config = vllm_config(deployment={"host": addr})
    assert config.deployment.exposed and apikey.needed(config)
    (inst,) = plan(config, [HostFacts("h", 8)]).instances
    assert inst.argv[inst.argv.index("--host") + 1] == addr
    assert "VLLM_API_KEY" in inst.env_names
    assert not any("api-key" in a or "api_key" in a for a in inst.argv)


@pytest.mark.parametrize(("value", "words"), [
    ("10.0.0.5", "one interface's address"),
    ("my-host", "is not an IP address"),
    ("0.0.0.0 --api-key x", "is not an IP address"),
])
def test_deployment_host_refuses_what_is_not_loopback_or_every_interface(make_config,
                                                                         vllm_user, value,
                                                                         words):
    with pytest.raises(ConfigError) as err:
        make_config(vllm_user(deployment={"host": value}))
    (line,) = err.value.lines
    assert line.startswith("deployment.host:") and words in line
    assert "use 127.0.0.1" in line and "0.0.0.0" in line


def test_host_in_extra_args_points_at_the_field(make_config, vllm_user):
    with pytest.raises(ConfigError) as err:
        make_config(vllm_user(deployment={"extra_args": "--host 0.0.0.0"}))
    assert "set by evalprov from deployment.host" in err.value.lines[0]


def test_api_key_in_extra_args_stays_refused_when_the_api_is_opened(make_config, vllm_user):
    with pytest.raises(ConfigError) as err:
        make_config(vllm_user(deployment={"host": "0.0.0.0",
                                          "extra_args": "--api-key=s3cr3t-value"}))
    (line,) = err.value.lines
    assert "'--api-key' would put an API key on the vllm serve command line" in line
    assert "s3cr3t-value" not in line


def test_an_opened_api_is_refused_on_slurm(seed_config):
    from evalprov.decide import Inputs, safe_decide

    config = seed_config("deployment.host=0.0.0.0")
    d, problems = safe_decide(Inputs(config=config, hosts=(), run_id="r", owner="o"), {})
    assert d is None
    assert problems == ["deployment.host: 0.0.0.0 opens the API, which evalprov does not do "
                        "on Slurm (the tasks run in the server's own job); remove "
                        "deployment.host"]
    with pytest.raises(PlanError):
        plan(config, [])


# --------------------------------------------------------------------------- the plan


def test_the_keys_fingerprint_is_part_of_the_spec_and_a_new_key_recreates(vllm_config):
    config = opened(vllm_config)
    hosts = [HostFacts("h", 8)]
    a = plan(config, hosts, apikey.fingerprint("k1")).instances[0]
    again = plan(config, hosts, apikey.fingerprint("k1")).instances[0]
    b = plan(config, hosts, apikey.fingerprint("k2")).instances[0]
    assert a.spec_hash == again.spec_hash != b.spec_hash
    assert a.argv == b.argv  # the key is in no argument
    # no key: the hash is what it always was (converged loopback fleets stay untouched)
    assert plan(vllm_config(), hosts).instances[0].spec_hash == plan(
        vllm_config(), hosts, "").instances[0].spec_hash


def test_the_harness_is_told_which_variable_holds_the_key(vllm_config):
    keyed = plan(opened(vllm_config), [HostFacts("h", 8)]).task_runs[0]
    assert keyed.run_config["target"]["api_endpoint"]["api_key_name"] == "EVALPROV_API_KEY"
    assert "EVALPROV_API_KEY" in keyed.env_names
    plain = plan(vllm_config(), [HostFacts("h", 8)]).task_runs[0]
    assert "api_key_name" not in plain.run_config["target"]["api_endpoint"]
    assert "EVALPROV_API_KEY" not in plain.env_names


def test_a_users_own_vllm_api_key_is_sent_by_the_harness_on_loopback_too(vllm_config):
    config = vllm_config(deployment={"env_vars": {"VLLM_API_KEY": "host:MY_KEY"}})
    assert apikey.keyed(config) and not apikey.needed(config)
    run = plan(config, [HostFacts("h", 8)]).task_runs[0]
    assert run.run_config["target"]["api_endpoint"]["api_key_name"] == "EVALPROV_API_KEY"


# --------------------------------------------------------------------------- the key


def test_the_controller_secret_is_made_0600_in_a_0700_dir_and_reused(tmp_path):
    path = tmp_path / "cfg" / "evalprov" / "secret"
    first = apikey.controller_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert apikey.controller_secret(path) == first and len(first) == 64


def test_a_controller_secret_others_can_read_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "secret"
    apikey.controller_secret(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as err:
        apikey.controller_secret(path)
    (line,) = err.value.lines
    assert line == (f"{path}: evalprov's controller secret has mode 0644, readable by "
                    f"others; chmod 600 {path}")


def test_a_symlinked_controller_secret_is_refused(tmp_path):
    real = tmp_path / "real"
    real.write_text("x" * 64)
    os.chmod(real, 0o600)
    link = tmp_path / "secret"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="cannot read evalprov's controller secret"):
        apikey.controller_secret(link)


def test_the_secret_lives_under_xdg_config_home_not_the_output_dir(tmp_path):
    assert apikey.secret_path({"XDG_CONFIG_HOME": str(tmp_path)}) == (
        tmp_path / "evalprov" / "secret")


def test_the_key_is_stable_per_deployment_and_differs_between_deployments(
        vllm_config, tmp_path):
    config = opened(vllm_config)
    path = tmp_path / "secret"
    k1 = apikey.deployment_key(config, "owner-a", {}, path)
    assert k1 == apikey.deployment_key(config, "owner-a", {}, path)
    assert k1 != apikey.deployment_key(config, "owner-b", {}, path)
    assert len(k1) == 64 and apikey.fingerprint(k1) not in k1
    # a new controller secret: a new key
    path.unlink()
    assert apikey.deployment_key(config, "owner-a", {}, path) != k1
    # loopback: no key, and no secret is made
    other = tmp_path / "none"
    assert apikey.deployment_key(vllm_config(), "owner-a", {}, other) is None
    assert not other.exists()


def test_with_api_key_gives_vllm_and_every_task_the_key(vllm_config, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    config = opened(vllm_config, tasks=[{"name": "ifeval"}, {"name": "gpqa_diamond"}])
    loaded = LoadedConfig(config=config)
    secret, per_task, key = with_api_key(loaded, "own", {"HF_TOKEN": "t"},
                                         {"gpqa_diamond": {"HF_TOKEN": "g"}})
    assert key and secret == {"HF_TOKEN": "t", "VLLM_API_KEY": key}
    assert per_task == {"ifeval": {"EVALPROV_API_KEY": key},
                        "gpqa_diamond": {"HF_TOKEN": "g", "EVALPROV_API_KEY": key}}
    # the user's own VLLM_API_KEY wins, on loopback too
    mine = vllm_config(deployment={"env_vars": {"VLLM_API_KEY": "host:MY_KEY"}})
    loaded = LoadedConfig(config=mine)
    secret, per_task, key = with_api_key(loaded, "own", {"VLLM_API_KEY": "users-key"}, {})
    assert key == "users-key" and per_task == {"ifeval": {"EVALPROV_API_KEY": "users-key"}}


# --------------------------------------------------------------------------- on the host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_health_check_sends_the_key_a_server_requires():
    port = _free_port()
    proc = run_standin_locally(port, "--served-model-name", "m",
                               env={"VLLM_API_KEY": "k-123"})
    try:
        deadline = time.monotonic() + 30
        while host_utils.http_get(f"http://127.0.0.1:{port}/health")[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "stand-in not up"
            time.sleep(0.1)
        assert host_utils.health(port, "/health", "m", "k-123") == (True, "")
        ok, why = host_utils.health(port, "/health", "m")
        assert not ok and "/v1/models" in why
        assert not host_utils.health(port, "/health", "m", "wrong")[0]
    finally:
        proc.kill()
        proc.wait()


def _docker_task(tmp_path: Path) -> dict:
    return {"name": "t", "dir": str(tmp_path), "container_name": "c", "labels": {"a": "b"},
            "env": {"HF_HUB_OFFLINE": "1"}, "container": "img:1", "cwd": str(tmp_path),
            "argv": ["nemo-evaluator", "run_eval", "--run_config", "/work/run_config.yml"]}


def test_a_containers_secrets_go_on_stdin_never_in_argv_or_the_clis_environment(tmp_path):
    values = {"EVALPROV_API_KEY": "k-secret-1", "HF_TOKEN": "hf-secret-2"}
    argv, env, _, stdin = tasks_utils.command({"runtime": "docker"}, _docker_task(tmp_path),
                                              values)
    text = " ".join(argv) + " " + json.dumps(env)
    assert "k-secret-1" not in text and "hf-secret-2" not in text
    assert "EVALPROV_API_KEY" not in env and "HF_TOKEN" not in env
    assert "-i" in argv and argv[argv.index("img:1") + 1:argv.index("img:1") + 3] == [
        "python3", "-c"]
    assert argv[-4:] == ["nemo-evaluator", "run_eval", "--run_config", "/work/run_config.yml"]
    assert argv[argv.index("-e"):argv.index("-e") + 2] == ["-e", "HF_HUB_OFFLINE"]
    assert json.loads(stdin) == values
    # no secret: the command as planned, nothing on stdin
    argv, _, _, stdin = tasks_utils.command({"runtime": "docker"}, _docker_task(tmp_path), {})
    assert stdin is None and argv[-5:] == ["img:1", *_docker_task(tmp_path)["argv"]]


def test_the_stdin_line_puts_the_secrets_into_the_commands_environment_only(tmp_path):
    """ENV_FROM_STDIN run as the container would: the command sees the values in its
    environment; they are in no argv of any process."""
    probe = ("import os, sys; print(os.environ['EVALPROV_API_KEY'], "
             "open('/proc/self/cmdline').read().replace(chr(0), ' '))")
    out = subprocess.run([sys.executable, "-c", tasks_utils.ENV_FROM_STDIN, sys.executable,
                          "-c", probe], input=json.dumps({"EVALPROV_API_KEY": "v-9"}) + "\n",
                         capture_output=True, text=True, timeout=30, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout
    value, cmdline = out.split(" ", 1)
    assert value == "v-9" and "v-9" not in cmdline


def test_the_process_runtime_gives_the_harness_its_secrets_in_its_environment(tmp_path):
    task = {**_docker_task(tmp_path), "path_prepend": "/venv/bin", "argv": ["/venv/bin/x"]}
    argv, env, _, stdin = tasks_utils.command({"runtime": "process"}, task,
                                              {"EVALPROV_API_KEY": "k"})
    assert argv == ["/venv/bin/x"] and stdin is None and env["EVALPROV_API_KEY"] == "k"


def test_plan_and_inventory_print_the_spec_hash_apply_acts_on(tmp_path, monkeypatch, capsys):
    """`evalprov plan` and `inventory` put the deployment's key in the spec hashes as apply
    does: the hash a user reads is the one apply compares (nothing of the key is shown)."""
    import yaml

    from evalprov.apply import owner_id
    from evalprov.cli import main

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "defaults": [{"execution": "local"}, {"deployment": "vllm"}, "_self_"],
        "execution": {"output_dir": str(out)},
        "deployment": {"hf_model_handle": "meta-llama/Llama-3.1-8B", "host": "0.0.0.0",
                       "served_model_name": "llama", "tensor_parallel_size": 1},
        "evaluation": {"tasks": [{"name": "ifeval"}]}}))
    assert main(["plan", str(cfg), "--gpus", "1", "--format", "json"]) == 0
    shown = capsys.readouterr().out
    from evalprov.config.loader import load_config

    config = load_config(cfg, (), default_execution="local").config
    key = apikey.deployment_key(config, owner_id(out.resolve()), {})
    (applied,) = plan(config, [HostFacts("localhost", 1)], apikey.fingerprint(key)).instances
    (bare,) = plan(config, [HostFacts("localhost", 1)]).instances
    assert applied.spec_hash != bare.spec_hash
    assert applied.spec_hash in shown and bare.spec_hash not in shown
    assert key not in shown
    assert main(["inventory", str(cfg), "--gpus", "1"]) == 0
    shown = capsys.readouterr().out
    assert applied.spec_hash in shown and key not in shown
