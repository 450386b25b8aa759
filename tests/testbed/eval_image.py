"""Build an eval-factory-style container image that runs NVIDIA's real harness, offline.

Like NVIDIA's eval-factory containers, the image has ``nemo-evaluator`` (with
nvidia-lm-eval and nvidia-simple-evals) on PATH, so a fleet host can run::

    docker run --rm --network host -v HOSTDIR:/work IMAGE \\
        nemo-evaluator run_eval --run_config /work/run_config.yml

No Docker Hub and no ``docker build``: the rootfs is a tar made from this machine's files,

* Debian's /usr/bin/python3.11 (3.11.2) + its stdlib (tests, tkinter, the static
  libpython in config-3.11-*, ... left out) + /usr/bin/bash (run_eval runs its
  harness commands with ``bash``) + busybox-static for sh and the usual tools;
* a venv at /opt/evalprov/harness-venv whose site-packages are copied from the machine's
  harness venv (scripts/install-harness; built by pyenv's 3.11.7 — same cp311 ABI and .pyc
  magic, so wheels and the compiled .pyc files work unchanged on 3.11.2). Its pyvenv.cfg
  says ``home = /usr/bin``, bin/python* point at /usr/bin/python3.11 and every console
  script's shebang at the image's venv python. Packages' own test suites (``tests``
  directories of numpy, scipy, pandas, ...; never imported at run time) are left out;
* every shared library ``ldd`` names for the binaries and all extension modules (the
  libraries wheels bundle in ``*.libs`` come along with site-packages);
* evalprov's sample datasets (evalprov/data/samples) at /opt/evalprov/samples, which is
  also the WorkingDir: ``datasets.load_dataset("google/IFEval")`` resolves it there;
* ENV exactly as ``evalprov.harness.harness_env()`` sets it for that venv and samples
  dir (PATH with the venv's bin first, HF/transformers offline, telemetry off, NLTK_DATA,
  NO_PROXY for loopback), HOME=/root.

The tar is streamed (never held in memory) straight into ``docker import -`` on a fake
host's dockerd and pushed to the fleet's registry as
``<registry>/evalprov/nemo-evaluator-harness:<nvidia-lm-eval version>`` plus a cache tag
``<version>-<fingerprint12>``.  It is deterministic: sorted entries, uid/gid 0, source
mtimes kept (the .pyc files check them), generated files at a fixed mtime.  The
fingerprint hashes every entry's name, type, mode, mtime, size, link target (and the bytes
of generated files) plus the image config, so it is known before any byte is read; when
the registry already has the cache tag (and the main tag points at the same manifest),
nothing is built or pushed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from evalprov import harness as evh

from .registry import CACHE_ROOT
from .util import TestbedError, http_request, run

IMAGE_REPO = "evalprov/nemo-evaluator-harness"
IMAGE_VENV = evh.DEFAULT_VENV  # /opt/evalprov/harness-venv, as on a host
IMAGE_SAMPLES = "/opt/evalprov/samples"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_NET = 77
REGISTRY_PORT = 5000

PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
BASH = "/usr/bin/bash"
BUSYBOX = "/usr/bin/busybox"
DOCKER_CLI = "/usr/bin/docker"  # Debian's, matching the fake hosts' dockerd 20.10
CLI_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FIXED_MTIME = 1_700_000_000
LDD_CACHE = CACHE_ROOT / "images" / "eval-image-ldd.json"
LAYOUT_VERSION = 1  # bump when the image layout changes without any input changing

# The harness the image must carry (exactly what scripts/install-harness installs).
REQUIRED = {"nvidia-lm-eval": "26.3", "nvidia-simple-evals": "26.3", "nemo-evaluator": "0.2.8"}
TAG_FROM = "nvidia-lm-eval"  # the image tag is this package's version, like eval-factory's

STDLIB_SKIP_DIRS = {"test", "idlelib", "tkinter", "turtledemo", "site-packages", "dist-packages"}
STDLIB_SKIP_FILES = {"sitecustomize.py", "EXTERNALLY-MANAGED"}
DYNLOAD_SKIP = re.compile(r"^(_test|_ctypes_test|_xxtestfuzz|xxlimited|_xxsubinterpreters)")
# Package test suites: never imported at run time (~160 MB). The harness packages' own
# trees are copied whole whatever their directories are called.
SITE_SKIP_DIRNAMES = {"tests"}
SITE_KEEP_WHOLE = {"lm_eval", "nemo_evaluator", "simple_evals", "core_evals"}
VENV_BIN_SKIP = {"python", "python3", "python3.11", "Activate.ps1", "activate.csh", "activate.fish"}

# What the last eval_image_info() call did (timings etc.), for callers that only got a ref.
LAST_INFO: dict = {}


# ----------------------------------------------------------------- the tar
class RootfsTar:
    """Entries of a rootfs, written as a deterministic tar stream.

    Only metadata is kept in memory; file contents are read from disk while writing."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple] = {}

    @staticmethod
    def _norm(name: str) -> str:
        return "/" + name.strip("/")

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.entries.setdefault(self._norm(name), ("dir", mode))

    def symlink(self, name: str, target: str) -> None:
        self.entries.setdefault(self._norm(name), ("sym", target))

    def file(self, name: str, src: str, mode: int | None = None) -> None:
        st = os.stat(src)
        self.entries.setdefault(
            self._norm(name),
            (
                "file",
                src,
                mode if mode is not None else st.st_mode & 0o7777,
                int(st.st_mtime),
                st.st_size,
            ),
        )

    def data(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.entries.setdefault(self._norm(name), ("data", data, mode))

    def _complete(self) -> list[str]:
        for name in list(self.entries):
            parent = os.path.dirname(name)
            while parent not in ("/", "") and parent not in self.entries:
                self.entries[parent] = ("dir", 0o755)
                parent = parent.rsplit("/", 1)[0]
        return sorted(self.entries)

    def fingerprint(self, extra: object = None) -> str:
        """sha256 over every entry's metadata (and generated files' bytes) + ``extra``."""
        h = hashlib.sha256(f"layout {LAYOUT_VERSION}\n".encode())
        for name in self._complete():
            e = self.entries[name]
            if e[0] == "file":
                rec = [name, "file", e[2], e[3], e[4]]
            elif e[0] == "data":
                rec = [name, "data", e[2], hashlib.sha256(e[1]).hexdigest()]
            else:
                rec = [name, *e]
            h.update(json.dumps(rec).encode() + b"\n")
        h.update(json.dumps(extra, sort_keys=True).encode())
        return h.hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(e[4] for e in self.entries.values() if e[0] == "file") + sum(
            len(e[1]) for e in self.entries.values() if e[0] == "data"
        )

    def write(self, fileobj: BinaryIO) -> str:
        """Stream the tar to ``fileobj``; return the sha256 of the bytes written."""
        h = hashlib.sha256()
        sink = _Hashing(fileobj, h)
        bufsize = 1 << 20
        tar = tarfile.open(  # noqa: SIM115 - closed below
            fileobj=sink, mode="w|", format=tarfile.GNU_FORMAT, bufsize=bufsize
        )
        tar.copybufsize = bufsize
        try:
            for name in self._complete():
                e = self.entries[name]
                ti = tarfile.TarInfo(name.lstrip("/"))
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                ti.mtime = FIXED_MTIME
                if e[0] == "dir":
                    ti.type, ti.mode = tarfile.DIRTYPE, e[1]
                    tar.addfile(ti)
                elif e[0] == "sym":
                    ti.type, ti.mode, ti.linkname = tarfile.SYMTYPE, 0o777, e[1]
                    tar.addfile(ti)
                elif e[0] == "data":
                    ti.mode, ti.size = e[2], len(e[1])
                    tar.addfile(ti, io.BytesIO(e[1]))
                else:
                    _, src, mode, mtime, size = e
                    ti.mode, ti.mtime, ti.size = mode, mtime, size
                    with open(src, "rb") as f:
                        if os.fstat(f.fileno()).st_size != size:
                            raise TestbedError(f"{src} changed while the image was built")
                        tar.addfile(ti, f)
        finally:
            tar.close()
        return h.hexdigest()


class _Hashing(io.RawIOBase):
    def __init__(self, f: BinaryIO, h) -> None:
        self.f, self.h = f, h

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        self.f.write(b)
        return len(b)


class _Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return len(b)


# ------------------------------------------------------------- the contents
def _ldd(paths: list[str]) -> set[str]:
    """Every library ``ldd`` resolves for ``paths``. Per-file results are cached in
    LDD_CACHE keyed by the file's path, size and mtime and /etc/ld.so.cache's mtime
    (ldd runs the loader on every file: ~2-4 s for the ~420 files here)."""
    try:
        ld_cache = str(os.stat("/etc/ld.so.cache").st_mtime_ns)
    except OSError:
        ld_cache = "-"

    def key(p: str) -> str:
        st = os.stat(p)
        return f"{p}|{st.st_size}|{st.st_mtime_ns}|{ld_cache}"

    try:
        cache = json.loads(LDD_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    keys = {p: key(p) for p in paths}
    todo = [p for p in paths if keys[p] not in cache]
    for i in range(0, len(todo), 64):
        batch = todo[i : i + 64]
        out = run(["ldd", *batch], check=False, timeout=60).stdout.decode()
        found: dict[str, list[str]] = {p: [] for p in batch}
        cur = batch[0] if len(batch) == 1 else None
        for line in out.splitlines():
            if not line[:1].isspace() and line.endswith(":") and line[:-1] in found:
                cur = line[:-1]
                continue
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m and cur is not None:
                found[cur].append(m.group(1))
        for p, libs in found.items():
            cache[keys[p]] = sorted(set(libs))
    if todo:
        LDD_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = LDD_CACHE.with_name(f"{LDD_CACHE.name}.{os.getpid()}")
        keep = set(keys.values())
        tmp.write_text(json.dumps({k: v for k, v in cache.items() if k in keep}, indent=0))
        tmp.replace(LDD_CACHE)
    return {lib for p in paths for lib in cache[keys[p]]}


def _add_lib(tb: RootfsTar, path: str) -> None:
    """A shared library at its real path plus the name ldd used (merged-/usr aware)."""
    real = os.path.realpath(path)
    tb.file(real, real)
    alias = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if alias != real:
        tb.symlink(alias, os.path.relpath(real, os.path.dirname(alias)))


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _dist_versions(site: Path) -> dict[str, str]:
    out = {}
    for meta in site.glob("*.dist-info/METADATA"):
        name = version = None
        with open(meta, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Name:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("Version:"):
                    version = line.split(":", 1)[1].strip()
                if (name and version) or not line.strip():
                    break
        if name and version:
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def source_venv() -> Path:
    """The machine's harness venv the image's site-packages come from."""
    return evh.harness_venv()


def _site_packages(venv: Path) -> Path:
    site = venv / "lib" / "python3.11" / "site-packages"
    if not site.is_dir():
        raise TestbedError(
            f"{site} missing: the harness venv must be CPython 3.11 (run scripts/install-harness)"
        )
    return site


def image_env() -> dict[str, str]:
    """The image's ENV: what evalprov.harness.harness_env() sets for the image's venv and
    samples dir, on top of a minimal base."""
    base = {"PATH": IMAGE_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    env = evh.harness_env(venv=IMAGE_VENV, samples_dir=IMAGE_SAMPLES, base=base)
    env["PYTHONUNBUFFERED"] = "1"
    return dict(sorted(env.items()))


_UNSAFE_ENV = re.compile(r"[^\w/:.,=+@%-]")


def image_changes(version: str, fingerprint: str | None = None) -> list[str]:
    """``docker import --change`` lines (Dockerfile syntax)."""
    out = ["ENTRYPOINT []", 'CMD ["nemo-evaluator", "ls"]', f"WORKDIR {IMAGE_SAMPLES}"]
    for k, v in image_env().items():
        out.append(f"ENV {k}={json.dumps(v) if _UNSAFE_ENV.search(v) else v}")
    out += [
        "LABEL org.opencontainers.image.title=evalprov-nemo-evaluator-harness",
        f"LABEL org.opencontainers.image.version={version}",
        "LABEL org.evalprov.harness=" + ",".join(f"{k}=={v}" for k, v in sorted(REQUIRED.items())),
    ]
    if fingerprint:
        out.append(f"LABEL org.evalprov.fingerprint={fingerprint}")
    return out


def collect(venv: Path | None = None, samples: Path | None = None) -> tuple[RootfsTar, str]:
    """Every entry of the image's rootfs; returns (entries, image tag version)."""
    venv = Path(venv) if venv else source_venv()
    samples = Path(samples) if samples else evh.SAMPLES_DIR
    for need in (PYTHON, STDLIB, BASH, BUSYBOX):
        if not os.path.exists(need):
            raise TestbedError(f"{need} missing; run .ci/setup-testbed.sh")
    site = _site_packages(venv)
    versions = _dist_versions(site)
    wrong = {k: versions.get(k) for k, v in REQUIRED.items() if versions.get(k) != v}
    if wrong:
        raise TestbedError(f"harness venv {venv} has {wrong}, the image needs {REQUIRED}")
    tb = RootfsTar()
    elves: list[str] = []

    # top level, merged /usr like this machine
    for top in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{top}"):
            tb.symlink(f"/{top}", os.readlink(f"/{top}"))
    for d, mode in (
        ("/tmp", 0o1777),
        ("/var/tmp", 0o1777),
        ("/root", 0o700),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/dev", 0o755),
        ("/run", 0o755),
        ("/etc", 0o755),
        ("/work", 0o755),
        ("/usr/lib64", 0o755),
        ("/usr/local/bin", 0o755),
    ):
        tb.dir(d, mode)

    # python + stdlib
    tb.file(PYTHON, os.path.realpath(PYTHON))
    tb.symlink("/usr/bin/python3", "python3.11")
    elves.append(os.path.realpath(PYTHON))
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
            if rel == "lib-dynload" and DYNLOAD_SKIP.match(fn):
                continue
            src = os.path.join(root, fn)
            if not os.path.isfile(src):  # dangling symlink
                continue
            tb.file(os.path.normpath(os.path.join(STDLIB, rel, fn)), os.path.realpath(src))
            if fn.endswith(".so"):
                elves.append(src)

    # bash (run_eval starts harness commands with `bash FILE`) + busybox for the rest
    tb.file("/usr/bin/bash", os.path.realpath(BASH))
    elves.append(os.path.realpath(BASH))
    tb.file("/usr/bin/busybox", os.path.realpath(BUSYBOX))
    for a in run([BUSYBOX, "--list-full"]).stdout.decode().split():
        dest = "/" + a if a.startswith("usr/") else "/usr/" + a
        tb.symlink(dest, "/usr/bin/busybox")

    # the venv
    vroot = Path(IMAGE_VENV)
    tb.data(
        str(vroot / "pyvenv.cfg"),
        (
            "home = /usr/bin\n"
            "include-system-site-packages = false\n"
            f"version = {_python_version()}\n"
            f"executable = {PYTHON}\n"
            f"command = {PYTHON} -m venv {IMAGE_VENV}\n"
        ).encode(),
    )
    tb.symlink(str(vroot / "lib64"), "lib")
    tb.symlink(str(vroot / "bin" / "python3.11"), PYTHON)
    tb.symlink(str(vroot / "bin" / "python3"), "python3.11")
    tb.symlink(str(vroot / "bin" / "python"), "python3.11")
    shebang = re.compile(rb"^#!\S*python[0-9.]*")
    for entry in sorted(os.listdir(venv / "bin")):
        src = venv / "bin" / entry
        if entry in VENV_BIN_SKIP or not src.is_file():
            continue
        body = src.read_bytes()
        if body.startswith(b"#!"):
            first, nl, rest = body.partition(b"\n")
            first = shebang.sub(f"#!{IMAGE_VENV}/bin/python".encode(), first)
            body = first + nl + rest
        body = body.replace(str(venv).encode(), IMAGE_VENV.encode())  # activate's VIRTUAL_ENV
        tb.data(str(vroot / "bin" / entry), body, mode=src.stat().st_mode & 0o7777)
    stamp = venv / ".evalprov-harness"
    if stamp.is_file():
        tb.file(str(vroot / ".evalprov-harness"), str(stamp))
    _add_tree(tb, str(site), f"{IMAGE_VENV}/lib/python3.11/site-packages", elves)
    tb.dir(str(vroot / "include"))

    # every library the ELF files need from the system
    for lib in sorted(_ldd(elves)):
        if not lib.startswith(str(venv)) and not lib.startswith(str(site)):
            _add_lib(tb, lib)

    # the sample datasets, at a fixed path (also the WorkingDir)
    for root, dirs, files in os.walk(samples):
        dirs.sort()
        rel = os.path.relpath(root, samples)
        for fn in sorted(files):
            if fn.endswith((".pyc", ".pyo")):
                continue
            tb.file(
                os.path.normpath(os.path.join(IMAGE_SAMPLES, rel, fn)),
                os.path.join(root, fn),
                mode=0o644,
            )

    tb.data(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/bash\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )
    tb.data("/etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    tb.data("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")
    tb.data("/etc/os-release", b'NAME="evalprov nemo-evaluator harness"\nID=evalprov-harness\n')
    return tb, versions[TAG_FROM]


def _add_tree(tb: RootfsTar, src_root: str, dest_root: str, elves: list[str]) -> None:
    """Copy site-packages (scandir: one stat per file), leaving out SITE_SKIP_DIRNAMES
    except inside SITE_KEEP_WHOLE; collect the ELF files for ldd."""
    stack = [("", True)]
    while stack:
        rel, prune = stack.pop()
        with os.scandir(src_root + rel) as it:
            ents = sorted(it, key=lambda e: e.name)
        for e in ents:
            r = f"{rel}/{e.name}"
            if e.is_symlink():
                tb.symlink(dest_root + r, os.readlink(e.path))
            elif e.is_dir():
                if prune and e.name in SITE_SKIP_DIRNAMES:
                    continue
                stack.append((r, prune and not (rel == "" and e.name in SITE_KEEP_WHOLE)))
            else:
                st = e.stat()
                tb.entries.setdefault(
                    dest_root + r,
                    ("file", e.path, st.st_mode & 0o7777, int(st.st_mtime), st.st_size),
                )
                if ".so" in e.name and _is_elf(e.path):
                    elves.append(e.path)


def _python_version() -> str:
    out = run([PYTHON, "-c", "import platform; print(platform.python_version())"])
    return out.stdout.decode().strip()


# ----------------------------------------------------------- registry + fleet
def registry_addr(fleet) -> str:
    """host:port of the fleet's registry: fleet.registry.addr, else 10.213.<net>.1:5000
    (net = fleet.net, 77 for fleets without one)."""
    addr = getattr(getattr(fleet, "registry", None), "addr", None)
    if addr:
        return str(addr)
    net = getattr(fleet, "net", None)
    return f"10.213.{DEFAULT_NET if net is None else int(net)}.1:{REGISTRY_PORT}"


def image_refs(fleet, version: str, fingerprint: str) -> tuple[str, str]:
    """(main ref, cache ref) in the fleet's registry; Docker wants lowercase names."""
    base = f"{registry_addr(fleet)}/{IMAGE_REPO}".lower()
    return f"{base}:{version}".lower(), f"{base}:{version}-{fingerprint[:12]}".lower()


def _pushed_bytes(fleet, repo: str, tag: str) -> int | None:
    """Compressed size of ``repo:tag`` in the fleet's registry (sum of its layer blobs)."""
    status, _, body = http_request(
        f"{fleet.registry.url}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        timeout=10.0,
    )
    if status != 200:
        return None
    return sum(layer.get("size", 0) for layer in json.loads(body).get("layers") or [])


def _builder(fleet, builder: str | None) -> object:
    if builder is not None:
        return fleet.host(builder)
    for h in fleet.hosts:
        if h.docker:
            return h
    raise TestbedError("building the eval image needs a fleet host with docker=True")


def _docker_env(fleet, host) -> dict[str, str]:
    return {"PATH": CLI_PATH, "DOCKER_HOST": host.docker_host, "HOME": str(fleet.workdir)}


def _docker_cli() -> str:
    cli = DOCKER_CLI if os.path.exists(DOCKER_CLI) else shutil.which("docker", path=CLI_PATH)
    if not cli:
        raise TestbedError("docker CLI not found; run .ci/setup-testbed.sh")
    return cli


def stream_import(
    fleet, host, tb: RootfsTar, ref: str, changes: list[str], *, timeout: float = 900.0
) -> str:
    """Write the tar straight into ``docker import -`` on ``host``'s dockerd; return the
    tar's sha256."""
    argv = [_docker_cli(), "import"]
    for c in changes:
        argv += ["--change", c]
    argv += ["-", ref]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=out,
            env=_docker_env(fleet, host),
            start_new_session=True,
        )
        timer = _Deadline(proc, timeout)
        try:
            try:
                sha = tb.write(proc.stdin)
                proc.stdin.close()
            except (BrokenPipeError, OSError) as exc:
                proc.kill()
                proc.wait(timeout=30)
                out.seek(0)
                raise TestbedError(
                    f"docker import stopped reading: {exc}\n"
                    f"{out.read().decode(errors='replace')[-2000:]}"
                ) from exc
            rc = proc.wait(timeout=max(1.0, timer.left()))
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait(timeout=30)
            raise TestbedError(f"docker import timed out after {timeout}s") from exc
        finally:
            timer.cancel()
        if rc != 0 or timer.fired:
            out.seek(0)
            raise TestbedError(
                f"docker import exited {rc}"
                f"{' (deadline)' if timer.fired else ''}: "
                f"{out.read().decode(errors='replace')[-2000:]}"
            )
    return sha


class _Deadline:
    """Kill ``proc`` when ``timeout`` passes (the writer may block on a full pipe)."""

    def __init__(self, proc: subprocess.Popen, timeout: float) -> None:
        import threading

        self.end = time.monotonic() + timeout
        self.fired = False
        self._t = threading.Timer(timeout, self._fire, args=(proc,))
        self._t.daemon = True
        self._t.start()

    def _fire(self, proc: subprocess.Popen) -> None:
        self.fired = True
        proc.kill()

    def left(self) -> float:
        return self.end - time.monotonic()

    def cancel(self) -> None:
        self._t.cancel()


def eval_image_info(fleet, *, force: bool = False, builder: str | None = None) -> dict:
    """Make sure the fleet's registry has the harness image for the current harness venv,
    samples and evalprov.harness env; build (streamed) and push only when missing.
    Returns what happened, with timings; ``info["ref"]`` is the ref for a task's
    ``container:``. One process at a time on the machine (registry storage is shared)."""
    from .util import machine_lock

    with machine_lock("images"):
        return _eval_image_info(fleet, force=force, builder=builder)


def _eval_image_info(fleet, *, force: bool, builder: str | None) -> dict:
    global LAST_INFO
    t0 = time.monotonic()
    tb, version = collect()
    probe = image_changes(version)
    fp = tb.fingerprint(probe)
    changes = image_changes(version, fp)
    ref, cache_ref = image_refs(fleet, version, fp)
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    info: dict = {
        "ref": ref,
        "cache_ref": cache_ref,
        "fingerprint": fp,
        "entries": len(tb.entries),
        "content_bytes": tb.total_bytes,
        "collect_s": round(time.monotonic() - t0, 3),
        "built": False,
    }
    reg = fleet.registry
    main = reg.manifest_digest(repo, version)
    if (
        not force
        and main is not None
        and reg.manifest_digest(repo, cache_ref.rsplit(":", 1)[1]) == main
    ):
        info["digest"] = main
        info["pushed_bytes"] = _pushed_bytes(fleet, repo, version)
        LAST_INFO = info
        return info
    host = _builder(fleet, builder)
    t1 = time.monotonic()
    info["tar_sha256"] = stream_import(fleet, host, tb, ref, changes)
    info["build_import_s"] = round(time.monotonic() - t1, 3)
    fleet.docker(host.name, "tag", ref, cache_ref)
    insp = json.loads(fleet.docker(host.name, "image", "inspect", ref).stdout)
    info["image_bytes"] = insp[0]["Size"]
    t1 = time.monotonic()
    for r in (ref, cache_ref):
        fleet.docker(host.name, "push", r, timeout=900)
    info["push_s"] = round(time.monotonic() - t1, 3)
    fleet.docker(host.name, "rmi", ref, cache_ref, check=False)
    info["built"] = True
    info["digest"] = reg.manifest_digest(repo, version)
    info["pushed_bytes"] = _pushed_bytes(fleet, repo, version)
    LAST_INFO = info
    return info


def ensure_eval_image(fleet, force: bool = False) -> str:
    """The ref (in the fleet's registry) of the harness image, built and pushed if missing.
    Details of what happened: ``LAST_INFO``."""
    return eval_image_info(fleet, force=force)["ref"]


def build_tar(out: BinaryIO | None = None) -> dict:
    """Build the rootfs tar into ``out`` (default: discard) — for timing and determinism
    checks. Returns fingerprint, tar sha256, sizes and seconds."""
    t0 = time.monotonic()
    tb, version = collect()
    fp = tb.fingerprint(image_changes(version))
    t1 = time.monotonic()
    sha = tb.write(out if out is not None else _Null())
    return {
        "version": version,
        "fingerprint": fp,
        "tar_sha256": sha,
        "entries": len(tb.entries),
        "content_bytes": tb.total_bytes,
        "collect_s": round(t1 - t0, 3),
        "write_s": round(time.monotonic() - t1, 3),
    }


def run_argv(ref: str, host_workdir: str, run_config: str = "/work/run_config.yml") -> list[str]:
    """The docker argv that runs one evaluation in the image (HOSTDIR mounted at /work)."""
    return [
        "docker",
        "run",
        "--rm",
        "--network",
        "host",
        "-v",
        f"{host_workdir}:/work",
        ref,
        "nemo-evaluator",
        "run_eval",
        "--run_config",
        run_config,
    ]


def run_command(ref: str, host_workdir: str) -> str:
    return shlex.join(run_argv(ref, host_workdir))
