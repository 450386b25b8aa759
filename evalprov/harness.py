"""NVIDIA's evaluation harness (`nemo-evaluator run_eval`) as evalprov runs it: the run config it
reads, the command and environment to start it with, and the scores it writes.

The harness lives in its own venv (scripts/install-harness; it shadows upstream `lm_eval`), so
this module never imports it: it builds plain data and reads plain YAML.

Offline operation: no package ships the datasets, and `datasets.load_dataset("google/IFEval")`
resolves a local directory of that relative path first. `harness_env()` and `SAMPLES_DIR` give
the harness our own sample rows (evalprov/data/samples) with every download switched off:
HF hub, telemetry, and lm-eval's import-time `nltk.download("punkt_tab")`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SAMPLES_DIR = Path(__file__).resolve().parent / "data" / "samples"
DEFAULT_VENV = "/opt/evalprov/harness-venv"
RUN_CONFIG_NAME = "run_config.yaml"

# nemo_evaluator.api.api_dataclasses.ConfigParams (extra="forbid"): the only keys run_eval
# accepts under config.params; harness-specific ones go under `extra`.
PARAM_KEYS = frozenset(
    {
        "limit_samples",
        "max_new_tokens",
        "max_retries",
        "parallelism",
        "task",
        "temperature",
        "request_timeout",
        "top_p",
        "extra",
    }
)
ENDPOINT_TYPES = ("chat", "completions", "completions_logprob", "embedding")
ENDPOINT_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "completions_logprob": "/v1/completions",
    "embedding": "/v1/embeddings",
}

# The score a task is judged by: (metric, score) in results.yml. Tasks not listed fall back to
# their only metric/score, or else the first one the harness wrote.
PRIMARY = {
    "gpqa_diamond": ("score", "micro"),
    "ifeval": ("prompt_level_strict_acc", "prompt_level_strict_acc"),
}


def harness_venv() -> Path:
    """The harness venv: $EVALPROV_HARNESS_VENV, else /opt/evalprov/harness-venv."""
    return Path(os.environ.get("EVALPROV_HARNESS_VENV") or DEFAULT_VENV)


def endpoint_url(base_url: str, endpoint_type: str) -> str:
    """The full URL run_eval wants for `endpoint_type` on a server at `base_url`
    (`http://host:8000` or `http://host:8000/v1`). run_eval's adapter proxy forwards every
    request to exactly this URL, so it must name the endpoint, not the server."""
    if endpoint_type not in ENDPOINT_PATHS:
        raise ValueError(f"endpoint type {endpoint_type!r} is not one of {list(ENDPOINT_PATHS)}")
    base = base_url.rstrip("/")
    path = ENDPOINT_PATHS[endpoint_type]
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + path


def run_config(
    task: str,
    harness: str | None,
    model_url: str,
    model_id: str,
    endpoint_type: str,
    output_dir: str | os.PathLike[str],
    params: Mapping[str, Any] | None = None,
    *,
    api_key_name: str | None = None,
) -> dict[str, Any]:
    """The `--run_config` document for `nemo-evaluator run_eval`.

    `harness` (e.g. "lm-evaluation-harness", "simple_evals") qualifies the task as
    `harness.task`, which run_eval needs when more than one installed harness defines the task;
    None leaves it bare. `model_url` is the full endpoint URL (see `endpoint_url`). `params` go to
    config.params; unset ones take the harness's defaults. The API key is never written here:
    `api_key_name` names the environment variable run_eval reads it from.
    """
    if not task or "." in task:
        raise ValueError(f"task {task!r} must be a bare task name (pass the harness separately)")
    if endpoint_type not in ENDPOINT_TYPES:
        raise ValueError(f"endpoint type {endpoint_type!r} is not one of {list(ENDPOINT_TYPES)}")
    params = dict(params or {})
    unknown = sorted(set(params) - PARAM_KEYS)
    if unknown:
        raise ValueError(
            f"unknown harness params {unknown}; run_eval accepts {sorted(PARAM_KEYS)} "
            "(harness-specific ones go under 'extra')"
        )
    api_endpoint: dict[str, Any] = {"url": model_url, "model_id": model_id, "type": endpoint_type}
    if api_key_name:
        api_endpoint["api_key_name"] = api_key_name
    return {
        "config": {
            "type": f"{harness}.{task}" if harness else task,
            "output_dir": str(output_dir),
            "params": {k: v for k, v in params.items() if v is not None},
        },
        "target": {"api_endpoint": api_endpoint},
    }


def write_run_config(config: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write `config` as YAML at `path` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


# What every harness run gets, however it is started (evalprov's own runs on the hosts take it
# from the plan): hubs and telemetry off, so nothing is downloaded at run time; Python's output
# unbuffered, so the harness's log (whose requests the live view counts) grows as it runs.
HARNESS_ENV = {
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NEMO_EVALUATOR_TELEMETRY_LEVEL": "0",
}


def harness_env(
    venv: str | os.PathLike[str] | None = None,
    samples_dir: str | os.PathLike[str] | None = None,
    base: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """Environment for run_eval: the venv's bin first on PATH (run_eval starts `lm-eval` and
    `simple_evals` by name), every hub/telemetry download off, NLTK pointed at the samples'
    placeholder so lm-eval's IFEval does not try to fetch punkt_tab, and loopback never sent
    through a proxy. `cache_dir` (optional) holds the HF datasets cache for this run."""
    env = dict(os.environ if base is None else base)
    venv = Path(venv) if venv else harness_venv()
    samples = Path(samples_dir) if samples_dir else SAMPLES_DIR
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH") or os.defpath])
    env["VIRTUAL_ENV"] = str(venv)
    env.pop("PYTHONHOME", None)
    env.update({**HARNESS_ENV, "NLTK_DATA": str(samples / "nltk_data")})
    for var in ("NO_PROXY", "no_proxy"):
        have = [h for h in env.get(var, "").split(",") if h]
        env[var] = ",".join(have + [h for h in ("localhost", "127.0.0.1", "::1") if h not in have])
    if cache_dir is not None:
        env["HF_DATASETS_CACHE"] = str(Path(cache_dir) / "hf_datasets")
    return env


@dataclass(frozen=True)
class Invocation:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def invocation(
    run_config_path: str | os.PathLike[str],
    *,
    venv: str | os.PathLike[str] | None = None,
    samples_dir: str | os.PathLike[str] | None = None,
    base_env: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Invocation:
    """How to start run_eval on a written run config: argv, env, and cwd = the samples dir
    (datasets resolve `google/IFEval`, `Idavidrein/gpqa` relative to it). `nemo-evaluator`
    is found through env's PATH (subprocess searches the PATH of the env it is given)."""
    samples = Path(samples_dir) if samples_dir else SAMPLES_DIR
    return Invocation(
        argv=["nemo-evaluator", "run_eval", "--run_config", str(run_config_path)],
        env=harness_env(venv, samples, base_env, cache_dir),
        cwd=samples,
    )


def read_scores(results_yml: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every score in a run_eval results.yml, as
    {task, metric, name, score, samples, stderr, primary}: `results.tasks.<task>.metrics.<metric>
    .scores.<name>.value`, with stats.count as `samples` and stats.stderr (None if absent).
    `samples` is None when the harness records no count (ifeval and gpqa_diamond in 26.3 don't).
    Exactly one entry per task has primary=True (see PRIMARY). Group-level results are read the
    same way, with the group's name as task, unless a task of that name was read already."""
    data = yaml.safe_load(Path(results_yml).read_text()) or {}
    results = data.get("results") or {}
    tasks = results.get("tasks") or {}
    # Single-task runs repeat the task under groups with the same numbers: read it once.
    groups = {k: v for k, v in (results.get("groups") or {}).items() if k not in tasks}
    out: list[dict[str, Any]] = []
    for section in (tasks, groups):
        for task, body in section.items():
            entries = []
            for metric, mbody in ((body or {}).get("metrics") or {}).items():
                for name, sbody in ((mbody or {}).get("scores") or {}).items():
                    if not isinstance(sbody, Mapping) or sbody.get("value") is None:
                        continue
                    stats = sbody.get("stats") or {}
                    entries.append(
                        {
                            "task": task,
                            "metric": metric,
                            "name": name,
                            "score": float(sbody["value"]),
                            "samples": _int_or_none(stats.get("count")),
                            "stderr": _float_or_none(stats.get("stderr")),
                            "primary": False,
                        }
                    )
            if entries:
                _mark_primary(task, entries)
                out.extend(entries)
    return out


def primary_score(scores: list[dict[str, Any]], task: str | None = None) -> dict[str, Any]:
    """The primary entry of `read_scores()` output (for `task`, or the only task)."""
    hits = [s for s in scores if s["primary"] and (task is None or s["task"] == task)]
    if len(hits) != 1:
        tasks = sorted({s["task"] for s in scores if s["primary"]})
        raise LookupError(f"no single primary score for task {task!r}; tasks: {tasks}")
    return hits[0]


def _mark_primary(task: str, entries: list[dict[str, Any]]) -> None:
    want = PRIMARY.get(task)
    pick = next((e for e in entries if want and (e["metric"], e["name"]) == want), None)
    if pick is None:
        same = [e for e in entries if e["metric"] == e["name"]]
        pick = same[0] if same else entries[0]
    pick["primary"] = True


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)
