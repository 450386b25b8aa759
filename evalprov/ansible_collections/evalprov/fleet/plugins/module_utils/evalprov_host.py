"""What evalprov's modules read on a host, written once: /proc (process state, listening
ports), dockerd's API over its socket, the process runtime's state files, and the HTTP
health of an instance."""

from __future__ import annotations

import http.client
import json
import os
import socket
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


def read_state(state_dir, name):
    """The process runtime's state file of an instance ({} when there is none)."""
    try:
        with open(os.path.join(state_dir, name + ".json")) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


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


# ---------------------------------------------------------------------------- HTTP health


def http_get(url, timeout=3):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status, resp.read(65536)
    except Exception:
        return 0, b""


def health(port, health_path, served):
    """(serving, reason): /health answers 200 and /v1/models lists the served name."""
    status, _ = http_get(f"http://127.0.0.1:{port}{health_path}")
    if status != 200:
        return False, f"{health_path} not 200"
    status, body = http_get(f"http://127.0.0.1:{port}/v1/models")
    try:
        ids = [m.get("id") for m in json.loads(body or b"{}").get("data", [])]
    except (ValueError, AttributeError):
        ids = []
    if status != 200 or (served and served not in ids):
        return False, f"/v1/models lists {ids}, not {served}"
    return True, ""


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
