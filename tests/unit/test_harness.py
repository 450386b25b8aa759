"""evalprov.harness: the run_eval run config, its command and environment, the scores read back
from results.yml (fixtures captured from real run_eval 0.2.8 runs), and the sample datasets."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from evalprov import harness

DATA = Path(__file__).resolve().parents[1] / "data" / "harness"
PARAMS = {"limit_samples": 5, "max_new_tokens": 64, "parallelism": 2}


def _cfg(**kw):
    args = {
        "task": "gpqa_diamond",
        "harness": "simple_evals",
        "model_url": "http://10.0.0.5:8000/v1/chat/completions",
        "model_id": "qwen3-4b",
        "endpoint_type": "chat",
        "output_dir": "/results/gpqa",
        "params": PARAMS,
    }
    args.update(kw)
    return harness.run_config(**args)


# ---------------------------------------------------------------- run_config


def test_run_config_has_the_shape_run_eval_reads():
    assert _cfg() == {
        "config": {
            "type": "simple_evals.gpqa_diamond",
            "output_dir": "/results/gpqa",
            "params": {"limit_samples": 5, "max_new_tokens": 64, "parallelism": 2},
        },
        "target": {
            "api_endpoint": {
                "url": "http://10.0.0.5:8000/v1/chat/completions",
                "model_id": "qwen3-4b",
                "type": "chat",
            }
        },
    }


def test_run_config_without_harness_keeps_the_task_bare():
    assert _cfg(harness=None)["config"]["type"] == "gpqa_diamond"


def test_run_config_output_dir_path_becomes_a_string(tmp_path):
    assert _cfg(output_dir=tmp_path)["config"]["output_dir"] == str(tmp_path)


def test_run_config_drops_unset_params_and_keeps_extra():
    cfg = _cfg(params={"temperature": None, "top_p": 0.9, "extra": {"n_samples": 2}})
    assert cfg["config"]["params"] == {"top_p": 0.9, "extra": {"n_samples": 2}}


def test_run_config_rejects_params_run_eval_would_reject():
    with pytest.raises(ValueError, match="max_tokens"):
        _cfg(params={"max_tokens": 64})


@pytest.mark.parametrize("task", ["", "simple_evals.gpqa_diamond"])
def test_run_config_rejects_qualified_or_empty_task(task):
    with pytest.raises(ValueError, match="bare task name"):
        _cfg(task=task)


def test_run_config_rejects_unknown_endpoint_type():
    with pytest.raises(ValueError, match="endpoint type 'vlm'"):
        _cfg(endpoint_type="vlm")


def test_run_config_names_the_api_key_variable_never_the_key():
    ep = _cfg(api_key_name="EVALPROV_API_KEY")["target"]["api_endpoint"]
    assert ep["api_key_name"] == "EVALPROV_API_KEY"
    assert "api_key" not in ep
    assert "api_key_name" not in _cfg()["target"]["api_endpoint"]


def test_write_run_config_round_trips(tmp_path):
    path = harness.write_run_config(_cfg(), tmp_path / "a" / "run_config.yaml")
    assert yaml.safe_load(path.read_text()) == _cfg()


@pytest.mark.parametrize(
    ("base", "kind", "want"),
    [
        ("http://h:8000", "chat", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/", "chat", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/v1", "completions", "http://h:8000/v1/completions"),
        ("http://h:8000/v1/", "embedding", "http://h:8000/v1/embeddings"),
    ],
)
def test_endpoint_url_names_the_endpoint(base, kind, want):
    assert harness.endpoint_url(base, kind) == want


def test_endpoint_url_rejects_unknown_type():
    with pytest.raises(ValueError, match="ranking"):
        harness.endpoint_url("http://h:8000", "ranking")


# ---------------------------------------------------------------- command and environment


def test_invocation_runs_nemo_evaluator_from_the_samples_dir(tmp_path):
    inv = harness.invocation(tmp_path / "rc.yaml", venv="/v", base_env={"PATH": "/usr/bin"})
    assert inv.argv == ["nemo-evaluator", "run_eval", "--run_config", str(tmp_path / "rc.yaml")]
    assert inv.cwd == harness.SAMPLES_DIR
    assert inv.env["PATH"] == os.pathsep.join(["/v/bin", "/usr/bin"])


def test_harness_env_switches_every_download_off():
    env = harness.harness_env("/v", "/s", base={"PATH": "/usr/bin", "HF_HUB_OFFLINE": "0"})
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["NEMO_EVALUATOR_TELEMETRY_LEVEL"] == "0"
    assert env["NLTK_DATA"] == "/s/nltk_data"
    assert env["VIRTUAL_ENV"] == "/v"


def test_harness_env_keeps_loopback_off_any_proxy_and_does_not_touch_base():
    base = {"PATH": "/usr/bin", "no_proxy": "corp.example", "https_proxy": "http://p:3128"}
    env = harness.harness_env("/v", "/s", base=base)
    assert env["no_proxy"] == "corp.example,localhost,127.0.0.1,::1"
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    assert base == {"PATH": "/usr/bin", "no_proxy": "corp.example", "https_proxy": "http://p:3128"}


def test_harness_env_puts_the_datasets_cache_in_the_run_dir(tmp_path):
    env = harness.harness_env("/v", "/s", base={}, cache_dir=tmp_path)
    assert env["HF_DATASETS_CACHE"] == str(tmp_path / "hf_datasets")
    assert "HF_DATASETS_CACHE" not in harness.harness_env("/v", "/s", base={})


def test_harness_venv_follows_the_environment(monkeypatch):
    monkeypatch.setenv("EVALPROV_HARNESS_VENV", "/elsewhere")
    assert harness.harness_venv() == Path("/elsewhere")
    monkeypatch.delenv("EVALPROV_HARNESS_VENV")
    assert harness.harness_venv() == Path(harness.DEFAULT_VENV)


# ---------------------------------------------------------------- read_scores


def test_read_scores_gpqa_diamond_micro_is_primary():
    scores = harness.read_scores(DATA / "gpqa_diamond.results.yml")
    assert scores == [
        {
            "task": "gpqa_diamond",
            "metric": "score",
            "name": "micro",
            "score": 0.2,
            "samples": None,
            "stderr": pytest.approx(0.2),
            "primary": True,
        }
    ]


def test_read_scores_ifeval_reads_each_metric_once_and_picks_prompt_level_strict():
    scores = harness.read_scores(DATA / "ifeval.results.yml")
    assert sorted(s["metric"] for s in scores) == [
        "inst_level_loose_acc",
        "inst_level_strict_acc",
        "prompt_level_loose_acc",
        "prompt_level_strict_acc",
    ]
    best = harness.primary_score(scores, "ifeval")
    assert (best["metric"], best["name"], best["score"]) == (
        "prompt_level_strict_acc",
        "prompt_level_strict_acc",
        0.2,
    )
    assert all(isinstance(s["score"], float) for s in scores)


def _results(tmp_path, results: dict) -> Path:
    path = tmp_path / "results.yml"
    path.write_text(yaml.safe_dump({"results": results}))
    return path


def _metric(**scores):
    return {"scores": {k: {"value": v, "stats": {"count": 7}} for k, v in scores.items()}}


def test_read_scores_is_generic_over_tasks_metrics_and_groups(tmp_path):
    path = _results(
        tmp_path,
        {
            "tasks": {
                "mmlu_x": {"metrics": {"acc": _metric(macro=0.5, micro=0.25)}},
                "other": {"metrics": {"em": _metric(em=1), "f1": _metric(f1=0.5)}},
            },
            "groups": {"mmlu": {"metrics": {"acc": _metric(acc=0.4)}}},
        },
    )
    scores = harness.read_scores(path)
    assert {(s["task"], s["metric"], s["name"]) for s in scores} == {
        ("mmlu_x", "acc", "macro"),
        ("mmlu_x", "acc", "micro"),
        ("other", "em", "em"),
        ("other", "f1", "f1"),
        ("mmlu", "acc", "acc"),
    }
    assert all(s["samples"] == 7 and s["stderr"] is None for s in scores)
    assert harness.primary_score(scores, "mmlu_x")["name"] == "macro"  # the first one written
    assert harness.primary_score(scores, "other")["metric"] == "em"  # metric == score name
    assert harness.primary_score(scores, "mmlu")["score"] == 0.4
    assert sum(s["primary"] for s in scores) == 3


def test_read_scores_skips_scores_without_a_value(tmp_path):
    path = _results(tmp_path, {"tasks": {"t": {"metrics": {"m": {"scores": {"m": {}}}}}}})
    assert harness.read_scores(path) == []


def test_read_scores_of_a_failed_run_is_empty(tmp_path):
    (tmp_path / "results.yml").write_text("")
    assert harness.read_scores(tmp_path / "results.yml") == []


def test_primary_score_needs_a_task_when_there_are_several(tmp_path):
    path = _results(
        tmp_path, {"tasks": {"a": {"metrics": {"x": _metric(x=1)}},
                             "b": {"metrics": {"y": _metric(y=0)}}}}
    )
    scores = harness.read_scores(path)
    with pytest.raises(LookupError, match=r"\['a', 'b'\]"):
        harness.primary_score(scores)
    assert harness.primary_score(scores, "b")["score"] == 0.0


# ---------------------------------------------------------------- sample data

# IFEval instructions whose checker needs nltk punkt data (unavailable offline).
NEEDS_PUNKT = {"length_constraints:number_sentences", "change_case:capital_word_frequency"}


def test_ifeval_samples_are_in_ifeval_format_and_need_no_punkt():
    path = harness.SAMPLES_DIR / "google" / "IFEval" / "ifeval_input_data.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) >= 5
    assert len({r["key"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"key", "prompt", "instruction_id_list", "kwargs"}
        assert len(r["kwargs"]) == len(r["instruction_id_list"]) >= 1
        assert not NEEDS_PUNKT & set(r["instruction_id_list"]), r["key"]


def test_gpqa_samples_have_the_columns_simple_evals_reads():
    base = harness.SAMPLES_DIR / "Idavidrein" / "gpqa"
    with (base / "gpqa_diamond.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 5
    for r in rows:
        answers = [r["Correct Answer"]] + [r[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        assert r["Question"] and len(set(answers)) == 4 and all(answers)
    front = (base / "README.md").read_text().split("---")[1]
    configs = yaml.safe_load(front)["configs"]
    assert configs == [
        {"config_name": "gpqa_diamond",
         "data_files": [{"split": "train", "path": "gpqa_diamond.csv"}]}
    ]


def test_nltk_placeholder_is_where_lm_eval_looks_for_punkt_tab():
    assert (harness.SAMPLES_DIR / "nltk_data" / "tokenizers" / "punkt_tab").is_dir()
