"""What the ledger and the lock file record of a command line: secrets masked, nothing else."""

from __future__ import annotations

import shlex

import pytest

from evalprov.redact import redact_argv, redact_command_text, redacted_command

MASKED = [
    (["-o", "deployment.env_vars.HF_TOKEN=lit:hf_abc"], ["-o", "deployment.env_vars.HF_TOKEN=***"]),
    (["-o", "evaluation.tasks.0.env_vars.X=host:MY_VAR"],
     ["-o", "evaluation.tasks.0.env_vars.X=***"]),
    (["-o", "env_vars.PLAIN=somevalue"], ["-o", "env_vars.PLAIN=***"]),
    (["-o", "x.y=lit:abc"], ["-o", "x.y=***"]),
    (["-o", "x.y=host:ABC"], ["-o", "x.y=***"]),
    (["-o", "target.api_endpoint.api_key=abc"], ["-o", "target.api_endpoint.api_key=***"]),
    (["-o", "a.hf_token=abc"], ["-o", "a.hf_token=***"]),
    (["-o", "db.password=abc"], ["-o", "db.password=***"]),
    (["-o", "a.client_secret=abc"], ["-o", "a.client_secret=***"]),
    (["--override", "deployment.env_vars.A=lit:x"], ["--override", "deployment.env_vars.A=***"]),
    (["--override=deployment.env_vars.A=lit:x"], ["--override=deployment.env_vars.A=***"]),
    (["--over", "deployment.env_vars.A=lit:x"], ["--over", "deployment.env_vars.A=***"]),
    (["-odeployment.env_vars.A=lit:x"], ["-odeployment.env_vars.A=***"]),
    (["-o", "deployment={env_vars: {A: lit:x}}"], ["-o", "deployment=***"]),
    (["-o", "evaluation.tasks=[{name: ifeval, env_vars: {A: B}}]"], ["-o", "evaluation.tasks=***"]),
    (["-o", "lit:oops"], ["-o", "***"]),
    (["--api-key", "sk-1"], ["--api-key", "***"]),
    (["--api-key=sk-1"], ["--api-key=***"]),
    (["--hf-token", "hf_1"], ["--hf-token", "***"]),
    (["--password=pw"], ["--password=***"]),
]

KEPT = [
    ["-o", "execution.walltime=04:00:00"],
    ["-o", "deployment.tensor_parallel_size=2"],
    ["-o", "target.api_endpoint.url=http://localhost:8000/v1"],
    ["-o", "execution.output_dir=/tmp/x"],
    ["--limit", "gpu-node-01", "--forks", "5", "--tags", "eval", "--rerun", "failed"],
    ["--check", "--diff", "--format", "json"],
    ["-i", "inventories/fleet.yml"],
    ["--output-dir", "o"],
]


@pytest.mark.parametrize(("args", "expect"), MASKED)
def test_secret_values_are_masked(args, expect):
    assert redact_argv(["evalprov", "apply", "c.yaml", *args]) == [
        "evalprov", "apply", "c.yaml", *expect]


@pytest.mark.parametrize("args", KEPT)
def test_ordinary_values_are_kept_as_typed(args):
    argv = ["evalprov", "apply", "examples/c.yaml", *args]
    assert redact_argv(argv) == argv


def test_one_secret_among_ordinary_arguments_masks_only_it():
    argv = ["evalprov", "apply", "c.yaml", "-o", "a=1", "-o", "env_vars.T=lit:s3cr3t", "-o",
            "b=2", "--limit", "h1"]
    assert redact_argv(argv) == ["evalprov", "apply", "c.yaml", "-o", "a=1", "-o",
                                 "env_vars.T=***", "-o", "b=2", "--limit", "h1"]


def test_argv0_and_a_short_trivial_value_are_never_masked():
    # a 1-character value elsewhere on the line is not masked because a secret equals it
    argv = ["/opt/key/evalprov", "apply", "c.yaml", "-o", "env_vars.T=lit:1", "--forks", "1"]
    assert redact_argv(argv) == ["/opt/key/evalprov", "apply", "c.yaml", "-o", "env_vars.T=***",
                                 "--forks", "1"]


def test_redacted_command_is_shell_quoted_and_reads_back():
    argv = ["evalprov", "apply", "my config.yaml", "-o", "env_vars.T=lit:x y", "-o", "a=b c"]
    text = redacted_command(argv)
    assert shlex.split(text) == ["evalprov", "apply", "my config.yaml", "-o", "env_vars.T=***",
                                 "-o", "a=b c"]


def test_old_unquoted_command_text_is_redacted():
    old = "evalprov apply c.yaml -o deployment.env_vars.HF=lit:abc --limit h1"
    assert redact_command_text(old) == ("evalprov apply c.yaml -o 'deployment.env_vars.HF=***' "
                                        "--limit h1")
    plain = "evalprov apply c.yaml --limit h1"
    assert redact_command_text(plain) == plain  # nothing secret: unchanged
    assert "abc" not in redact_command_text("evalprov apply -o env_vars.A=lit:abc 'unbalanced")
