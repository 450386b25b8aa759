"""What the eval module reads on a host for the run's record (module_utils' provenance),
without a host: a checkpoint's content hash (cached by path, size and mtime), the HF
revision from an HF cache, vLLM's /version from a real HTTP server on 127.0.0.1, the harness
versions printed by a real python, and null-with-a-reason for each fact that is not there."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.unit.collection import module

host = module("module_utils.evalprov_host")


def _manifest_hash(root: Path) -> str:
    lines = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.stat().st_size}  "
                     f"{p.relative_to(root)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_a_checkpoint_hash_covers_every_file_and_is_cached(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text('{"a": 1}')
    (ckpt / "sub" / "model.safetensors").write_bytes(os.urandom(3 << 20))
    cache = tmp_path / "state" / "hashes.json"
    first = host.checkpoint_hash(str(ckpt), str(cache))
    assert first["sha256"] == _manifest_hash(ckpt)
    assert (first["files"], first["hashed_now"]) == (2, 2)
    assert first["bytes"] == (3 << 20) + 8
    again = host.checkpoint_hash(str(ckpt), str(cache))
    assert again["sha256"] == first["sha256"] and again["hashed_now"] == 0  # from the cache
    (ckpt / "config.json").write_text('{"a": 2}')  # content (and mtime) change
    changed = host.checkpoint_hash(str(ckpt), str(cache))
    assert changed["sha256"] != first["sha256"] and changed["hashed_now"] == 1
    assert changed["sha256"] == _manifest_hash(ckpt)


def test_a_checkpoint_hash_that_runs_out_of_time_is_null_with_a_reason(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "w.bin").write_bytes(os.urandom(4 << 20))
    got = host.checkpoint_hash(str(ckpt), str(tmp_path / "h.json"), budget=0.0)
    assert got["sha256"] is None and "hashing stopped after 0 s" in got["reason"]
    assert host.checkpoint_hash(str(tmp_path / "nope"), str(tmp_path / "h.json")) == {
        "sha256": None, "reason": f"{tmp_path / 'nope'} is not a directory on the host"}


def test_the_hf_revision_is_the_ref_in_the_hf_cache(tmp_path):
    refs = tmp_path / "hub" / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("0123abcd" * 5)
    assert host.hf_revision(str(tmp_path), "org/model") == {
        "id": "org/model", "revision": "0123abcd" * 5, "ref": "main"}
    missing = host.hf_revision(str(tmp_path), "org/other")
    assert missing["revision"] is None and "not in the HF cache" in missing["reason"]


@pytest.fixture
def vllm_like():
    """A real HTTP server on 127.0.0.1 answering /version as vLLM does."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"version": "0.9.1"}).encode()
            self.send_response(200 if self.path == "/version" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_vllm_version_from_the_servers_version_endpoint(vllm_like, tmp_path):
    assert host.vllm_version(vllm_like) == ("0.9.1", "")
    server_gone = host.vllm_version(1)
    assert server_gone[0] is None and "answered nothing" in server_gone[1]
    got = host.provenance({"runtime": "process", "instances": [
        {"name": "evalprov-vllm-0", "port": vllm_like}], "model": {}})
    assert got["instances"] == {"evalprov-vllm-0": {"vllm_version": "0.9.1"}}


def test_harness_versions_are_read_with_the_harness_python(tmp_path):
    venv = tmp_path / "venv"
    site = venv / "lib" / "site-packages"
    for name, version in (("nemo_evaluator", "0.2.8"), ("nvidia_lm_eval", "26.3"),
                          ("unrelated", "1.0")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {version}\n")
    (venv / "bin").mkdir()
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} -S \"$@\"\n")  # no site
    python.chmod(0o755)
    got = host.provenance({"runtime": "process", "harness_venv": str(venv)})
    assert got["harness"] == {str(venv): {"versions": {"nemo-evaluator": "0.2.8",
                                                       "nvidia-lm-eval": "26.3"}}}
    absent = host.provenance({"runtime": "process", "harness_venv": str(tmp_path / "none")})
    entry = absent["harness"][str(tmp_path / "none")]
    assert entry["versions"] is None and "cannot run" in entry["reason"]
