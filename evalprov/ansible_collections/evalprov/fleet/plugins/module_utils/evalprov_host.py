"""What evalprov's modules read on a host, written once: /proc (process state, listening
ports), dockerd's API over its socket, the process runtime's state files, and the HTTP
health of an instance."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

DOCKER_SOCK = "/var/run/docker.sock"


# ---------------------------------------------------------------------------- /proc


def proc_stat(pid):
    """(state letter, start time in clock ticks) of a pid, or None when it is gone."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().split(") ", 1)[1].split()
    except (OSError, ValueError, TypeError, IndexError):
        return None
    return fields[0], fields[19]


def pid_alive(pid):
    st = proc_stat(pid) if pid else None
    return st is not None and st[0] not in ("Z", "X")


def is_ours(record):
    """The recorded process still runs: same pid AND same start time (no pid reuse)."""
    st = proc_stat(record.get("pid")) if record.get("pid") else None
    return st is not None and st[0] not in ("Z", "X") and st[1] == record.get("start_time")


def listening_ports():
    """TCP ports with a listening socket on this host (any address, v4 and v6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return sorted(ports)


# ---------------------------------------------------------------------------- process runtime


# the proxy in front of a host's instances (evalprov.plan.PROXY_NAME): a supervised haproxy
# whose state file lies beside the process runtime's instances
PROXY_NAME = "evalprov-lb"
PROXY_BACKEND = "evalprov_vllm"


def haproxy_path():
    """Debian's haproxy on this host ("" none): on PATH, or in sbin when PATH lacks it."""
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        "")


def proxy_servers(stats_port):
    """server name -> (UP?, requests so far) of the proxy's backend, from its loopback stats
    CSV ({} when the stats do not answer)."""
    import csv
    import io

    status, body = http_get(f"http://127.0.0.1:{int(stats_port)}/stats;csv", timeout=3)
    text = body.decode("utf-8", "replace").lstrip()
    if status != 200 or not text.startswith("# pxname,"):
        return {}
    header, _, rest = text.partition("\n")
    fields = header[2:].rstrip(",").split(",")
    out = {}
    for row in csv.DictReader(io.StringIO(rest), fieldnames=fields, restkey="_"):
        if row.get("pxname") == PROXY_BACKEND and row.get("svname") not in (
                "FRONTEND", "BACKEND", None):
            up = (row.get("status") or "").split(" ", 1)[0] == "UP"
            count = row.get("req_tot") or row.get("stot") or "0"
            out[row["svname"]] = (up, int(count) if count.isdigit() else 0)
    return out


PROXY_BEFORE = "proxy-before.json"


def proxy_mark(run_dir, stats_port):
    """Keep the proxy's request counts as the tasks start (its counters run since it
    started)."""
    counts = {name: n for name, (_, n) in proxy_servers(stats_port).items()}
    with open(os.path.join(run_dir, PROXY_BEFORE), "w") as f:
        json.dump({"stats_port": stats_port, "requests": counts}, f)


def proxy_requests(run_dir):
    """Requests each server behind the proxy answered since proxy_mark ({} without one)."""
    try:
        with open(os.path.join(run_dir, PROXY_BEFORE)) as f:
            before = json.load(f)
    except (OSError, ValueError):
        return {}
    now = proxy_servers(before["stats_port"])
    return {name: n - before["requests"].get(name, 0) for name, (_, n) in now.items()}


def read_state(state_dir, name):
    """The process runtime's state file of an instance ({} when there is none)."""
    try:
        with open(os.path.join(state_dir, name + ".json")) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def group_mark_path(state_dir, group):
    """A node group's mark on one member (not *.json: the mark is no instance)."""
    return os.path.join(state_dir, group + ".group")


def read_group_mark(state_dir, group, run):
    """This run's mark of the group on this host ({} none): state ready (the head serves)
    or failed (a member failed: reason, by)."""
    try:
        with open(group_mark_path(state_dir, group)) as f:
            mark = json.load(f)
    except (OSError, ValueError):
        return {}
    return mark if isinstance(mark, dict) and mark.get("run") == run else {}


def write_group_mark(state_dir, group, run, state, reason="", by=""):
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = group_mark_path(state_dir, group)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump({"run": run, "state": state, "reason": reason, "by": by}, f)
    os.replace(tmp, path)


def state_names(state_dir):
    try:
        return sorted(f[:-5] for f in os.listdir(state_dir) if f.endswith(".json"))
    except OSError:
        return []


# ---------------------------------------------------------------------------- dockerd


class _UnixHTTP(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(DOCKER_SOCK)


def docker_api(path, timeout=20):
    """GET on dockerd's API over its socket: (status, parsed JSON or None); (0, None) when
    dockerd does not answer."""
    conn = _UnixHTTP("localhost", timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, (json.loads(body) if body[:1] in (b"{", b"[") else None)
    except (OSError, ValueError):
        return 0, None
    finally:
        conn.close()


def quote(text):
    return urllib.parse.quote(text, safe="")


def containers(label):
    """Containers (all states) with a label, as dockerd lists them."""
    flt = quote(json.dumps({"label": [label]}))
    status, found = docker_api(f"/containers/json?all=1&filters={flt}")
    return found if status == 200 and isinstance(found, list) else []


def container_state(name):
    """running, status, exit code and restart count of a container; None without dockerd."""
    status, c = docker_api(f"/containers/{quote(name)}/json")
    if status == 0:
        return None
    if status != 200 or not isinstance(c, dict):
        return {"running": False, "status": "missing", "exit_code": None, "restarts": 0}
    st = c.get("State") or {}
    return {"running": bool(st.get("Running")), "status": st.get("Status", ""),
            "exit_code": st.get("ExitCode"), "restarts": int(c.get("RestartCount") or 0)}


# ---------------------------------------------------------------------------- why it stopped

# Lines that name why a server stopped, in vLLM's and Python's own words: the first one is
# quoted first, ahead of the errors it causes further down the log.
DECISIVE = ("must be divisible by", "out of memory", "OutOfMemoryError", "No such file",
            "not found", "Permission denied", "Address already in use", "ValueError:",
            "RuntimeError:", "OSError:", "ImportError:", "ModuleNotFoundError:", "error:")


def decisive_line(text):
    for line in text.splitlines():
        if any(k in line for k in DECISIVE):
            return line.strip()[:300]
    return ""


# ---------------------------------------------------------------------------- HTTP health


def http_get(url, timeout=3, headers=None):
    try:
        req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status, resp.read(65536)
    except Exception:
        return 0, b""


def http_answer(url, timeout=10):
    """(status, what): the HTTP status (0: no answer) and the first line of an error's body,
    or why nothing answered."""
    try:
        req = urllib.request.Request(url)  # noqa: S310 - the task's own server
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, ""
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(1024).decode(errors="replace").strip()
        except Exception:
            body = ""
        try:  # vLLM's (and OpenAI's) JSON error: its message
            data = json.loads(body)
            err = data.get("error") if isinstance(data.get("error"), dict) else data
            body = str(err.get("message") or body)
        except (ValueError, AttributeError):
            pass
        return exc.code, (body.splitlines() or [""])[0][:300]
    except Exception as exc:
        return 0, str(getattr(exc, "reason", exc))[:300]


def health(port, health_path, served, api_key=None, host="127.0.0.1"):
    """(serving, reason): /health answers 200 and /v1/models lists the served name (asked
    with the deployment's API key, when its servers require one) at host:port."""
    status, _ = http_get(f"http://{host}:{port}{health_path}")
    if status != 200:
        return False, f"{health_path} not 200"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    status, body = http_get(f"http://{host}:{port}/v1/models", headers=headers)
    try:
        ids = [m.get("id") for m in json.loads(body or b"{}").get("data", [])]
    except (ValueError, AttributeError):
        ids = []
    if status != 200 or (served and served not in ids):
        return False, f"/v1/models lists {ids}, not {served}"
    return True, ""


# ---------------------------------------------------------------------------- secrets in memory

# A server container's secret environment never goes into its config (docker inspect, and
# dockerd's config.v2.json on disk): it is a JSON file on a tmpfs, readable by root only,
# mounted read-only at SECRETS_IN_CONTAINER; ENV_FROM_FILE, run in the container before
# its command, puts it into the environment and execs the command (argv[2:]).
MEMORY_DIR = "/run/evalprov"
SECRETS_IN_CONTAINER = "/run/evalprov-secrets.json"
ENV_FROM_FILE = (
    "import json, os, sys\n"
    "try:\n"
    "    f = open(sys.argv[1])\n"
    "except OSError as e:\n"
    "    sys.exit('evalprov: the secret environment is gone (' + e.strerror + '; the host "
    "rebooted?): run evalprov apply again')\n"
    "os.environ.update(json.load(f))\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")
MEMORY_FS = ("tmpfs", "ramfs")


def filesystem_of(path):
    """The type of the filesystem holding path (its longest mount point in mountinfo)."""
    path = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                point = left.split()[4].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, right.split()[0]
    except (OSError, IndexError):
        return ""
    return kind


def secret_file_path(name, directory=MEMORY_DIR):
    return os.path.join(directory, f"{name}.secrets.json")


def require_memory(directory):
    """ValueError unless directory is (or, once made, will be) on a filesystem in memory."""
    near = directory  # its nearest existing ancestor holds it once it is made
    while not os.path.isdir(near) and os.path.dirname(near) != near:
        near = os.path.dirname(near)
    kind = filesystem_of(near)
    if kind not in MEMORY_FS:
        raise ValueError(f"{directory} is on {kind or 'an unknown filesystem'}, not in memory "
                         "(tmpfs): evalprov never writes a secret to a disk; mount a tmpfs "
                         f"on {directory}")


def write_secret_file(path, values, dry=False):
    """values (a dict of str) as JSON in path, 0600, on a filesystem in memory only; True
    when the file changed (dry: would change, nothing written). Raises ValueError when
    path's filesystem is on a disk."""
    directory = os.path.dirname(path)
    require_memory(directory)
    if not dry:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    data = json.dumps({str(k): str(v) for k, v in sorted(values.items())}).encode()
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            if f.read() == data and st.st_mode & 0o777 == 0o600:
                return False
    except OSError:
        pass
    if dry:
        return True
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


def remove_file(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------- what a run starts


def write_pid(path, pid):
    """A pid file with the process's start time, so a reused pid is never taken for it."""
    st = proc_stat(pid)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": pid, "start_time": st[1] if st else None}, f)
    os.replace(tmp, path)


def read_pid(path):
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def write_json(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def start_detached(run_dir, files, work, what):
    """Run work() (returning a result dict) detached from the calling module: its own
    session, no inherited descriptors, stdio on /dev/null; files = (pid, progress, result)
    names in run_dir (the old progress and result are removed first). Returns its pid once
    its pid file is written."""
    pid_name, progress, result_name = files
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    for name in (progress, result_name):
        if os.path.exists(os.path.join(run_dir, name)):
            os.unlink(os.path.join(run_dir, name))
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child:
        os.close(ready_w)
        os.waitpid(child, 0)
        with os.fdopen(ready_r, "rb") as ready:
            pid = ready.read().decode() or "0"
        return int(pid)
    try:  # the intermediate child: a new session, then the runner, then gone
        os.close(ready_r)
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, ready_w)
        os.closerange(ready_w + 1, 65536)
        write_pid(os.path.join(run_dir, pid_name), os.getpid())
        os.write(ready_w, str(os.getpid()).encode())
        os.close(ready_w)
        try:
            result = work()
        except BaseException as exc:  # the controller must hear of it
            result = {"failed": True, "msg": f"{what} failed: {type(exc).__name__}: {exc}"}
        write_json(os.path.join(run_dir, result_name), result)
    finally:
        os._exit(0)


def poll_detached(run_dir, files, key, lost, wait=2.0, interval=0.2):
    """A detached runner's state (start_detached), waiting up to `wait` seconds for it to
    end: running (with its progress under `key`), or its result; failed (message `lost`)
    when it stopped without one."""
    pid_name, progress_name, result_name = files
    deadline = time.monotonic() + wait
    while True:
        result = read_json(os.path.join(run_dir, result_name))
        progress = read_json(os.path.join(run_dir, progress_name)) or {}
        if result is None:
            rec = read_pid(os.path.join(run_dir, pid_name))
            if not rec or not is_ours(rec):
                # it may have written its result just now
                result = read_json(os.path.join(run_dir, result_name))
                if result is None:
                    return {"failed": True, "running": False, key: progress, "msg": lost}
        if result is not None:
            return {**result, "running": False, key: progress}
        if time.monotonic() >= deadline:
            return {"changed": False, "running": True, key: progress}
        time.sleep(interval)


def stop_group(pid, grace=10.0):
    """SIGTERM the process group led by pid, SIGKILL what is left after grace seconds."""
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


# ---------------------------------------------------------------------------- provenance
#
# What a run's reproducibility record needs from the host, read once per run by the eval
# module: the vLLM version each instance reports, the image each one runs (id and repo
# digests, as `docker image inspect` shows them), the model's content hash or HF revision,
# and the harness package versions. A fact that cannot be read is None with the reason.

# Prints the versions of NVIDIA's harness packages as JSON (run by the harness's python).
HARNESS_VERSIONS = (
    "import importlib.metadata as m, json\n"
    "out = {}\n"
    "for d in m.distributions():\n"
    "    n = (d.metadata['Name'] or '').lower().replace('_', '-')\n"
    "    if n.startswith(('nemo-evaluator', 'nvidia-', 'lm-eval')):\n"
    "        out[n] = d.version\n"
    "print(json.dumps(out, sort_keys=True))\n"
)


def vllm_version(port):
    """(version, reason) from the server's /version endpoint."""
    status, body = http_get(f"http://127.0.0.1:{int(port)}/version", timeout=5)
    if status != 200:
        return None, f"/version on port {port} answered {status or 'nothing'}"
    try:
        version = json.loads(body).get("version")
    except (ValueError, AttributeError):
        version = None
    if not isinstance(version, str) or not version:
        return None, f"/version on port {port} has no version"
    return version, ""


def image_info(ref):
    """The image as `docker image inspect` reports it: id, repo digests, tags."""
    status, img = docker_api(f"/images/{quote(ref)}/json")
    if status != 200 or not isinstance(img, dict):
        return {"id": None, "repo_digests": None, "repo_tags": None,
                "reason": f"dockerd has no image {ref} ({status or 'no answer'})"}
    return {"id": img.get("Id"), "repo_digests": sorted(img.get("RepoDigests") or []),
            "repo_tags": sorted(img.get("RepoTags") or [])}


def _file_sha256(path, deadline):
    import hashlib
    import time

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
            if time.monotonic() > deadline:
                return None


def checkpoint_hash(path, cache_file, budget=1800.0):
    """The content hash of a checkpoint directory: sha256 of the sorted manifest
    `<sha256 of the file>  <size>  <relative path>`, one line per file. File hashes are
    cached by (path, size, mtime) in cache_file, so a later run hashes only what changed;
    hashing stops after `budget` seconds (None, the reason; the next run goes on)."""
    import hashlib
    import time

    if not os.path.isdir(path):
        return {"sha256": None, "reason": f"{path} is not a directory on the host"}
    try:
        with open(cache_file) as f:
            cache = json.load(f)
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    deadline = time.monotonic() + budget
    lines, total, hashed, stopped = [], 0, 0, False
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in names)
    for full in sorted(files):
        rel = os.path.relpath(full, path)
        try:
            st = os.stat(full)
        except OSError:
            continue
        if not os.path.isfile(full):
            continue
        key = f"{os.path.realpath(full)}\x00{st.st_size}\x00{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None and not stopped:
            try:
                digest = _file_sha256(full, deadline)
            except OSError as exc:
                return {"sha256": None, "reason": f"cannot read {rel}: {exc.strerror}"}
            if digest is None:
                stopped = True
            else:
                cache[key] = digest
                hashed += 1
        total += st.st_size
        lines.append(f"{digest}  {st.st_size}  {rel}")
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = cache_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_file)
    except OSError:
        pass
    if stopped:
        return {"sha256": None, "files": len(lines), "bytes": total,
                "reason": f"hashing stopped after {budget:g} s; the hashes so far are cached "
                          "and the next run goes on"}
    manifest = "\n".join(lines).encode()
    return {"sha256": hashlib.sha256(manifest).hexdigest(), "files": len(lines),
            "bytes": total, "hashed_now": hashed}


def hf_revision(cache_dir, repo_id, ref="main"):
    """The commit an HF id resolves to in the HF cache (refs/<ref> of its repo folder)."""
    folder = "models--" + repo_id.replace("/", "--")
    for base in (os.path.join(cache_dir, "hub"), cache_dir):
        refs = os.path.join(base, folder, "refs", ref)
        try:
            with open(refs) as f:
                return {"id": repo_id, "revision": f.read().strip() or None, "ref": ref}
        except OSError:
            continue
    return {"id": repo_id, "revision": None,
            "reason": f"{repo_id} is not in the HF cache {cache_dir} (no refs/{ref})"}


def harness_versions(argv, timeout=120):
    """({package: version}, reason) printed by HARNESS_VERSIONS run with argv's python."""
    import subprocess

    try:
        proc = subprocess.run([*argv, HARNESS_VERSIONS], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"cannot run {argv[0]}: {exc}"
    if proc.returncode != 0:
        return None, (f"{' '.join(argv[:4])} exited {proc.returncode}: "
                      f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, "the version script printed no JSON"
    if not found:
        return None, "no nemo-evaluator or nvidia-* harness package is installed there"
    return found, ""


def provenance(spec):
    """Everything above for one host, as planned by evalprov (spec: runtime, instances
    [{name, port}], images, model {kind, ref, hf_cache}, hash_cache, harness_venv,
    harness_images)."""
    import shutil

    docker = spec.get("runtime") == "docker"
    out = {"instances": {}, "images": {}, "model": None, "harness": {}}
    image_ids = []
    for inst in spec.get("instances") or []:
        version, reason = vllm_version(inst["port"])
        entry = {"vllm_version": version}
        if reason:
            entry["vllm_version_reason"] = reason
        if docker:
            status, c = docker_api(f"/containers/{quote(inst['name'])}/json")
            entry["image_id"] = c.get("Image") if status == 200 and isinstance(c, dict) else None
            if entry["image_id"]:
                image_ids.append(entry["image_id"])
        out["instances"][inst["name"]] = entry
    if docker:
        for ref in [*(spec.get("images") or []), *image_ids]:
            if ref and ref not in out["images"]:
                out["images"][ref] = image_info(ref)
    model = spec.get("model") or {}
    if model.get("kind") == "checkpoint":
        out["model"] = {"kind": "checkpoint", "path": model.get("ref"),
                        **checkpoint_hash(model.get("ref") or "", spec.get("hash_cache")
                                          or "/var/lib/evalprov/checkpoint-hashes.json")}
    elif model.get("kind") == "hf":
        out["model"] = {"kind": "hf", **hf_revision(model.get("hf_cache") or "",
                                                    model.get("ref") or "")}
    if docker:
        exe = shutil.which("docker") or "docker"
        for image in spec.get("harness_images") or []:
            found, reason = harness_versions(
                [exe, "run", "--rm", "--network", "none", "--entrypoint", "python3", image,
                 "-c"])
            out["harness"][image] = {"versions": found, **({"reason": reason} if reason else {})}
    elif spec.get("harness_venv"):
        venv = spec["harness_venv"]
        found, reason = harness_versions([os.path.join(venv, "bin", "python"), "-c"])
        out["harness"][venv] = {"versions": found, **({"reason": reason} if reason else {})}
    return out
