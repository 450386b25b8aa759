"""What a person watching apply sees, from ansible-runner events as Progress gets them: each
host's phase and each task's samples, as plain rate-limited lines when stderr is not a
terminal (no control characters), as a redrawn rich display when it is."""

from __future__ import annotations

import io
import re

from rich.console import Console

from evalprov.live import LiveView
from evalprov.runner import Progress

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def ev(kind: str, host: str, task: str = "", **res) -> dict:
    return {"event": kind, "event_data": {"host": host, "task": task, "res": res}}


def progress(done: int, status: str = "running", seconds: float = 10.0, total: int = 50):
    return {"evalprov_eval_progress": {
        "ifeval": {"status": status, "done": done, "total": total, "seconds": seconds}}}


def run(out, clock, tty: bool) -> Progress:
    """A run as the roles make it: the health wait polled (async), the tasks followed."""
    p = Progress(out=out, live=LiveView(out, tty=tty, clock=clock, start=clock()))
    health, follow = "Health | Wait for /health and the served model", \
        "Eval | Run the evaluation tasks, followed until they end"
    with p.live:
        p(ev("runner_on_start", "h1", health))
        for _ in range(70):  # a 70 s wait, polled every second
            clock.now += 1
            p(ev("runner_on_async_poll", "h1", "async_status", started=1, finished=0))
        p(ev("runner_on_ok", "h1", health, changed=False))
        p(ev("runner_on_start", "h1", "Eval | Run the evaluation tasks"))
        p(ev("runner_on_ok", "h1", "Eval | Run the evaluation tasks", changed=True,
             running=True))
        p(ev("runner_on_start", "h1", follow))
        for i in range(1, 31):  # 30 looks, 2 s apart, a sample done at each
            clock.now += 2
            p(ev("runner_retry", "h1", follow, running=True, **progress(i, seconds=2.0 * i)))
        clock.now += 2
        p(ev("runner_on_ok", "h1", follow, running=False, tasks=[],
             **progress(50, "succeeded", 62.0)))
    return p


def test_without_a_terminal_lines_are_plain_and_rate_limited():
    out, clock = io.StringIO(), Clock()
    p = run(out, clock, tty=False)
    text = out.getvalue()
    assert not CONTROL.search(text), repr(CONTROL.search(text))
    lines = text.splitlines()
    loading = [line for line in lines if " loading " in line]
    # the phase once it is seen to go on (the first poll), then a heartbeat at most every
    # 30 s of a 70 s wait
    assert loading[0].startswith("   1.0s h1") and "waiting for /health" in loading[0]
    assert [line.split("loading", 1)[1].strip() for line in loading[1:]] == [
        "still loading, 31 s", "still loading, 1 min 01 s"]
    tasks = [line for line in lines if " ifeval " in line]
    # 30 counts in 60 s: one line per 10 s, then the end
    assert len(tasks) == 7, tasks
    assert "1/50 samples, 0.50/s, ETA 1 min 38 s" in tasks[0]
    assert tasks[-1].endswith("ifeval       50/50 samples, 0.81/s, succeeded")
    assert any(line.endswith("evaluating   running the evaluation tasks") for line in lines)
    assert p.hosts["h1"].changed == 1  # Progress still counts the tasks' outcomes


def test_on_a_terminal_the_display_shows_each_hosts_phase_and_each_tasks_samples():
    out, clock = Tty(), Clock()
    view = LiveView(out, tty=True, clock=clock, start=clock())
    p = Progress(out=out, live=view)
    with view:
        p(ev("runner_on_start", "gpu-node-01", "Health | Wait for /health and the served model"))
        clock.now += 42
        shown = render(view)
        assert re.search(r"gpu-node-01\s+loading\s+42 s\s+waiting for /health", shown), shown
        p(ev("runner_on_ok", "gpu-node-01", "Health | Wait for /health and the served model"))
        p(ev("runner_on_start", "gpu-node-01", "Eval | Run the evaluation tasks, followed"))
        p(ev("runner_retry", "gpu-node-01", "Eval | Run", running=True,
             **progress(20, seconds=40.0)))
        shown = render(view)
        assert re.search(r"gpu-node-01\s+evaluating\s+0 s\s+running the evaluation", shown)
        assert re.search(r"ifeval\s+#{8}-{12}\s+20/50 samples, 0\.50/s, ETA 1 min 00 s", shown)
        p.say("   3.0s gpu-node-01          ok           Preflight | Probe")
    # the permanent line went through rich (above the display), the display was drawn
    assert "Preflight | Probe" in out.getvalue()
    assert "\x1b[" in out.getvalue()


def test_a_start_whose_work_goes_on_does_not_end_the_phase():
    out, clock = io.StringIO(), Clock()
    view = LiveView(out, tty=False, clock=clock)
    view.started("h1", "Eval | Run the evaluation tasks")
    view.finished("h1", "Eval | Run the evaluation tasks", ok=True, goes_on=True)
    assert view.hosts["h1"].phase == "evaluating"
    view.finished("h1", "Eval | Run the evaluation tasks, followed until they end", ok=True)
    assert view.hosts["h1"].phase == "evaluated"


def render(view: LiveView) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(view._render())
    return console.file.getvalue()


def test_a_task_that_starts_and_is_skipped_leaves_the_host_in_its_phase():
    out, clock = io.StringIO(), Clock()
    p = Progress(out=out, live=LiveView(out, tty=False, clock=clock, start=clock()))
    p(ev("runner_on_start", "h1", "Health | Wait for /health and the served model"))
    p(ev("runner_on_ok", "h1", "Health | Wait for /health and the served model"))
    p(ev("runner_on_start", "h1", "Eval | Install the harness into its venv (process runtime)"))
    p(ev("runner_on_skipped", "h1", "Eval | Install the harness into its venv (process runtime)"))
    assert p.live.hosts["h1"].phase == "healthy"
    assert "installing" not in out.getvalue()


def pull_look(done: int, total: int, seconds: float, layers_done: int = 0) -> dict:
    return {"evalprov_pull_progress": {"image": "vllm/vllm-openai:v0.11.0", "attempt": 1,
                                       "done_bytes": done, "total_bytes": total,
                                       "layers": 7, "layers_done": layers_done,
                                       "seconds": seconds}}


def test_a_pull_shows_its_bytes_on_a_terminal_and_in_a_plain_heartbeat():
    start, follow = ("Image | Pull vllm/vllm-openai:v0.11.0",
                     "Image | Pull vllm/vllm-openai:v0.11.0, followed until it ends")
    out, clock = Tty(), Clock()
    view = LiveView(out, tty=True, clock=clock, start=clock())
    p = Progress(out=out, live=view)
    with view:
        p(ev("runner_on_start", "h1", start))
        p(ev("runner_on_ok", "h1", start, changed=True, running=True))
        p(ev("runner_on_start", "h1", follow))
        clock.now += 20
        p(ev("runner_retry", "h1", follow, running=True, **pull_look(900_000_000,
                                                                     8_500_000_000, 20.0, 2)))
        shown = render(view)
        assert re.search(r"h1\s+pulling\s+20 s\s+900\.0 MB of 8\.5 GB, 45\.0 MB/s, 2/7 "
                         r"layers", shown), shown
    out, clock = io.StringIO(), Clock()
    p = Progress(out=out, live=LiveView(out, tty=False, clock=clock, start=clock()))
    with p.live:
        p(ev("runner_on_start", "h1", start))
        p(ev("runner_on_ok", "h1", start, changed=True, running=True))
        p(ev("runner_on_start", "h1", follow))
        for i in range(1, 41):  # 40 looks, 1 s apart, 100 MB each
            clock.now += 1
            p(ev("runner_retry", "h1", follow, running=True,
                 **pull_look(i * 100_000_000, 4_000_000_000, float(i))))
        p(ev("runner_on_ok", "h1", follow, running=False, changed=True))
    lines = [line for line in out.getvalue().splitlines() if " pulling " in line]
    assert not CONTROL.search(out.getvalue())
    assert lines[0].endswith("pulling      pulling the vLLM image")
    assert lines[1].endswith("still pulling, 31 s: 3.1 GB of 4.0 GB, 100.0 MB/s, 0/7 layers")
    assert len(lines) == 2
