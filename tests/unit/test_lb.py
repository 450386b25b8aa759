"""evalprov.lb: haproxy.cfg rendered from checked data, the stats CSV read back, and real
Debian haproxy in front of two stand-in vLLM servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from evalprov import lb
from evalprov.lb import LbError, Server, parse_stats_csv, render_haproxy_cfg
from tests.testbed.image import SERVER_PY
from tests.testbed.util import free_port, wait_while_running

HAPROXY = "/usr/sbin/haproxy"
DEADLINE = 30.0


def _cfg(**over) -> str:
    kw = {"listen_host": "127.0.0.1", "listen_port": 8080,
          "servers": [("a", "127.0.0.1", 8001), ("b", "10.0.0.2", 8002)], "stats_port": 8404}
    kw.update(over)
    return render_haproxy_cfg(**kw)


def _section(cfg: str, header: str) -> list[str]:
    blocks = cfg.split("\n\n")
    (block,) = [b for b in blocks if b.splitlines()[0] == header]
    return [ln.strip() for ln in block.splitlines()[1:]]


# --------------------------------------------------------------------------- rendering


def test_every_backend_is_a_health_checked_server_behind_one_frontend():
    cfg = _cfg()
    assert _section(cfg, "frontend evalprov_lb")[0] == "bind 127.0.0.1:8080"
    be = _section(cfg, "backend evalprov_vllm")
    assert "balance leastconn" in be
    assert "http-check send meth GET uri /health ver HTTP/1.1 hdr Host evalprov-lb" in be
    assert "http-check expect status 200" in be
    assert "default-server check inter 2s fall 2 rise 2" in be
    assert [ln for ln in be if ln.startswith("server ")] == [
        "server a 127.0.0.1:8001", "server b 10.0.0.2:8002"]


def test_the_stats_endpoint_is_on_loopback_and_serves_csv_at_a_known_uri():
    stats = _section(_cfg(stats_port=9000), "frontend evalprov_stats")
    assert stats[0] == "bind 127.0.0.1:9000" and "stats uri /stats" in stats
    assert lb.stats_url("127.0.0.1", 9000) == "http://127.0.0.1:9000/stats;csv"
    assert _section(_cfg(stats_host="::1"), "frontend evalprov_stats")[0] == "bind [::1]:8404"


def test_timeouts_let_a_long_generation_finish():
    d = _section(_cfg(), "defaults")
    assert "timeout server 1800s" in d and "timeout client 1800s" in d
    assert "timeout connect 5s" in d
    d = _section(_cfg(request_timeout_s=7200), "defaults")
    assert "timeout server 7200s" in d and "timeout client 7200s" in d


def test_a_refused_connection_is_redispatched_never_a_sent_request():
    d = _section(_cfg(), "defaults")
    assert "option redispatch 1" in d and "retries 3" in d
    assert not any(ln.startswith("retry-on") for ln in d)  # haproxy's default: conn-failure


def test_roundrobin_ipv6_and_host_names_render_as_haproxy_reads_them():
    cfg = _cfg(balance="roundrobin", listen_host="::",
               servers=[Server("gpu-1", "::1", 8001), ("gpu-2", "node-2.cluster.local", 8001)],
               health_path="/v1/models", check_interval_s=5, fall=3, rise=1)
    assert "balance roundrobin" in _section(cfg, "backend evalprov_vllm")
    assert "server gpu-1 [::1]:8001" in cfg and "server gpu-2 node-2.cluster.local:8001" in cfg
    assert "bind [::]:8080" in cfg and "uri /v1/models " in cfg
    assert "default-server check inter 5s fall 3 rise 1" in cfg
    from_yaml = _cfg(servers=[["a", "127.0.0.1", 8001], ["b", "10.0.0.2", 8002]])
    assert from_yaml == _cfg()


def test_the_config_has_the_same_shape_whatever_the_values():
    """Values only ever fill one token of a fixed line: no value adds a line or a directive."""
    def shape(cfg: str) -> list[str]:
        return [ln.split()[0] if ln.strip() else "" for ln in cfg.splitlines()]
    base = shape(_cfg())
    other = shape(_cfg(listen_host="0.0.0.0", stats_host="127.0.0.9", health_path="/h/x-y_z.~",
                       servers=[("x.y", "h-1.example", 1), ("Z_9", "fd00::7", 65535)]))
    assert base == other


BAD = [
    ({"listen_host": "127.0.0.1:80"}, "'127.0.0.1:80'"),
    ({"listen_host": "0.0.0.0\n    stats enable"}, "stats enable"),
    ({"listen_host": ""}, "listen host ''"),
    ({"listen_port": "8080"}, "listen port '8080'"),
    ({"listen_port": True}, "listen port True"),
    ({"listen_port": 0}, "listen port 0"),
    ({"listen_port": 65536}, "listen port 65536"),
    ({"listen_port": 80.0}, "listen port 80.0"),
    ({"servers": [("a b", "127.0.0.1", 1)]}, "name 'a b'"),
    ({"servers": [("a#x", "127.0.0.1", 1)]}, "'a#x'"),
    ({"servers": [("a\n  server evil 6.6.6.6:80", "127.0.0.1", 1)]}, "server evil"),
    ({"servers": [("a", "127.0.0.1 backup", 1)]}, "host '127.0.0.1 backup'"),
    ({"servers": [("a", "h;rm", 1)]}, "'h;rm'"),
    ({"servers": [("a", "${HOME}", 1)]}, "'${HOME}'"),
    ({"servers": [("a", "10.1", 1)]}, "'10.1'"),  # inet_aton would read it as 10.0.0.1
    ({"servers": [("a", "fe80::1%eth0", 1)]}, "'fe80::1%eth0'"),
    ({"servers": [("a", "http://h", 1)]}, "'http://h'"),
    ({"servers": [("a", "127.0.0.1", "1")]}, "port '1'"),
    ({"servers": [("a", "127.0.0.1")]}, "not a (name, host, port) triple"),
    ({"servers": ["a 127.0.0.1 1"]}, "not a (name, host, port) triple"),
    ({"servers": [("a", "127.0.0.1", 1), ("a", "127.0.0.2", 1)]}, "'a' is given twice"),
    ({"servers": [("a", "127.0.0.1", 1), ("b", "127.0.0.1", 1)]}, "127.0.0.1:1 is given twice"),
    ({"servers": []}, "at least one backend"),
    ({"servers": [("a", "127.0.0.1", 8080)]}, "is the load balancer's own"),
    ({"health_path": "health"}, "'health'"),
    ({"health_path": "/health check"}, "'/health check'"),
    ({"health_path": "/h#x"}, "'/h#x'"),
    ({"health_path": "/h\"x"}, "'/h\"x'"),
    ({"balance": "source"}, "'source'"),
    ({"stats_host": "0.0.0.0"}, "'0.0.0.0' must be a loopback"),
    ({"stats_host": "10.0.0.1"}, "'10.0.0.1' must be a loopback"),
    ({"stats_host": "localhost"}, "'localhost' must be a loopback"),
    ({"stats_port": 8080}, "stats port 8080 is the listen port"),
    ({"check_interval_s": 0}, "check interval (s) 0"),
    ({"request_timeout_s": "30m"}, "request timeout (s) '30m'"),
    ({"fall": -1}, "fall -1"),
]


@pytest.mark.parametrize("over, named", BAD, ids=[repr(o) for o, _ in BAD])
def test_anything_but_plain_data_is_refused_in_one_line_naming_it(over, named):
    with pytest.raises(LbError) as err:
        _cfg(**over)
    msg = str(err.value)
    assert named in msg
    assert "\n" not in msg and err.value.exit_code == 2


# --------------------------------------------------------------------------- stats CSV

HEADER = ("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,"
          "wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,"
          "sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,"
          "check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,"
          "req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,"
          "lastsess,last_chk,\n")


def _row(px: str, sv: str, status: str, stot: int, req_tot: str, check: str, last: str) -> str:
    cols = dict.fromkeys(HEADER[2:].rstrip(",\n").split(","), "")
    cols.update(pxname=px, svname=sv, status=status, stot=str(stot), req_tot=req_tot,
                check_status=check, last_chk=last)
    return ",".join(cols.values()) + ",\n"


def test_the_stats_csv_gives_each_servers_state_and_request_count():
    text = HEADER + "".join([
        _row("evalprov_lb", "FRONTEND", "OPEN", 30, "30", "", ""),
        _row("evalprov_vllm", "a", "UP", 12, "17", "L7OK", ""),
        _row("evalprov_vllm", "b", "DOWN", 13, "13", "L4CON", "Connection refused"),
        _row("evalprov_vllm", "c", "UP 1/2", 0, "", "* L7STS", "503"),
        _row("evalprov_vllm", "BACKEND", "UP", 25, "30", "", ""),
        _row("other", "a", "UP", 99, "99", "", ""),
    ])
    got = parse_stats_csv(text)
    assert set(got) == {"a", "b", "c"}
    assert (got["a"].up, got["a"].requests, got["a"].sessions) == (True, 17, 12)
    assert (got["b"].up, got["b"].status, got["b"].check) == (False, "DOWN",
                                                              "L4CON Connection refused")
    assert (got["c"].up, got["c"].requests, got["c"].check) == (True, 0, "L7STS 503")  # going down
    assert parse_stats_csv(text, backend="other")["a"].requests == 99


def test_text_that_is_not_stats_csv_is_refused():
    with pytest.raises(LbError, match="not haproxy stats CSV"):
        parse_stats_csv("<html>503 Service Unavailable</html>")


# --------------------------------------------------------------------------- real haproxy




def _wait(what: str, pred, procs=()) -> None:
    wait_while_running(what, pred, procs, deadline=DEADLINE, interval=0.1)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _complete(port: int, i: int) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps({"model": "m", "max_tokens": 8,
                         "messages": [{"role": "user", "content": f"question {i}"}]}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            json.loads(r.read())
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _served(port: int) -> int:
    _, body = _get(f"http://127.0.0.1:{port}/metrics")
    m = re.search(rb"^vllm:num_requests_total (\d+)$", body, re.M)
    assert m, f"no request counter on :{port}: {body[:200]!r}"
    return int(m.group(1))


@pytest.mark.skipif(not os.path.exists(HAPROXY),
                    reason=f"{HAPROXY} missing: apt-get install haproxy (.ci/setup-testbed.sh)")
def test_real_haproxy_spreads_requests_and_routes_around_a_dead_instance(tmp_path: Path):
    ports = {"a": free_port(), "b": free_port()}
    listen, stats = free_port(), free_port()
    procs: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "haproxy")}
    try:
        for name, port in ports.items():
            with open(logs[name], "wb") as out:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-u", str(SERVER_PY), "serve", "m", "--host", "127.0.0.1",
                     "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(render_haproxy_cfg(
            listen_host="127.0.0.1", listen_port=listen, stats_port=stats,
            servers=[(n, "127.0.0.1", p) for n, p in ports.items()],
            check_interval_s=1, fall=2, rise=1))
        lb.check_config(str(cfg), HAPROXY)
        assert subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True,
                              timeout=60).returncode == 0
        with open(logs["haproxy"], "wb") as out:
            procs["haproxy"] = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"],
                                                stdout=out, stderr=subprocess.STDOUT)
        alive = list(procs.values())

        def states() -> dict[str, lb.ServerStats]:
            try:
                return lb.read_stats("127.0.0.1", stats)
            except OSError:
                return {}

        _wait("both stand-ins UP in haproxy",
              lambda: [s.status for s in states().values()] == ["UP", "UP"], alive)

        assert [_complete(listen, i) for i in range(20)] == [200] * 20
        served = {n: _served(p) for n, p in ports.items()}
        assert sum(served.values()) == 20 and min(served.values()) > 0, served
        seen = states()
        assert {n: s.requests for n, s in seen.items()} == served

        procs["b"].kill()
        procs["b"].wait()
        # before haproxy has noticed: the refused connection is redispatched to a
        assert [_complete(listen, i) for i in range(5)] == [200] * 5
        _wait("b DOWN in haproxy", lambda: states().get("b", seen["b"]).status == "DOWN",
              [procs["a"], procs["haproxy"]])
        assert states()["a"].up
        assert "Server evalprov_vllm/b is DOWN" in logs["haproxy"].read_text()
        assert [_complete(listen, i) for i in range(10)] == [200] * 10
        assert _served(ports["a"]) == served["a"] + 15
        assert states()["a"].requests == served["a"] + 15
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
