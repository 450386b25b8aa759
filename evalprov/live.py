"""What a person watching `evalprov apply` sees while it runs: each host's phase (probing,
pulling, starting, loading, healthy, evaluating, fetching) and how long it has been in it, and
per evaluation task the samples done of the total, with rate and ETA.

On a terminal (stderr is a TTY) it is a rich Live display, redrawn a few times a second, with
the run's permanent lines (Progress's per-task lines, apply's own messages) printed above it.
Anywhere else (CI, a log file, a pipe) it is plain newline-terminated lines without control
characters, rate-limited: a line when a host's phase changes, while a phase goes on at most a
line every `heartbeat` seconds, and per task at most one every `every` seconds when its count
moved.

The view knows nothing of Ansible: Progress tells it what happened (`started`, `finished`,
`tick`, `samples`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from evalprov.timeline import phase_of

# a phase while it runs, and once its task is done
_RUNNING = {"probe": "probing", "pull": "pulling", "install": "installing",
            "start": "starting", "healthy": "loading", "samples": "shipping",
            "eval": "evaluating", "fetch": "fetching"}
_DONE = {"healthy": "healthy", "eval": "evaluated", "fetch": "fetched"}
_WHAT = {"probing": "reading the host's facts", "pulling": "pulling the vLLM image",
         "installing": "installing into the venvs", "starting": "converging the instances",
         "loading": "waiting for /health (vLLM loads the model)",
         "shipping": "shipping the sample datasets",
         "evaluating": "running the evaluation tasks", "fetching": "fetching the results"}
# the phases a plain log gets a line for once they are seen to go on (the others end within
# seconds, and Progress prints their tasks' outcome)
_LOGGED = ("pulling", "installing", "loading", "evaluating")


def is_tty(out: TextIO) -> bool:
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class TaskView:
    name: str
    status: str = "pending"  # pending, running, succeeded, failed
    done: int = 0
    total: int | None = None
    seconds: float = 0.0  # how long it has run (the host's clock)
    shown_at: float | None = None  # plain mode: when its last line was printed
    shown_done: int = -1
    shown_status: str = ""

    @property
    def rate(self) -> float | None:
        return self.done / self.seconds if self.done and self.seconds > 0 else None

    @property
    def eta(self) -> float | None:
        rate = self.rate
        if rate is None or self.total is None or self.status != "running" \
                or self.done >= self.total:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def text(self) -> str:
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{count} samples"]
        if self.rate is not None:
            parts.append(f"{self.rate:.2f}/s" if self.rate < 10 else f"{self.rate:.0f}/s")
        if self.eta is not None:
            parts.append(f"ETA {duration(self.eta)}")
        if self.status in ("succeeded", "failed", "pending"):
            parts.append(self.status)
        elif self.total is not None and self.done >= self.total:
            parts.append("scoring")
        return ", ".join(parts)


@dataclass
class HostView:
    name: str
    phase: str = "waiting"
    since: float = 0.0
    shown_at: float = 0.0  # plain mode: when its last phase line was printed
    announced: bool = True  # plain mode: its phase's line is out
    before: tuple[str, float] | None = None  # the phase a task that may be skipped ended
    tasks: dict[str, TaskView] = field(default_factory=dict)
    detail: str = ""  # how far the phase got (a pull's bytes), "" none


class LiveView:
    """The run's live view: `with view:` around the run; `say` for permanent lines."""

    def __init__(self, out: TextIO, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, every: float = 10.0,
                 heartbeat: float = 30.0, start: float | None = None) -> None:
        self.out = out
        self.tty = is_tty(out) if tty is None else tty
        self.clock = clock
        self.every = every
        self.heartbeat = heartbeat
        self.start = clock() if start is None else start
        self.hosts: dict[str, HostView] = {}
        self._lock = threading.RLock()
        self._live: Any = None
        self._console: Any = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> LiveView:
        if self.tty and self._live is None:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.out, highlight=False, soft_wrap=True)
            self._live = Live(console=self._console, get_renderable=self._render,
                              refresh_per_second=4, transient=True, redirect_stdout=False,
                              redirect_stderr=self.out is _stderr())
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    # -- what Progress tells it --------------------------------------------------------------
    def say(self, line: str) -> None:
        """A permanent line (above the live display on a terminal)."""
        with self._lock:
            if self._live is not None:
                self._console.print(line, markup=False, highlight=False, emoji=False)
            else:
                print(line, file=self.out, flush=True)

    def started(self, host: str, task: str) -> None:
        """A task started on a host: a new phase when its name says so."""
        phase = phase_of(task)
        if phase is None:
            return
        self._phase(host, _RUNNING[phase])

    def finished(self, host: str, task: str, ok: bool, goes_on: bool = False) -> None:
        """A task ended on a host; one whose work goes on (a start) ends no phase."""
        phase = phase_of(task)
        if ok and goes_on:
            return
        with self._lock:
            hv = self.hosts.get(host)
            if phase is None or hv is None or hv.phase != _RUNNING[phase]:
                return
        if not ok:
            self._phase(host, "failed")
        elif phase in _DONE:
            self._phase(host, _DONE[phase])

    def skipped(self, host: str, task: str) -> None:
        """A task that started was skipped: the host is back in the phase it was in."""
        with self._lock:
            hv = self.hosts.get(host)
            phase = phase_of(task)
            if hv is None or phase is None or hv.before is None \
                    or hv.phase != _RUNNING[phase]:
                return
            hv.phase, hv.since = hv.before
            hv.before, hv.announced = None, True

    def tick(self, host: str) -> None:
        """The host's step goes on (a poll or retry event): in a plain log, the phase's
        line the first time, then a heartbeat when due."""
        with self._lock:
            hv = self.hosts.get(host)
            if hv is None or self.tty:
                return
            now = self.clock()
            if not hv.announced:
                hv.announced, hv.shown_at = True, now
                self._line(host, hv.phase, _WHAT.get(hv.phase, ""))
            elif now - hv.shown_at >= self.heartbeat:
                hv.shown_at = now
                self._line(host, hv.phase, f"still {hv.phase}, {duration(now - hv.since)}"
                           + (f": {hv.detail}" if hv.detail else ""))

    def pulled(self, host: str, progress: dict[str, Any]) -> None:
        """The pull's look at its bytes: {done_bytes, total_bytes, layers, layers_done,
        seconds, attempt}; shown beside the phase (and in a plain log's heartbeat)."""
        with self._lock:
            hv = self.hosts.get(host)
            if hv is not None and hv.phase == "pulling":
                hv.detail = pull_text(progress)

    def samples(self, host: str, progress: dict[str, Any]) -> None:
        """The eval module's look at its tasks: {task: {status, done, total, seconds}}."""
        self.tick(host)
        with self._lock:
            hv = self.hosts.setdefault(host, HostView(host, since=self.clock()))
            now = self.clock()
            for name, p in progress.items():
                if not isinstance(p, dict):
                    continue
                tv = hv.tasks.setdefault(name, TaskView(name))
                tv.status = str(p.get("status") or tv.status)
                tv.done = int(p.get("done") or 0)
                total = p.get("total")
                tv.total = int(total) if isinstance(total, int) and total > 0 else None
                tv.seconds = float(p.get("seconds") or 0.0)
                if self.tty or tv.status == "pending":
                    continue
                ended = tv.status in ("succeeded", "failed") and tv.shown_status != tv.status
                moved = tv.done != tv.shown_done and (
                    tv.shown_at is None or now - tv.shown_at >= self.every)
                if ended or moved:
                    tv.shown_at, tv.shown_done, tv.shown_status = now, tv.done, tv.status
                    self._line(host, name, tv.text())
            if not self.tty:
                hv.shown_at = now  # the task lines are this host's heartbeat

    # -- output ------------------------------------------------------------------------------
    def _phase(self, host: str, phase: str) -> None:
        with self._lock:
            hv = self.hosts.setdefault(host, HostView(host))
            if hv.phase == phase:
                return
            now = self.clock()
            hv.before = (hv.phase, hv.since)
            hv.phase, hv.since, hv.shown_at, hv.detail = phase, now, now, ""
            # a plain log hears of a long phase once it is seen to go on (tick)
            hv.announced = self.tty or phase not in _LOGGED

    def _line(self, host: str, word: str, text: str) -> None:
        t = f"{self.clock() - self.start:6.1f}s"
        print(f"{t} {host:<20} {word:<12} {text}", file=self.out, flush=True)

    def _render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            now = self.clock()
            table = Table.grid(padding=(0, 2))
            for _ in range(4):
                table.add_column()
            table.add_row(Text(f"evalprov {duration(now - self.start)}", style="bold"),
                          "", "", "")
            for hv in self.hosts.values():
                table.add_row(Text(hv.name, style="cyan"), Text(hv.phase, style="bold"),
                              duration(now - hv.since),
                              Text(hv.detail or _WHAT.get(hv.phase, ""), style="dim"))
                for tv in hv.tasks.values():
                    table.add_row("", Text(f"  {tv.name}"), _bar(tv), tv.text())
            return table


def size(n: float) -> str:
    """Bytes as docker prints them (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def pull_text(p: dict[str, Any]) -> str:
    """e.g. "1.2 GB of 8.5 GB, 45.0 MB/s, 3/7 layers" (attempt 2: said)."""
    done, total = int(p.get("done_bytes") or 0), int(p.get("total_bytes") or 0)
    seconds = float(p.get("seconds") or 0.0)
    parts = [f"{size(done)} of {size(total)}" if total else f"{size(done)}"]
    if done and seconds > 0:
        parts.append(f"{size(done / seconds)}/s")
    if p.get("layers"):
        parts.append(f"{int(p.get('layers_done') or 0)}/{int(p['layers'])} layers")
    if int(p.get("attempt") or 1) > 1:
        parts.append(f"attempt {int(p['attempt'])}")
    return ", ".join(parts)


def _bar(tv: TaskView, width: int = 20) -> str:
    if not tv.total:
        return ""
    full = min(width, round(width * tv.done / tv.total))
    return "#" * full + "-" * (width - full)


def _stderr() -> Any:
    import sys

    return sys.stderr
