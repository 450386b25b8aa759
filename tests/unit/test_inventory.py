"""Plan -> Ansible inventory variables (`evalprov.inventory.render`): the per-host and group
variables the roles read, that ansible-core reads them back as written, and that no env var
value ever appears in them."""

from __future__ import annotations

import json
import shlex
import textwrap
from typing import Any

import pytest
import yaml

from evalprov.cli import main
from evalprov.inventory import ansible_vars, inventory_file, render, to_yaml
from evalprov.plan import HostFacts, plan

FLEET = [HostFacts("gpu-a", 8), HostFacts("gpu-b", 4)]
TASKS = [{"name": "ifeval"}, {"name": "mmlu"}, {"name": "gpqa_diamond",
                                                "env_vars": {"HF_TOKEN": "host:HF_TOKEN"}}]


@pytest.fixture
def fleet_plan(vllm_config):
    config = vllm_config(
        deployment={"hf_model_handle": None, "checkpoint_path": "/models/llama",
                    "tensor_parallel_size": 2, "image": "vllm/vllm-openai:v0.11.0",
                    "extra_args": "--max-model-len 8192"},
        execution={"instances_per_host": "auto", "health_check_timeout": 900},
        tasks=TASKS,
    )
    return plan(config, FLEET)


def ansible_hostvars(*sources: str) -> dict[str, dict[str, Any]]:
    """What ansible-core itself makes of inventory files: host -> merged variables."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=list(sources))
    variables = VariableManager(loader=loader, inventory=inventory)
    return {
        h.name: variables.get_vars(host=h, include_hostvars=False)
        for h in inventory.get_hosts("all")
    }


def plain(node: Any) -> bool:
    """Only YAML/JSON-native types (no tuples, no dataclasses, no str subclasses)."""
    if type(node) is dict:
        return all(type(k) is str and plain(v) for k, v in node.items())
    if type(node) is list:
        return all(plain(v) for v in node)
    return type(node) in (str, int, float, bool, type(None))


# --------------------------------------------------------------------------- shape


def test_group_vars_are_the_run_wide_settings(fleet_plan):
    state = "/var/lib/evalprov/vllm"
    assert render(fleet_plan)["all"]["vars"] == {
        "evalprov_preflight_runtime": "docker",
        "evalprov_preflight_image": "vllm/vllm-openai:v0.11.0",
        "evalprov_preflight_remote_digest": False,  # a pinned tag: pulled when missing
        "evalprov_preflight_dirs": ["/models/llama"],
        "evalprov_preflight_disk_paths": [],
        "evalprov_preflight_venvs": {},
        "evalprov_preflight_state_dir": state,
        "evalprov_preflight_health_path": "/health",
        "evalprov_preflight_served_model_name": "model",
        "evalprov_image_name": "vllm/vllm-openai:v0.11.0",
        "evalprov_vllm_runtime": "docker",
        "evalprov_vllm_state_dir": state,
        "evalprov_health_path": "/health",
        "evalprov_health_timeout": 900,
        "evalprov_health_served_model_name": "model",
        "evalprov_health_runtime": "docker",
        "evalprov_health_state_dir": state,
        "evalprov_eval_runtime": "docker",
        "evalprov_eval_concurrency": 1,
        "evalprov_eval_harness_venv": "/opt/evalprov/harness-venv",
        "evalprov_eval_samples_dest": "/var/lib/evalprov/samples",
    }


def test_process_runtime_group_vars_name_the_venvs_and_the_package(vllm_config):
    config = vllm_config(execution={"runtime": "process", "device": "cpu"})
    common = render(plan(config, [HostFacts("h", 0)]))["all"]["vars"]
    assert common["evalprov_preflight_image"] is None
    assert common["evalprov_preflight_remote_digest"] is False
    assert common["evalprov_preflight_venvs"] == {"vllm": "/opt/evalprov/vllm-venv",
                                                  "harness": "/opt/evalprov/harness-venv"}
    assert common["evalprov_vllm_venv"] == "/opt/evalprov/vllm-venv"
    assert common["evalprov_vllm_package"] == config.execution.vllm_pip_spec
    assert common["evalprov_vllm_cpu"] is True


def test_each_host_gets_its_instances(fleet_plan):
    hosts = render(fleet_plan)["all"]["hosts"]
    assert list(hosts) == ["gpu-a", "gpu-b"]
    for hp in fleet_plan.hosts:
        assert hosts[hp.host]["evalprov_plan_gpus"] == hp.gpus_total
        rendered = hosts[hp.host]["evalprov_plan_instances"]
        assert [i["name"] for i in rendered] == [i.name for i in hp.instances]
        for got, inst in zip(rendered, hp.instances, strict=True):
            assert got["port"] == inst.port
            assert got["gpus"] == list(inst.gpus)
            assert got["argv"] == list(inst.argv)
            assert got["entrypoint"] == ["vllm"] and got["command"] == list(inst.argv[1:])
            assert got["image"] == inst.image
            assert got["spec_hash"] == inst.spec_hash
            assert got["volumes"] == ["/models/llama:/checkpoint:ro"]
            assert got["device_requests"] == [{
                "driver": "nvidia", "device_ids": [str(g) for g in inst.gpus],
                "capabilities": [["gpu"]]}]
            assert got["labels"] == {
                "evalprov.managed": "true", "evalprov.instance": inst.name,
                "evalprov.spec_hash": inst.spec_hash, "evalprov.port": str(inst.port)}
    a = hosts["gpu-a"]["evalprov_plan_instances"]
    assert [(i["name"], i["port"], i["gpus"]) for i in a] == [
        ("evalprov-vllm-0", 8000, [0, 1]), ("evalprov-vllm-1", 8001, [2, 3]),
        ("evalprov-vllm-2", 8002, [4, 5]), ("evalprov-vllm-3", 8003, [6, 7]),
    ]
    assert a[0]["argv"][-2:] == ["--max-model-len", "8192"]
    assert a[1]["label"] == "evalprov-vllm-1 port 8001 GPUs 2,3"
    assert len(hosts["gpu-b"]["evalprov_plan_instances"]) == 2


def test_each_hosts_preflight_checks_are_made_by_check_against_its_facts(fleet_plan):
    """GPUs required, ports and checkpoints per host: check() holds each host's facts
    against its part of the plan (gpu-a needs 8 GPUs and ports 8000-8003, gpu-b 4 and
    8000-8001, both /models/llama)."""
    from evalprov.check import HostFacts as Probed
    from evalprov.check import check

    def probed(gpus: int, listening: tuple[int, ...] = (), ckpt: bool = True) -> Probed:
        return Probed(gpu_count=gpus, docker_present=True, docker_running=True,
                      nvidia_runtime=True, listening=frozenset(listening),
                      dirs={"/models/llama": ckpt}, haproxy="/usr/sbin/haproxy")

    assert check(fleet_plan, {"gpu-a": probed(8), "gpu-b": probed(4)}).problems == ()
    problems = check(fleet_plan, {"gpu-a": probed(8, (8003, 8004)),
                                  "gpu-b": probed(4, (8002,), ckpt=False)}).problems
    assert len(problems) == 2
    assert "host gpu-a: port(s) 8003 already in use" in problems[0]
    assert "host gpu-b: checkpoint_path /models/llama is not a directory" in problems[1]
    small = check(fleet_plan, {"gpu-a": probed(6), "gpu-b": probed(2)}).problems
    assert any("host gpu-a: has 6 GPUs" in p and "needs 8" in p for p in small)
    assert any("host gpu-b: has 2 GPUs" in p and "needs 4" in p for p in small)


def _run_config(task: str, harness: str, url: str, etype: str = "chat") -> dict:
    return {"config": {"type": f"{harness}.{task}", "output_dir": "/work/results",
                       "params": {}},
            "target": {"api_endpoint": {"url": url, "model_id": "model", "type": etype}}}


def test_each_host_gets_its_tasks(fleet_plan):
    """Through the proxy in front of a host's instances (gpu-a has 4 of them, gpu-b 2)."""
    hosts = render(fleet_plan)["all"]["hosts"]
    tasks = [{k: v for k, v in t.items() if k not in ("run_config", "volumes")}
             for t in hosts["gpu-a"]["evalprov_plan_tasks"]]
    assert [t["run_config"] for t in hosts["gpu-a"]["evalprov_plan_tasks"]] == [
        _run_config("ifeval", "lm-evaluation-harness", "http://127.0.0.1:5009/v1/chat/completions"),
        _run_config("gpqa_diamond", "simple_evals", "http://127.0.0.1:5009/v1/chat/completions"),
    ]
    assert tasks == [
        {"name": "ifeval", "task": "ifeval", "harness": "lm-evaluation-harness",
         "container": "nvcr.io/nvidia/eval-factory/lm-evaluation-harness:26.03",
         "endpoint_type": "chat", "instance": "evalprov-lb",
         "url": "http://127.0.0.1:5009/v1/chat/completions", "env_names": []},
        {"name": "gpqa_diamond", "task": "gpqa_diamond", "harness": "simple_evals",
         "container": "nvcr.io/nvidia/eval-factory/simple-evals:26.03",
         "endpoint_type": "chat", "instance": "evalprov-lb",
         "url": "http://127.0.0.1:5009/v1/chat/completions", "env_names": ["HF_TOKEN"]},
    ]
    assert [t["name"] for t in hosts["gpu-b"]["evalprov_plan_tasks"]] == ["mmlu"]
    assert hosts["gpu-b"]["evalprov_plan_tasks"][0]["url"].endswith(":5009/v1/completions")
    proxy = hosts["gpu-b"]["evalprov_plan_proxy"]
    assert proxy["servers"] == [{"name": "evalprov-vllm-0", "port": 8000},
                                {"name": "evalprov-vllm-1", "port": 8001}]
    assert proxy["argv"] == ["haproxy", "-db", "-f", "/var/lib/evalprov/vllm/evalprov-lb.cfg"]
    assert "    server evalprov-vllm-1 127.0.0.1:8001\n" in proxy["config"]


def test_every_variable_carries_the_evalprov_prefix(fleet_plan):
    inv = render(fleet_plan)
    names = list(inv["all"]["vars"]) + [k for h in inv["all"]["hosts"].values() for k in h]
    assert names and all(n.startswith("evalprov_") for n in names)


def test_rendered_data_is_plain_yaml_and_json(fleet_plan):
    inv = render(fleet_plan)
    assert plain(inv)
    assert yaml.safe_load(yaml.safe_dump(inv)) == inv
    assert json.loads(json.dumps(inv)) == inv


def test_deployment_none_renders_no_instances(make_config):
    from evalprov.check import HostFacts as Probed
    from evalprov.check import check

    user = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "none"}],
        "execution": {"output_dir": "/results"},
        "target": {"api_endpoint": {"url": "http://api:9000/v1/chat/completions",
                                    "model_id": "m"}},
        "evaluation": {"tasks": [{"name": "ifeval"}]},
    }
    p = plan(make_config(user), [HostFacts("a")])
    inv = render(p)
    host = inv["all"]["hosts"]["a"]
    assert host["evalprov_plan_instances"] == []
    assert host["evalprov_plan_tasks"][0]["url"] == "http://api:9000/v1/chat/completions"
    assert host["evalprov_plan_tasks"][0]["instance"] is None
    assert inv["all"]["vars"]["evalprov_image_name"] is None
    assert inv["all"]["vars"]["evalprov_preflight_dirs"] == []
    # no GPU, no port needed: a host with dockerd (the tasks' containers) passes the check
    checked = check(p, {"a": Probed(gpu_count=0, listening=frozenset({8000}),
                                    docker_present=True, docker_running=True)})
    assert checked.problems == ()
    assert checked.hosts["a"].start == () and checked.hosts["a"].tasks == 1


# --------------------------------------------------------------------------- ansible-core


def test_rendered_yaml_is_an_inventory_ansible_core_reads_back(fleet_plan, tmp_path):
    inv = render(fleet_plan)
    path = tmp_path / "evalprov.yml"
    path.write_text(to_yaml(inv))
    hostvars = ansible_hostvars(str(path))
    assert sorted(hostvars) == ["gpu-a", "gpu-b"]
    for host, rendered in inv["all"]["hosts"].items():
        for key, value in {**inv["all"]["vars"], **rendered}.items():
            assert hostvars[host][key] == value, (host, key)
            assert same_types(hostvars[host][key], value), (host, key)


def same_types(got: Any, want: Any) -> bool:
    """got (as ansible-core read it) has want's shape and types: a string stays a string
    ('8000', '0.95', '' are not read back as numbers or None)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(
            same_types(got[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(
            same_types(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, bool) or want is None:
        return got is want
    return isinstance(got, type(want)) and not isinstance(got, bool) and got == want


def strings(node: Any) -> list[str]:
    """Every string in node, keys included."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*strings(k), *strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


STR = "tag:yaml.org,2002:str"


def value_scalars(text: str) -> list[tuple[str, str]]:
    """(tag, value) of every scalar below a variable (values, list items, nested keys) in an
    inventory file; variable and host names and the all/vars/hosts structure left out."""
    out: list[tuple[str, str]] = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.ScalarNode):
            out.append((node.tag, node.value))
        elif isinstance(node, yaml.SequenceNode):
            for n in node.value:
                walk(n)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(k)
                walk(v)

    def section(node: yaml.MappingNode) -> None:
        for _name, value in node.value:
            walk(value)

    (_, top), = yaml.compose(text, Loader=yaml.SafeLoader).value
    for key, node in top.value:
        if key.value == "vars":
            section(node)
        else:
            for _host, hv in node.value:
                section(hv)
    return out


def reads_as_another_type(value: str) -> bool:
    return yaml.resolver.Resolver().resolve(yaml.ScalarNode, value, (True, False)) != STR


def test_to_yaml_tags_every_string_value_unsafe_and_ansible_reads_them_unchanged(
        fleet_plan, tmp_path):
    """Ordinary strings are tagged too: every string under a variable (values, list items,
    keys of nested maps) is !unsafe. The one exception are strings plain YAML would read as
    another type ('8000', '0.95', 'true', ''): ansible-core 2.19 resolves an !unsafe
    scalar's type again as if unquoted (!unsafe '8000' -> the int 8000), so they are written
    as quoted strings; none of them can hold a template. ansible-core reads every value back
    unchanged, strings as strings."""
    inv = render(fleet_plan)
    text = to_yaml(inv)
    assert text == inventory_file(inv)
    scalars = value_scalars(text)
    every = [s for section in (inv["all"]["vars"], *inv["all"]["hosts"].values())
             for v in section.values() for s in strings(v)]
    as_strings = [(tag, v) for tag, v in scalars if tag in ("!unsafe", STR)]
    assert sorted(v for _, v in as_strings) == sorted(every)  # each string, once
    for tag, value in as_strings:
        assert tag == "!unsafe" or reads_as_another_type(value), (tag, value)
    tagged = {v for tag, v in as_strings if tag == "!unsafe"}
    assert {"docker", "model", "/health", "evalprov-vllm-0", "--port", "name",
            "evalprov.spec_hash"} <= tagged  # ordinary values and nested keys
    assert {"8000", "0.95", "0", "true"} <= {v for tag, v in as_strings if tag == STR}
    path = tmp_path / "evalprov.yml"
    path.write_text(text)
    hostvars = ansible_hostvars(str(path))
    for host, rendered in inv["all"]["hosts"].items():
        for key, value in {**inv["all"]["vars"], **rendered}.items():
            assert same_types(hostvars[host][key], value), (host, key)


def test_ansible_vars_tags_every_value_and_reads_back_unchanged(tmp_path):
    from ansible.parsing.dataloader import DataLoader

    variables = {"evalprov_x": {"a": ["8000", "", "true", "010", "x", 1, 0.5, None, False]},
                 "evalprov_path": "/var/lib/evalprov", "evalprov_n": 3}
    text = ansible_vars(variables)
    assert "evalprov_path: !unsafe '/var/lib/evalprov'" in text
    assert "!unsafe 'a':" in text and "!unsafe 'x'" in text
    path = tmp_path / "extra.yml"
    path.write_text(text)
    back = DataLoader().load_from_file(str(path))
    assert same_types(back, variables)


def test_plan_vars_merge_with_the_users_inventory_as_a_second_source(vllm_config, repo,
                                                                      tmp_path):
    config = vllm_config(deployment={"tensor_parallel_size": 2},
                         execution={"instances_per_host": "auto"})
    p = plan(config, [HostFacts("gpu-node-01", 8), HostFacts("gpu-node-02", 4)])
    path = tmp_path / "zz-evalprov.yml"
    path.write_text(to_yaml(render(p)))
    hostvars = ansible_hostvars(str(repo / "inventories" / "fleet.yml"), str(path))
    node = hostvars["gpu-node-02"]
    assert node["ansible_host"] == "192.0.2.12" and node["ansible_user"] == "root"
    assert [i["port"] for i in node["evalprov_plan_instances"]] == [8000, 8001]
    assert node["evalprov_vllm_runtime"] == "docker"


def _templated_hostvars(text: str, tmp_path) -> dict[str, Any]:
    """The host's variables as a play's task sees them: read by ansible-core's inventory
    and VariableManager, then put through its Templar."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    path = tmp_path / "inv.yml"
    path.write_text(text)
    hostvars = ansible_hostvars(str(path))["h"]
    templar = Templar(loader=DataLoader(), variables=hostvars)
    return {k: templar.template(v) for k, v in hostvars.items() if k.startswith("evalprov_")}


def test_jinja_in_argv_reaches_ansible_as_written_not_templated(vllm_config, tmp_path):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    extra = f"--chat-template '{template}' --response-role '{{{{ 6 * 7 }}}}'"
    p = plan(vllm_config(deployment={"extra_args": extra}), [HostFacts("h", 8)])
    text = to_yaml(render(p))
    assert f"!unsafe '{template}'" in text
    argv = _templated_hostvars(text, tmp_path)["evalprov_plan_instances"][0]["argv"]
    assert argv[-3:] == [template, "--response-role", "{{ 6 * 7 }}"]
    assert argv == list(p.instances[0].argv)


@pytest.mark.parametrize("value", [
    "{{ lookup('pipe','touch /tmp/x') }}",
    "#jinja2:variable_start_string:'[['\n[[ lookup('pipe','touch /tmp/x') ]]",
    "#jinja2:variable_start_string:'[[', variable_end_string:']]'\n[[ 6 * 7 ]]",
    "{% set x = lookup('pipe','touch /tmp/x') %}{# c #}",
])
def test_template_syntax_in_any_value_stays_literally_as_written(value, vllm_config, tmp_path):
    """A config value that looks like a template (an argv element, a task's run config, a
    key of it) reaches the roles as written and runs nothing."""
    marker = tmp_path / "x"
    value = value.replace("/tmp/x", str(marker))
    argv_value = value.replace("\n", " ")  # extra_args takes no control characters
    config = vllm_config(
        deployment={"extra_args": f"--chat-template {shlex.quote(argv_value)}"},
        evaluation={"nemo_evaluator_config": {"config": {"params": {"extra": {value: value}}}},
                    "tasks": [{"name": "ifeval"}]})
    p = plan(config, [HostFacts("h", 8)])
    rendered = render(p)
    seen = _templated_hostvars(to_yaml(rendered), tmp_path)
    assert not marker.exists()
    assert seen["evalprov_plan_instances"][0]["argv"][-1] == argv_value
    extra = seen["evalprov_plan_tasks"][0]["run_config"]["config"]["params"]["extra"]
    assert extra == {value: value}
    for key, want in {**rendered["all"]["vars"], **rendered["all"]["hosts"]["h"]}.items():
        assert seen[key] == want, key
    assert not marker.exists()


# --------------------------------------------------------------------------- secrets

SECRET_CONFIG = """\
defaults:
  - execution: baremetal
  - deployment: vllm
  - _self_
env_vars:
  TOP_LEVEL_KEY: lit:supersecret
execution:
  output_dir: /results
deployment:
  hf_model_handle: org/model
  served_model_name: model
  tensor_parallel_size: 1
  env_vars:
    HF_TOKEN: host:EVALPROV_TEST_HF_TOKEN
    SERVER_PASSWORD: lit:supersecret-server
    VLLM_PLAIN_SETTING: lit:plain-value-42
evaluation:
  env_vars:
    EVAL_KEY: lit:supersecret-eval
  tasks:
    - name: ifeval
    - name: gpqa_diamond
      env_vars:
        HF_TOKEN: host:EVALPROV_TEST_HF_TOKEN
        JUDGE_KEY: runtime:JUDGE_KEY
"""


@pytest.mark.parametrize(
    "command",
    [["inventory"], ["inventory", "--format", "json"], ["plan"], ["plan", "--format", "yaml"],
     ["plan", "--format", "json"]],
)
def test_no_secret_value_appears_in_any_output(command, tmp_path, monkeypatch, capsys):
    """Secrets (host-read values, literals named like a token/key/secret/password) never
    appear; a plain literal is configuration and is shown in the plan (JSON/YAML/text)."""
    monkeypatch.setenv("EVALPROV_TEST_HF_TOKEN", "hf_tokenvalue12345")
    config = tmp_path / "secret.yaml"
    config.write_text(textwrap.dedent(SECRET_CONFIG))
    inv = tmp_path / "hosts.yml"
    inv.write_text("all:\n  hosts:\n    gpu-a:\n      evalprov_gpu_count: 8\n")
    code = main([command[0], str(config), "-i", str(inv), *command[1:]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "HF_TOKEN" in out and "EVAL_KEY" in out and "TOP_LEVEL_KEY" in out
    for value in ("supersecret", "hf_tokenvalue12345"):
        assert value not in out and value not in err
    if command[0] == "inventory" or "--format" in command:
        assert "plain-value-42" in out
