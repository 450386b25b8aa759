#!/usr/bin/python
"""Pull an image on the host and tell the controller how far it got, in bytes: `docker pull`
(its credentials, its registry mirrors) runs detached under a pseudo-terminal, where it
prints each layer's bytes; every poll returns the sum so far (evalprov_pull_progress)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: evalprov_image_pull
short_description: Pull a container image detached, reporting bytes done and total
description:
  - state=start starts `docker pull IMAGE` detached from the module (retried on failure),
    or follows the pull of the same image that already runs; state=poll waits up to
    `wait` seconds and returns the progress (bytes done and total over the layers being
    downloaded, layers done) and, once it ended, its result (digest; changed when a newer
    image was downloaded). A failed pull fails the poll with docker's own last line.
options:
  state:
    description: start, poll, or stop (the pull of this image that runs, after an interrupt).
    type: str
    choices: [start, poll, stop]
    default: start
  image:
    description: The image reference.
    type: str
    required: true
  dir:
    description: Where the pulls keep their pid, progress and result (a directory per image).
    type: path
    default: /var/lib/evalprov/pull
  retries:
    description: Attempts after the first when docker pull fails.
    type: int
    default: 3
  delay:
    description: Seconds between attempts.
    type: float
    default: 5
  wait:
    description: state=poll, seconds to wait for the end before returning the progress.
    type: float
    default: 2
author: evalprov
"""

RETURN = r"""
running:
  description: The pull goes on.
  type: bool
  returned: always
evalprov_pull_progress:
  description: image, attempt, done and total bytes, layers and layers done, seconds.
  type: dict
  returned: always
pull_attempts:
  description: How many times docker pull ran (once it ended).
  type: int
  returned: when the pull ended
digest:
  description: The pulled image's digest (once it ended).
  type: str
  returned: when the pull succeeded
"""

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import termios
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.evalprov.fleet.plugins.module_utils.evalprov_host import (
    is_ours,
    poll_detached,
    read_json,
    read_pid,
    start_detached,
    stop_group,
    write_json,
)

FILES = PID, PROGRESS, RESULT = "pull.pid", "progress.json", "result.json"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
LINE = re.compile(r"^([0-9a-f]{12}): (.*)$")
BYTES = re.compile(r"([\d.]+)\s*([kMGTP]?B)/([\d.]+)\s*([kMGTP]?B)\s*$")
UNIT = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15}
DONE_WORDS = ("Download complete", "Verifying Checksum", "Extracting", "Pull complete")


class Layers:
    """What `docker pull` printed so far, per layer: its bytes done and total."""

    def __init__(self):
        self.layers = {}  # id -> [done, total, finished]
        self.lines = []  # the lines that are not a layer's, last ones kept

    def feed(self, line):
        m = LINE.match(line)
        if not m:
            if line.strip():
                self.lines = [*self.lines[-20:], line.strip()]
            return
        layer, text = m.groups()
        rec = self.layers.setdefault(layer, [0, 0, False])
        size = BYTES.search(text)
        if text.startswith("Downloading") and size:
            rec[0] = int(float(size.group(1)) * UNIT[size.group(2)])
            rec[1] = int(float(size.group(3)) * UNIT[size.group(4)])
        elif text.startswith(DONE_WORDS):
            rec[0] = rec[1]
            rec[2] = rec[2] or text.startswith("Pull complete")
        elif text.startswith("Already exists"):
            rec[2] = True

    def view(self):
        done = sum(r[0] for r in self.layers.values())
        total = sum(r[1] for r in self.layers.values())
        return {"done_bytes": done, "total_bytes": total, "layers": len(self.layers),
                "layers_done": sum(1 for r in self.layers.values() if r[2])}


def pull_once(image, run_dir, attempt, started, every=0.5):
    """One `docker pull` under a pseudo-terminal (where it prints bytes); returns
    (exit code, Layers)."""
    docker = shutil.which("docker") or "docker"
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen([docker, "pull", image], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, close_fds=True,
                            env={**os.environ, "TERM": "xterm", "COLUMNS": "200"})
    os.close(slave)
    layers, buf, shown = Layers(), b"", 0.0
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: docker exited
            chunk = b""
        if not chunk:
            break
        buf += ANSI.sub(b"", chunk)
        *lines, buf = re.split(rb"[\r\n]+", buf)
        for line in lines:
            layers.feed(line.decode("utf-8", "replace"))
        now = time.monotonic()
        if now - shown >= every:
            shown = now
            write_json(os.path.join(run_dir, PROGRESS), {
                "image": image, "attempt": attempt, "seconds": round(now - started, 1),
                **layers.view()})
    if buf:
        layers.feed(buf.decode("utf-8", "replace"))
    os.close(master)
    return proc.wait(), layers


def pull(image, run_dir, retries, delay):
    started = time.monotonic()
    for attempt in range(1, retries + 2):
        code, layers = pull_once(image, run_dir, attempt, started)
        view = {"image": image, "attempt": attempt,
                "seconds": round(time.monotonic() - started, 1), **layers.view()}
        write_json(os.path.join(run_dir, PROGRESS), view)
        said = "\n".join(layers.lines)
        if code == 0:
            digest = re.search(r"Digest: (sha256:[0-9a-f]{64})", said)
            return {"changed": "Downloaded newer image" in said,
                    "digest": digest.group(1) if digest else "", "pull_attempts": attempt,
                    "bytes": view["done_bytes"]}
        last = layers.lines[-1] if layers.lines else f"docker pull exited {code}"
        if attempt <= retries:
            time.sleep(delay)
    return {"failed": True, "pull_attempts": attempt,
            "msg": f"docker pull {image} failed after {attempt} "
                   f"attempt{'s' if attempt != 1 else ''}: {last}"}


def stop(pid):
    """The pull's runner and its docker client: the process group the runner is in (the
    session start_detached made; the runner is not its leader)."""
    with contextlib.suppress(ProcessLookupError):
        stop_group(os.getpgid(pid), grace=5.0)


def main():
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "choices": ["start", "poll", "stop"],
                      "default": "start"},
            "image": {"type": "str", "required": True},
            "dir": {"type": "path", "default": "/var/lib/evalprov/pull"},
            "retries": {"type": "int", "default": 3},
            "delay": {"type": "float", "default": 5},
            "wait": {"type": "float", "default": 2},
        },
        supports_check_mode=True,
    )
    p = module.params
    run_dir = os.path.join(p["dir"], hashlib.sha256(p["image"].encode()).hexdigest()[:16])
    rec = read_pid(os.path.join(run_dir, PID))
    running = bool(rec) and is_ours(rec) and read_json(os.path.join(run_dir, RESULT)) is None
    if module.check_mode:
        module.exit_json(changed=p["state"] == "start" or (p["state"] == "stop" and running),
                         running=False, evalprov_pull_progress={})
    if p["state"] == "stop":
        if running:
            stop(rec["pid"])
        module.exit_json(changed=running, running=False)
    if p["state"] == "poll":
        result = poll_detached(run_dir, FILES, "evalprov_pull_progress",
                               "the pull on the host stopped without a result", p["wait"])
        if result.pop("failed", False):
            module.fail_json(**result)
        module.exit_json(**result)
    # this image's pull already runs (an earlier apply was interrupted): follow it
    if running:
        module.exit_json(changed=False, running=True, pid=rec["pid"], followed=True)
    pid = start_detached(run_dir, FILES,
                         lambda: pull(p["image"], run_dir, p["retries"], p["delay"]),
                         "the pull")
    if not pid:
        module.fail_json(msg="the pull did not start on the host")
    # the poll says whether a newer image came (docker's own "Downloaded newer image")
    module.exit_json(changed=False, running=True, pid=pid)


if __name__ == "__main__":
    main()
