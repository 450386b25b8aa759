"""Plan -> Ansible inventory variables (`evalprov.inventory.render`): the per-host and group
variables the roles read, that ansible-core reads them back as written, and that no env var
value ever appears in them."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
import yaml

from evalprov.cli import main
from evalprov.inventory import render, to_yaml
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
    assert render(fleet_plan)["all"]["vars"] == {
        "evalprov_runtime": "docker",
        "evalprov_image_name": "vllm/vllm-openai:v0.11.0",
        "evalprov_health_path": "/health",
        "evalprov_health_timeout": 900,
        "evalprov_health_served_model_name": "model",
        "evalprov_eval_concurrency": 1,
        "evalprov_eval_work_dir": "/var/lib/evalprov",
    }


def test_each_host_gets_its_instances(fleet_plan):
    hosts = render(fleet_plan)["all"]["hosts"]
    assert list(hosts) == ["gpu-a", "gpu-b"]
    for hp in fleet_plan.hosts:
        rendered = hosts[hp.host]["evalprov_vllm_instances"]
        assert [i["name"] for i in rendered] == [i.name for i in hp.instances]
        for got, inst in zip(rendered, hp.instances, strict=True):
            assert got["port"] == inst.port
            assert got["gpus"] == list(inst.gpus)
            assert got["argv"] == list(inst.argv)
            assert got["image"] == inst.image
            assert got["spec_hash"] == inst.spec_hash
            assert got["mounts"] == [
                {"source": "/models/llama", "target": "/checkpoint", "read_only": True}
            ]
    a = hosts["gpu-a"]["evalprov_vllm_instances"]
    assert [(i["name"], i["port"], i["gpus"]) for i in a] == [
        ("evalprov-vllm-0", 8000, [0, 1]), ("evalprov-vllm-1", 8001, [2, 3]),
        ("evalprov-vllm-2", 8002, [4, 5]), ("evalprov-vllm-3", 8003, [6, 7]),
    ]
    assert a[0]["argv"][-2:] == ["--max-model-len", "8192"]
    assert len(hosts["gpu-b"]["evalprov_vllm_instances"]) == 2


def test_each_host_gets_its_preflight_checks(fleet_plan):
    hosts = render(fleet_plan)["all"]["hosts"]
    assert hosts["gpu-a"]["evalprov_preflight_gpus_required"] == 8
    assert hosts["gpu-b"]["evalprov_preflight_gpus_required"] == 4
    assert hosts["gpu-a"]["evalprov_preflight_ports"] == [8000, 8001, 8002, 8003]
    assert hosts["gpu-b"]["evalprov_preflight_ports"] == [8000, 8001]
    assert hosts["gpu-a"]["evalprov_preflight_checkpoints"] == ["/models/llama"]


def _run_config(task: str, harness: str, url: str, etype: str = "chat") -> dict:
    return {"config": {"type": f"{harness}.{task}", "output_dir": "/work/results",
                       "params": {}},
            "target": {"api_endpoint": {"url": url, "model_id": "model", "type": etype}}}


def test_each_host_gets_its_tasks(fleet_plan):
    hosts = render(fleet_plan)["all"]["hosts"]
    tasks = [{k: v for k, v in t.items() if k not in ("run_config", "volumes")}
             for t in hosts["gpu-a"]["evalprov_eval_tasks"]]
    assert [t["run_config"] for t in hosts["gpu-a"]["evalprov_eval_tasks"]] == [
        _run_config("ifeval", "lm-evaluation-harness", "http://127.0.0.1:8000/v1/chat/completions"),
        _run_config("gpqa_diamond", "simple_evals", "http://127.0.0.1:8001/v1/chat/completions"),
    ]
    assert tasks == [
        {"name": "ifeval", "task": "ifeval", "harness": "lm-evaluation-harness",
         "container": "nvcr.io/nvidia/eval-factory/lm-evaluation-harness:26.03",
         "endpoint_type": "chat", "instance": "evalprov-vllm-0",
         "url": "http://127.0.0.1:8000/v1/chat/completions", "env_names": []},
        {"name": "gpqa_diamond", "task": "gpqa_diamond", "harness": "simple_evals",
         "container": "nvcr.io/nvidia/eval-factory/simple-evals:26.03",
         "endpoint_type": "chat", "instance": "evalprov-vllm-1",
         "url": "http://127.0.0.1:8001/v1/chat/completions", "env_names": ["HF_TOKEN"]},
    ]
    assert [t["name"] for t in hosts["gpu-b"]["evalprov_eval_tasks"]] == ["mmlu"]
    assert hosts["gpu-b"]["evalprov_eval_tasks"][0]["url"].endswith(":8000/v1/completions")


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
    user = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "none"}],
        "execution": {"output_dir": "/results"},
        "target": {"api_endpoint": {"url": "http://api:9000/v1/chat/completions",
                                    "model_id": "m"}},
        "evaluation": {"tasks": [{"name": "ifeval"}]},
    }
    inv = render(plan(make_config(user), [HostFacts("a")]))
    host = inv["all"]["hosts"]["a"]
    assert host["evalprov_vllm_instances"] == []
    assert host["evalprov_preflight_ports"] == []
    assert host["evalprov_preflight_gpus_required"] == 0
    assert host["evalprov_eval_tasks"][0]["url"] == "http://api:9000/v1/chat/completions"
    assert host["evalprov_eval_tasks"][0]["instance"] is None
    assert inv["all"]["vars"]["evalprov_image_name"] is None


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
    assert [i["port"] for i in node["evalprov_vllm_instances"]] == [8000, 8001]
    assert node["evalprov_runtime"] == "docker"


def test_jinja_in_argv_reaches_ansible_as_written_not_templated(vllm_config, tmp_path):
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    extra = f"--chat-template '{template}' --response-role '{{{{ 6 * 7 }}}}'"
    p = plan(vllm_config(deployment={"extra_args": extra}), [HostFacts("h", 8)])
    text = to_yaml(render(p))
    assert "!unsafe" in text
    path = tmp_path / "inv.yml"
    path.write_text(text)
    hostvars = ansible_hostvars(str(path))["h"]
    argv = Templar(loader=DataLoader(), variables=hostvars).template(
        hostvars["evalprov_vllm_instances"]
    )[0]["argv"]
    assert argv[-3:] == [template, "--response-role", "{{ 6 * 7 }}"]
    assert argv == list(p.instances[0].argv)


def test_to_yaml_leaves_ordinary_strings_untagged(fleet_plan):
    text = to_yaml(render(fleet_plan))
    assert "!unsafe" not in text
    assert yaml.safe_load(text) == render(fleet_plan)


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
    SERVER_LIT: lit:supersecret-server
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
def test_no_env_var_value_appears_in_any_output(command, tmp_path, monkeypatch, capsys):
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
