"""ansible-runner: a 0700 private data dir per run, the plan as inventory variables, live
progress per host from runner events, and per-host results from runner stats.

The Ansible side is the collection evalprov.fleet inside this package (found with
importlib.resources, so an installed wheel applies from any directory). Every value handed
to Ansible is written by one function (inventory.ansible_vars / inventory_file) that marks
it !unsafe: nothing from a config, inventory, the environment or the command line is ever
templated.

Secrets never touch a file: ansible-runner writes its envvars, extravars and even the whole
environment of ansible-playbook (artifacts/<id>/command) to disk, so the run gets an
allow-listed environment, and secret values (and decide's inputs) travel through anonymous
in-memory files (memfd) that the playbook reads by their /proc paths.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalprov.inventory import ansible_vars, inventory_file
from evalprov.live import LiveView

# The directory holding ansible_collections/evalprov/fleet (the package itself).
COLLECTIONS = Path(str(importlib.resources.files("evalprov")))
COLLECTION = COLLECTIONS / "ansible_collections" / "evalprov" / "fleet"
PLAYBOOKS = COLLECTION / "playbooks"


@dataclass
class HostResult:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    would_change: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    status: str
    rc: int
    hosts: dict[str, HostResult]
    facts: dict[str, Any]
    seconds: float
    private_data_dir: Path
    tasks: list[dict[str, Any]] = field(default_factory=list)  # evaluation results
    interrupted: bool = False
    decision: dict[str, Any] | None = None  # what evalprov_decide returned
    # host -> instance -> requests it answered through the host's proxy during the tasks
    proxy_requests: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def failed_hosts(self) -> list[str]:
        return [h for h, r in self.hosts.items() if r.failed or r.unreachable or r.errors]


def _private_dir(run_dir: Path) -> Path:
    pdd = run_dir / "ansible"
    (pdd / "inventory").mkdir(parents=True, exist_ok=True)
    for p in (run_dir, pdd):
        os.chmod(p, 0o700)
    return pdd


# What ansible-playbook may inherit from the caller's environment (no secrets in these).
ENV_ALLOW = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM", "TZ", "TMPDIR",
             "SSH_AUTH_SOCK", "VIRTUAL_ENV", "PYTHONPATH")
ENV_ALLOW_PREFIX = ("ANSIBLE_",)


@contextlib.contextmanager
def clean_environ() -> Iterator[None]:
    """Run with only allow-listed variables in os.environ (ansible-runner copies and records
    it), restoring the caller's environment afterwards."""
    saved = dict(os.environ)
    keep = {k: v for k, v in saved.items() if k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIX)}
    # the ansible-playbook of this evalprov's own environment (a venv's bin may not be on
    # PATH when evalprov is started by its full path)
    keep["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                    keep.get("PATH") or os.defpath])
    os.environ.clear()
    os.environ.update(keep)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def memory_file(data: bytes | None) -> Iterator[str]:
    """A path ansible-playbook (a child of this process) can read data from, backed by
    memory only and gone when the run ends; "" when there is no data."""
    if not data:
        yield ""
        return
    fd = os.memfd_create("evalprov", 0)
    try:
        os.write(fd, data)
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def secret_channel(values: dict[str, Any] | None):
    """Secret values as JSON in a memory file (see memory_file)."""
    return memory_file(json.dumps(values).encode() if values else None)


def ansible_env(pdd: Path, forks: int | None) -> dict[str, str]:
    """Non-secret Ansible settings: pipelining and SSH connection reuse on by default."""
    paths = [str(COLLECTIONS), *filter(None, os.environ.get("ANSIBLE_COLLECTIONS_PATH", "")
                                       .split(os.pathsep)),
             str(Path.home() / ".ansible" / "collections"), "/usr/share/ansible/collections"]
    env = {
        "ANSIBLE_COLLECTIONS_PATH": os.pathsep.join(dict.fromkeys(paths)),
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=120s",
        "ANSIBLE_GATHERING": "explicit",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_LOCAL_TEMP": str(pdd / "tmp"),
        "ANSIBLE_NOCOLOR": "True",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
    }
    if forks:
        env["ANSIBLE_FORKS"] = str(forks)
    return env


class Progress:
    """Turns runner events into one line per host per task (skips are counted, not shown),
    and tells the live view (evalprov.live) each host's phase and each task's samples as
    they happen: a long step (the health wait, the evaluation) reports while it runs through
    its poll (runner_on_async_poll) or retry (runner_retry) events."""

    def __init__(self, out=None, check: bool = False, diff: bool = False,
                 on_task_start: Callable[[str, str], None] | None = None,
                 on_decision: Callable[[dict[str, Any]], None] | None = None,
                 live: LiveView | None = None) -> None:
        self.out = out or sys.stderr
        self.start = time.monotonic()
        self.live = live or LiveView(self.out, start=self.start)
        self.on_task_start = on_task_start  # (host, module) when a task starts on a host
        self.on_decision = on_decision  # evalprov_decide's result, as soon as it is made
        self.decision: dict[str, Any] | None = None
        self.check = check
        self.diff = diff
        self.hosts: dict[str, HostResult] = {}
        self.facts: dict[str, Any] = {}
        self.slurm: dict[str, Any] | None = None  # the last look at a Slurm job
        self._slurm_line = ""

    def say(self, line: str) -> None:
        self.live.say(line)

    def _host(self, name: str) -> HostResult:
        return self.hosts.setdefault(name, HostResult())

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host")
        if kind == "runner_on_start" and host:
            self.live.started(host, str(data.get("task") or ""))
            if self.on_task_start:
                self.on_task_start(host, _action(data))
        if kind in ("runner_on_async_poll", "runner_retry") and host:
            progress = (data.get("res") or {}).get("evalprov_eval_progress")
            if isinstance(progress, dict):
                self.live.samples(host, progress)
            pulled = (data.get("res") or {}).get("evalprov_pull_progress")
            if isinstance(pulled, dict):
                self.live.pulled(host, pulled)
            self.live.tick(host)
        if kind in ("runner_on_ok", "runner_on_failed") and host:
            res = data.get("res") or {}
            if isinstance(res.get("evalprov_eval_progress"), dict):
                self.live.samples(host, res["evalprov_eval_progress"])
            self.live.finished(host, str(data.get("task") or ""),
                               kind == "runner_on_ok" or bool(data.get("ignore_errors")),
                               goes_on=res.get("running") is True)
        if kind in ("runner_retry", "runner_on_ok") and (data.get("res") or {}).get(
                "evalprov_slurm_state"):
            self._slurm_progress(host, data["res"])
            if kind == "runner_retry":
                return True
        if not host or kind not in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable",
                                    "runner_on_skipped"):
            return True
        task = data.get("task", "")
        res = data.get("res") or {}
        hr = self._host(host)
        t = f"{time.monotonic() - self.start:6.1f}s"
        if kind == "runner_on_skipped":
            hr.skipped += 1
            self.live.skipped(host, task)
            return True
        if kind == "runner_on_unreachable":
            hr.unreachable += 1
            msg = str(res.get("msg", "unreachable")).strip().splitlines()[0][:200]
            if "Host key verification failed" in str(res.get("msg", "")):
                msg = (f"host {host}: its SSH host key is not in known_hosts or has changed "
                       "(host key checking stays on); add it with `ssh-keyscan HOST >> "
                       "~/.ssh/known_hosts`, or set ansible_ssh_common_args: '-o "
                       "StrictHostKeyChecking=accept-new' for the host in the inventory")
            hr.errors.append(f"unreachable: {msg}")
            self.say(f"{t} {host:<20} UNREACHABLE  {task}: {msg}")
            return True
        if res.get("evalprov_facts"):  # the probe's raw facts
            self.facts[host] = res
        if res.get("evalprov_decision"):
            self.decision = res
            if self.on_decision:
                self.on_decision(res)
            if kind == "runner_on_failed":
                for problem in res.get("problems") or []:
                    who = problem.split(":", 1)[0].removeprefix("host ")
                    self._host(who if who in self.facts else host).errors.append(problem)
                    self.say(f"{t} {who if who in self.facts else host:<20} FAILED       "
                             f"{problem}")
                self._host(host).failed += 1
                return True
        if kind == "runner_on_failed":
            if data.get("ignore_errors"):
                return True
            hr.failed += 1
            msg = str(res.get("msg", "failed")).strip()
            hr.errors.append(msg)
            self.say(f"{t} {host:<20} FAILED       {task}: {msg}")
            return True
        if "censored" in res:  # no_log (secret values in the arguments): stats count it
            hr.ok += 1
            self.say(f"{t} {host:<20} {'done':<12} {task} "
                     "(output hidden: it carries secrets)")
            return True
        changed = bool(res.get("changed"))
        if changed:
            hr.changed += 1
            items = [r.get("_ansible_item_label") or r.get("item") for r in
                     res.get("results", []) if r.get("changed")] or [None]
            for item in items:
                label = f"{task} [{item}]" if item else task
                hr.would_change.append(label)
        else:
            hr.ok += 1
        word = ("would change" if self.check else "changed") if changed else "ok"
        if _action(data).endswith("validate_argument_spec") and not changed:
            return True
        self.say(f"{t} {host:<20} {word:<12} {task}")
        if self.diff and changed:
            for d in _diffs(res):
                self.say(f"{'':>8}{host:<20} diff: {d}")
        return True


    def _slurm_progress(self, host: str, res: dict[str, Any]) -> None:
        """One line each time the job's state, phase or a task's state changes."""
        self.slurm = res
        jobs = ", ".join(f"job {j.get('id')} {j.get('state')}" for j in res.get("jobs") or [])
        tasks = res.get("tasks") or {}
        done = sum(s in ("succeeded", "failed") for s in tasks.values())
        where = f" on {res['node']}" if res.get("node") else ""
        line = (f"{jobs or 'no job'}; {res.get('phase')}{where}; tasks {done}/{len(tasks)} "
                "done" + "".join(f", {n} {s}" for n, s in sorted(tasks.items())
                                 if s != "pending"))
        if line != self._slurm_line:
            self._slurm_line = line
            t = f"{time.monotonic() - self.start:6.1f}s"
            self.say(f"{t} {host:<20} {'slurm':<12} {line}")
            if res.get("message") and res.get("phase") in ("failed", "stopping"):
                self.say(f"{'':>8}{host:<20} {'':<12} {res['message']}")


def _action(data: dict[str, Any]) -> str:
    """The module or action a task runs (resolved FQCN where the event has it)."""
    return str(data.get("resolved_action") or data.get("task_action") or "")


def _leaf_diffs(before: Any, after: Any, path: str) -> list[str]:
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        return [d for k in sorted(set(before) | set(after), key=str)
                for d in _leaf_diffs(before.get(k), after.get(k), f"{path}.{k}" if path else k)]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [d for i, (b, a) in enumerate(zip(before, after, strict=True))
                for d in _leaf_diffs(b, a, f"{path}[{i}]")]
    return [f"{path or 'value'}: {json.dumps(before)} -> {json.dumps(after)}"]


def _diffs(res: dict[str, Any]) -> list[str]:
    """Only what differs, one leaf per line (e.g. ``command[13]: "4096" -> "2048"``)."""
    out = []
    for r in [res, *res.get("results", [])]:
        diff = r.get("diff")
        for d in diff if isinstance(diff, list) else [diff] if diff else []:
            label = r.get("_ansible_item_label")
            prefix = f"[{label}] " if label else ""
            out.extend(prefix + x for x in _leaf_diffs(d.get("before"), d.get("after"), ""))
    return out


def run_playbook(
    playbook: str,
    run_dir: Path,
    inventories: list[str],
    plan_vars: dict[str, Any],
    extravars: dict[str, Any] | None = None,
    *,
    check: bool = False,
    diff: bool = False,
    limit: str | None = None,
    tags: str | None = None,
    skip_tags: str | None = None,
    forks: int | None = None,
    secrets: dict[str, Any] | None = None,
    inputs: bytes | None = None,
    progress: Callable[[dict[str, Any]], bool] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RunResult:
    """One ansible-playbook run of the collection's `playbook`. plan_vars (an inventory dict)
    and extravars reach Ansible only as !unsafe data; secrets and decide's inputs only
    through memory files."""
    import ansible_runner

    pdd = _private_dir(run_dir)
    sources = list(inventories)
    if plan_vars:
        vars_file = pdd / "inventory" / "zz-evalprov-plan.yml"
        vars_file.write_text(inventory_file(plan_vars))
        sources.append(str(vars_file))
    handler = progress or Progress(check=check, diff=diff)
    live = getattr(handler, "live", None)
    t0 = time.monotonic()
    with memory_file(inputs) as inputs_path, secret_channel(secrets) as secrets_path, \
            clean_environ(), live if live is not None else contextlib.nullcontext():
        extra = pdd / "env" / "evalprov-vars.yml"
        extra.parent.mkdir(parents=True, exist_ok=True)
        extra.write_text(ansible_vars({**(extravars or {}), "evalprov_secrets_file": secrets_path,
                                       "evalprov_inputs_file": inputs_path}))
        flags = [f for f, on in (("--check", check), ("--diff", diff)) if on]
        r = ansible_runner.run(
            private_data_dir=str(pdd),
            playbook=str(PLAYBOOKS / playbook),
            inventory=sources,
            envvars=ansible_env(pdd, forks),
            cmdline=" ".join([*flags, "-e", shlex.quote(f"@{extra}")]),  # runner shlex-splits
            limit=limit,
            tags=tags,
            skip_tags=skip_tags,
            forks=forks,
            cancel_callback=cancel,
            event_handler=handler,
            quiet=True,
            suppress_env_files=True,
            rotate_artifacts=20,
        )
    seconds = time.monotonic() - t0
    hosts = getattr(handler, "hosts", {})
    stats = r.stats or {}
    for key, attr in (("ok", "ok"), ("changed", "changed"), ("failures", "failed"),
                      ("dark", "unreachable"), ("skipped", "skipped")):
        for host, n in (stats.get(key) or {}).items():
            hr = hosts.setdefault(host, HostResult())
            setattr(hr, attr, n)
    return RunResult(r.status, r.rc, hosts, getattr(handler, "facts", {}), seconds, pdd,
                     decision=getattr(handler, "decision", None))
