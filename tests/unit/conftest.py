"""Shared fixtures for the planner, host and inventory tests. They hand out pure functions
that build a Config from a dict the way `load_config` does (compose -> interpolate ->
validate), without touching files or the process environment."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from evalprov.config.loader import compose, interpolate, load_config, validate
from evalprov.config.models import Config

REPO = Path(__file__).resolve().parents[2]


def _make_config(
    user: dict[str, Any],
    default_execution: str = "baremetal",
    environ: dict[str, str] | None = None,
) -> Config:
    user = copy.deepcopy(user)
    composed = compose(user, default_execution=default_execution)
    data = interpolate(composed, {} if environ is None else environ)
    return validate(data, user).config


def _vllm_user(
    *,
    deployment: dict[str, Any] | None = None,
    execution: dict[str, Any] | None = None,
    tasks: list[Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    dep: dict[str, Any] = {
        "hf_model_handle": "org/model",
        "served_model_name": "model",
        "tensor_parallel_size": 1,
    }
    dep.update(deployment or {})
    exe: dict[str, Any] = {"output_dir": "/results"}
    exe.update(execution or {})
    user: dict[str, Any] = {
        "defaults": [{"execution": "baremetal"}, {"deployment": "vllm"}, "_self_"],
        "deployment": dep,
        "execution": exe,
        "evaluation": {"tasks": [{"name": "ifeval"}] if tasks is None else tasks},
    }
    user.update(top)
    return user


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def make_config() -> Callable[..., Config]:
    """make_config(user_dict, default_execution="baremetal", environ=None) -> Config."""
    return _make_config


@pytest.fixture(scope="session")
def vllm_user() -> Callable[..., dict[str, Any]]:
    """vllm_user(deployment={...}, execution={...}, tasks=[...], **top) -> a baremetal + vLLM
    user dict (HF id org/model, TP 1, task ifeval) with those sections merged over it."""
    return _vllm_user


@pytest.fixture(scope="session")
def vllm_config() -> Callable[..., Config]:
    """vllm_config(**same as vllm_user) -> Config."""
    return lambda **kw: _make_config(_vllm_user(**kw))


@pytest.fixture(scope="session")
def seed_config() -> Callable[..., Config]:
    """seed_config("key=value", ...) -> the NEL seed example (examples/nel_seed.yaml)
    loaded with those -o overrides and an empty environment."""
    return lambda *overrides: load_config(
        REPO / "examples" / "nel_seed.yaml", list(overrides), environ={}
    ).config
