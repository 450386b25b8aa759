"""HAProxy in front of several vLLM instances: render haproxy.cfg from data, read its stats.

``render_haproxy_cfg`` is pure: values in, the complete config text out. Every value is
checked first (names, hosts, ports, the health path, the numbers), and anything that is not a
plain name, host/IP or integer refuses with one line naming it, so no value can add a
directive, a comment or a second argument to a line. No template engine: the structure is
fixed here and only checked values are placed in it.

Balance: ``leastconn`` by default. LLM requests differ in length by orders of magnitude (a
short multiple-choice answer next to a long generation), so round robin can queue new requests
behind long ones on one instance while another idles; leastconn sends each request to the
instance with the fewest in flight (and round-robins among equals, so a sequential client still
alternates). ``roundrobin`` is accepted for identical short requests.

``parse_stats_csv`` turns the stats endpoint's CSV (``GET /stats;csv`` on the loopback-only
stats listener) into per-server request counts and states.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
import subprocess
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from .errors import EvalprovError

FRONTEND = "evalprov_lb"
BACKEND = "evalprov_vllm"
STATS = "evalprov_stats"
STATS_URI = "/stats"
BALANCES = ("leastconn", "roundrobin")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_VAR_RE = re.compile(r"[A-Z][A-Z0-9_]{0,62}")
_PATH_RE = re.compile(r"/[A-Za-z0-9._~/-]{0,200}")


class LbError(EvalprovError):
    """A load-balancer value that cannot go into haproxy.cfg, or haproxy refusing it."""


class Server(NamedTuple):
    """One backend: an instance's vLLM API."""

    name: str
    host: str
    port: int


class NodeAddress(NamedTuple):
    """A backend host known only where haproxy runs (a Slurm node's address): rendered as
    haproxy's "${VAR}", whose value the process starting haproxy puts in its environment
    (a checked IP address)."""

    var: str


@dataclass(frozen=True)
class ServerStats:
    """One backend server as haproxy's stats CSV reports it."""

    name: str
    status: str  # haproxy's words: UP, DOWN, "UP 1/2" (going down), "DOWN 1/2", MAINT, ...
    up: bool  # receives new requests (UP, or UP but going down)
    requests: int  # HTTP requests haproxy sent to it (req_tot; sessions where that is empty)
    sessions: int  # connections haproxy opened to it (stot)
    check: str  # the last health check's result, e.g. "L7OK" or "L4CON Connection refused"


# --------------------------------------------------------------------------- checks


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise LbError(f"{what} {value!r} is not a plain name: use letters, digits, '_', '.', "
                      "'-' (at most 63, starting with a letter or digit)")
    return value


def _host(value: object, what: str) -> str:
    """A plain IP address or DNS host name, rendered as haproxy reads it (a NodeAddress:
    its environment variable)."""
    if isinstance(value, NodeAddress):
        if not _VAR_RE.fullmatch(value.var):
            raise LbError(f"{what} {value.var!r} is not an environment variable name: use "
                          "capitals, digits and '_'")
        return f'"${{{value.var}}}"'
    if isinstance(value, str) and "%" not in value:
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
        if (len(value) <= 253 and _HOSTNAME_RE.fullmatch(value)
                and not value.rsplit(".", 1)[-1].isdigit()):
            return value
    raise LbError(f"{what} {value!r} is not a plain host name or IP address")


def _port(value: object, what: str) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise LbError(f"{what} {value!r} is not a port: give an integer 1..65535")
    return value


def _count(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise LbError(f"{what} {value!r} must be an integer {lo}..{hi}")
    return value


def _loopback(value: object, what: str) -> str:
    try:
        ip = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        raise LbError(f"{what} {value!r} must be a loopback IP address (127.0.0.1 or ::1): "
                      "the stats endpoint is not for the network")
    return _host(value, what)


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _servers(servers: Iterable[object]) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    names: set[str] = set()
    addrs: set[tuple[str, int]] = set()
    for i, item in enumerate(servers):
        if not isinstance(item, tuple | list) or len(item) != 3:  # lists: from JSON/YAML
            raise LbError(f"backend #{i + 1} {item!r} is not a (name, host, port) triple")
        name = _name(item[0], f"backend #{i + 1} name")
        host = _host(item[1], f"backend {name} host")
        port = _port(item[2], f"backend {name} port")
        if name in names:
            raise LbError(f"backend name {name!r} is given twice; names must be unique")
        if (host, port) in addrs:
            raise LbError(f"backend {name} address {item[1]}:{port} is given twice")
        names.add(name)
        addrs.add((host, port))
        out.append((name, host, port))
    if not out:
        raise LbError("the load balancer needs at least one backend (name, host, port)")
    return out


# --------------------------------------------------------------------------- render


def render_haproxy_cfg(
    *,
    listen_host: str,
    listen_port: int,
    servers: Iterable[Server | tuple[str, str, int] | list],
    stats_port: int,
    stats_host: str = "127.0.0.1",
    health_path: str = "/health",
    balance: str = "leastconn",
    check_interval_s: int = 2,
    fall: int = 2,
    rise: int = 2,
    connect_timeout_s: int = 5,
    request_timeout_s: int = 1800,
) -> str:
    """The complete haproxy.cfg: a frontend on listen_host:listen_port spreading requests over
    ``servers`` (name, host, port) by ``balance``, each health-checked with GET health_path
    (200 = up; ``fall`` failures in a row take it out, ``rise`` successes bring it back), and
    a stats listener on loopback stats_host:stats_port (``/stats;csv``).

    ``request_timeout_s`` bounds how long a request may wait for its answer (client and server
    inactivity; 30 min by default: a non-streamed completion sends nothing until it is done).
    Raises LbError (one line naming the value) for anything that is not plain data."""
    bind = _host(listen_host, "listen host")
    lport = _port(listen_port, "listen port")
    backends = _servers(servers)
    shost = _loopback(stats_host, "stats host")
    sport = _port(stats_port, "stats port")
    if not isinstance(health_path, str) or not _PATH_RE.fullmatch(health_path):
        raise LbError(f"health path {health_path!r} must be a plain absolute URL path "
                      "(letters, digits, '/', '.', '_', '~', '-')")
    if balance not in BALANCES:
        raise LbError(f"balance {balance!r} is not one of {', '.join(BALANCES)}")
    inter = _count(check_interval_s, "check interval (s)", 1, 3600)
    fall = _count(fall, "fall", 1, 100)
    rise = _count(rise, "rise", 1, 100)
    connect = _count(connect_timeout_s, "connect timeout (s)", 1, 600)
    request = _count(request_timeout_s, "request timeout (s)", 1, 7 * 24 * 3600)
    if sport == lport and (shost == bind or _unspecified(bind)):
        raise LbError(f"stats port {sport} is the listen port; give the stats endpoint its own")
    for name, host, port in backends:
        if (host, port) in ((bind, lport), (shost, sport)):
            raise LbError(f"backend {name} address {host}:{port} is the load balancer's own")

    lines = [
        "# haproxy.cfg rendered by evalprov (evalprov/lb.py); the next apply rewrites it.",
        "global",
        "    log stderr format short local0 info",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode http",
        "    log global",
        # a connection refused by a dead instance not yet marked DOWN goes to another one;
        # a request that reached an instance is never sent twice (retry-on: conn-failure)
        "    retries 3",
        "    option redispatch 1",
        f"    timeout connect {connect}s",
        f"    timeout client {request}s",
        f"    timeout server {request}s",
        "    timeout http-request 60s",
        "    timeout http-keep-alive 60s",
        "    timeout queue 60s",
        f"    timeout check {max(1, min(inter, 10))}s",
        "",
        f"frontend {FRONTEND}",
        f"    bind {bind}:{lport}",
        "    option httplog",
        "    option dontlognull",
        f"    default_backend {BACKEND}",
        "",
        f"backend {BACKEND}",
        f"    balance {balance}",
        "    option httpchk",
        f"    http-check send meth GET uri {health_path} ver HTTP/1.1 hdr Host evalprov-lb",
        "    http-check expect status 200",
        f"    default-server check inter {inter}s fall {fall} rise {rise}",
        *(f"    server {name} {host}:{port}" for name, host, port in backends),
        "",
        f"frontend {STATS}",
        f"    bind {shost}:{sport}",
        "    no log",
        "    stats enable",
        f"    stats uri {STATS_URI}",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- stats


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def parse_stats_csv(text: str, backend: str = BACKEND) -> dict[str, ServerStats]:
    """Per server of ``backend``: its state and counts, from haproxy's ``/stats;csv``."""
    header, _, body = text.lstrip().partition("\n")
    if not header.startswith("# pxname,svname,"):
        raise LbError(f"not haproxy stats CSV: starts with {header[:40]!r}")
    fields = header[2:].rstrip(",").split(",")
    out: dict[str, ServerStats] = {}
    for row in csv.DictReader(io.StringIO(body), fieldnames=fields, restkey="_"):
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND", None):
            continue
        req_tot = row.get("req_tot") or ""
        # "* L7OK": a check is running; the last result follows the star
        check_status = (row.get("check_status") or "").removeprefix("* ")
        check = " ".join(x for x in (check_status, row.get("last_chk")) if x)
        status = row.get("status") or ""
        out[row["svname"]] = ServerStats(
            name=row["svname"],
            status=status,
            up=status.split(" ", 1)[0] in ("UP", "no"),  # "no check": always in rotation
            requests=_int(req_tot) if req_tot else _int(row.get("stot")),
            sessions=_int(row.get("stot")),
            check=check,
        )
    return out


# --------------------------------------------------------------------------- on the node


def stats_url(stats_host: str, stats_port: int) -> str:
    return f"http://{_loopback(stats_host, 'stats host')}:{_port(stats_port, 'stats port')}" \
        f"{STATS_URI};csv"


def read_stats(stats_host: str, stats_port: int, timeout: float = 5.0) -> dict[str, ServerStats]:
    """GET the stats CSV from a running haproxy (on its node: the listener is loopback)."""
    with urllib.request.urlopen(stats_url(stats_host, stats_port), timeout=timeout) as r:  # noqa: S310 - loopback URL built from checked values
        return parse_stats_csv(r.read().decode("utf-8", "replace"))


def check_config(path: str, haproxy: str = "haproxy") -> None:
    """``haproxy -c -f path``; LbError with haproxy's first complaint when it refuses."""
    proc = subprocess.run([haproxy, "-c", "-f", path], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        said = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()
                if "ALERT" in ln or "error" in ln.lower()]
        first = said[0] if said else f"exit {proc.returncode}"
        raise LbError(f"haproxy refuses {path}: {first}")
