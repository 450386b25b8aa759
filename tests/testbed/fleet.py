"""A fleet of fake GPU hosts on one machine, reachable over SSH, for Ansible.

Each host ``hN`` is a network namespace ``evp<net>hN`` joined to the bridge
``evpbr<net>`` (10.213.<net>.1/24) by a veth ``evp<net>-hN``, at 10.213.<net>.1N,
running in its own PID, mount and UTS namespaces::

    nsenter --net=/run/netns/evp<net>hN unshare --mount --uts --pid --mount-proc \
        --propagation private --kill-child=SIGKILL /usr/bin/tini -s -- sh -c INIT

INIT gives the host its own hostname, /etc/hosts, empty resolv.conf, /root
(stock /etc/skel dotfiles + our authorized key), /tmp, tmpfs over /run and the
``private_dirs``, a stub ``nvidia-smi`` (+ ``nvidia-container-runtime-hook``)
on PATH via /usr/local/sbin, optionally dockerd (own /var/lib/docker, the local
registry as Docker Hub mirror), and finally ``exec sshd -D``.  Everything else
(/usr, /etc, Debian's python3) is the machine's own filesystem, shared.

The namespaces have no default route: only 10.213.<net>.0/24 is reachable.

``net`` (the third octet, default 77, or ``$EVALPROV_TESTBED_NET``) keeps fleets
apart: two fleets with different nets share nothing but the registry's storage
directory (each has its own bridge, netns, veths, cgroups and registry process on
its own 10.213.<net>.1:5000), so two test processes can run side by side.  Host
*names* (h1, h2, ...) are the same in every net; only kernel object names differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import stubs
from .registry import CACHE_ROOT, DEFAULT_REGISTRY_DIR, Registry
from .util import (
    TestbedError,
    child_pids,
    kill_and_reap,
    ns_inode,
    pid_alive,
    pid_cmdline,
    pids_in_ns,
    rmdir_tree,
    run,
    signal_quiet,
    tcp_banner,
    unix_http_get,
    wait_for,
)

DEFAULT_NET = 77
NET_ENV = "EVALPROV_TESTBED_NET"
REGISTRY_PORT = 5000
HOSTNAME_PREFIX = "fleet"
CGROUP_PREFIX = "evalprov-testbed"
HOST_PYTHON = "/usr/bin/python3"
DEBIAN_DOCKER_CLI = "/usr/bin/docker"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_PRIVATE_DIRS = (
    "/opt",
    "/srv",
    "/etc/evalprov",
    "/var/lib/evalprov",
    "/var/log/evalprov",
    "/var/cache/evalprov",
)
SSH_OPTS = (
    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "
    "-o IdentitiesOnly=yes -o ControlMaster=auto -o ControlPersist=60s"
)


def check_net(net: int) -> int:
    """``net`` as an int in 1..254 (the third octet of 10.213.<net>.0/24), or ValueError."""
    if isinstance(net, bool) or not isinstance(net, int) or not 1 <= net <= 254:
        raise ValueError(f"net must be an integer 1..254 (10.213.<net>.0/24), not {net!r}")
    return net


def default_net() -> int:
    """The net a fleet uses when none is given: ``$EVALPROV_TESTBED_NET`` or 77."""
    text = os.environ.get(NET_ENV, "").strip()
    if not text:
        return DEFAULT_NET
    try:
        return check_net(int(text))
    except ValueError:
        raise ValueError(f"{NET_ENV}={text!r}: expected an integer 1..254") from None


def subnet_prefix(net: int) -> str:
    return f"10.213.{net}"


def controller_ip(net: int) -> str:
    return f"{subnet_prefix(net)}.1"


def registry_addr(net: int) -> str:
    return f"{controller_ip(net)}:{REGISTRY_PORT}"


def bridge_name(net: int) -> str:
    return f"evpbr{net}"


def netns_name(net: int, host: str) -> str:
    return f"evp{net}{host}"


def veth_name(net: int, host: str) -> str:
    """Controller end of the host's veth (the host end is ``evq<net>-hN`` until renamed eth0)."""
    return f"evp{net}-{host}"


def cgroup_parent(net: int, host: str) -> str:
    return f"{CGROUP_PREFIX}-{netns_name(net, host)}"


# The default net's names (what code that predates ``net`` imports).
SUBNET_PREFIX = subnet_prefix(DEFAULT_NET)
CONTROLLER_IP = controller_ip(DEFAULT_NET)
BRIDGE = bridge_name(DEFAULT_NET)
REGISTRY_ADDR = registry_addr(DEFAULT_NET)


def _tool(name: str) -> str:
    for d in HOST_PATH.split(":"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    raise TestbedError(f"{name} not found; run .ci/setup-testbed.sh")


@dataclass
class Host:
    """One fake host. ``name`` is the inventory name (h1, h2, ...); its kernel objects
    (netns, veth, cgroup parent) are named after ``net`` + ``name``."""

    name: str
    index: int
    ip: str
    hostname: str
    gpus: int
    docker: bool
    dir: str
    veth: str
    pid: int | None = None  # outer nsenter/unshare process (controller PID namespace)
    init_pid: int | None = None  # tini, PID 1 inside the host
    pidns: int | None = None  # inode of the host's PID namespace
    gpu_uuids: list[str] = field(default_factory=list)
    net: int = DEFAULT_NET

    @property
    def docker_sock(self) -> str:
        return os.path.join(self.dir, "docker.sock")

    @property
    def docker_host(self) -> str:
        """DOCKER_HOST for reaching this host's dockerd from the controller."""
        return f"unix://{self.docker_sock}"

    @property
    def netns(self) -> str:
        return netns_name(self.net, self.name)

    @property
    def cgroup_parent(self) -> str:
        return cgroup_parent(self.net, self.name)


class Fleet:
    """N fake GPU hosts + the local registry. Use as a context manager or up()/down().

    ``gpus`` gives one entry per host: its GPU count (0 = no GPU stubs at all).
    ``net`` is the third octet of the fleet's subnet 10.213.<net>.0/24 (default:
    ``$EVALPROV_TESTBED_NET`` or 77); fleets with different nets can run at once.
    """

    def __init__(
        self,
        gpus: list[int] | tuple[int, ...] = (8, 4, 2),
        *,
        docker: bool = True,
        workdir: str | os.PathLike | None = None,
        registry: bool = True,
        registry_dir: str | os.PathLike = DEFAULT_REGISTRY_DIR,
        private_dirs: tuple[str, ...] | list[str] = DEFAULT_PRIVATE_DIRS,
        bridge: str | None = None,
        start_timeout: float = 60.0,
        net: int | None = None,
        binds: tuple[tuple[str, str], ...] = (),
        init_extra: tuple[str, ...] = (),
    ):
        # binds: (controller dir, host path) bind-mounted into every host (e.g. /etc/slurm);
        # init_extra: shell lines each host's init runs (in the background) before sshd,
        # with $B its testbed dir and $H its hostname: they die with the host
        self.binds = tuple(binds)
        self.init_extra = tuple(init_extra)
        self.net = check_net(default_net() if net is None else net)
        self.subnet = f"{subnet_prefix(self.net)}.0/24"
        self.controller_ip = controller_ip(self.net)
        if not gpus:
            raise ValueError("a fleet needs at least one host")
        if len(gpus) > 99:
            raise ValueError(
                f"at most 99 hosts ({subnet_prefix(self.net)}.11 .. {subnet_prefix(self.net)}.199)"
            )
        self._owns_workdir = workdir is None
        if workdir is None:
            import tempfile

            workdir = tempfile.mkdtemp(prefix=f"evp-fleet{self.net}-", dir="/tmp")
        self.workdir = Path(workdir).resolve()
        if str(self.workdir).startswith("/run/"):
            raise ValueError("workdir must not be under /run (hidden inside the hosts)")
        self.bridge = bridge or bridge_name(self.net)
        self.docker_enabled = docker
        self.registry_enabled = registry
        self.registry_dir = Path(registry_dir)
        self.private_dirs = tuple(private_dirs)
        self.start_timeout = start_timeout
        self.hosts: list[Host] = []
        for i, k in enumerate(gpus, start=1):
            name = f"h{i}"
            hostname = f"{HOSTNAME_PREFIX}-{name}"
            self.hosts.append(
                Host(
                    name=name,
                    index=i,
                    ip=f"{subnet_prefix(self.net)}.1{i}",
                    hostname=hostname,
                    gpus=int(k),
                    docker=docker,
                    dir=str(self.workdir / name),
                    veth=veth_name(self.net, name),
                    gpu_uuids=stubs.gpu_uuids(hostname, int(k)),
                    net=self.net,
                )
            )
        self.registry = Registry(
            registry_addr(self.net), storage=self.registry_dir, workdir=self.workdir
        )
        self.is_up = False
        self.timings: dict[str, float] = {}
        self._cp_dir: Path | None = None
        if len(str(self.workdir)) > 80:
            raise ValueError(f"workdir path too long for unix sockets: {self.workdir}")

    # ------------------------------------------------------------------ paths
    @property
    def key_file(self) -> Path:
        return self.workdir / "id_ed25519"

    @property
    def control_path_dir(self) -> Path:
        """Where the ssh ControlPersist sockets live: DIR/cp, unless that is too long
        for a unix socket (ssh needs len + 41 + 17 < 108), then a short dir in /tmp."""
        if self._cp_dir is None:
            cp = self.workdir / "cp"
            if len(str(cp)) + 1 + 40 + 17 >= 108:
                link = self.workdir / "cp-dir"
                if link.is_symlink() or link.exists():
                    cp = Path(os.readlink(link)) if link.is_symlink() else link
                else:
                    import tempfile

                    cp = Path(tempfile.mkdtemp(prefix="evp-cp-", dir="/tmp"))
                    self.workdir.mkdir(parents=True, exist_ok=True)
                    os.symlink(cp, link)
            self._cp_dir = cp
        return self._cp_dir

    @property
    def control_path(self) -> str:
        return str(self.control_path_dir / "%C")

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if name in (h.name, h.hostname, h.ip):
                return h
        raise KeyError(name)

    def url(self, name: str, port: int, path: str = "") -> str:
        return f"http://{self.host(name).ip}:{port}{path}"

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> Fleet:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Fleet:
        """Build bridge, registry and hosts; wait until sshd (and dockerd) answer."""
        t0 = time.monotonic()
        try:
            cleanup_stale(self.net, [h.name for h in self.hosts], bridge=self.bridge)
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.control_path_dir.mkdir(parents=True, exist_ok=True)
            self._keys()
            self._bridge_up()
            if self.registry_enabled:
                self.registry.start()
            for h in self.hosts:
                shutil.rmtree(h.dir, ignore_errors=True)  # fresh hosts: no old docker state
                self._prepare_host(h)
                self._net_up(h)
            for h in self.hosts:
                self._spawn(h)
            self._save_state()
            with ThreadPoolExecutor(max_workers=len(self.hosts)) as ex:
                list(ex.map(self._wait_ready, self.hosts))
            self._save_state()
        except BaseException:
            self.down()
            raise
        self.is_up = True
        self.timings["up"] = time.monotonic() - t0
        return self

    def down(self, *, remove_workdir: bool | None = None) -> None:
        """Tear everything down. Safe after a partial up() and safe to call twice.

        ``remove_workdir`` defaults to True only for a workdir the Fleet made itself."""
        if remove_workdir is None:
            remove_workdir = self._owns_workdir
        t0 = time.monotonic()
        errors: list[str] = []

        def attempt(fn, *args) -> None:
            try:
                fn(*args)
            except Exception as exc:
                errors.append(f"{getattr(fn, '__name__', fn)}{args}: {exc}")

        attempt(self.close_ssh_masters)
        if self._cp_dir is not None and self._cp_dir != self.workdir / "cp":
            shutil.rmtree(self._cp_dir, ignore_errors=True)  # the short fallback in /tmp
        for h in self.hosts:
            attempt(self._kill, h)
        for h in self.hosts:
            attempt(self._net_down, h)
        if self.registry_enabled:
            attempt(self.registry.stop)
        attempt(_del_link, self.bridge)
        for h in self.hosts:
            attempt(_clean_cgroups, h.cgroup_parent)
        for h in self.hosts:  # dockerd's images and layers: up() would wipe them anyway, and
            # a test run's fleets, each host with its own copy of every image it pulled
            # (the harness image is GBs), would otherwise fill the disk
            shutil.rmtree(Path(h.dir) / "docker", ignore_errors=True)
        self.is_up = False
        try:
            if self.workdir.exists():
                self._save_state()
        except OSError:
            pass
        if remove_workdir:
            if self.control_path_dir != self.workdir / "cp":
                shutil.rmtree(self.control_path_dir, ignore_errors=True)
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["down"] = time.monotonic() - t0
        if errors:
            raise TestbedError("teardown problems:\n" + "\n".join(errors))

    # ----------------------------------------------------------- one host
    def kill_host(self, name: str) -> None:
        """Simulate a host crash: every process of the host dies (connections are
        refused from then on). Its disk state (HOSTDIR, /var/lib/docker) stays."""
        h = self.host(name)
        self.close_ssh_masters(h)
        self._kill(h)
        _clean_cgroups(h.cgroup_parent)
        self._save_state()

    def revive_host(self, name: str) -> None:
        """Boot a killed host again (like a reboot: dockerd restarts with its old
        /var/lib/docker, containers with a restart policy come back)."""
        h = self.host(name)
        if h.pid is not None and pid_alive(h.pid):
            raise TestbedError(f"{name} is still running")
        if not os.path.exists(f"/run/netns/{h.netns}"):
            self._net_up(h)
        self._spawn(h)
        self._wait_ready(h)
        self._save_state()

    def disconnect_host(self, name: str) -> None:
        """Simulate a network partition: the host keeps running, packets to it are
        dropped (connections time out instead of being refused)."""
        run(["ip", "link", "set", self.host(name).veth, "down"])

    def reconnect_host(self, name: str) -> None:
        run(["ip", "link", "set", self.host(name).veth, "up"])

    def host_alive(self, name: str) -> bool:
        h = self.host(name)
        return h.pid is not None and pid_alive(h.pid)

    # --------------------------------------------------------- using a host
    def ssh_argv(self, name: str, command: str | None = None) -> list[str]:
        h = self.host(name)
        argv = [
            "ssh",
            *shlex.split(SSH_OPTS),
            "-o",
            f"ControlPath={self.control_path}",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-i",
            str(self.key_file),
            f"root@{h.ip}",
        ]
        if command is not None:
            argv.append(command)
        return argv

    def ssh(self, name: str, command: str, *, timeout: float = 30.0, check: bool = True):
        """Run ``command`` on the host over plain ssh; returns CompletedProcess."""
        return run(self.ssh_argv(name, command), timeout=timeout, check=check)

    def exec(self, name: str, argv: list[str], *, timeout: float = 30.0, check: bool = True):
        """Run ``argv`` inside the host's namespaces via nsenter (no ssh involved)."""
        h = self.host(name)
        if h.init_pid is None:
            raise TestbedError(f"{name} is not running")
        return run(
            [
                "nsenter",
                f"--target={h.init_pid}",
                "--mount",
                "--uts",
                "--net",
                "--pid",
                "--wd=/",
                "--",
                "env",
                "-i",
                f"PATH={HOST_PATH}",
                "HOME=/root",
                *argv,
            ],
            timeout=timeout,
            check=check,
        )

    def docker(
        self,
        name: str,
        *args: str,
        timeout: float = 120.0,
        check: bool = True,
        input: bytes | None = None,
    ):
        """Run the docker CLI on the controller against the host's dockerd."""
        h = self.host(name)
        if not h.docker:
            raise TestbedError(f"{name} has no dockerd")
        env = {"PATH": HOST_PATH, "DOCKER_HOST": h.docker_host, "HOME": str(self.workdir)}
        cli = DEBIAN_DOCKER_CLI if os.path.exists(DEBIAN_DOCKER_CLI) else _tool("docker")
        return run([cli, *args], timeout=timeout, check=check, env=env, input=input)

    def close_ssh_masters(self, host: Host | None = None) -> None:
        """``ssh -O exit`` every ControlPersist master (Ansible's and ours)."""
        if not self.control_path_dir.is_dir():
            return
        if host is not None:
            argv = self.ssh_argv(host.name)
            argv[1:1] = ["-O", "exit"]
            run(argv, timeout=5, check=False)
            return
        socks = [p for p in self.control_path_dir.iterdir() if p.is_socket()]

        def close(sock: Path) -> None:
            run(
                ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "evalprov-testbed"],
                timeout=5,
                check=False,
            )

        if socks:
            with ThreadPoolExecutor(max_workers=min(8, len(socks))) as ex:
                list(ex.map(close, socks))
        # A master whose host died may not answer: kill what still holds our sockets.
        needle = str(self.control_path_dir)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                argv = pid_cmdline(int(entry))
                if argv and os.path.basename(argv[0]) == "ssh" and any(needle in a for a in argv):
                    signal_quiet(int(entry))

    # -------------------------------------------------------------- inventory
    def host_vars(self, h: Host) -> dict:
        return {
            "ansible_host": h.ip,
            "ansible_port": 22,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.key_file),
            "ansible_python_interpreter": HOST_PYTHON,
            "ansible_ssh_common_args": f"{SSH_OPTS} -o ControlPath={self.control_path}",
            "ansible_control_path_dir": str(self.control_path_dir),
            "testbed_hostname": h.hostname,
            "testbed_gpus": h.gpus,
            "testbed_gpu_uuids": list(h.gpu_uuids),
            "testbed_docker": h.docker,
        }

    def inventory(self) -> dict:
        """Inventory dict for ansible_runner.run(inventory=...)."""
        return {
            "all": {
                "hosts": {h.name: self.host_vars(h) for h in self.hosts},
                "children": {
                    "testbed_gpu_hosts": {"hosts": {h.name: {} for h in self.hosts if h.gpus}},
                },
            }
        }

    def write_inventory(self, path: str | os.PathLike | None = None) -> Path:
        import yaml

        path = Path(path) if path is not None else self.workdir / "inventory.yml"
        path.write_text(yaml.safe_dump(self.inventory(), sort_keys=False))
        return path

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {
            "workdir": str(self.workdir),
            "net": self.net,
            "bridge": self.bridge,
            "docker": self.docker_enabled,
            "registry": self.registry_enabled,
            "registry_dir": str(self.registry_dir),
            "registry_pid": self.registry.pid,
            "private_dirs": list(self.private_dirs),
            "hosts": [asdict(h) for h in self.hosts],
        }

    def _save_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2) + "\n")
        tmp.replace(self.state_file)

    @classmethod
    def attach(cls, workdir: str | os.PathLike) -> Fleet:
        """Re-open a fleet another process brought up (CLI ``down``/``status``)."""
        st = json.loads((Path(workdir) / "state.json").read_text())
        f = cls(
            [h["gpus"] for h in st["hosts"]],
            docker=st["docker"],
            workdir=st["workdir"],
            registry=st["registry"],
            registry_dir=st["registry_dir"],
            private_dirs=st["private_dirs"],
            bridge=st["bridge"],
            net=st.get("net", DEFAULT_NET),
        )
        for h, saved in zip(f.hosts, st["hosts"], strict=True):
            h.pid, h.init_pid, h.pidns = saved["pid"], saved["init_pid"], saved["pidns"]
        f.registry.pid = st.get("registry_pid")
        f.is_up = any(h.pid and pid_alive(h.pid) for h in f.hosts)
        return f

    def status(self) -> dict:
        out = {"workdir": str(self.workdir), "net": self.net, "bridge": self.bridge, "hosts": {}}
        out["bridge_present"] = os.path.exists(f"/sys/class/net/{self.bridge}")
        out["registry"] = self.registry.url if self.registry_enabled else None
        for h in self.hosts:
            out["hosts"][h.name] = {
                "hostname": h.hostname,
                "ip": h.ip,
                "gpus": h.gpus,
                "docker": h.docker,
                "alive": bool(h.pid and pid_alive(h.pid)),
                "netns": os.path.exists(f"/run/netns/{h.netns}"),
            }
        return out

    # -------------------------------------------------------------- internals
    def _keys(self) -> None:
        for key in (self.key_file, self.workdir / "ssh_host_ed25519_key"):
            if not key.exists():
                run(
                    [
                        "ssh-keygen",
                        "-q",
                        "-t",
                        "ed25519",
                        "-N",
                        "",
                        "-C",
                        "evalprov-testbed",
                        "-f",
                        str(key),
                    ]
                )
            key.chmod(0o600)

    def _bridge_up(self) -> None:
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.controller_ip}/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])

    def _etc_hosts(self) -> str:
        lines = [
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            f"{self.controller_ip}\t{HOSTNAME_PREFIX}-controller",
        ]
        lines += [f"{h.ip}\t{h.hostname} {h.name}" for h in self.hosts]
        return "\n".join(lines) + "\n"

    def _prepare_host(self, h: Host) -> None:
        d = Path(h.dir)
        d.mkdir(parents=True, exist_ok=True)
        for sub in ("sbin", "docker"):
            (d / sub).mkdir(exist_ok=True)
        tmp = d / "tmp"
        tmp.mkdir(exist_ok=True)
        tmp.chmod(0o1777)
        root = d / "root"
        if not root.exists():
            shutil.copytree("/etc/skel", root, symlinks=True)
            root.chmod(0o700)
        ssh_dir = root / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        pub = (self.workdir / "id_ed25519.pub").read_text()
        (ssh_dir / "authorized_keys").write_text(pub)
        (ssh_dir / "authorized_keys").chmod(0o600)
        (d / "hosts").write_text(self._etc_hosts())
        (d / "hostname").write_text(h.hostname + "\n")
        (d / "resolv.conf").write_text("")
        shutil.copy2(self.workdir / "ssh_host_ed25519_key", d / "ssh_host_ed25519_key")
        (d / "ssh_host_ed25519_key").chmod(0o600)
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    f"ListenAddress {h.ip}",
                    "Port 22",
                    "HostKey /run/testbed/ssh_host_ed25519_key",
                    "PidFile /run/sshd.pid",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "AuthorizedKeysFile .ssh/authorized_keys",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "UseDNS no",
                    "MaxStartups 50",
                    "MaxSessions 50",
                    "PrintMotd no",
                    "AcceptEnv LANG LC_*",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        # /usr/local/sbin is first on root's PATH (sshd, dockerd): the GPU stubs live there.
        sbin = d / "sbin"
        for entry in sbin.iterdir():
            entry.unlink()
        for entry in sorted(os.listdir("/usr/local/sbin")):
            os.symlink(os.path.join("/usr/local/sbin", entry), sbin / entry)
        if h.docker and os.path.exists(DEBIAN_DOCKER_CLI) and not (sbin / "docker").exists():
            # The machine may carry a newer docker CLI in /usr/local/bin (28.x here); against
            # Debian's dockerd 20.10 it breaks `--gpus device=...` ("cannot set both Count
            # and DeviceIDs"). A real host has a matching client: give the hosts Debian's.
            os.symlink(DEBIAN_DOCKER_CLI, sbin / "docker")
        if h.gpus > 0:
            smi = sbin / "nvidia-smi"
            smi.write_text(stubs.nvidia_smi(h.hostname, h.gpus))
            smi.chmod(0o755)
            hook = sbin / "nvidia-container-runtime-hook"
            hook.write_text(stubs.HOOK)
            hook.chmod(0o755)

    def _init_script(self, h: Host) -> str:
        q = shlex.quote
        lines = [
            "set -eu",
            f"export PATH={HOST_PATH}",
            f"hostname {q(h.hostname)}",
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            "mkdir -p /run/testbed /run/sshd /run/lock",
            f"mount --bind {q(h.dir)} /run/testbed",
            "B=/run/testbed",
            # the sources of the extra binds, held before /root & co. are replaced
            *[f"mkdir -p /run/testbed-bind/{i} && mount --bind {q(src)} /run/testbed-bind/{i}"
              for i, (src, _) in enumerate(self.binds)],
            "mount --bind $B/hosts /etc/hosts",
            "mount --bind $B/hostname /etc/hostname",
            "mount --bind $B/resolv.conf /etc/resolv.conf",
            "mount --bind $B/root /root",
            "mount --bind $B/sbin /usr/local/sbin",
        ]
        for d in self.private_dirs:
            lines.append(f"mkdir -p {q(d)} && mount -t tmpfs -o mode=0755 tmpfs {q(d)}")
        for i, (_, dst) in enumerate(self.binds):
            lines.append(f"mkdir -p {q(dst)} && mount --bind /run/testbed-bind/{i} {q(dst)}")
        if h.docker:
            lines += [
                "mkdir -p /var/lib/docker /etc/docker",
                "mount --bind $B/docker /var/lib/docker",
                "mount -t tmpfs -o mode=0755 tmpfs /etc/docker",
                "rm -f $B/docker.sock",
                "dockerd --host unix:///run/docker.sock --host unix://$B/docker.sock"
                " --data-root /var/lib/docker --exec-root /run/docker --pidfile /run/docker.pid"
                f" --registry-mirror http://{self.registry.addr}"
                f" --insecure-registry {self.registry.addr}"
                f" --cgroup-parent /{h.cgroup_parent} --log-level warn"
                " >>$B/dockerd.log 2>&1 </dev/null &",
            ]
        lines += [
            "mount --bind $B/tmp /tmp",
            "cd /",
            f"H={q(h.hostname)}",
            *self.init_extra,
            "exec /usr/sbin/sshd -D -e -f $B/sshd_config >>$B/sshd.log 2>&1 </dev/null",
        ]
        return "\n".join(lines)

    def _net_up(self, h: Host) -> None:
        peer = f"evq{self.net}-{h.name}"
        run(["ip", "netns", "add", h.netns])
        run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", peer])
        run(["ip", "link", "set", h.veth, "master", self.bridge, "up"])
        run(["ip", "link", "set", peer, "netns", h.netns])
        ns = ["ip", "-n", h.netns]
        run([*ns, "link", "set", peer, "name", "eth0"])
        run([*ns, "addr", "add", f"{h.ip}/24", "dev", "eth0"])
        run([*ns, "link", "set", "eth0", "up"])
        run([*ns, "link", "set", "lo", "up"])

    def _net_down(self, h: Host) -> None:
        _del_link(h.veth)
        if os.path.exists(f"/run/netns/{h.netns}"):
            # Anything still inside (should be nothing after _kill) dies first.
            ino = ns_inode(f"/run/netns/{h.netns}")
            if ino is not None:
                for pid in pids_in_ns("net", ino):
                    signal_quiet(pid)
            run(["ip", "netns", "del", h.netns], timeout=10)

    def _spawn(self, h: Host) -> None:
        with open(os.path.join(h.dir, "init.log"), "ab") as log:
            proc = subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/run/netns/{h.netns}",
                    "unshare",
                    "--mount",
                    "--uts",
                    "--pid",
                    "--mount-proc",
                    "--propagation",
                    "private",
                    "--kill-child=SIGKILL",
                    "/usr/bin/tini",
                    "-s",
                    "--",
                    "sh",
                    "-c",
                    self._init_script(h),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": "/root"},
            )
        h.pid = proc.pid
        h.init_pid = None
        h.pidns = None
        self._procs = getattr(self, "_procs", {})
        self._procs[h.name] = proc

    def _wait_ready(self, h: Host) -> None:
        proc = getattr(self, "_procs", {}).get(h.name)

        def check_alive() -> None:
            if (proc is not None and proc.poll() is not None) or not pid_alive(h.pid):
                log = Path(h.dir, "init.log").read_text(errors="replace")[-3000:]
                raise TestbedError(f"{h.name} died during start-up; init.log:\n{log}")

        def init_pid() -> int | None:
            check_alive()
            kids = child_pids(h.pid)
            return kids[0] if kids else None

        h.init_pid = wait_for(init_pid, timeout=10, what=f"{h.name} tini")
        h.pidns = ns_inode(f"/proc/{h.init_pid}/ns/pid")

        def sshd_up() -> bool:
            check_alive()
            return tcp_banner(h.ip, 22, timeout=1.0).startswith(b"SSH-")

        wait_for(sshd_up, timeout=self.start_timeout, what=f"sshd on {h.name}")
        if h.docker:

            def dockerd_up() -> bool:
                check_alive()
                status, _ = unix_http_get(h.docker_sock, "/_ping", timeout=2)
                return status == 200

            try:
                wait_for(dockerd_up, timeout=self.start_timeout, what=f"dockerd on {h.name}")
            except TestbedError as exc:
                log = Path(h.dir, "dockerd.log").read_text(errors="replace")[-3000:]
                raise TestbedError(f"{exc}\ndockerd.log:\n{log}") from exc

    def _kill(self, h: Host) -> None:
        if h.pid is not None and pid_alive(h.pid):
            argv = pid_cmdline(h.pid)
            if argv and os.path.basename(argv[0]) in ("unshare", "nsenter"):
                kill_and_reap(h.pid, timeout=10)
        proc = getattr(self, "_procs", {}).pop(h.name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        # The kernel kills the whole PID namespace when tini (its PID 1) dies.
        if h.pidns is not None:
            pidns = h.pidns
            wait_for(
                lambda: not pids_in_ns("pid", pidns),
                timeout=15,
                what=f"{h.name}'s processes to exit",
            )
        h.pid = h.init_pid = h.pidns = None


def _del_link(name: str) -> None:
    if os.path.exists(f"/sys/class/net/{name}"):
        run(["ip", "link", "del", name], timeout=10)


def _clean_cgroups(parent: str, *, timeout: float = 10.0) -> None:
    """rmdir the cgroup trees dockerd/runc made under /<parent> in every hierarchy."""
    roots = [Path("/sys/fs/cgroup") / parent]
    base = Path("/sys/fs/cgroup")
    if base.is_dir():
        roots += [d / parent for d in base.iterdir() if d.is_dir() and not d.is_symlink()]
    deadline = time.monotonic() + timeout
    for root in roots:
        if root.is_dir() and not rmdir_tree(root, deadline):
            raise TestbedError(f"cgroup {root} still busy after {timeout}s")


# Names a net-77 fleet used before fleets had a ``net``: netns hN, veth evp-hN, bridge evpbr0,
# cgroup parent evalprov-testbed-hN. cleanup_stale(77) removes those leftovers too.
_LEGACY_BRIDGE = "evpbr0"


def _stale_netns(net: int) -> list[str]:
    """Host names (h1, ...) whose netns for ``net`` exists."""
    prefix = netns_name(net, "h")
    if not os.path.isdir("/run/netns"):
        return []
    return [
        n[len(prefix) - 1 :]
        for n in os.listdir("/run/netns")
        if n.startswith(prefix) and n[len(prefix) :].isdigit()
    ]


def _legacy_netns() -> list[str]:
    if not os.path.isdir("/run/netns"):
        return []
    return [n for n in os.listdir("/run/netns") if n[:1] == "h" and n[1:].isdigit()]


def _kill_netns(name: str) -> bool:
    """Kill what runs in netns ``name`` and delete it; False if it did not exist."""
    path = f"/run/netns/{name}"
    if not os.path.exists(path):
        return False
    ino = ns_inode(path)
    pids = pids_in_ns("net", ino) if ino is not None else []
    # Killing the tini of each PID namespace takes everything in it along.
    for pid in pids:
        signal_quiet(pid)
    if pids:
        wait_for(
            lambda: not pids_in_ns("net", ino),
            timeout=15,
            what=f"stale processes in netns {name}",
        )
    run(["ip", "netns", "del", name], timeout=10, check=False)
    return True


def cleanup_stale(
    net: int | None = None, hosts: list[str] | None = None, *, bridge: str | None = None
) -> list[str]:
    """Remove what a crashed earlier fleet on ``net`` left: processes in its netns,
    veths, netns, bridge, registry, cgroups. Fleets on other nets are untouched.
    ``hosts`` are host names (h1, ...) to clean besides every netns of this net that exists.
    Returns what was removed."""
    net = check_net(default_net() if net is None else net)
    bridge = bridge or bridge_name(net)
    removed = []
    hosts = sorted(set(hosts or ()) | set(_stale_netns(net)))
    objects = [(netns_name(net, h), veth_name(net, h), cgroup_parent(net, h)) for h in hosts]
    bridges = [bridge]
    if net == DEFAULT_NET:
        legacy = sorted(set(hosts) | set(_legacy_netns()))
        objects += [(n, f"evp-{n}", f"{CGROUP_PREFIX}-{n}") for n in legacy]
        bridges.append(_LEGACY_BRIDGE)
    for ns, veth, cgroup in objects:
        if _kill_netns(ns):
            removed.append(f"netns {ns}")
        if os.path.exists(f"/sys/class/net/{veth}"):
            _del_link(veth)
            removed.append(f"link {veth}")
        _clean_cgroups(cgroup)
    for br in bridges:
        if os.path.exists(f"/sys/class/net/{br}"):
            _del_link(br)
            removed.append(f"bridge {br}")
    stale_registry = Registry(registry_addr(net), workdir=Path("/tmp"))
    stale_registry.stop_stale()
    if net == DEFAULT_NET:
        stale_registry.stop_stale(CACHE_ROOT / "registry.pid")
    return removed
