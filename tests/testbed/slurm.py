"""A real Slurm 22.05 cluster on the test fleet (../shared/docs/TESTBED.md, "Slurm"):
munged on a private socket and slurmctld on the controller's fleet address, one slurmd
inside every fake host (started by the host's init, so it dies with the host), fake GPU
gres from device files. The first host doubles as the login node (sbatch over SSH).

    with SlurmCluster(gpus=[2, 2]) as c:
        c.fleet.ssh("h1", "sbatch --wrap true")
        c.squeue()

Every wait has a deadline; teardown stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .fleet import DEFAULT_PRIVATE_DIRS, Fleet
from .util import TestbedError, kill_and_reap, run, wait_for

PARTITION = "batch"
ACCOUNT = "evalprov"
# The hosts see the machine's /opt/evalprov (the venvs of the process runtime) and
# /var/lib/evalprov (the tiny model): a cluster's shared software and model directories.
SLURM_PRIVATE_DIRS = tuple(d for d in DEFAULT_PRIVATE_DIRS
                           if d not in ("/opt", "/var/lib/evalprov"))


class SlurmCluster:
    def __init__(self, gpus=(2, 2), *, workdir: str | os.PathLike | None = None,
                 net: int | None = None, cpus: int = 2, docker: bool = True,
                 fleet_kwargs: dict | None = None):
        import tempfile

        # not under /tmp: every host has its own /tmp, and the cluster's files (its config,
        # munge socket, job directories) must be seen by all of them, as on a shared FS
        self._owns = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="evp-slurm-", dir="/var/tmp")).resolve()
        self.gpus = list(gpus)
        self.cpus = cpus
        self.etc = self.dir / "etc"
        self.conf = self.etc / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.ctld: subprocess.Popen | None = None
        self.munged: subprocess.Popen | None = None
        # the venvs' python lives where the machine's python does (e.g. /root/.pyenv, under
        # the /root every host has of its own): the nodes see it as a cluster's nodes see
        # its shared software
        binds = [(str(self.etc), "/etc/slurm")]
        base = Path(sys.base_prefix).resolve()
        if str(base).startswith("/root/"):
            binds.append((str(base), str(base)))
        self.fleet = Fleet(
            self.gpus, docker=docker, net=net, private_dirs=SLURM_PRIVATE_DIRS,
            workdir=self.dir / "fleet",
            binds=tuple(binds),
            init_extra=(
                "slurmd -D -N $H -f /etc/slurm/slurm.conf >>$B/slurmd.log 2>&1 </dev/null &",
            ),
            **(fleet_kwargs or {}),
        )
        self.nodes = [h.hostname for h in self.fleet.hosts]

    # ------------------------------------------------------------------ config
    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm commands run on the controller."""
        return {"PATH": os.environ.get("PATH", os.defpath), "SLURM_CONF": str(self.conf),
                "HOME": "/root", "LANG": "C.UTF-8"}

    def _write_conf(self) -> None:
        for sub in ("etc", "munge", "ctld", "spool", "dev", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for h in self.fleet.hosts:
            (self.dir / "spool" / h.hostname).mkdir(exist_ok=True)
        os.chmod(self.dir / "munge", 0o700)
        ctl = socket.gethostname().split(".")[0]
        nodes, gres = [], []
        for h in self.fleet.hosts:
            devs = []
            for i in range(h.gpus):
                dev = self.dir / "dev" / f"{h.hostname}-nvidia{i}"
                if not dev.exists():
                    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
                devs.append(str(dev))
            g = f" Gres=gpu:{h.gpus}" if h.gpus else ""
            nodes.append(f"NodeName={h.hostname} NodeAddr={h.ip} CPUs={self.cpus} "
                         f"RealMemory=4000{g} State=UNKNOWN")
            for d in devs:
                gres.append(f"NodeName={h.hostname} Name=gpu File={d}")
        d = self.dir
        self.conf.write_text("\n".join([
            "ClusterName=evalprov",
            f"SlurmctldHost={ctl}({self.fleet.controller_ip})",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmctldPort=16817",
            "SlurmdPort=16818",
            f"StateSaveLocation={d}/ctld",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            "SlurmdPidFile=/run/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu",
            "ReturnToService=2",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=300",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "MessageTimeout=10",
            "SchedulerParameters=bf_interval=1,sched_interval=1",
            *nodes,
            f"PartitionName={PARTITION} Nodes=ALL Default=NO MaxTime=INFINITE State=UP",
            "",
        ]))
        (self.etc / "gres.conf").write_text("\n".join(gres) + "\n")

    # --------------------------------------------------------------- lifecycle
    def __enter__(self) -> SlurmCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> SlurmCluster:
        try:
            self.fleet.workdir.mkdir(parents=True, exist_ok=True)
            self._write_conf()
            self._munge()
            self.fleet.up()  # the bridge (controller address) must exist before slurmctld
            log = open(self.dir / "log" / "slurmctld.out", "ab")  # noqa: SIM115
            self.ctld = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True)
            log.close()
            wait_for(self._all_idle, timeout=60, interval=0.5, what="slurm nodes idle")
        except BaseException:
            self.down()
            raise
        return self

    def _munge(self) -> None:
        key = self.dir / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        m = self.dir / "munge"
        self.munged = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
             f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
             f"--seed-file={m}/munged.seed"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_for(self.munge_socket.exists, timeout=10, what="munged socket")

    def _all_idle(self) -> bool:
        if self.ctld is not None and self.ctld.poll() is not None:
            raise TestbedError("slurmctld exited: " + self.log("slurmctld.log")[-2000:])
        r = self.sinfo()
        states = [line.split()[1] for line in r.splitlines() if line.strip()]
        return len(states) == len(self.nodes) and all(s.startswith("idle") for s in states)

    def down(self) -> None:
        errors = []
        with contextlib.suppress(Exception):
            self.cancel_all()
        for proc in (self.ctld, self.munged):
            if proc is not None and proc.poll() is None:
                try:
                    kill_and_reap(proc.pid, timeout=10)
                except Exception as exc:
                    errors.append(str(exc))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self.ctld = self.munged = None
        try:
            self.fleet.down()
        except Exception as exc:
            errors.append(str(exc))
        if self._owns:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise TestbedError("slurm teardown: " + "; ".join(errors))

    # ---------------------------------------------------------------- queries
    def cmd(self, *argv: str, timeout: float = 30.0, check: bool = True) -> str:
        return run(list(argv), env=self.env, timeout=timeout,
                   check=check).stdout.decode(errors="replace")

    def sinfo(self) -> str:
        return self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False)

    def squeue(self) -> list[dict[str, str]]:
        out = self.cmd("squeue", "-h", "-o", "%i|%j|%T|%R")
        return [dict(zip(("id", "name", "state", "reason"), line.split("|"), strict=False))
                for line in out.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id), check=False)
        fields = {}
        for word in out.split():
            k, _, v = word.partition("=")
            fields[k] = v
        return fields

    def cancel_all(self) -> None:
        self.cmd("scancel", "--partition", PARTITION, check=False)
        wait_for(lambda: not self.squeue(), timeout=30, interval=0.5, what="jobs to end")

    def log(self, name: str) -> str:
        path = self.dir / "log" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_job_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        def state() -> str | None:
            s = self.job(job_id).get("JobState", "")
            return s if s in states else None
        return str(wait_for(state, timeout=timeout, interval=1.0,
                            what=f"job {job_id} in {states}"))

