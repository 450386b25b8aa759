"""The planner: GPU arithmetic, instances, ports, the exact `vllm serve` argv, model source,
spec hash, task placement and endpoint URLs."""

from __future__ import annotations

import shlex

import pytest

from evalprov.check import HostFacts as Probed
from evalprov.check import check
from evalprov.errors import PlanError
from evalprov.inventory import render
from evalprov.plan import CHECKPOINT_MOUNT, HF_CACHE_MOUNT, HostFacts, Mount, plan, spec_hash
from evalprov.show import plan_text

SEED_ARGV = [
    "vllm", "serve", "Qwen/Qwen3-4B-Instruct-2507",
    "--tensor-parallel-size=1", "--pipeline-parallel-size=1", "--data-parallel-size=8",
    "--port", "8000", "--trust-remote-code",
    "--served-model-name", "qwen3-4b-instruct-2507",
    "--gpu-memory-utilization", "0.95",
    "--max-model-len", "4096",
]  # fmt: skip
BASE_ARGV_LEN = 15  # vllm serve MODEL + 12 planned tokens, before extra_args


@pytest.fixture
def one_host_plan(vllm_config):
    """one_host_plan(gpus=8, **vllm_user sections) -> the plan for one host `gpu1`."""
    return lambda gpus=8, **kw: plan(vllm_config(**kw), [HostFacts("gpu1", gpus)])


# --------------------------------------------------------------------------- GPU arithmetic


@pytest.mark.parametrize(
    ("tp", "pp", "dp", "need"),
    [(1, 1, 1, 1), (1, 1, 8, 8), (2, 2, 2, 8), (4, 1, 1, 4), (2, 3, 1, 6), (1, 2, 3, 6)],
)
def test_gpus_per_instance_is_tp_times_pp_times_dp(tp, pp, dp, need, one_host_plan):
    dep = {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "data_parallel_size": dp}
    p = one_host_plan(gpus=need, deployment=dep)
    assert p.gpus_per_instance == need
    (inst,) = p.instances
    assert inst.gpus == tuple(range(need))
    assert f"--tensor-parallel-size={tp}" in inst.argv
    assert f"--pipeline-parallel-size={pp}" in inst.argv
    assert f"--data-parallel-size={dp}" in inst.argv


def test_host_with_too_few_gpus_is_an_error_naming_host_numbers_and_fix(vllm_config):
    config = vllm_config(deployment={"tensor_parallel_size": 4,
                                               "data_parallel_size": 2})
    with pytest.raises(PlanError) as err:
        plan(config, [HostFacts("small-box", 4)])
    (line,) = err.value.lines
    assert "small-box" in line
    assert "has 4 GPUs" in line and "needs 8" in line
    assert "tensor_parallel_size 4" in line and "data_parallel_size 2" in line
    assert "lower the parallel sizes" in line


def test_every_host_that_lacks_gpus_gets_its_own_line_and_fitting_hosts_none(vllm_config):
    config = vllm_config(deployment={"tensor_parallel_size": 8})
    hosts = [HostFacts("a", 4), HostFacts("b", 8), HostFacts("c", 2)]
    with pytest.raises(PlanError) as err:
        plan(config, hosts)
    assert len(err.value.lines) == 2
    assert err.value.lines[0].startswith("host a:")
    assert err.value.lines[1].startswith("host c:")
    assert "host b" not in str(err.value)


def test_exact_fit_is_not_an_error(one_host_plan):
    p = one_host_plan(gpus=8, deployment={"tensor_parallel_size": 8})
    assert [i.gpus for i in p.instances] == [tuple(range(8))]


def test_too_many_instances_for_the_host_names_count_and_total(vllm_config):
    config = vllm_config(deployment={"tensor_parallel_size": 4},
                                   execution={"instances_per_host": 3})
    with pytest.raises(PlanError) as err:
        plan(config, [HostFacts("gpu1", 8)])
    (line,) = err.value.lines
    assert "gpu1" in line and "has 8 GPUs" in line and "3 instances of 4 GPUs" in line
    assert "need 12" in line and "instances_per_host" in line


@pytest.mark.parametrize("count", [0, -1])
def test_instances_per_host_below_one_is_a_plan_error_even_past_the_config_check(
    count, vllm_config
):
    config = vllm_config()
    execution = config.execution.model_copy(update={"instances_per_host": count})
    config = config.model_copy(update={"execution": execution})
    with pytest.raises(PlanError, match="instances_per_host"):
        plan(config, [HostFacts("gpu1", 8)])


def test_instances_per_host_int_gives_consecutive_ports_and_disjoint_gpus(one_host_plan):
    p = one_host_plan(gpus=8, deployment={"tensor_parallel_size": 2, "port": 9000},
                      execution={"instances_per_host": 3})
    insts = p.instances
    assert [i.name for i in insts] == ["evalprov-vllm-0", "evalprov-vllm-1", "evalprov-vllm-2"]
    assert [i.port for i in insts] == [9000, 9001, 9002]
    assert [i.gpus for i in insts] == [(0, 1), (2, 3), (4, 5)]
    for inst in insts:
        port_at = inst.argv.index("--port")
        assert inst.argv[port_at + 1] == str(inst.port)
    assert len({i.spec_hash for i in insts}) == 3


@pytest.mark.parametrize(("gpus", "need", "count"), [(8, 2, 4), (7, 2, 3), (8, 8, 1), (8, 3, 2)])
def test_instances_per_host_auto_fills_the_host(gpus, need, count, one_host_plan):
    p = one_host_plan(gpus=gpus, deployment={"tensor_parallel_size": need},
                      execution={"instances_per_host": "auto"})
    assert len(p.instances) == count
    assert [i.port for i in p.instances] == list(range(8000, 8000 + count))
    assert [i.gpus for i in p.instances] == [
        tuple(range(k * need, (k + 1) * need)) for k in range(count)
    ]


def test_instances_per_host_auto_on_a_host_too_small_is_an_error(vllm_config):
    config = vllm_config(deployment={"tensor_parallel_size": 8},
                                   execution={"instances_per_host": "auto"})
    with pytest.raises(PlanError, match="host gpu1: has 4 GPUs but one instance needs 8"):
        plan(config, [HostFacts("gpu1", 4)])


def test_auto_is_worked_out_per_host(vllm_config):
    config = vllm_config(deployment={"tensor_parallel_size": 2},
                                   execution={"instances_per_host": "auto"})
    p = plan(config, [HostFacts("big", 8), HostFacts("small", 4)])
    assert [len(h.instances) for h in p.hosts] == [4, 2]


def test_unknown_gpu_count_plans_and_adds_a_note(one_host_plan):
    p = one_host_plan(gpus=None, deployment={"tensor_parallel_size": 8},
                      execution={"instances_per_host": "auto"})
    assert p.hosts[0].gpus_total is None
    assert len(p.instances) == 1 and p.instances[0].gpus == tuple(range(8))
    assert any("GPU counts not given" in n and "--gpus" in n for n in p.notes)
    known = one_host_plan(gpus=8, deployment={"tensor_parallel_size": 8})
    assert not any("GPU counts" in n for n in known.notes)


def test_ports_past_65535_are_an_error(vllm_config):
    config = vllm_config(deployment={"port": 65535},
                                   execution={"instances_per_host": 2})
    with pytest.raises(PlanError, match="port 65536"):
        plan(config, [HostFacts("gpu1", 8)])


def test_no_hosts_and_duplicate_hosts_are_errors(vllm_config):
    config = vllm_config()
    with pytest.raises(PlanError, match="no hosts"):
        plan(config, [])
    with pytest.raises(PlanError, match="listed twice"):
        plan(config, [HostFacts("a", 8), HostFacts("a", 8)])


# --------------------------------------------------------------------------- argv


def test_seed_argv_is_nel_base_command_exactly(seed_config):
    """NEL's base command, bound to loopback: the harness runs in the same Slurm job, on the
    same node, and nothing else on the cluster's network may call the unauthenticated API."""
    p = plan(seed_config(), [])
    (inst,) = p.instances
    port = SEED_ARGV.index("--port")
    assert list(inst.argv) == [*SEED_ARGV[:port + 2], "--host", "127.0.0.1",
                               *SEED_ARGV[port + 2:]]
    assert isinstance(inst.argv, tuple) and all(type(a) is str for a in inst.argv)


def test_argv_without_extra_args_ends_with_gpu_memory_utilization(one_host_plan):
    p = one_host_plan(deployment={"gpu_memory_utilization": 0.5})
    assert p.instances[0].argv[-2:] == ("--gpu-memory-utilization", "0.5")
    assert len(p.instances[0].argv) == BASE_ARGV_LEN


def test_quoted_extra_args_become_single_argv_elements_never_rejoined(one_host_plan):
    extra = """--override-generation-config '{"temperature": 0.5}' --max-model-len 4096"""
    p = one_host_plan(deployment={"extra_args": extra})
    (inst,) = p.instances
    assert list(inst.argv[BASE_ARGV_LEN:]) == [
        "--override-generation-config", '{"temperature": 0.5}', "--max-model-len", "4096",
    ]
    rendered = render(p)["all"]["hosts"]["gpu1"]["evalprov_plan_instances"][0]
    assert rendered["argv"] == list(inst.argv)
    assert rendered["entrypoint"] + rendered["command"] == list(inst.argv)
    rendered = rendered["argv"]
    assert '{"temperature": 0.5}' in rendered
    assert not any(" --max-model-len" in a for a in rendered)


@pytest.mark.parametrize(
    ("extra", "tail"),
    [
        ("; rm -rf /", [";", "rm", "-rf", "/"]),
        ("--chat-template '; rm -rf /'", ["--chat-template", "; rm -rf /"]),
        ("$(reboot)", ["$(reboot)"]),
        ('--x "$(reboot)" `id` && echo pwned | tee /etc/passwd',
         ["--x", "$(reboot)", "`id`", "&&", "echo", "pwned", "|", "tee", "/etc/passwd"]),
    ],
)
def test_shell_injection_in_extra_args_stays_inert_argv_elements(extra, tail, one_host_plan):
    p = one_host_plan(deployment={"extra_args": extra})
    (inst,) = p.instances
    assert list(inst.argv[BASE_ARGV_LEN:]) == tail
    assert inst.argv[:2] == ("vllm", "serve")
    # what `evalprov plan` prints is a quoted command that splits back to the same argv
    argv_line = next(ln for ln in plan_text(p).splitlines() if ln.strip().startswith("argv:"))
    assert shlex.split(argv_line.split("argv:", 1)[1]) == list(inst.argv)


# --------------------------------------------------------------------------- model source


def test_absolute_checkpoint_path_is_mounted_read_only_at_checkpoint(one_host_plan):
    p = one_host_plan(deployment={"hf_model_handle": None, "checkpoint_path": "/models/llama"})
    (inst,) = p.instances
    assert inst.model.kind == "checkpoint" and inst.model.ref == "/models/llama"
    assert inst.argv[2] == CHECKPOINT_MOUNT == "/checkpoint"
    assert inst.mounts == (Mount("/models/llama", "/checkpoint", True),)
    assert p.checkpoints == ("/models/llama",)
    assert p.disk_paths == ()
    inv = render(p)["all"]
    assert inv["vars"]["evalprov_preflight_dirs"] == ["/models/llama"]
    assert inv["hosts"]["gpu1"]["evalprov_plan_instances"][0]["volumes"] == [
        "/models/llama:/checkpoint:ro"
    ]


@pytest.mark.parametrize(
    "field", ["checkpoint_path", "hf_model_handle"],
)
def test_hf_id_in_either_field_is_served_by_id_with_the_hf_cache_mounted(field, one_host_plan):
    p = one_host_plan(deployment={"hf_model_handle": None, field: "Qwen/Qwen3-4B"},
                      execution={"hf_cache_dir": "/data/hf"})
    (inst,) = p.instances
    assert inst.model.kind == "hf" and inst.model.ref == "Qwen/Qwen3-4B"
    assert inst.argv[2] == "Qwen/Qwen3-4B"
    assert "/checkpoint" not in inst.argv
    assert inst.mounts == (Mount("/data/hf", HF_CACHE_MOUNT, False),)
    assert p.checkpoints == () and p.disk_paths == ("/data/hf",)
    inv = render(p)["all"]
    assert inv["vars"]["evalprov_preflight_dirs"] == []
    assert inv["vars"]["evalprov_preflight_disk_paths"] == ["/data/hf"]
    assert inv["hosts"]["gpu1"]["evalprov_plan_instances"][0]["volumes"] == [
        f"/data/hf:{HF_CACHE_MOUNT}:rw"
    ]


def test_hf_model_handle_wins_over_checkpoint_path_as_in_nel(one_host_plan):
    p = one_host_plan(deployment={"hf_model_handle": "org/served",
                                  "checkpoint_path": "/models/other"})
    assert p.instances[0].argv[2] == "org/served"
    assert p.instances[0].model.kind == "hf"


# --------------------------------------------------------------------------- spec hash


@pytest.fixture
def spec_of(one_host_plan):
    """spec_of(**vllm_user sections) -> the spec hash of the single instance."""
    return lambda **kw: one_host_plan(**kw).instances[0].spec_hash


def test_spec_hash_is_stable_across_calls_and_fresh_configs(vllm_config, spec_of):
    first = spec_of()
    assert first == spec_of() == spec_of()
    assert len(first) == 16 and int(first, 16) >= 0
    config = vllm_config()
    assert plan(config, [HostFacts("gpu1", 8)]) == plan(config, [HostFacts("gpu1", 8)])


@pytest.mark.parametrize(
    "change",
    [
        {"deployment": {"extra_args": "--max-model-len 4096"}},  # argv
        {"deployment": {"port": 8100}},  # argv
        {"deployment": {"served_model_name": "other"}},  # argv
        {"deployment": {"image": "vllm/vllm-openai:v0.11.0"}},  # image
        {"deployment": {"tensor_parallel_size": 2}},  # GPUs (and argv)
        {"deployment": {"env_vars": {"HF_TOKEN": "host:HF_TOKEN"}}},  # env names
        {"env_vars": {"EXTRA": "lit:x"}},  # env names (top level reaches the server)
        {"execution": {"hf_cache_dir": "/data/hf"}},  # mounts
        {"execution": {"runtime": "process"}},  # runtime
    ],
)
def test_spec_hash_changes_with_the_instance_spec(change, spec_of):
    assert spec_of(**change) != spec_of()


def test_spec_hash_covers_the_gpu_set():
    base = {"image": "i", "argv": ("a",), "env": (), "mounts": [], "runtime": "docker"}
    assert spec_hash(gpus=(0, 1), **base) != spec_hash(gpus=(2, 3), **base)
    assert spec_hash(gpus=(0, 1), **base) == spec_hash(gpus=(0, 1), **base)


def test_spec_hash_ignores_env_values_and_tasks(spec_of):
    base = spec_of(deployment={"env_vars": {"HF_TOKEN": "host:A"}})
    assert spec_of(deployment={"env_vars": {"HF_TOKEN": "host:B"}}) == base
    assert spec_of(deployment={"env_vars": {"HF_TOKEN": "lit:secret"}}) == base
    assert spec_of(deployment={"env_vars": {"HF_TOKEN": "host:A"}},
                 tasks=[{"name": "ifeval"}, {"name": "gpqa_diamond"}, {"name": "mmlu"}]) == base
    assert spec_of(deployment={"env_vars": {"HF_TOKEN": "host:A"}},
                 execution={"placement": "every_host"}) == base


# --------------------------------------------------------------------------- placement

TASKS5 = [{"name": n} for n in ("ifeval", "gpqa_diamond", "mmlu", "mmlu_pro", "math_test_500")]


def test_shard_spreads_tasks_across_hosts_each_once(vllm_config):
    config = vllm_config(tasks=TASKS5, deployment={"tensor_parallel_size": 8})
    p = plan(config, [HostFacts(h, 8) for h in ("a", "b", "c")])
    by_host = {h.host: [t.name for t in h.tasks] for h in p.hosts}
    assert by_host == {"a": ["ifeval", "mmlu_pro"], "b": ["gpqa_diamond", "math_test_500"],
                       "c": ["mmlu"]}
    assert sorted(t.name for t in p.task_runs) == sorted(t["name"] for t in TASKS5)
    for run in p.task_runs:
        assert run.host in by_host and run.name in by_host[run.host]


def test_shard_round_robins_a_hosts_tasks_over_its_instances_without_a_proxy(vllm_config):
    config = vllm_config(tasks=TASKS5, deployment={"tensor_parallel_size": 2},
                         execution={"instances_per_host": "auto", "proxy": {"type": "none"}})
    p = plan(config, [HostFacts("a", 4)])
    assert [t.instance for t in p.task_runs] == [
        "evalprov-vllm-0", "evalprov-vllm-1", "evalprov-vllm-0", "evalprov-vllm-1",
        "evalprov-vllm-0",
    ]
    assert [t.url.split(":")[2].split("/")[0] for t in p.task_runs] == [
        "8000", "8001", "8000", "8001", "8000",
    ]


def test_every_host_gives_each_host_every_task(vllm_config):
    config = vllm_config(tasks=TASKS5, deployment={"tensor_parallel_size": 8},
                                   execution={"placement": "every_host"})
    p = plan(config, [HostFacts(h, 8) for h in ("a", "b", "c")])
    for hp in p.hosts:
        assert [t.name for t in hp.tasks] == [t["name"] for t in TASKS5]
        assert {t.host for t in hp.tasks} == {hp.host}
    assert len(p.task_runs) == 15


def test_more_hosts_than_tasks_under_shard_leaves_hosts_idle_with_a_note(vllm_config):
    config = vllm_config(tasks=[{"name": "ifeval"}],
                                   deployment={"tensor_parallel_size": 8})
    p = plan(config, [HostFacts("a", 8), HostFacts("b", 8)])
    assert [len(h.tasks) for h in p.hosts] == [1, 0]
    assert any("1 host(s) get no task" in n for n in p.notes)


@pytest.mark.parametrize("ntasks", [1, 3, 5])
def test_all_tasks_share_one_deployment_per_host(ntasks, vllm_config):
    config = vllm_config(tasks=TASKS5[:ntasks], deployment={"tensor_parallel_size": 8})
    p = plan(config, [HostFacts("a", 8)])
    assert len(p.instances) == 1
    assert {t.instance for t in p.task_runs} == {"evalprov-vllm-0"}
    assert len(p.task_runs) == ntasks


def test_seed_gpqa_and_ifeval_share_one_eight_gpu_instance(seed_config):
    p = plan(seed_config(), [])
    assert len(p.instances) == 1
    assert [t.instance for t in p.task_runs] == ["evalprov-vllm-0", "evalprov-vllm-0"]


def test_task_env_names_merge_top_evaluation_and_task_and_hold_no_values(make_config, vllm_user):
    user = vllm_user(tasks=[{"name": "gpqa_diamond", "env_vars": {"HF_TOKEN": "lit:hush"}}],
                     env_vars={"TOP": "host:TOP"})
    user["evaluation"]["env_vars"] = {"EVAL": "lit:x"}
    p = plan(make_config(user), [HostFacts("a", 8)])
    (run,) = p.task_runs
    assert run.env_names == ("EVAL", "HF_TOKEN", "TOP")
    assert "hush" not in repr(p)


# --------------------------------------------------------------------------- deployment none


def test_deployment_none_plans_no_instances_and_points_tasks_at_the_target(make_config):
    user = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "none"}],
        "execution": {"output_dir": "/results"},
        "target": {"api_endpoint": {"url": "https://api.example.com/v1/chat/completions",
                                    "model_id": "meta/llama"}},
        "evaluation": {"tasks": [{"name": "ifeval"}, {"name": "mmlu"}]},
    }
    p = plan(make_config(user), [HostFacts("a", None), HostFacts("b", None)])
    assert p.deployment == "none"
    assert p.instances == [] and p.gpus_per_instance == 0
    assert [t.url for t in p.task_runs] == ["https://api.example.com/v1/chat/completions"] * 2
    assert [t.instance for t in p.task_runs] == [None, None]
    assert not any("GPU counts" in n for n in p.notes)
    host = render(p)["all"]["hosts"]["a"]
    assert host["evalprov_plan_instances"] == [] and host["evalprov_plan_gpus"] is None
    assert p.image is None and p.checkpoints == () and p.disk_paths == ()
    # a host with no GPU fits: nothing is served there (dockerd runs the tasks' containers)
    up = {"docker_present": True, "docker_running": True}
    assert check(p, {"a": Probed(gpu_count=0, **up), "b": Probed(gpu_count=0, **up)}
                 ).problems == ()


# --------------------------------------------------------------------------- slurm


def test_seed_on_slurm_plans_one_allocation_of_gres_gpus(seed_config):
    p = plan(seed_config(), [HostFacts("ignored", 1)])
    assert p.execution == "slurm"
    assert [h.host for h in p.hosts] == ["your-cluster-headnode"]
    assert p.hosts[0].gpus_total == 8
    (inst,) = p.instances
    assert inst.gpus == tuple(range(8))
    assert "--data-parallel-size=8" in inst.argv


def test_slurm_num_instances_plans_that_many_instances_on_their_own_nodes(seed_config):
    """NEL's topology: num_nodes / num_instances nodes per instance, one cluster host with
    every instance behind the proxy its tasks call."""
    p = plan(seed_config("execution.num_instances=3", "execution.num_nodes=3",
                         "execution.gres=gpu:a100:8"), [])
    (hp,) = p.hosts
    assert hp.host == "your-cluster-headnode" and hp.gpus_total == 8
    assert [(i.name, i.node, i.port) for i in p.instances] == [
        (f"evalprov-vllm-{i}", i, 8000) for i in range(3)]
    assert len({i.spec_hash for i in p.instances}) == 3
    assert hp.proxy is not None and {t.instance for t in p.task_runs} == {hp.proxy.name}
    assert sorted(t.name for t in p.task_runs) == ["gpqa_diamond", "ifeval"]
    with pytest.raises(PlanError) as err:
        plan(seed_config("execution.num_instances=3"), [])
    assert "execution.num_nodes: 1 is not a multiple of execution.num_instances 3" in str(
        err.value)


def test_slurm_gres_too_small_names_gres_and_the_fix(seed_config):
    with pytest.raises(PlanError) as err:
        plan(seed_config("execution.gres=gpu:4"), [])
    (line,) = err.value.lines
    assert "host your-cluster-headnode:" in line
    assert "4 GPUs" in line and "needs 8" in line and "execution.gres" in line
    assert "gpu:8" in line


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("task", "etype", "path"),
    [
        ({"name": "ifeval"}, "chat", "/v1/chat/completions"),
        ({"name": "mmlu"}, "completions", "/v1/completions"),
        ({"name": "ifeval", "endpoint_type": "completions"}, "completions", "/v1/completions"),
        ({"name": "mmlu", "endpoint_type": "chat"}, "chat", "/v1/chat/completions"),
        ({"name": "ifeval", "endpoint_type": "embedding"}, "embedding", "/v1/embeddings"),
        ({"name": "chartqa"}, "vlm", "/v1/chat/completions"),
    ],
)
def test_task_url_follows_its_endpoint_type(task, etype, path, one_host_plan):
    p = one_host_plan(tasks=[task], deployment={"port": 8123})
    (run,) = p.task_runs
    assert run.endpoint_type == etype
    assert run.url == f"http://127.0.0.1:8123{path}"


def test_custom_endpoint_paths_are_used(one_host_plan):
    p = one_host_plan(tasks=[{"name": "ifeval"}, {"name": "mmlu"}],
                      deployment={"endpoints": {"chat": "/c", "completions": "/p"}})
    assert [t.url for t in p.task_runs] == ["http://127.0.0.1:8000/c",
                                            "http://127.0.0.1:8000/p"]
