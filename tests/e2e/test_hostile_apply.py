"""Values are data: template and shell payloads in every string field a config can carry go
through `evalprov apply --check` (vLLM deployment) and a real `evalprov apply` (deployment:
none, the harness really runs against a closed port), on this machine, and nothing they say
is ever run: no marker file appears anywhere, whatever the exit code, and there is never a
traceback. (Fleet hosts: tests/fleet/test_apply.py runs the same payloads over SSH.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HARNESS = Path("/opt/evalprov/harness-venv/bin/nemo-evaluator")


def payloads(mark: Path) -> dict[str, str]:
    """One payload of each kind, each touching its own marker file."""
    return {
        "jinja": f"{{{{ lookup('pipe', 'touch {mark}-jinja') }}}}",
        "jinja_stmt": f"{{% set x = lookup('pipe', 'touch {mark}-stmt') %}}x",
        "jinja_header": ("#jinja2:variable_start_string:'[[', variable_end_string:']]'\n"
                         f"[[ lookup('pipe', 'touch {mark}-header') ]]"),
        "shell_subst": f"$(touch {mark}-subst)",
        "shell_backtick": f"`touch {mark}-backtick`",
        "shell_chain": f"x; touch {mark}-chain",
    }


def every_string_field(kind: str, text: str, out: Path, vllm: bool) -> dict:
    """A config with `text` in every free-text string field (names that are validated get it
    too, in other configs of the corpus: here the config must still load)."""
    params = {"limit_samples": 1, "max_new_tokens": 4, "parallelism": 1,
              "extra": {f"k_{kind}": text, text: "v"}}
    config = {
        "defaults": [{"execution": "local"}, {"deployment": "vllm" if vllm else "none"},
                     "_self_"],
        # (a newline is refused in a path and in argv: the rest of the payload stays)
        "execution": {"output_dir": str(out / f"out-{oneline(text)}"), "runtime": "process",
                      "device": "cpu", "sample_data": True, "health_check_timeout": 30},
        "env_vars": {"PLAIN_SETTING": f"lit:{text}", "SOME_TOKEN": f"lit:{text}"},
        "evaluation": {
            "nemo_evaluator_config": {"config": {"params": params}},
            "tasks": [{"name": "ifeval", "env_vars": {"TASK_SETTING": f"lit:{text}"},
                       "nemo_evaluator_config": {"config": {"params": {
                           "extra": {"task_extra": text}}}}}],
        },
    }
    if vllm:
        config["deployment"] = {
            "checkpoint_path": "/var/lib/evalprov/models/tiny-llama",
            "served_model_name": "tiny", "tensor_parallel_size": 1, "port": 8123,
            "extra_args": f"--chat-template {_quote(oneline(text))} --max-model-len 512",
            "env_vars": {"SERVER_SETTING": f"lit:{text}"},
        }
    else:
        config["target"] = {"api_endpoint": {"url": "http://127.0.0.1:9/v1/chat/completions",
                                             "model_id": "tiny"}}
    return config


def oneline(text: str) -> str:
    return text.replace("\n", " ")


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evalprov.cli", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def markers(mark: Path) -> list[str]:
    return sorted(str(p) for p in mark.parent.glob(mark.name + "*"))


@pytest.mark.parametrize("kind", list(payloads(Path("/x"))))
def test_payloads_in_every_field_run_nothing_under_apply_check(kind, tmp_path):
    mark = tmp_path / "MARK"
    text = payloads(mark)[kind]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(every_string_field(kind, text, tmp_path, vllm=True)))
    for args in (["validate", str(cfg)], ["plan", str(cfg)], ["inventory", str(cfg)],
                 ["apply", str(cfg), "--check", "--diff"]):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode in (0, 1, 2), (args, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "Traceback" not in proc.stdout + proc.stderr, args
        assert markers(mark) == [], (args, proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # --check ran


@pytest.mark.skipif(not HARNESS.exists(), reason="needs scripts/install-harness")
def test_payloads_in_every_field_run_nothing_under_a_real_apply(tmp_path):
    """deployment: none, so every role but vllm runs for real: the harness gets the payloads
    in its run config and env, fails on the closed port, and nothing is run by them."""
    mark = tmp_path / "MARK"
    all_kinds = payloads(mark)
    text = " ".join(all_kinds.values())
    cfg = tmp_path / "c.yaml"
    config = every_string_field("all", text, tmp_path, vllm=False)
    # (SQLite refuses a ledger path over 512 characters: one payload in the path)
    config["execution"]["output_dir"] = str(tmp_path / f"out-{all_kinds['jinja']}")
    cfg.write_text(yaml.safe_dump(config))
    proc = cli("apply", str(cfg), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]  # the task failed: nothing answers on port 9
    assert "Traceback" not in out
    assert "ifeval" in proc.stdout and "failed" in proc.stdout
    assert markers(mark) == [], out[-3000:]
    # the payload reached the harness as written (the run config on the controller)
    (run_config,) = [p for p in tmp_path.rglob("run_config.yml") if p.parent.name == "ifeval"]
    assert all_kinds["jinja"] in run_config.read_text()
