"""evalprov.tinymodel without torch: argument parsing, the completeness check, idempotent main,
the generated corpus. The build itself runs in the vLLM venv (tests/e2e/test_vllm_cpu.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from evalprov import tinymodel


def _fake_complete(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in tinymodel.REQUIRED_FILES:
        (dest / name).write_text("x")
    (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (dest / tinymodel.MARKER).write_text(json.dumps({"complete": True, "seed": 0}))
    return dest


def test_module_imports_without_ml_stack():
    # Importing must not pull in torch/transformers/tokenizers (they are imported lazily).
    for heavy in ("torch", "transformers", "tokenizers"):
        if heavy not in sys.modules:
            assert heavy not in vars(tinymodel)


def test_parse_args_defaults_and_options(tmp_path):
    args = tinymodel.parse_args([str(tmp_path / "m")])
    assert args.dest == tmp_path / "m" and args.seed == 0 and not args.force
    args = tinymodel.parse_args([str(tmp_path), "--seed", "7", "--force"])
    assert args.seed == 7 and args.force
    with pytest.raises(SystemExit):
        tinymodel.parse_args([])


def test_head_dim_at_least_32():
    assert tinymodel.HIDDEN // tinymodel.HEADS >= 32
    assert tinymodel.HIDDEN % tinymodel.HEADS == 0
    assert tinymodel.MAX_POSITIONS >= 1024


def test_is_complete(tmp_path):
    assert not tinymodel.is_complete(tmp_path / "missing")
    assert not tinymodel.is_complete(tmp_path)
    dest = _fake_complete(tmp_path / "m")
    assert tinymodel.is_complete(dest)


@pytest.mark.parametrize("broken", ["missing-file", "empty-file", "bad-json", "not-llama",
                                    "marker-incomplete"])
def test_is_complete_rejects_partial(tmp_path, broken):
    dest = _fake_complete(tmp_path / "m")
    if broken == "missing-file":
        (dest / "model.safetensors").unlink()
    elif broken == "empty-file":
        (dest / "tokenizer.json").write_text("")
    elif broken == "bad-json":
        (dest / "config.json").write_text("{not json")
    elif broken == "not-llama":
        (dest / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    else:
        (dest / tinymodel.MARKER).write_text(json.dumps({"complete": False}))
    assert not tinymodel.is_complete(dest)


def test_main_is_idempotent_on_complete_dest(tmp_path, capsys, monkeypatch):
    dest = _fake_complete(tmp_path / "m")
    monkeypatch.setattr(tinymodel, "build_tiny_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert tinymodel.main([str(dest)]) == 0
    assert "already holds a complete model" in capsys.readouterr().out


def test_main_refuses_foreign_nonempty_dest(tmp_path, capsys, monkeypatch):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "other.txt").write_text("keep me")
    monkeypatch.setattr(tinymodel, "build_tiny_model", lambda *a, **k: pytest.fail("built"))
    assert tinymodel.main([str(dest)]) == 2
    assert "not a complete tiny model" in capsys.readouterr().err
    assert (dest / "other.txt").read_text() == "keep me"


def test_main_builds_into_missing_dest(tmp_path, monkeypatch):
    calls = []

    def fake_build(dest, seed=0):
        calls.append((dest, seed))
        return _fake_complete(dest)

    monkeypatch.setattr(tinymodel, "build_tiny_model", fake_build)
    assert tinymodel.main([str(tmp_path / "m"), "--seed", "3"]) == 0
    assert calls == [((tmp_path / "m").absolute(), 3)]


def test_corpus_is_deterministic_and_has_chat_markers():
    a, b = tinymodel._corpus(0, 200), tinymodel._corpus(0, 200)
    assert a == b
    assert a != tinymodel._corpus(1, 200)
    assert any(tinymodel.IM_START in line for line in a)


def test_chat_template_renders():
    jinja2 = pytest.importorskip("jinja2")
    tpl = jinja2.Environment().from_string(tinymodel.CHAT_TEMPLATE)
    out = tpl.render(
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
    )
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "tokenizers")),
    reason="torch/transformers/tokenizers not installed here (the build runs in the vLLM venv)",
)
def test_build_is_deterministic(tmp_path):
    a = tinymodel.build_tiny_model(tmp_path / "a", seed=0)
    b = tinymodel.build_tiny_model(tmp_path / "b", seed=0)
    assert tinymodel.is_complete(a) and tinymodel.is_complete(b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
