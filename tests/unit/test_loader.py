"""Config loading: NEL compatibility (seed example, packaged defaults, defaults list), -o
overrides, interpolation, env_vars, warnings, examples and the task table."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from evalprov.cli import main
from evalprov.config.envvars import EnvVarSpec, parse_env_value, resolve_env
from evalprov.config.loader import load_config, parse_override
from evalprov.config.models import NoneDeployment, SlurmExecution, VllmDeployment
from evalprov.config.tasks import task_table
from evalprov.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

# Verbatim from NEL-REFERENCE.md, "The example every user starts from (must work unchanged)".
NEL_SEED = """\
defaults:
  - execution: slurm/default
  - deployment: vllm
  - _self_
deployment:
  checkpoint_path: Qwen/Qwen3-4B-Instruct-2507
  served_model_name: qwen3-4b-instruct-2507
  tensor_parallel_size: 1
  data_parallel_size: 8
  extra_args: "--max-model-len 4096"
execution:
  hostname: your-cluster-headnode
  account: your-account
  output_dir: /path/to/output
  walltime: 02:00:00
evaluation:
  tasks:
    - name: ifeval
    - name: gpqa_diamond
      env_vars:
        HF_TOKEN: HF_TOKEN_FOR_GPQA_DIAMOND
"""

LOCAL_VLLM = """\
defaults:
  - execution: local
  - deployment: vllm
  - _self_
execution:
  output_dir: /results
deployment:
  checkpoint_path: /models/llama
  served_model_name: llama
evaluation:
  tasks:
    - name: ifeval
"""

SLURM_VLLM = """\
defaults:
  - execution: slurm/default
  - deployment: vllm
  - _self_
execution:
  hostname: head
  account: acct
  output_dir: /out
deployment:
  checkpoint_path: /models/llama
  served_model_name: llama
"""


@pytest.fixture
def write(tmp_path):
    def _write(text: str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return _write


def load(path, *overrides, environ=None):
    return load_config(path, list(overrides), environ={} if environ is None else environ)


# --------------------------------------------------------------------------- the seed


def test_seed_example_file_is_the_documented_seed_unchanged():
    assert yaml.safe_load((EXAMPLES / "nel_seed.yaml").read_text()) == yaml.safe_load(NEL_SEED)


def test_seed_example_loads_as_written(write):
    loaded = load(write(NEL_SEED), environ={"USER": "alice"})
    cfg = loaded.config
    assert isinstance(cfg.execution, SlurmExecution)
    assert isinstance(cfg.deployment, VllmDeployment)
    assert cfg.execution.hostname == "your-cluster-headnode"
    assert cfg.execution.account == "your-account"
    assert cfg.execution.username == "alice"  # ${oc.env:USER}
    assert cfg.execution.walltime == "02:00:00"  # unquoted: YAML 1.1 read 7200
    assert cfg.deployment.checkpoint_path == "Qwen/Qwen3-4B-Instruct-2507"
    assert (cfg.deployment.tensor_parallel_size, cfg.deployment.data_parallel_size) == (1, 8)
    assert cfg.deployment.extra_args == "--max-model-len 4096"
    assert [t.name for t in cfg.evaluation.tasks] == ["ifeval", "gpqa_diamond"]
    # NEL 0.2.6 wants host:NAME; the seed's bare name means exactly that.
    assert cfg.evaluation.tasks[1].env_vars == {
        "HF_TOKEN": EnvVarSpec("host", "HF_TOKEN_FOR_GPQA_DIAMOND")
    }
    assert loaded.warnings == []


# --------------------------------------------------------------------------- packaged defaults


def test_vllm_defaults_equal_nel(write):
    dep = load(write(LOCAL_VLLM)).config.deployment
    assert dep.image == "vllm/vllm-openai:latest"
    assert dep.port == 8000
    assert dep.tensor_parallel_size == 8
    assert dep.pipeline_parallel_size == 1
    assert dep.data_parallel_size == 1
    assert dep.gpu_memory_utilization == 0.95
    assert dep.extra_args == ""
    assert dep.hf_model_handle is None
    assert dep.env_vars == {}
    assert dep.endpoints.model_dump() == {
        "chat": "/v1/chat/completions",
        "completions": "/v1/completions",
        "health": "/health",
        "embedding": "/v1/embeddings",
        "ranking": "/v1/ranking",
    }


def test_slurm_defaults_equal_nel(write):
    exe = load(write(SLURM_VLLM), environ={"USER": "bob"}).config.execution
    assert isinstance(exe, SlurmExecution)
    assert exe.username == "bob"
    assert exe.partition == "batch"
    assert exe.num_nodes == 1
    assert exe.num_instances == 1
    assert exe.ntasks_per_node == 1
    assert exe.gres == "gpu:8"
    assert exe.gpus_per_node == 8
    assert exe.walltime == "01:00:00"
    assert exe.max_walltime == "120:00:00"
    assert exe.endpoint_readiness_timeout is None
    assert exe.subproject == "nemo-evaluator-launcher"
    assert exe.sbatch_extra_flags == {"exclusive": True}
    assert exe.mounts.model_dump() == {
        "deployment": {}, "evaluation": {}, "auxiliary": {}, "mount_home": True,
    }
    assert exe.proxy["type"] == "haproxy"
    assert exe.proxy["config"]["haproxy_port"] == 5009


def test_slurm_username_is_empty_without_user_in_the_environment(write):
    assert load(write(SLURM_VLLM), environ={}).config.execution.username == ""


def test_local_defaults_equal_nel(write):
    exe = load(write(LOCAL_VLLM)).config.execution
    assert exe.type == "local"
    assert exe.endpoint_readiness_timeout == 600
    assert exe.health_timeout == 600
    assert exe.mode == "sequential"
    assert exe.extra_docker_args == ""


def test_no_defaults_list_defaults_to_local_execution_and_no_deployment(write):
    cfg = load(write("""\
        execution: {output_dir: /r}
        target: {api_endpoint: {url: "http://h:8000/v1/chat/completions", model_id: m}}
    """)).config
    assert cfg.execution.type == "local"
    assert isinstance(cfg.deployment, NoneDeployment)


def test_inventory_switches_the_default_execution_to_baremetal(write):
    path = write("""\
        execution: {output_dir: /r}
        target: {api_endpoint: {url: "http://h:8000/v1/chat/completions", model_id: m}}
    """)
    cfg = load_config(path, default_execution="baremetal", environ={}).config
    assert cfg.execution.type == "baremetal"


# --------------------------------------------------------------------------- walltime


@pytest.mark.parametrize("value", ["10:00:00", '"10:00:00"', "'10:00:00'"])
def test_walltime_quoted_or_not_is_hh_mm_ss(write, value):
    path = write(SLURM_VLLM.replace("  output_dir: /out\n",
                                    f"  output_dir: /out\n  walltime: {value}\n"))
    raw = yaml.safe_load(path.read_text())["execution"]["walltime"]
    assert raw == (36000 if value == "10:00:00" else "10:00:00")  # the YAML 1.1 gotcha
    assert load(path).config.execution.walltime == "10:00:00"


def test_walltime_with_days_is_accepted(write):
    path = write(SLURM_VLLM.replace("  output_dir: /out\n",
                                    '  output_dir: /out\n  walltime: "1-12:00:00"\n'))
    assert load(path).config.execution.walltime == "1-12:00:00"


def test_walltime_override_is_hh_mm_ss(write):
    cfg = load(write(SLURM_VLLM), "execution.walltime=04:30:00").config
    assert cfg.execution.walltime == "04:30:00"


# --------------------------------------------------------------------------- -o overrides


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("deployment.port=8001", ["deployment", "port"], 8001),
        ("execution.mounts.mount_home=false", ["execution", "mounts", "mount_home"], False),
        ("deployment.gpu_memory_utilization=0.5", ["deployment", "gpu_memory_utilization"], 0.5),
        ("target.api_endpoint.url=null", ["target", "api_endpoint", "url"], None),
        ("evaluation.tasks.0.name=gpqa_diamond", ["evaluation", "tasks", "0", "name"],
         "gpqa_diamond"),
        ("execution.sbatch_extra_flags={gpus-per-node: 8}", ["execution", "sbatch_extra_flags"],
         {"gpus-per-node": 8}),
        ("deployment.extra_args=", ["deployment", "extra_args"], ""),
    ],
)
def test_parse_override_types_values_as_yaml(text, keys, value):
    got_keys, got = parse_override(text)
    assert got_keys == keys
    assert got == value and type(got) is type(value)


def test_override_values_are_yaml_typed(write):
    dep = load(write(LOCAL_VLLM), "deployment.port=8001",
               "deployment.gpu_memory_utilization=0.5").config.deployment
    assert dep.port == 8001 and isinstance(dep.port, int)
    assert dep.gpu_memory_utilization == 0.5


def test_false_override_beats_yaml_true(write):
    """lm-eval's `if v or v == 0` bug: a false flag could not override a YAML true."""
    path = write(SLURM_VLLM.replace(
        "  output_dir: /out\n",
        "  output_dir: /out\n  mounts: {mount_home: true}\n"
        "  sbatch_extra_flags: {exclusive: true}\n",
    ))
    assert load(path).config.execution.mounts.mount_home is True
    exe = load(path, "execution.mounts.mount_home=false",
               "execution.sbatch_extra_flags.exclusive=false").config.execution
    assert exe.mounts.mount_home is False
    assert exe.sbatch_extra_flags["exclusive"] is False


def test_zero_override_beats_yaml_value(write):
    path = write(LOCAL_VLLM.replace("  output_dir: /results\n",
                                    "  output_dir: /results\n  eval_concurrency: 4\n"))
    assert load(path).config.execution.eval_concurrency == 4
    with pytest.raises(ConfigError, match=r"execution.eval_concurrency: got 0"):
        load(path, "execution.eval_concurrency=0")  # 0 reaches validation, is not dropped


def test_empty_override_sets_an_empty_string(write):
    path = write(LOCAL_VLLM.replace("  served_model_name: llama\n",
                                    "  served_model_name: llama\n  extra_args: --enforce-eager\n"))
    assert load(path).config.deployment.extra_args == "--enforce-eager"
    assert load(path, "deployment.extra_args=").config.deployment.extra_args == ""


def test_override_list_index(write):
    path = write(NEL_SEED)
    cfg = load(path, "evaluation.tasks.0.name=mmlu_pro").config
    assert [t.name for t in cfg.evaluation.tasks] == ["mmlu_pro", "gpqa_diamond"]


def test_override_value_may_contain_equals(write):
    cfg = load(write(LOCAL_VLLM), "deployment.extra_args=--max-model-len=4096").config
    assert cfg.deployment.extra_args == "--max-model-len=4096"


def test_override_sets_a_field_the_file_does_not_mention(write):
    cfg = load(write(LOCAL_VLLM), "execution.placement=every_host").config
    assert cfg.execution.placement == "every_host"


def test_override_into_an_empty_list_says_so(write):
    path = write(LOCAL_VLLM.replace("evaluation:\n  tasks:\n    - name: ifeval\n", ""))
    with pytest.raises(ConfigError) as exc:
        load(path, "evaluation.tasks.0.name=ifeval")
    assert exc.value.lines == [
        "-o 'evaluation.tasks.0.name=ifeval': evaluation.tasks.0 is not an index of a list "
        "of 0; the list is empty; add the items in the config file"
    ]


def test_override_can_choose_the_defaults_option(write):
    path = write(LOCAL_VLLM)
    cfg = load(path, "defaults.0.execution=baremetal").config
    assert cfg.execution.type == "baremetal"


# --------------------------------------------------------------------------- interpolation


def test_oc_env_reads_the_environment(write):
    path = write(LOCAL_VLLM.replace("served_model_name: llama",
                                    "served_model_name: ${oc.env:MODEL_NAME}"))
    assert load(path, environ={"MODEL_NAME": "qwen"}).config.deployment.served_model_name == "qwen"


def test_oc_env_default_when_unset(write):
    path = write(LOCAL_VLLM.replace("served_model_name: llama",
                                    "served_model_name: ${oc.env:MODEL_NAME,fallback-model}"))
    assert load(path).config.deployment.served_model_name == "fallback-model"
    assert load(path, environ={"MODEL_NAME": "set"}).config.deployment.served_model_name == "set"


def test_oc_env_unset_without_default_names_the_variable(write):
    path = write(LOCAL_VLLM.replace("output_dir: /results", "output_dir: ${oc.env:RESULTS_DIR}"))
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert exc.value.lines == [
        "execution.output_dir: ${oc.env:RESULTS_DIR} reads RESULTS_DIR from the environment, "
        "which is not set; export RESULTS_DIR or give a default as ${oc.env:RESULTS_DIR,default}"
    ]


def test_field_reference_keeps_the_type_and_follows_overrides(write):
    path = write(SLURM_VLLM.replace("  output_dir: /out\n",
                                    "  output_dir: /out\n  num_nodes: 2\n"))
    exe = load(path).config.execution
    assert exe.deployment["n_tasks"] == 2  # packaged ${execution.num_nodes}, an int
    assert load(path, "execution.num_nodes=3").config.execution.deployment["n_tasks"] == 3


def test_field_reference_inside_a_string(write):
    path = write(LOCAL_VLLM.replace("served_model_name: llama",
                                    "served_model_name: llama-port${deployment.port}"))
    assert load(path).config.deployment.served_model_name == "llama-port8000"


# --------------------------------------------------------------------------- defaults list


def _self_at(position: str) -> str:
    entries = ["execution: local", "deployment: none"]
    entries.insert(0 if position == "first" else 2, "_self_")
    return "defaults:\n" + "".join(f"  - {e}\n" for e in entries) + """\
execution:
  output_dir: /mine
  endpoint_readiness_timeout: 120
target:
  api_endpoint: {url: "http://h:8000/v1/chat/completions", model_id: m}
"""


def test_self_last_lets_the_file_win_over_packaged_defaults(write):
    cfg = load(write(_self_at("last"))).config
    assert cfg.execution.endpoint_readiness_timeout == 120


def test_self_first_lets_packaged_defaults_win(write):
    cfg = load(write(_self_at("first"))).config
    assert cfg.execution.endpoint_readiness_timeout == 600  # local.yaml's, not the file's 120
    # As in OmegaConf, a ??? in a later layer (local.yaml's output_dir) keeps a set value.
    assert cfg.execution.output_dir == "/mine"


def test_override_wins_even_when_self_is_first(write):
    """-o is applied after composition (Hydra): it beats every defaults entry."""
    cfg = load(write(_self_at("first")), "execution.endpoint_readiness_timeout=45").config
    assert cfg.execution.endpoint_readiness_timeout == 45


def test_execution_type_without_defaults_list(write):
    cfg = load(write("""\
        execution:
          type: baremetal
          output_dir: /results
          instances_per_host: auto
        deployment:
          type: vllm
          hf_model_handle: org/model
          served_model_name: model
          tensor_parallel_size: 2
        evaluation:
          tasks:
            - name: ifeval
    """)).config
    assert cfg.execution.type == "baremetal"
    assert cfg.execution.instances_per_host == "auto"
    assert isinstance(cfg.deployment, VllmDeployment)
    assert cfg.deployment.port == 8000  # vllm.yaml was composed in from deployment.type
    assert cfg.deployment.tensor_parallel_size == 2


def test_slurm_type_without_defaults_list_picks_slurm_default(write):
    cfg = load(write(SLURM_VLLM.replace(
        "defaults:\n  - execution: slurm/default\n  - deployment: vllm\n  - _self_\n", ""
    ).replace("execution:\n", "execution:\n  type: slurm\n")
     .replace("deployment:\n", "deployment:\n  type: vllm\n"))).config
    assert cfg.execution.partition == "batch"
    assert cfg.execution.gres == "gpu:8"


def test_composed_defaults_list_is_reported(write):
    cfg = load(write(LOCAL_VLLM)).config
    assert cfg.defaults == [{"execution": "local"}, {"deployment": "vllm"}, "_self_"]


# --------------------------------------------------------------------------- env_vars


@pytest.mark.parametrize(
    ("raw", "spec"),
    [
        ("HF_TOKEN", EnvVarSpec("host", "HF_TOKEN")),
        ("host:HF_TOKEN", EnvVarSpec("host", "HF_TOKEN")),
        ("lit:some value: with colon", EnvVarSpec("lit", "some value: with colon")),
        ("lit:", EnvVarSpec("lit", "")),
        ("runtime:NODE_RANK", EnvVarSpec("runtime", "NODE_RANK")),
    ],
)
def test_env_value_forms(raw, spec):
    assert parse_env_value(raw) == spec


@pytest.mark.parametrize("raw", ["host:", "runtime:1BAD", "two words", "a-b", None, ["X"]])
def test_env_value_rejects(raw):
    with pytest.raises(ValueError):
        parse_env_value(raw)


def test_describe_never_shows_a_literal():
    assert EnvVarSpec("lit", "s3cr3t").describe() == "lit:<literal>"
    assert EnvVarSpec("host", "HF_TOKEN").describe() == "host:HF_TOKEN"
    assert EnvVarSpec("runtime", "X").describe() == "runtime:X"


def test_resolve_env_returns_host_and_literal_values_leaves_runtime():
    specs = {
        "A": EnvVarSpec("host", "SRC_A"),
        "B": EnvVarSpec("lit", "literal-b"),
        "C": EnvVarSpec("runtime", "SRC_C"),
    }
    assert resolve_env(specs, "evaluation.tasks.0", {"SRC_A": "value-a"}) == {
        "A": "value-a", "B": "literal-b",
    }


def test_resolve_env_missing_host_var_names_it_and_where():
    specs = {"HF_TOKEN": EnvVarSpec("host", "HF_TOKEN_FOR_GPQA"), "X": EnvVarSpec("lit", "x")}
    with pytest.raises(ConfigError) as exc:
        resolve_env(specs, "evaluation.tasks.1.env_vars", {})
    assert exc.value.lines == [
        "evaluation.tasks.1.env_vars: env var HF_TOKEN reads HF_TOKEN_FOR_GPQA from the "
        "controller environment, which is not set; export HF_TOKEN_FOR_GPQA=... before "
        "running evalprov"
    ]


def test_env_vars_at_every_level_are_parsed(write):
    path = write("""\
        defaults: [{execution: local}, {deployment: vllm}, _self_]
        execution: {output_dir: /results}
        deployment:
          checkpoint_path: /models/llama
          served_model_name: llama
          env_vars: {D: host:D}
        evaluation:
          env_vars: {E: lit:e}
          tasks:
            - name: ifeval
              env_vars: {T: runtime:R}
        env_vars:
          TOP: TOP_SRC
    """)
    cfg = load(path).config
    assert cfg.env_vars == {"TOP": EnvVarSpec("host", "TOP_SRC")}
    assert cfg.evaluation.env_vars == {"E": EnvVarSpec("lit", "e")}
    assert cfg.evaluation.tasks[0].env_vars == {"T": EnvVarSpec("runtime", "R")}
    assert cfg.deployment.env_vars == {"D": EnvVarSpec("host", "D")}


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_validate_output_never_contains_env_values(write, capsys, monkeypatch, fmt):
    monkeypatch.setenv("HF_TOKEN", "hf_fromtheenvironment")
    path = write(LOCAL_VLLM.replace("    - name: ifeval\n", """\
    - name: ifeval
      env_vars:
        API_KEY: lit:sk-literal-secret-value
        HF_TOKEN: host:HF_TOKEN
"""))
    assert main(["validate", str(path), "--format", fmt]) == 0
    out, err = capsys.readouterr()
    assert "sk-literal-secret-value" not in out + err
    assert "hf_fromtheenvironment" not in out + err
    assert "lit:<literal>" in out and "host:HF_TOKEN" in out


# --------------------------------------------------------------------------- warnings


@pytest.mark.parametrize(
    ("snippet", "field"),
    [
        ("execution:\n  mounts: {/data: /data}\n", "execution.mounts"),
        ("deployment:\n  pre_cmd: pip install foo\n", "deployment.pre_cmd"),
        ("deployment:\n  cache_path: /cache\n", "deployment.cache_path"),
        ("evaluation:\n  pre_cmd: echo hi\n", "evaluation.pre_cmd"),
        ("evaluation:\n  tasks:\n    - name: ifeval\n      post_cmd: echo done\n",
         "evaluation.tasks.0.post_cmd"),
    ],
)
def test_accepted_but_not_acted_on_fields_warn_by_name(write, snippet, field):
    base = yaml.safe_load(LOCAL_VLLM)
    extra = yaml.safe_load(snippet)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key].update(value)
        else:
            base[key] = value
    loaded = load(write(yaml.safe_dump(base)))
    assert len(loaded.warnings) == 1
    assert loaded.warnings[0].startswith(
        f"warning: {field} is accepted but not acted on by evalprov yet; NEL ")


def test_warnings_reach_stderr_and_validation_still_succeeds(write, capsys):
    path = write(LOCAL_VLLM.replace("  served_model_name: llama\n",
                                    "  served_model_name: llama\n  pre_cmd: echo hi\n"))
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: deployment.pre_cmd is accepted but not acted on by evalprov yet" in err


def test_packaged_defaults_alone_raise_no_warnings(write):
    assert load(write(SLURM_VLLM)).warnings == []


# --------------------------------------------------------------------------- examples


EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_every_example_validates(path, capsys):
    rc = main(["validate", str(path)])
    out, err = capsys.readouterr()
    if path.stem.startswith("lepton"):
        assert rc == 2
        assert err.startswith("error: execution: 'lepton/default' is unsupported by evalprov")
        assert err.count("\n") == 1
    else:
        assert rc == 0, err
        assert err.endswith(f"{path}: valid\n")
        assert yaml.safe_load(out)["deployment"]["type"] in ("vllm", "none")


def test_examples_include_the_seed_and_the_lepton_one():
    stems = {p.stem for p in EXAMPLE_FILES}
    assert "nel_seed" in stems
    assert any(s.startswith("lepton") for s in stems)


# --------------------------------------------------------------------------- tasks


def test_harness_qualified_task_names_resolve(write):
    cfg = load(write(LOCAL_VLLM.replace("    - name: ifeval\n", """\
    - name: lm-evaluation-harness.ifeval
    - name: simple_evals.mmlu_pro
"""))).config
    table = task_table()
    lm, se = (table.resolve(t.name, t.container, "x") for t in cfg.evaluation.tasks)
    assert (lm.name, lm.harness) == ("ifeval", "lm-evaluation-harness")
    # mmlu_pro bare is lm-evaluation-harness's; qualified picks simple_evals'.
    assert (se.name, se.harness) == ("mmlu_pro", "simple_evals")
    assert se.container == "nvcr.io/nvidia/eval-factory/simple-evals:26.03"
    assert table.resolve("mmlu_pro", None, "x").harness == "lm-evaluation-harness"


def test_unlisted_task_with_container_is_accepted(write):
    cfg = load(write(LOCAL_VLLM.replace("    - name: ifeval\n", """\
    - name: myharness.mytask
      container: registry.example.com/evals/myharness:1.0
"""))).config
    task = cfg.evaluation.tasks[0]
    info = task_table().resolve(task.name, task.container, "x")
    assert (info.name, info.harness) == ("mytask", "myharness")
    assert info.container == "registry.example.com/evals/myharness:1.0"


def test_unlisted_task_of_a_known_harness_with_container_is_accepted():
    info = task_table().resolve("simple_evals.my_private_set", "reg.io/se:1", "x")
    assert (info.harness, info.container) == ("simple_evals", "reg.io/se:1")


def test_task_table_is_nel_sized():
    table = task_table()
    assert len(table.tasks) >= 400
    assert len({t.qualified for t in table.tasks}) == len(table.tasks)  # no duplicates


LM_EVAL = ("lm-evaluation-harness", "nvcr.io/nvidia/eval-factory/lm-evaluation-harness:26.03")
SIMPLE = ("simple_evals", "nvcr.io/nvidia/eval-factory/simple-evals:26.03")


@pytest.mark.parametrize(
    ("name", "harness_image", "endpoint"),
    [
        ("ifeval", LM_EVAL, "chat"),
        ("gpqa_diamond", SIMPLE, "chat"),
        ("mmlu", LM_EVAL, "completions"),
        ("mmlu_pro", LM_EVAL, "completions"),
        ("gsm8k", LM_EVAL, "completions"),
        ("humaneval", SIMPLE, "chat"),
        ("math_test_500", SIMPLE, "chat"),
        # NEL spells simple_evals' AIME_2025 in capitals; lowercase aime_2025 is codec's only.
        ("aime_2025",
         ("codec", "nvcr.io/nvidia/eval-factory/contamination-detection:26.03"), "completions"),
        ("AIME_2025", SIMPLE, "chat"),
    ],
)
def test_task_table_maps_tasks_like_nel(name, harness_image, endpoint):
    info = task_table().resolve(name, None, "x")
    assert (info.harness, info.container) == harness_image
    assert endpoint in info.endpoint_types


def test_bare_name_defined_by_two_harnesses_resolves_to_the_primary():
    table = task_table()
    assert [t.harness for t in table.candidates("ifeval")] == ["lm-evaluation-harness", "codec"]
    assert table.resolve("ifeval", None, "x").harness == "lm-evaluation-harness"
    assert table.resolve("codec.ifeval", None, "x").harness == "codec"
