"""Every NEL config generation loads as NEL read it, plans, and `evalprov migrate` brings it
to the current schema without changing what it means.

Corpus: tests/data/nel_generations/*.yaml, written from NEL's sources (one or more per
generation and field; see each file's `# nel:` line). Header lines:
    # nel: <the NEL version / form it stands for>
    # expect: valid | <the exact error line>
    # args: -o ...                     optional
    # env: NAME=value -NAME ...        optional: set (or unset) for the load
    # warns: <substring of a warning>  optional
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from evalprov.cli import main
from evalprov.commands.migrate import PREFIX, migrate
from evalprov.config.generations import normalise
from evalprov.config.loader import load_config, resolved_dict
from evalprov.hosts import host_facts
from evalprov.plan import plan

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "nel_generations"


@dataclass(frozen=True)
class Case:
    path: Path
    nel: str
    expect: str
    args: tuple[str, ...]
    env: dict[str, str | None]
    warns: str

    @property
    def overrides(self) -> tuple[str, ...]:
        return self.args[1::2]  # the values of "-o VALUE" pairs

    @property
    def valid(self) -> bool:
        return self.expect == "valid"


def _case(path: Path) -> Case:
    head = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^# (nel|expect|args|env|warns): (.*)$", line)
        if not m:
            break
        head[m.group(1)] = m.group(2)
    env: dict[str, str | None] = {}
    for item in shlex.split(head.get("env", "")):
        if item.startswith("-"):
            env[item[1:]] = None
        else:
            name, _, value = item.partition("=")
            env[name] = value
    return Case(path, head.get("nel", ""), head.get("expect", ""),
                tuple(shlex.split(head.get("args", ""))), env, head.get("warns", ""))


CASES = [_case(p) for p in sorted(CORPUS.glob("*.yaml"))]
VALID = [c for c in CASES if c.valid]
REFUSED = [c for c in CASES if not c.valid]
ids = [c.path.stem for c in VALID]


def _environ(case: Case) -> dict[str, str]:
    return {k: v for k, v in case.env.items() if v is not None}


@pytest.fixture
def env(monkeypatch):
    def set_for(case: Case) -> None:
        for name, value in case.env.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
    return set_for


def test_corpus_has_at_least_40_configs_each_naming_its_nel_generation():
    assert len(CASES) >= 40
    assert not [c.path.name for c in CASES if not c.nel or not c.expect]
    assert len(VALID) >= 40


@pytest.mark.parametrize("case", VALID, ids=ids)
def test_every_generation_validates_and_plans(case):
    loaded = load_config(case.path, case.overrides, environ=_environ(case))
    config = loaded.config
    hosts = host_facts(config.execution.type, None, gpus=8)
    assert plan(config, hosts) is not None
    if case.warns:
        assert any(case.warns in w for w in loaded.warnings), loaded.warnings
    assert all(w.startswith("warning: ") and "\n" not in w for w in loaded.warnings)


@pytest.mark.parametrize("case", REFUSED, ids=[c.path.stem for c in REFUSED])
def test_unsupported_types_are_refused_in_one_line(case, capsys):
    assert main(["validate", str(case.path), *case.args]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", case.expect + "\n")


@pytest.mark.parametrize("case", VALID, ids=ids)
def test_migrate_round_trips_to_the_same_resolved_config(case, tmp_path, env):
    env(case)
    environ = _environ(case)
    text, _, changes, _ = migrate(str(case.path), list(case.overrides))
    migrated = tmp_path / "migrated.yaml"
    migrated.write_text(text)
    before = resolved_dict(load_config(case.path, case.overrides, environ=environ))
    after = resolved_dict(load_config(migrated, (), environ=environ))
    assert after == before
    _, more = normalise(yaml.safe_load(text))
    assert more == [], "migrate's output is in the current schema: nothing left to normalise"
    # every change is commented, on its line or (a removed field) in the header
    assert text.count(f"# {PREFIX}") >= 1 + min(1, len(changes))
    for change in changes:
        assert change.note in text


def test_migrate_comments_every_changed_line_of_an_old_config():
    text, current, _, _ = migrate(str(CORPUS / "v0_1_0_task_overrides_slurm.yaml"), [])
    params = current["evaluation"]["tasks"][1]["nemo_evaluator_config"]["config"]["params"]
    assert params == {"temperature": 0.6, "max_new_tokens": 8192, "parallelism": 32}
    assert current["evaluation"]["nemo_evaluator_config"] == {
        "config": {"params": {"request_timeout": 3600}}}
    assert "overrides" not in yaml.safe_dump(current)
    commented = [line for line in text.splitlines() if f"# {PREFIX}" in line]
    for key in ("request_timeout", "temperature", "max_new_tokens", "parallelism", "HF_TOKEN"):
        assert any(line.strip().startswith(f"{key}:") for line in commented), key


@pytest.mark.parametrize(("stem", "dotted", "value"), [
    ("v0_1_0_overrides_beat_task_config",
     "evaluation.tasks.0.nemo_evaluator_config.config.params.temperature", 0.0),
    ("v0_1_0_overrides_beat_task_config",
     "evaluation.tasks.0.nemo_evaluator_config.config.params.max_new_tokens", 512),
    ("v0_1_19_config_ignored_when_both",
     "evaluation.nemo_evaluator_config.config.params.limit_samples", 5),
    ("v0_1_0_override_folded_prompt", "evaluation.nemo_evaluator_config.target.api_endpoint."
     "adapter_config.custom_system_prompt", '"Think step by step."'),
    ("v0_1_29_multiple_instances", "execution.num_instances", 2),
    ("v0_1_0_username_user_unset", "execution.username", None),
    ("v0_1_0_api_key_name_placeholder", "target.api_endpoint.api_key_name", None),
    ("v0_1_0_task_names_renamed", "evaluation.tasks.0.name", "mbpp-chat"),
    ("v0_1_0_task_names_renamed", "evaluation.tasks.4.name", "scicode_aa_v2"),
    ("v0_1_0_safety_harness_qualified", "evaluation.tasks.0.name", "safety_eval.aegis_v2"),
    ("v0_1_0_qualified_old_task", "evaluation.tasks.0.name",
     "bigcode-evaluation-harness.mbpp-chat"),
    ("v0_1_0_env_numbers", "deployment.env_vars.NCCL_DEBUG_LEVEL", "lit:<literal>"),
    ("v0_1_60_env_both_places", "deployment.env_vars.HF_TOKEN", "host:HF_TOKEN_PRIMARY"),
    ("v0_1_60_env_both_places", "deployment.env_vars.VLLM_USE_V1", "lit:<literal>"),
    ("v0_1_19_nemo_evaluator_config_split_env", "evaluation.env_vars.HF_TOKEN",
     "host:HF_TOKEN_FOR_EVAL"),
    ("v0_1_88_oc_env_in_env_vars", "deployment.env_vars.HF_TOKEN", "host:HF_TOKEN"),
    ("v0_1_88_dollar_name", "evaluation.env_vars.HF_TOKEN", "host:HF_TOKEN"),
    ("v0_2_0_dollar_prefix_docs", "evaluation.tasks.0.env_vars.NODE", "runtime:HOSTNAME"),
    ("v0_2_4_aux_judge", "auxiliary_deployments.judge.port", 8001),
    ("v0_2_4_aux_judge", "auxiliary_deployments.judge.gpu_memory_utilization", 0.95),
    ("v0_2_4_aux_judge_by_type", "auxiliary_deployments.judge.endpoints.chat",
     "/v1/chat/completions"),
    ("interpolation_nested_and_relative", "deployment.served_model_name", "llama-1gpu"),
    ("interpolation_nested_and_relative",
     "evaluation.nemo_evaluator_config.config.params.parallelism", 1),
    ("defaults_override_keyword", "execution.endpoint_readiness_timeout", 600),
    ("hydra_overrides_cli", "deployment.port", 8001),
    ("hydra_overrides_cli", "deployment.cache_path", "/cache"),
    ("hydra_group_override", "execution.type", "slurm"),
    ("legacy_override_on_cli",
     "evaluation.nemo_evaluator_config.config.params.temperature", 0.6),
])
def test_legacy_forms_mean_what_nel_made_them_mean(stem, dotted, value):
    case = _case(CORPUS / f"{stem}.yaml")
    data = resolved_dict(load_config(case.path, case.overrides, environ=_environ(case)))
    node = data
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    assert node == value


def test_hydra_extra_keys_present_on_local_are_deleted(tmp_path):
    case = _case(CORPUS / "hydra_overrides_cli.yaml")
    data = resolved_dict(load_config(case.path, case.overrides, environ={}))
    assert "extra_docker_args" in data["execution"]  # the model's default comes back: ""
    assert data["execution"]["extra_docker_args"] == ""


@pytest.mark.parametrize(("override", "expect"), [
    ("+deployment.port=1", "-o '+deployment.port=1': deployment.port is already in the config"),
    ("~deployment.nosuch", "-o '~deployment.nosuch': deployment.nosuch is not in the config"),
    ("~deployment.port=9", "deployment.port does not hold that value"),
])
def test_hydra_add_and_delete_are_checked_like_hydra(override, expect, capsys):
    path = CORPUS / "seed_example.yaml"
    assert main(["validate", str(path), "-o", override]) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1


DISTINCT = [c for c in VALID if any(v and "distinct" in v for v in c.env.values())]


@pytest.mark.parametrize("case", DISTINCT, ids=[c.path.stem for c in DISTINCT])
@pytest.mark.parametrize("command", [["validate", "--format", "yaml"],
                                     ["validate", "--format", "json"], ["migrate"]])
def test_no_output_shows_a_value_read_from_the_environment(case, command, env, capsys):
    env(case)
    assert main([command[0], str(case.path), *command[1:], *case.args]) == 0
    out, err = capsys.readouterr()
    for value in case.env.values():
        if value:
            assert value not in out + err
            assert value[3:-3] not in out + err
    assert "${oc.env:" in out or "host:" in out


def test_an_error_never_echoes_a_value_from_the_environment(env, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text((CORPUS / "interpolation_env_value.yaml").read_text().replace(
        "output_dir: ${oc.env:EVALPROV_T_OUT}",
        "output_dir: /r\n  hf_cache_dir: ${oc.env:EVALPROV_T_OUT}"))
    case = _case(CORPUS / "interpolation_env_value.yaml")
    env(case)
    import os
    os.environ["EVALPROV_T_OUT"] = "relative-zz-distinct-path"
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "zz-distinct" not in err and "EVALPROV_T_OUT" in err


def test_migrate_masks_secret_literals_on_stdout_and_write_keeps_them(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text((CORPUS / "v0_1_89_prefixes.yaml").read_text().replace(
        "VLLM_LOGGING_LEVEL: lit:INFO", "HF_API_KEY: lit:sk-zz-distinct-literal"))
    assert main(["migrate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "sk-zz-distinct-literal" not in out and "lit:<secret" in out
    assert main(["migrate", str(cfg), "--write"]) == 0
    assert "lit:sk-zz-distinct-literal" in cfg.read_text()
    assert main(["validate", str(cfg)]) == 0
