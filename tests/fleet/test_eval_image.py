"""The harness image (tests/testbed/eval_image.py) on a fake host: NVIDIA's real
`nemo-evaluator run_eval` (nvidia-lm-eval / nvidia-simple-evals 26.3) runs inside it, offline,
against the stand-in vLLM container on the same host, with only a host dir mounted at /work —
the way an eval-factory container is used.

Egress: for the duration of the runs the host's netns gets a default route into a dummy
device (which drops everything) and an iptables chain that counts DNS queries and rejects
anything addressed outside loopback and the fleet's subnet. Without that route a connection
attempt would fail silently (ENETUNREACH, no packet); with it, every attempt is counted.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from evalprov import harness
from tests.testbed import eval_image
from tests.testbed.image import STANDIN_IMAGE, ensure_standin_image
from tests.testbed.util import http_request, wait_for

pytest_plugins = ["tests.testbed.pytest_plugin"]
pytestmark = pytest.mark.fleet

HOST = "h1"
PORT = 8000
SERVED = "tiny"
LIMIT, MAX_NEW_TOKENS, PARALLELISM = 3, 32, 2
RUN_DEADLINE = 600.0
CHAIN = "EVP_EGRESS"
SINK, SINK_PEER = "evpsink0", "evpsink1"

if not (harness.harness_venv() / "bin" / "nemo-evaluator").exists():
    pytest.skip(
        f"harness venv missing ({harness.harness_venv()}): run scripts/install-harness",
        allow_module_level=True,
    )


def _requests_served(fleet) -> int:
    _, _, body = http_request(fleet.url(HOST, PORT, "/metrics"), timeout=5)
    m = re.search(rb"^vllm:num_requests_total (\d+)", body, re.M)
    assert m, body[:300]
    return int(m.group(1))


class Egress:
    """Count the host's connection attempts beyond loopback + the fleet subnet.

    The host netns gets a default route into one end of a veth pair whose other end is in
    the same netns (no dummy driver in this kernel; a blackhole route fails connect() before
    any packet exists), and an OUTPUT chain that counts DNS and rejects what is left. Nothing
    can leave: the pair never leaves the namespace and the chain rejects before sending."""

    RULES = (
        ("dns", ["-p", "udp", "--dport", "53"]),  # counters only
        ("dns", ["-p", "tcp", "--dport", "53"]),
        (None, ["-o", "lo", "-j", "RETURN"]),
        (None, ["-d", "SUBNET", "-j", "RETURN"]),
        ("rejected", ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]),
        ("rejected", ["-j", "REJECT"]),
    )

    def __init__(self, fleet, subnet: str):
        self.fleet, self.subnet = fleet, subnet

    def _x(self, *argv: str, check: bool = True):
        return self.fleet.exec(HOST, list(argv), check=check)

    def up(self) -> None:
        self._x("ip", "link", "add", SINK, "type", "veth", "peer", "name", SINK_PEER)
        for dev in (SINK, SINK_PEER):
            self._x("ip", "link", "set", dev, "addrgenmode", "none")  # no IPv6 chatter
            self._x("ip", "link", "set", dev, "up")
        self._x("ip", "route", "add", "default", "dev", SINK)
        ipt = ("iptables", "-w", "5")
        self._x(*ipt, "-N", CHAIN)
        for _, rule in self.RULES:
            self._x(*ipt, "-A", CHAIN, *[self.subnet if a == "SUBNET" else a for a in rule])
        self._x(*ipt, "-I", "OUTPUT", "1", "-j", CHAIN)

    def down(self) -> None:
        ipt = ("iptables", "-w", "5")
        self._x(*ipt, "-D", "OUTPUT", "-j", CHAIN, check=False)
        self._x(*ipt, "-F", CHAIN, check=False)
        self._x(*ipt, "-X", CHAIN, check=False)
        self._x("ip", "link", "del", SINK, check=False)

    def counts(self) -> dict[str, int]:
        out = self._x("iptables", "-w", "5", "-L", CHAIN, "-n", "-v", "-x").stdout.decode()
        rows = [ln.split() for ln in out.splitlines()[2:] if ln.strip()]
        assert len(rows) == len(self.RULES), out
        got = {"dns": 0, "rejected": 0}
        for (kind, _), row in zip(self.RULES, rows, strict=True):
            if kind:
                got[kind] += int(row[0])
        return got

    def probe(self) -> None:
        """Positive control: a connect to TEST-NET-1 and a DNS lookup are both counted."""
        before = self.counts()
        self._x("python3", "-c", PROBE)
        after = self.counts()
        assert after["rejected"] > before["rejected"] and after["dns"] > before["dns"], (
            before,
            after,
        )


PROBE = """
import socket
s = socket.socket()
s.settimeout(3)
try:
    s.connect(("192.0.2.1", 80))
except OSError:
    pass
try:
    socket.getaddrinfo("huggingface.co", 443)
except OSError:
    pass
"""


@pytest.fixture(scope="module")
def stand(fleet_factory):
    """A 1-host fleet with the harness image pulled and the stand-in serving on :8000
    (host network). Yields (fleet, ref, timings)."""
    fleet = fleet_factory((1,), docker=True)
    if fleet_factory.image_info is None:
        fleet_factory.image_info = ensure_standin_image(fleet)
    info = eval_image.eval_image_info(fleet)
    ref = info["ref"]
    timings = {k: v for k, v in info.items() if k.endswith("_s")}
    print("eval image:", json.dumps(info))

    t0 = time.monotonic()
    fleet.docker(HOST, "pull", ref, timeout=600)
    timings["pull_s"] = round(time.monotonic() - t0, 3)
    fleet.docker(HOST, "rm", "-f", "evp-standin", check=False)
    fleet.docker(
        HOST,
        "run",
        "-d",
        "--name",
        "evp-standin",
        "--network",
        "host",
        STANDIN_IMAGE,
        "vllm",
        "serve",
        "/models/tiny",
        "--port",
        str(PORT),
        "--served-model-name",
        SERVED,
        timeout=120,
    )
    wait_for(
        lambda: http_request(fleet.url(HOST, PORT, "/health"), timeout=1)[0] == 200,
        timeout=30,
        what="stand-in /health",
    )
    ip = fleet.host(HOST).ip
    egress = Egress(fleet, ip.rsplit(".", 1)[0] + ".0/24")
    egress.down()  # leftovers of an interrupted run
    egress.up()
    try:
        egress.probe()
        yield fleet, ref, timings, egress
    finally:
        egress.down()
        fleet.docker(HOST, "rm", "-f", "evp-standin", check=False)
        print("timings:", json.dumps(timings))


@pytest.mark.parametrize(
    ("task", "harness_name"),
    [("ifeval", "lm-evaluation-harness"), ("gpqa_diamond", "simple_evals")],
)
def test_real_harness_runs_in_the_image_offline(stand, task, harness_name):
    fleet, ref, timings, egress = stand
    # The host's /tmp is HOSTDIR/tmp on the controller: a dir there is visible to its dockerd.
    host_dir = f"/tmp/evalwork-{task}"
    work = Path(fleet.host(HOST).dir) / "tmp" / host_dir.rsplit("/", 1)[1]
    work.mkdir(parents=True, exist_ok=False)
    cfg = harness.run_config(
        task,
        harness_name,
        f"http://127.0.0.1:{PORT}/v1/chat/completions",
        SERVED,
        "chat",
        "/work/results",
        {"limit_samples": LIMIT, "max_new_tokens": MAX_NEW_TOKENS, "parallelism": PARALLELISM},
    )
    harness.write_run_config(cfg, work / "run_config.yml")
    served_before = _requests_served(fleet)
    before = egress.counts()

    argv = eval_image.run_argv(ref, host_dir)
    assert argv[0] == "docker"
    t0 = time.monotonic()
    r = fleet.docker(HOST, *argv[1:], timeout=RUN_DEADLINE, check=False)
    seconds = time.monotonic() - t0
    timings[f"run_{task}_s"] = round(seconds, 3)
    log = (r.stdout + r.stderr).decode(errors="replace")
    (work / "docker-run.log").write_text(log)
    assert r.returncode == 0, f"run_eval in the image exited {r.returncode}:\n{log[-4000:]}"
    print(f"{task}: docker run ... run_eval {seconds:.1f} s")

    results = work / "results" / "results.yml"
    assert results.is_file(), sorted(p.name for p in (work / "results").iterdir())
    best = harness.primary_score(harness.read_scores(results), task)
    assert 0.0 <= best["score"] <= 1.0
    assert (best["metric"], best["name"]) == harness.PRIMARY[task]
    stats = json.loads((work / "results" / "eval_factory_metrics.json").read_text())
    assert stats["response_stats"]["successful_count"] == LIMIT
    assert _requests_served(fleet) - served_before == LIMIT
    assert "[nltk_data]" not in log  # no punkt_tab download attempt
    assert egress.counts() == before, f"outbound attempts: {before} -> {egress.counts()}"


def test_second_ensure_is_a_cache_hit(stand):
    fleet, ref, _, _ = stand
    t0 = time.monotonic()
    info = eval_image.eval_image_info(fleet)
    assert info["built"] is False and info["ref"] == ref
    assert re.fullmatch(r"10\.213\.\d+\.1:5000/evalprov/nemo-evaluator-harness:26\.3", ref)
    assert ref == ref.lower() and info["cache_ref"] == info["cache_ref"].lower()
    assert eval_image.ensure_eval_image(fleet) == ref
    print(f"cache hit in {time.monotonic() - t0:.1f} s")


def test_image_config_and_determinism(stand):
    fleet, ref, timings, _ = stand
    cfg = json.loads(fleet.docker(HOST, "image", "inspect", ref).stdout)[0]
    env = dict(e.split("=", 1) for e in cfg["Config"]["Env"])
    want = harness.harness_env(
        eval_image.IMAGE_VENV, eval_image.IMAGE_SAMPLES, base={"PATH": eval_image.IMAGE_PATH}
    )
    for k, v in want.items():
        assert env[k] == v, k
    assert env["HOME"] == "/root"
    assert cfg["Config"]["WorkingDir"] == eval_image.IMAGE_SAMPLES
    assert not cfg["Config"]["Entrypoint"]
    print(f"image size {cfg['Size'] / 1e6:.0f} MB")
    a = eval_image.build_tar()
    b = eval_image.build_tar()
    timings["tar_build_s"] = round(a["collect_s"] + a["write_s"], 3)
    assert a["tar_sha256"] == b["tar_sha256"]
    assert (
        a["fingerprint"] == b["fingerprint"] == cfg["Config"]["Labels"]["org.evalprov.fingerprint"]
    )
