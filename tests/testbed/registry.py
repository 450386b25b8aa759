"""The local Docker registry that serves as the fake hosts' Docker Hub mirror.

``docker-registry serve CFG`` (Debian package docker-registry) listens on
10.213.<net>.1:5000 (one process per fleet) with its storage in a persistent
cache directory that every fleet's registry shares, so images pushed once survive
between test runs on the same machine.  The fake hosts'
dockerds use it as ``--registry-mirror``: ``docker pull vllm/vllm-openai:TAG``
is served from the repository ``vllm/vllm-openai`` here (official images live
under ``library/``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from .util import TestbedError, http_request, pid_alive, pid_cmdline, tcp_open, wait_for

CACHE_ROOT = Path(os.environ.get("EVALPROV_TESTBED_CACHE", "/var/tmp/evalprov-testbed"))
DEFAULT_REGISTRY_DIR = CACHE_ROOT / "registry"
REGISTRY_BINARY = "/usr/bin/docker-registry"

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)


class Registry:
    """A ``docker-registry`` process bound to ``addr`` (host:port)."""

    def __init__(self, addr: str, *, storage: Path = DEFAULT_REGISTRY_DIR, workdir: Path):
        self.addr = addr
        self.host, port = addr.rsplit(":", 1)
        self.port = int(port)
        self.storage = Path(storage)
        self.workdir = Path(workdir)
        self.config = self.workdir / "registry.yml"
        self.log = self.workdir / "registry.log"
        self.pidfile = CACHE_ROOT / f"registry-{self.host}-{self.port}.pid"
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def _write_config(self) -> None:
        cfg = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": {"addr": self.addr, "headers": {"X-Content-Type-Options": ["nosniff"]}},
        }
        # JSON is valid YAML, and keeps us free of a YAML writer here.
        self.config.write_text(json.dumps(cfg, indent=2) + "\n")

    @staticmethod
    def _is_registry(pid: int) -> bool:
        argv = pid_cmdline(pid)
        return bool(argv) and argv[0].endswith("docker-registry") and "serve" in argv

    def stop_stale(self, pidfile: Path | None = None) -> None:
        """Stop a registry a previous (crashed) fleet on this address left running
        (``pidfile``: where it recorded its pid, default this address's pidfile)."""
        pidfile = pidfile or self.pidfile
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if pid_alive(pid) and self._is_registry(pid):
            _terminate(pid)
        pidfile.unlink(missing_ok=True)

    def start(self, *, timeout: float = 15.0) -> None:
        self.stop_stale()
        if tcp_open(self.host, self.port, timeout=0.3):
            raise TestbedError(f"something already listens on {self.addr}")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.workdir)},
            )
        self.pid = proc.pid
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.write_text(f"{proc.pid}\n")

        def ready() -> bool:
            if proc.poll() is not None:
                raise TestbedError(
                    f"docker-registry exited {proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            status, _, _ = http_request(f"{self.url}/v2/", timeout=1.0)
            return status == 200

        wait_for(ready, timeout=timeout, what=f"registry on {self.addr}")

    def stop(self, *, timeout: float = 10.0) -> None:
        pid = self.pid
        if pid is None:
            try:
                pid = int(self.pidfile.read_text().strip())
            except (OSError, ValueError):
                return
        if pid_alive(pid) and self._is_registry(pid):
            _terminate(pid, timeout=timeout)
        self.pidfile.unlink(missing_ok=True)
        self.pid = None

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        """Digest of ``repo:tag`` in this registry, or None if absent."""
        status, headers, _ = http_request(
            f"{self.url}/v2/{repo}/manifests/{tag}",
            method="HEAD",
            headers={"Accept": MANIFEST_TYPES},
            timeout=5.0,
        )
        if status == 200:
            return headers.get("docker-content-digest")
        if status == 404:
            return None
        raise TestbedError(f"registry HEAD {repo}:{tag} -> HTTP {status}")

    def tags(self, repo: str) -> list[str]:
        status, _, body = http_request(f"{self.url}/v2/{repo}/tags/list", timeout=5.0)
        if status != 200:
            return []
        return sorted(json.loads(body).get("tags") or [])


def _terminate(pid: int, *, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_for(lambda: not pid_alive(pid), timeout=5.0, what=f"registry pid {pid} to die")
