"""Hostile inputs: each config, -o override or command-line argument below is refused with
exit code 2 and ONE `error:` line that names the field, in bounded time and memory, never
with a traceback. Then hypothesis feeds random YAML-ish text and random nested data to the
loader, which may only ever raise ConfigError.

Classes covered: names that end in a newline (a YAML `|` block scalar), vllm serve options
evalprov sets itself smuggled through extra_args as vLLM's parser reads them (underscores,
abbreviations, -tp8), API keys in argv, docker mount sources/targets with `:` `,` or a
relative path, duplicate YAML keys, alias bombs, deep nesting, recursive anchors, files that
do not end (/dev/zero) or are huge, NUL and control characters, counts no plan can have,
and values read through ${oc.env:VAR} (never echoed: they may be secrets).
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evalprov.cli import main
from evalprov.config.loader import (
    apply_override,
    compose,
    interpolate,
    load_config,
    parse_override,
    validate,
)
from evalprov.config.safeyaml import MAX_BYTES, load_text
from evalprov.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # generous: a refusal takes well under a second; a hang or a bomb would not end

LOCAL: dict[str, Any] = {
    "defaults": [{"execution": "local"}, {"deployment": "vllm"}, "_self_"],
    "execution": {"output_dir": "/results"},
    "deployment": {"checkpoint_path": "/models/llama", "served_model_name": "llama",
                   "tensor_parallel_size": 1},
    "evaluation": {"tasks": [{"name": "ifeval"}]},
}
SLURM: dict[str, Any] = {
    "defaults": [{"execution": "slurm/default"}, {"deployment": "vllm"}, "_self_"],
    "execution": {"hostname": "head", "account": "acct", "output_dir": "/out"},
    "deployment": {"checkpoint_path": "/models/llama", "served_model_name": "llama",
                   "tensor_parallel_size": 1},
    "evaluation": {"tasks": [{"name": "ifeval"}]},
}
LOCAL_TEXT = yaml.safe_dump(LOCAL, sort_keys=False)


@dataclass(frozen=True)
class Case:
    id: str
    field: str  # the error line must name this (a field path, or "config" for the file)
    text: str = LOCAL_TEXT  # the config file's content
    args: tuple[str, ...] = ()  # extra command-line arguments (-o ...)
    path: str | None = None  # a config path instead of a written file
    env: tuple[tuple[str, str], ...] = ()  # environment for ${oc.env:...}
    secret: str | None = None  # must not appear in the output
    process: bool = False  # run as a real process (bombs, huge files: bounded time)


def _with(base: dict[str, Any], dotted: str, value: Any) -> str:
    data = copy.deepcopy(base)
    node: Any = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def field(dotted: str, value: Any, *, base: dict[str, Any] = LOCAL, name: str = "",
          expect: str | None = None, **kw: Any) -> Case:
    """The base config with one field set to ``value``; the error must name ``expect``
    (default: the field itself)."""
    return Case(name or f"{dotted}={value!r}"[:80], expect or dotted, _with(base, dotted, value),
                **kw)


def override(text: str, expect: str, *, name: str = "", **kw: Any) -> Case:
    return Case(name or f"-o {text!r}"[:80], expect, args=("-o", text), **kw)


def raw(name: str, text: str, expect: str = "config", **kw: Any) -> Case:
    return Case(name, expect, text, **kw)


# ------------------------------------------------------------------ 1. trailing newlines
NEWLINE_NAMES = [
    field("deployment.served_model_name", "evil\n"),
    field("deployment.image", "vllm/vllm-openai:latest\n"),
    field("deployment.hf_model_handle", "org/name\n"),
    field("deployment.checkpoint_path", "org/name\n"),
    field("evaluation.tasks.0.name", "ifeval\n"),
    field("evaluation.tasks.0.container", "nvcr.io/nvidia/eval-factory/simple-evals:26.03\n",
          name="task container"),
    field("deployment.env_vars", {"HF_TOKEN\n": "host:HF_TOKEN"}, name="env var name",
          expect="deployment.env_vars"),
    field("deployment.env_vars", {"HF_TOKEN": "host:HF_TOKEN\n"}, name="env var host:NAME",
          expect="deployment.env_vars"),
    field("deployment.env_vars", {"HF_TOKEN": "runtime:HF_TOKEN\n"}, name="env var runtime:",
          expect="deployment.env_vars"),
    field("evaluation.tasks.0.env_vars", {"HF_TOKEN": "HF_TOKEN\n"}, name="task env bare",
          expect="evaluation.tasks.0.env_vars"),
    field("execution.walltime", "02:00:00\n", base=SLURM),
    field("execution.max_walltime", "120:00:00\n", base=SLURM),
    field("execution.gres", "gpu:8\n", base=SLURM),
    field("deployment.endpoints.health", "/health\n"),
    raw("served_model_name as a | block", LOCAL_TEXT.replace(
        "served_model_name: llama", "served_model_name: |\n    llama"),
        "deployment.served_model_name"),
    override("deployment.served_model_name=|\n  evil\n", "deployment.served_model_name",
             name="-o served_model_name block scalar"),
    override('evaluation.tasks.0.name="ifeval\\n"', "evaluation.tasks.0.name",
             name="-o task name with newline"),
    override('deployment.image="vllm/vllm-openai\\n"', "deployment.image",
             name="-o image with newline"),
]

# ------------------------------------------------------------------ 2. extra_args bypasses
EXTRA_ARGS = [
    "--served_model_name evil", "--served-model evil", "--served evil",
    "--served-model-name=evil", "--served_model_name=evil", "--served-model-name.x=1",
    "--tensor_parallel_size=8", "--tensor-parallel 8", "--tensor 8", "--tensor_parallel=8",
    "--pipeline_parallel_size 2", "--pipeline-parallel 2", "--pipe=2",
    "--data_parallel_size=2", "--data-parallel-s 2", "--data_parallel_size 2",
    "--port=9000", "--por 9000", "--po=1", "--host 0.0.0.0", "--ho=0.0.0.0",
    "--gpu_memory_utilization 0.5", "--gpu-mem 0.5", "--gpu=0.5",
    "--model /x", "--mod /x", "--model=/x",
    "-tp 8", "-tp=8", "-tp8", "-t 8", "-pp 2", "-p=2", "-dp=2", "-d 2",
    "--max-model-len 4096 --served_model_name x",
]
API_KEYS = ["--api-key sk-1234567890", "--api_key=sk-1234567890", "--api-k sk-1234567890",
            "--api sk-1234567890", "--api_k=sk-1234567890"]
EXTRA = [field("deployment.extra_args", a, name=f"extra_args {a}") for a in EXTRA_ARGS] + [
    field("deployment.extra_args", a, name=f"extra_args {a}", secret="sk-1234567890")
    for a in API_KEYS
] + [
    override("deployment.extra_args=--served_model_name evil", "deployment.extra_args",
             name="-o extra_args underscores"),
    override("deployment.extra_args=--gpu_memory=0.5", "deployment.extra_args",
             name="-o extra_args abbreviated with underscores"),
]

# ------------------------------------------------------------------ 3. mounts and paths
MOUNT_FIELDS = ["deployment.checkpoint_path", "execution.hf_cache_dir", "execution.work_dir",
                "evaluation.tasks.0.dataset_dir", "evaluation.tasks.0.dataset_mount_path"]
MOUNT_VALUES = ["/data:/etc", "/data,ro", "/a/../etc", "/a//b", "/a\x1bb"]
MOUNTS = [field(f, v) for f in MOUNT_FIELDS for v in MOUNT_VALUES] + [
    field("execution.hf_cache_dir", "hf-cache"),
    field("execution.work_dir", "var/lib/evalprov"),
    field("evaluation.tasks.0.dataset_dir", "data"),
    field("evaluation.tasks.0.dataset_dir", "./data"),
    field("evaluation.tasks.0.dataset_mount_path", "datasets"),
    field("deployment.checkpoint_path", "./models/llama"),
    field("execution.vllm_venv", "venv"),
    field("execution.harness_venv", "/opt/h\x07v"),
    field("execution.output_dir", "/results\x00x", name="NUL in output_dir"),
    field("execution.output_dir", "/results\x1b[2J", name="escape in output_dir"),
    field("execution.output_dir", "/results\nx", name="newline in output_dir"),
    field("execution.work_dir", "/w\x00", name="NUL in work_dir"),
    field("evaluation.nemo_evaluator_config", {"config": {"x": "a\x00b"}},
          name="NUL anywhere", expect="evaluation.nemo_evaluator_config.config.x"),
    override("execution.hf_cache_dir=/a:/b", "execution.hf_cache_dir", name="-o hf cache :"),
    override("evaluation.tasks.0.dataset_dir=rel", "evaluation.tasks.0.dataset_dir",
             name="-o dataset_dir relative"),
]

# ------------------------------------------------------------------ 4. YAML
BOMB = "a0: &a0 [lol]\n" + "".join(
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)
)
YAML = [
    raw("duplicate top-level key", LOCAL_TEXT + "execution: {output_dir: /x}\n", "execution"),
    raw("duplicate nested key", LOCAL_TEXT.replace(
        "  output_dir: /results", "  output_dir: /results\n  output_dir: /other"),
        "execution.output_dir"),
    raw("duplicate key in a list item", LOCAL_TEXT.replace(
        "  - name: ifeval", "  - name: ifeval\n    name: gpqa_diamond"),
        "evaluation.tasks.0.name"),
    raw("duplicate key 1 and 1.0", LOCAL_TEXT + "export: {1: a, 1.0: b}\n", "export.1"),
    raw("duplicate key in flow mapping", LOCAL_TEXT.replace(
        "tensor_parallel_size: 1", "tensor_parallel_size: 1\n  port: 1\n  port: 2"),
        "deployment.port"),
    raw("alias bomb", LOCAL_TEXT + "export:\n" + "".join("  " + line + "\n"
                                                        for line in BOMB.splitlines()),
        "export.a", process=True),
    raw("alias bomb alone", BOMB, "a", process=True),
    raw("900-level nesting", "x: " + "[" * 900 + "]" * 900 + "\n", process=True),
    raw("a million [", "[" * 1_000_000, process=True),
    raw("deep mappings", "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n",
        process=True),
    raw("recursive anchor", "a: &a [*a]\n", "a.0", process=True),
    raw("recursive mapping anchor", LOCAL_TEXT + "export: &e {self: *e}\n", "export.self",
        process=True),
    raw("recursive merge key", "base: &b\n  <<: *b\n", "base", process=True),
    raw("aliases nest too deep", "a: &a " + "[" * 40 + "x" + "]" * 40 + "\nb: " + "[" * 40
        + "*a" + "]" * 40 + "\n", "b", process=True),
    raw("5000-digit integer", LOCAL_TEXT + "export: " + "9" * 5000 + "\n"),
    raw("impossible date", LOCAL_TEXT + "export: 2024-13-45\n"),
    raw("empty !!timestamp", LOCAL_TEXT + "export: !!timestamp\n"),
    raw("!!float that is not", LOCAL_TEXT + "export: !!float abc\n"),
    raw("invalid YAML", "deployment: [\n"),
    raw("tab indentation", "deployment:\n\tport: 1\n"),
    raw("control character", "x: a\x07b\n"),
    raw("python tag", "x: !!python/object/apply:os.system ['id']\n"),
    raw("not a mapping", "- a\n- b\n"),
    raw("unhashable key", "? [a]\n: b\n"),
    Case("/dev/zero", "config", path="/dev/zero", process=True),
    Case("/dev/urandom", "config", path="/dev/urandom", process=True),
    Case("/dev/null", "config", path="/dev/null"),
    Case("a directory", "config", path=str(REPO / "tests")),
    Case("a missing file", "config", path="/nonexistent/evalprov.yaml"),
    Case("a path too long", "config", path="/" + "a" * 5000),
    Case("a 10 MiB file", "config", text="# padding\n" * (1024 * 1024 + 1), process=True),
    Case("a 4 MiB comment line", "config", text="#" + "x" * MAX_BYTES + "\n", process=True),
    raw("latin-1 bytes", "x: caf\udce9\n"),  # written with surrogateescape: invalid UTF-8
]

# ------------------------------------------------------------------ 5. counts
COUNTS = [
    field("execution.num_instances", 1_000_000_000, base=SLURM, process=True),
    field("execution.num_nodes", 1_000_000_000, base=SLURM),
    field("execution.ntasks_per_node", 10**12, base=SLURM),
    field("execution.gres", "gpu:100000", base=SLURM),
    field("execution.instances_per_host", 1_000_000_000, process=True),
    field("execution.instances_per_host", "99999999999999999999"),
    field("execution.eval_concurrency", 100_000),
    field("execution.health_check_timeout", 10**15),
    field("execution.endpoint_readiness_timeout", 10**30),
    field("deployment.port", 0),
    field("deployment.port", 70_000),
    field("deployment.port", -1),
    field("deployment.tensor_parallel_size", 2048),
    field("deployment.tensor_parallel_size", 10**100),
    field("deployment.gpu_memory_utilization", float("nan")),
    field("deployment.gpu_memory_utilization", float("inf")),
]


def _sized(tp: int, pp: int, dp: int) -> str:
    data = copy.deepcopy(LOCAL)
    data["deployment"].update(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                              data_parallel_size=dp)
    return yaml.safe_dump(data)


COUNTS += [
    Case("1024^3 parallel sizes", "tensor_parallel_size", _sized(1024, 1024, 1024),
         process=True),
    Case("1024^3 parallel sizes, plan", "tensor_parallel_size", _sized(1024, 1024, 1024),
         args=("--gpus", "0"), process=True),
    Case("8 x 1024 GPUs", "tensor_parallel_size", _sized(8, 1024, 1)),
    override("execution.instances_per_host=1000000000", "execution.instances_per_host",
             name="-o instances_per_host huge"),
]

# ------------------------------------------------------------------ -o overrides and argv
OVERRIDES = [
    override("deployment.port", "-o", name="-o without ="),
    override("=1", "-o", name="-o without key"),
    override("a..b=1", "-o", name="-o empty part"),
    override("deploy ment.port=1", "-o",
             name="-o key with space"),
    override(".".join(["a"] * 100) + "=1", "-o", name="-o key 100 parts"),
    override("evaluation.nemo_evaluator_config={a: 1, a: 2}",
             "evaluation.nemo_evaluator_config.a", name="-o duplicate key"),
    override("evaluation.nemo_evaluator_config=" + "[" * 100 + "]" * 100,
             "evaluation.nemo_evaluator_config", name="-o deep value"),
    override("evaluation.nemo_evaluator_config=&a [*a]", "evaluation.nemo_evaluator_config",
             name="-o recursive anchor", process=True),
    override("evaluation.nemo_evaluator_config={" + ", ".join(
        line.strip() for line in BOMB.splitlines()) + "}",
        "evaluation.nemo_evaluator_config", name="-o alias bomb", process=True),
    override("evaluation.tasks.99999999999999999999.name=x", "-o", name="-o huge index"),
    override("deployment.port=99999", "deployment.port", name="-o port too big"),
    override("execution.output_dir=/r\x1bx", "execution.output_dir", name="-o escape"),
    override("deployment.tensor_parallel_size=1e400", "deployment.tensor_parallel_size",
             name="-o inf"),
]


# ------------------------------------------------------------------ 6. env values
def env_case(name: str, dotted: str, secret: str, expect: str | None = None,
             template: str = "${oc.env:EVALPROV_T_SECRET}") -> Case:
    return Case(name, expect or dotted, _with(LOCAL, dotted, template),
                env=(("EVALPROV_T_SECRET", secret),), secret=secret)


SECRET = "hf_sEcReT0123456789abcdef"
ENV = [
    env_case("env into served_model_name", "deployment.served_model_name", SECRET + " x"),
    env_case("env into tensor_parallel_size", "deployment.tensor_parallel_size", SECRET),
    env_case("env into port", "deployment.port", SECRET),
    env_case("env into checkpoint_path", "deployment.checkpoint_path", SECRET + ":/x"),
    env_case("env into image", "deployment.image", SECRET + "!"),
    env_case("env into extra_args", "deployment.extra_args", "--port=" + SECRET),
    env_case("env into task name", "evaluation.tasks.0.name", SECRET),
    env_case("env into instances_per_host", "execution.instances_per_host", SECRET),
    env_case("env into placement", "execution.placement", SECRET),
    env_case("env with quote into image", "deployment.image", "a'b\"c\\" + SECRET),
    env_case("env into a longer string", "deployment.served_model_name", SECRET + " y",
             template="pre-${oc.env:EVALPROV_T_SECRET}-post" + "x" * 60),
    env_case("env value with ${...} is not re-interpolated", "deployment.served_model_name",
             "${" + SECRET + " }"),
]

CASES = NEWLINE_NAMES + EXTRA + MOUNTS + YAML + COUNTS + OVERRIDES + ENV


def test_corpus_is_at_least_100_cases_with_unique_ids():
    assert len(CASES) >= 100
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


def _write(case: Case, tmp_path: Path) -> str:
    if case.path is not None:
        return case.path
    p = tmp_path / "config.yaml"
    p.write_bytes(case.text.encode("utf-8", "surrogateescape"))
    return str(p)


def _argv(case: Case, path: str) -> list[str]:
    command = "plan" if "--gpus" in case.args else "validate"
    return [command, path, *case.args]


def _check(case: Case, rc: int, out: str, err: str) -> None:
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert "Traceback" not in out + err
    assert rc == 2, f"exit {rc}\n{err}"
    assert len(lines) == 1, f"not one error line:\n{err}"
    assert lines[0].startswith("error: ")
    assert case.field in lines[0], f"{case.field!r} not named in {lines[0]!r}"
    assert len(lines[0]) < 1000, "an error line stays short"
    assert out == ""
    if case.secret:
        assert case.secret not in err
        assert case.secret[:12] not in err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    path = _write(case, tmp_path)
    argv = _argv(case, path)
    if case.process:
        env = {**os.environ, **dict(case.env)}
        proc = subprocess.run([sys.executable, "-m", "evalprov.cli", *argv], cwd=tmp_path,
                              env=env, capture_output=True, timeout=TIMEOUT)
        out, err = (proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
        _check(case, proc.returncode, out, err)
        return
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    rc = main(argv)
    out, err = capsys.readouterr()
    _check(case, rc, out, err)


def test_a_fifo_config_is_read_bounded(tmp_path):
    """Process substitution (<(...)) is a pipe: read, at most MAX_BYTES + 1 bytes."""
    fifo = tmp_path / "cfg"
    os.mkfifo(fifo)
    script = (f"import os\nfd = os.open({str(fifo)!r}, os.O_WRONLY)\n"
              "try:\n    os.write(fd, b'#' * (5 * 1024 * 1024))\nexcept OSError:\n    pass\n")
    writer = subprocess.Popen([sys.executable, "-c", script])
    try:
        proc = subprocess.run([sys.executable, "-m", "evalprov.cli", "validate", str(fifo)],
                              capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        writer.kill()
        writer.wait(timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert "larger than 4 MiB" in proc.stderr and "Traceback" not in proc.stderr


def test_env_values_are_plain_strings_not_interpolated_again(tmp_path):
    """As in OmegaConf: ${oc.env:X} gives X's text; a ${...} inside it stays text."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_with(LOCAL, "deployment.served_model_name", "${oc.env:EVALPROV_T_NAME}"))
    loaded = load_config(cfg, ["deployment.extra_args=--x ${oc.env:EVALPROV_T_ARGS}"],
                         environ={"EVALPROV_T_NAME": "m1", "EVALPROV_T_ARGS": "${nope}"})
    assert loaded.config.deployment.served_model_name == "m1"
    assert loaded.config.deployment.extra_args == "--x ${nope}"


@pytest.mark.parametrize("args", ["--max-model-len 4096", "--data-parallel-size-local 2",
                                  "-dpl 2", "-q fp8", "--api-server-count 2", "--port-x 1",
                                  "--enforce-eager -O3", "--x -1"])
def test_extra_args_vllm_reads_differently_are_kept(args, make_config, vllm_user):
    """Options that are not (prefixes of) the ones evalprov sets pass through."""
    cfg = make_config(vllm_user(deployment={"extra_args": args}))
    assert cfg.deployment.extra_args == args


def test_a_normalised_trailing_slash_is_accepted(make_config, vllm_user):
    cfg = make_config(vllm_user(deployment={"checkpoint_path": "/models/llama/"},
                                tasks=[{"name": "ifeval", "dataset_dir": "/data/"}]))
    assert cfg.deployment.checkpoint_path == "/models/llama/"


def test_bounds_accept_the_largest_sane_plan(make_config, vllm_user):
    cfg = make_config(vllm_user(
        deployment={"tensor_parallel_size": 8, "pipeline_parallel_size": 16,
                    "data_parallel_size": 32},
        execution={"instances_per_host": 1024, "health_check_timeout": 7 * 24 * 3600}))
    assert cfg.deployment.tensor_parallel_size * 16 * 32 == 4096


def test_packaged_yaml_goes_through_the_bounded_loader():
    """The task table and defaults are read with the same loader (limits fit them)."""
    from evalprov.config.tasks import task_table

    task_table.cache_clear()
    assert len(task_table().tasks) > 400
    assert compose({"defaults": [{"execution": "slurm/default"}, {"deployment": "vllm"}]})


# ------------------------------------------------------------------ fuzz
FRAGMENTS = [
    "deployment:", "execution:", "evaluation:", "defaults:", "  - execution: local",
    "  - deployment: vllm", "  - _self_", "  tensor_parallel_size: ", "  port: ",
    "  served_model_name: ", "  checkpoint_path: ", "  extra_args: ", "  output_dir: ",
    "  tasks:", "    - name: ifeval", "  instances_per_host: ", "type: vllm", "&a", "*a",
    "<<: *a", "!!set", "!!binary", "!!timestamp", "!!python/name:os.system", "|", ">-", "? ",
    "[", "]", "{", "}", ",", ":", "- ", "'", '"', "#", "%YAML 1.1", "---", "...",
    "${oc.env:EVALPROV_FUZZ}", "${deployment.port}", "${execution}", "${a.b}", "???",
    "\t", "\x00", "\x85", "\ufeff", "1e400", "0x1F", "0o17", "10:00:00", "2024-13-45",
    "9" * 5000, ".nan", "~", "null", "yes", "on", "/a:/b", "--served_model_name x",
    "-tp8", "\n", "\n  ", "\n    ",
]
text_st = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=40
).map("".join)

KEYS = ["defaults", "deployment", "execution", "evaluation", "tasks", "name", "type",
        "tensor_parallel_size", "port", "served_model_name", "checkpoint_path",
        "hf_model_handle", "output_dir", "extra_args", "env_vars", "instances_per_host",
        "nemo_evaluator_config", "target", "api_endpoint", "url", "model_id", "gres",
        "walltime", "dataset_dir", "_self_", "vllm", "local", "slurm/default", "none"]
scalar_st = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from([*KEYS, "???", "${oc.env:EVALPROV_FUZZ}", "${deployment.port}", "${x}",
                     "\x00"]),
)
data_st = st.recursive(
    scalar_st,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers()),
                        kids, max_size=5),
    ),
    max_leaves=30,
)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
_DIR = Path(tempfile.mkdtemp(prefix="evalprov-fuzz-"))


@FUZZ
@given(text=text_st, overrides=st.lists(st.text(max_size=30), max_size=3))
def test_random_yamlish_text_only_ever_raises_config_error(text, overrides):
    path = _DIR / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path, overrides, environ={"EVALPROV_FUZZ": "${x}"})
    except ConfigError as exc:
        assert exc.lines and all(isinstance(line, str) for line in exc.lines)


@FUZZ
@given(text=text_st)
def test_random_text_through_the_yaml_reader(text):
    with contextlib.suppress(ConfigError, yaml.YAMLError):
        load_text(text)


@FUZZ
@given(user=st.dictionaries(st.sampled_from(KEYS), data_st, max_size=6),
       override_value=data_st)
def test_random_nested_data_only_ever_raises_config_error(user, override_value):
    try:
        keys, _ = parse_override("deployment.port=1")
        apply_override(user, keys, override_value, "deployment.port=...")
        composed = compose(user, default_execution="baremetal")
        validate(interpolate(composed, {"EVALPROV_FUZZ": "${x}"}), user)
    except ConfigError as exc:
        assert exc.lines
