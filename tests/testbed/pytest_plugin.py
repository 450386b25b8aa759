"""pytest fixtures for the evalprov test fleet.

Register with ``pytest_plugins = ["tests.testbed.pytest_plugin"]`` in the root conftest.

Fixtures:
  fleet_factory   session: ``fleet_factory(gpus=[8, 4, 2], docker=True, net=None,
                  **Fleet kwargs)`` returns a running Fleet on 10.213.<net>.0/24 (net
                  None: the session's net, ``fleet_factory.net``: $EVALPROV_TESTBED_NET
                  or 77 — set the variable to run two pytest sessions side by side).
                  One fleet per session at a time: asking for a different spec tears
                  the previous one down;
                  asking for the same spec again returns the running one (rebuilt if a
                  test left a host killed or disconnected). ``fleet_factory.close()``
                  tears down the current fleet. Everything is torn down at session end.
  fleet           function: ``fleet_factory([8, 4, 2], docker=True)``.
  slurm_cluster   function: ``fleet_factory.slurm((2, 2))``: a real Slurm cluster on fake
                  hosts (tests/testbed/slurm.py) with the stand-in and harness images on
                  every node; it is the factory's current fleet (asking for another one
                  tears it down).
  standin_image   function: ensures ``vllm/vllm-openai:evalprov-standin`` is in the local
                  registry (built at most once per session, cached across sessions) and
                  returns that name.

Tests skip with a clear reason only when not root or ``ip netns add`` fails.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from .fleet import Fleet, check_net, default_net
from .image import STANDIN_IMAGE, ensure_standin_image

DEFAULT_GPUS = (8, 4, 2)


# Fleet fixtures whose tests run next to one another (each builds its fleet once).
FLEET_ORDER = ("eval_fleet", "mn_fleet")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(session, config, items) -> None:
    """The heavy tests form two pytest-xdist groups, each run in turn by one worker: "fleet",
    the tests on the network-namespace test fleet, and "local+slurm", the tests on the Slurm
    cluster (built once, on a fleet of that worker's own net, fleet_factory.net) and the
    end-to-end tests on this machine itself (the quickstart's real vLLM, the local harness
    and hostile applies), which touch no fleet. The other tests run beside them. Within a
    group, tests on the same fleet fixture run one after another."""
    def names(item) -> tuple[str, ...]:
        return tuple(getattr(item, "fixturenames", ()))

    def local_e2e(item) -> bool:
        return item.get_closest_marker("e2e") is not None and "fleet_factory" not in names(item)

    def rank(item) -> int:
        if "slurm_cluster" in names(item):
            return len(FLEET_ORDER) + 1
        return next((k + 1 for k, f in enumerate(FLEET_ORDER) if f in names(item)), 0)

    items[:] = sorted(items, key=rank)  # stable: the collection order otherwise
    for item in items:
        if "slurm_cluster" in names(item) or local_e2e(item):
            item.add_marker(pytest.mark.xdist_group("local+slurm"))
        elif item.get_closest_marker("fleet") or item.get_closest_marker("e2e") or \
                "fleet_factory" in names(item):
            item.add_marker(pytest.mark.xdist_group("fleet"))


def worker_net() -> int:
    """The net of this pytest process's fleets: $EVALPROV_TESTBED_NET, else 77 for a
    single process or xdist's first worker, 90+N for worker gwN (N > 0)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if os.environ.get("EVALPROV_TESTBED_NET", "").strip() or not worker.startswith("gw"):
        return default_net()
    index = int(worker[2:] or 0)
    return default_net() if index == 0 else 90 + index


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "fleet: needs the network-namespace test fleet (root, ip netns)"
    )


def fleet_skip_reason() -> str | None:
    """Why fleet tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "the test fleet needs root (network namespaces, mounts)"
    probe = f"evp-probe-{os.getpid()}"
    try:
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


class FleetFactory:
    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self.net = worker_net()
        self.current: Fleet | None = None
        self._key: tuple | None = None
        self.image_info: dict | None = None
        self.cluster = None  # a SlurmCluster whose fleet is self.current

    def _healthy(self, f: Fleet) -> bool:
        if not f.is_up:
            return False
        for h in f.hosts:
            if not f.host_alive(h.name):
                return False
            try:
                with open(f"/sys/class/net/{h.veth}/operstate") as fh:
                    if fh.read().strip() == "down":
                        return False
            except OSError:
                return False
        return True

    def __call__(
        self, gpus=DEFAULT_GPUS, docker: bool = True, net: int | None = None, **kwargs
    ) -> Fleet:
        net = self.net if net is None else check_net(net)
        key = (tuple(gpus), bool(docker), net, tuple(sorted(kwargs.items())))
        if self.current is not None and key == self._key and self._healthy(self.current):
            return self.current
        self.close()
        f = Fleet(list(gpus), docker=docker, net=net, workdir=self._tmp.mktemp("fleet"), **kwargs)
        f.up()
        self.current, self._key = f, key
        return f

    def slurm(self, gpus=(2, 2)):
        """A running SlurmCluster (tests/testbed/slurm.py) on the session's net, its nodes
        holding the stand-in and harness images; the same one while the spec is the same."""
        from .eval_image import ensure_eval_image
        from .image import STANDIN_IMAGE
        from .slurm import SlurmCluster

        key = ("slurm", tuple(gpus), self.net)
        if self.cluster is not None and self._key == key and self._healthy(self.cluster.fleet):
            return self.cluster
        self.close()
        c = SlurmCluster(gpus=gpus, net=self.net)
        c.up()
        self.cluster, self.current, self._key = c, c.fleet, key
        try:
            ensure_standin_image(c.fleet)
            c.eval_image = ensure_eval_image(c.fleet)
            # the nodes have the images already, as a cluster's nodes usually do: a job's
            # walltime in the tests is spent serving and evaluating, not pulling
            for h in c.fleet.hosts:
                for image in (STANDIN_IMAGE, c.eval_image):
                    c.fleet.docker(h.name, "pull", image, timeout=300)
            c.inventory = c.fleet.write_inventory(c.dir / "inventory.yml")
        except BaseException:
            self.close()
            raise
        return c

    def close(self) -> None:
        if self.cluster is not None:
            c, self.cluster, self.current, self._key = self.cluster, None, None, None
            c.down()
        if self.current is not None:
            f, self.current, self._key = self.current, None, None
            f.down()


@pytest.fixture(scope="session")
def fleet_factory(tmp_path_factory):
    reason = fleet_skip_reason()
    if reason:
        pytest.skip(reason)
    factory = FleetFactory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def fleet(fleet_factory) -> Fleet:
    return fleet_factory(DEFAULT_GPUS, docker=True)


@pytest.fixture
def slurm_cluster(fleet_factory):
    return fleet_factory.slurm((2, 2))


@pytest.fixture
def standin_image(fleet_factory) -> str:
    f = fleet_factory.current
    if f is None or not any(h.docker for h in f.hosts):
        f = fleet_factory(DEFAULT_GPUS, docker=True)
    if fleet_factory.image_info is None:
        fleet_factory.image_info = ensure_standin_image(f)
    return STANDIN_IMAGE
