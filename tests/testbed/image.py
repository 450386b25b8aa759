"""Build the stand-in vLLM image without Docker Hub and push it to the local registry.

The rootfs is made from this machine's own Debian python3.11 (binary, stdlib,
the shared libraries ldd names), busybox-static, and a ``vllm`` launcher that
runs standin/server.py.  ``docker import`` (with ENTRYPOINT []) happens in one
fake host's dockerd, driven from the controller through that dockerd's socket
in the host dir; the image is pushed to the fleet's registry as
``10.213.<net>.1:5000/vllm/vllm-openai:evalprov-standin`` so that a fake host's
``docker pull vllm/vllm-openai:evalprov-standin`` is served by the mirror.

The tar is deterministic for a given machine (sorted entries, uid 0, package
mtimes kept so the stdlib's .pyc files stay valid); its sha256 names a second
tag ``evalprov-standin-<sha12>`` that serves as the cache key: nothing is built
or pushed when the registry already has it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

from .registry import CACHE_ROOT
from .util import TestbedError, run

STANDIN_REPO = "vllm/vllm-openai"
STANDIN_TAG = "evalprov-standin"
STANDIN_IMAGE = f"{STANDIN_REPO}:{STANDIN_TAG}"
REGISTRY_PREFIX = "10.213.77.1:5000"  # the default net's registry; a fleet's is fleet.registry.addr
STANDIN_REGISTRY_REF = f"{REGISTRY_PREFIX}/{STANDIN_IMAGE}"

SERVER_PY = Path(__file__).resolve().parent / "standin" / "server.py"
IMAGE_CACHE = CACHE_ROOT / "images"
PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
BUSYBOX = "/usr/bin/busybox"
FIXED_MTIME = 1_700_000_000
IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin"

# Parts of the stdlib a stdlib-only HTTP server never needs.
STDLIB_SKIP_DIRS = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "venv",
    "distutils",
}
STDLIB_SKIP_FILES = {"sitecustomize.py"}

LAUNCHER = (
    "#!/bin/sh\n"
    "# evalprov testbed: stand-in for vLLM's CLI; only `vllm serve ...` is supported.\n"
    'exec /usr/bin/python3.11 -u /usr/local/lib/evalprov-standin/server.py "$@"\n'
)

IMAGE_CHANGES = [
    "ENTRYPOINT []",
    'CMD ["vllm", "serve", "--help"]',
    f"ENV PATH={IMAGE_PATH}",
    "ENV LANG=C.UTF-8",
    "ENV PYTHONDONTWRITEBYTECODE=1",
    "ENV PYTHONUNBUFFERED=1",
    "WORKDIR /",
    "EXPOSE 8000",
    "LABEL org.opencontainers.image.title=evalprov-standin",
]


class _TarBuilder:
    def __init__(self):
        self.entries: dict[str, tuple] = {}

    def _info(self, name: str, kind, mode: int, mtime: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name.lstrip("/"))
        ti.type = kind
        ti.mode = mode
        ti.mtime = mtime
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        return ti

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.entries.setdefault(name.rstrip("/") or "/", ("dir", mode))

    def symlink(self, name: str, target: str) -> None:
        self.entries.setdefault(name, ("sym", target))

    def file(
        self,
        name: str,
        *,
        src: str | None = None,
        data: bytes | None = None,
        mode: int | None = None,
    ) -> None:
        self.entries.setdefault(name, ("file", src, data, mode))

    def write(self, fileobj) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.GNU_FORMAT)  # noqa: SIM115 - closed at the end
        # Parent directories first, then everything in sorted order.
        for name in list(self.entries):
            parent = os.path.dirname(name)
            while parent not in ("/", ""):
                self.entries.setdefault(parent, ("dir", 0o755))
                parent = os.path.dirname(parent)
        for name in sorted(self.entries):
            e = self.entries[name]
            if e[0] == "dir":
                self.tar.addfile(self._info(name, tarfile.DIRTYPE, e[1], FIXED_MTIME))
            elif e[0] == "sym":
                ti = self._info(name, tarfile.SYMTYPE, 0o777, FIXED_MTIME)
                ti.linkname = e[1]
                self.tar.addfile(ti)
            else:
                _, src, data, mode = e
                if src is not None:
                    st = os.stat(src)
                    ti = self._info(
                        name, tarfile.REGTYPE, mode or (st.st_mode & 0o7777), int(st.st_mtime)
                    )
                    ti.size = st.st_size
                    with open(src, "rb") as f:
                        self.tar.addfile(ti, f)
                else:
                    ti = self._info(name, tarfile.REGTYPE, mode or 0o644, FIXED_MTIME)
                    ti.size = len(data)
                    self.tar.addfile(ti, io.BytesIO(data))
        self.tar.close()


def _ldd(paths: list[str]) -> set[str]:
    libs: set[str] = set()
    for i in range(0, len(paths), 50):
        out = run(["ldd", *paths[i : i + 50]], check=False, timeout=30).stdout.decode()
        for m in re.finditer(r"(?:=>\s*)?(/\S+)\s+\(0x", out):
            libs.add(m.group(1))
    return libs


def _add_lib(tb: _TarBuilder, path: str) -> None:
    """Add a shared library at its real path plus the name ldd used (merged-/usr aware)."""
    real = os.path.realpath(path)
    tb.file(real, src=real)
    alias = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if alias != real:
        tb.symlink(alias, real)


def build_rootfs(out: Path) -> str:
    """Write the stand-in rootfs tar to ``out``; return its sha256."""
    for need in (PYTHON, STDLIB, BUSYBOX):
        if not os.path.exists(need):
            raise TestbedError(f"{need} missing; run .ci/setup-testbed.sh")
    tb = _TarBuilder()

    # top-level layout as on this (merged-/usr) machine
    for top in ("bin", "lib", "lib64", "sbin"):
        p = f"/{top}"
        if os.path.islink(p):
            tb.symlink(p, os.readlink(p))
    for d, mode in (
        ("/tmp", 0o1777),
        ("/var/tmp", 0o1777),
        ("/root", 0o700),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/dev", 0o755),
        ("/run", 0o755),
        ("/etc", 0o755),
        ("/opt", 0o755),
        ("/usr/lib64", 0o755),
    ):
        tb.dir(d, mode)

    # python + stdlib
    real_python = os.path.realpath(PYTHON)
    tb.file("/usr/bin/python3.11", src=real_python)
    tb.symlink("/usr/bin/python3", "python3.11")
    tb.symlink("/usr/bin/python", "python3.11")
    sos = [real_python]
    for root, dirs, files in os.walk(STDLIB):
        rel = os.path.relpath(root, STDLIB)
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS and not d.startswith("config-")]
        dirs.sort()
        for fn in sorted(files):
            if rel == "." and fn in STDLIB_SKIP_FILES:
                continue
            if ".opt-1." in fn or ".opt-2." in fn:
                continue
            src = os.path.join(root, fn)
            if not os.path.isfile(src):  # dangling symlink
                continue
            tb.file(
                os.path.join(STDLIB, rel, fn) if rel != "." else os.path.join(STDLIB, fn),
                src=os.path.realpath(src),
            )
            if fn.endswith(".so"):
                sos.append(src)
    for lib in sorted(_ldd(sos)):
        _add_lib(tb, lib)

    # busybox: /bin/sh and friends
    tb.file("/usr/bin/busybox", src=BUSYBOX)
    applets = run([BUSYBOX, "--list-full"]).stdout.decode().split()
    for a in applets:
        dest = "/" + a if a.startswith("usr/") else "/usr/" + a
        if dest not in tb.entries:
            tb.symlink(dest, "/usr/bin/busybox")

    # the stand-in
    tb.file("/usr/local/lib/evalprov-standin/server.py", src=str(SERVER_PY), mode=0o644)
    tb.file("/usr/local/bin/vllm", data=LAUNCHER.encode(), mode=0o755)
    tb.file(
        "/etc/passwd",
        data=b"root:x:0:0:root:/root:/bin/sh\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    tb.file("/etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
    tb.file("/etc/os-release", data=b'NAME="evalprov stand-in"\nID=evalprov-standin\n')

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".partial-{os.getpid()}")  # fleets in other processes build too
    h = hashlib.sha256()

    class _Hashing(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            h.update(b)
            return self.f.write(b)

    with open(tmp, "wb") as f:
        tb.write(_Hashing(f))
    tmp.replace(out)
    return h.hexdigest()


def import_and_push(
    fleet, tar: Path, refs: list[str], changes: list[str], builder: str | None = None
) -> dict[str, float]:
    """``docker import`` ``tar`` on a fake host's dockerd, tag it as every ref in
    ``refs`` (registry refs, 10.213.<net>.1:5000/...), push them, remove them again
    from that host. Returns timings."""
    if builder is None:
        docker_hosts = [h.name for h in fleet.hosts if h.docker]
        if not docker_hosts:
            raise TestbedError("building an image needs a fleet host with docker=True")
        builder = docker_hosts[0]
    t = {}
    t0 = time.monotonic()
    args = ["import"]
    for c in changes:
        args += ["--change", c]
    fleet.docker(builder, *args, str(tar), refs[0], timeout=300)
    for ref in refs[1:]:
        fleet.docker(builder, "tag", refs[0], ref)
    t["import"] = time.monotonic() - t0
    t0 = time.monotonic()
    for ref in refs:
        fleet.docker(builder, "push", ref, timeout=300)
    t["push"] = time.monotonic() - t0
    fleet.docker(builder, "rmi", *refs, check=False)
    return t


def ensure_standin_image(fleet, *, force: bool = False, builder: str | None = None) -> dict:
    """Make sure the registry has ``vllm/vllm-openai:evalprov-standin`` for the current
    server.py; build and push it only when missing. Returns what happened + timings.
    One process at a time on the machine (the tar cache and registry storage are shared)."""
    from .util import machine_lock

    with machine_lock("images"):
        return _ensure_standin_image(fleet, force=force, builder=builder)


def _ensure_standin_image(fleet, *, force: bool, builder: str | None) -> dict:
    t0 = time.monotonic()
    tar = IMAGE_CACHE / "evalprov-standin.tar"
    sha = build_rootfs(tar)
    t_build = time.monotonic() - t0
    content_tag = f"{STANDIN_TAG}-{sha[:12]}"
    reg = fleet.registry
    prefix = reg.addr
    info = {
        "image": STANDIN_IMAGE,
        "registry_ref": f"{prefix}/{STANDIN_IMAGE}",
        "content_tag": content_tag,
        "built": False,
        "build_s": round(t_build, 3),
        "tar_bytes": tar.stat().st_size,
    }
    have = reg.manifest_digest(STANDIN_REPO, content_tag)
    main = reg.manifest_digest(STANDIN_REPO, STANDIN_TAG)
    if not force and have is not None and have == main:
        info["digest"] = main
        return info
    timings = import_and_push(
        fleet,
        tar,
        [f"{prefix}/{STANDIN_IMAGE}", f"{prefix}/{STANDIN_REPO}:{content_tag}"],
        IMAGE_CHANGES,
        builder=builder,
    )
    info.update({f"{k}_s": round(v, 3) for k, v in timings.items()})
    info["built"] = True
    info["digest"] = reg.manifest_digest(STANDIN_REPO, STANDIN_TAG)
    return info


def run_standin_locally(port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """Start server.py on 127.0.0.1 (no container) — handy for unit tests of clients."""
    return subprocess.Popen(
        [
            PYTHON if os.path.exists(PYTHON) else "python3",
            "-u",
            str(SERVER_PY),
            "serve",
            "standin-model",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
