#!/usr/bin/env python3
"""An OpenAI-compatible stand-in for vLLM (stdlib only), for the evalprov testbed.

Started like the real image: ``vllm serve MODEL --port 8000 --served-model-name NAME ...``
(the image's ``vllm`` launcher runs this file with the same arguments).

Endpoints: GET /health, GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (optionally ``"stream": true``), GET /version,
GET /metrics, and GET /evalprov/argv (argv, parsed args, unknown args and
NVIDIA_VISIBLE_DEVICES, for tests), GET /evalprov/ranks (data-parallel ranks joined,
missing and lost; this instance's request count).

Multi-node data parallelism as vLLM does it (docs.vllm.ai, "Data Parallel Deployment"):
  head:   vllm serve M --data-parallel-size N --data-parallel-size-local L
              --data-parallel-address HEAD --data-parallel-rpc-port P
  worker: vllm serve M --headless --data-parallel-size N --data-parallel-size-local L
              --data-parallel-start-rank R --data-parallel-address HEAD --data-parallel-rpc-port P
The head serves the API and listens on HEAD:P for workers (protocol: see Coordinator); its
/health is 503 until ranks 0..N-1 are all held, and 503 for good once a worker is lost. A worker
serves no HTTP, joins HEAD:P (retrying), and exits with code 4 when it cannot join, is refused,
or loses the head. Inconsistent data-parallel flags exit 2 with a usage line.
vLLM's multi-node multiprocessing (TP x PP over nodes: --nnodes N --node-rank R --master-addr
HEAD --master-port P, --headless on every node but 0) is held the same way, node ranks joining
HEAD:P in place of data-parallel ranks.

Behaviour switches (environment):
  STANDIN_START_DELAY=SECONDS  /health answers 503 until SECONDS after start
  STANDIN_NEVER_HEALTHY=1      /health always 503
  STANDIN_EXIT_AFTER=SECONDS   print an error and exit with code 3 after SECONDS
  STANDIN_FAIL_REQUESTS=1      completions / chat completions answer HTTP 500
  STANDIN_SLOW_AFTER=N         after N answered requests, each one waits first (a task that
                               outlives a job's time limit): STANDIN_SLOW_SECONDS (30)
  STANDIN_HOLD_UNTIL=PATH      completions / chat completions wait (at most 600 s) until PATH
                               exists (a test holds a task until it has seen it run)
  STANDIN_DP_HEARTBEAT=SECONDS a worker's heartbeat interval (1); the head drops a worker
                               after 3 intervals without a message
  STANDIN_DP_JOIN_TIMEOUT=SECONDS  how long a worker retries reaching its head (120)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.0.0+evalprov.standin"
EXIT_CODE_CRASH = 3
EXIT_CODE_HEAD_LOST = 4  # a headless worker could not join, was refused, or lost its head
DP_RPC_PORT = 29550  # vLLM's default --data-parallel-rpc-port
MASTER_PORT = 29501  # vLLM's default --master-port
DP_PROTOCOL = "EVALPROV-DP/1"


def log(msg: str) -> None:
    sys.stdout.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
    sys.stdout.flush()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="vllm", allow_abbrev=False, add_help=False)
    p.add_argument("subcommand", nargs="?", default="serve")
    p.add_argument("model_tag", nargs="?")
    p.add_argument("--model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--data-parallel-size-local", "-dpl", type=int)
    p.add_argument("--data-parallel-start-rank", "-dpr", type=int)
    p.add_argument("--data-parallel-address", "-dpa")
    p.add_argument("--data-parallel-rpc-port", "-dpp", type=int, default=DP_RPC_PORT)
    p.add_argument("--headless", action="store_true")
    # vLLM's multiprocessing multi-node (TP x PP over nodes): one torch.distributed group
    p.add_argument("--nnodes", "-n", type=int, default=1)
    p.add_argument("--node-rank", "-r", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=MASTER_PORT)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--api-key")
    args, unknown = p.parse_known_args(argv)
    model = args.model_tag or args.model
    if args.subcommand != "serve" or not model:
        sys.stderr.write("usage: vllm serve MODEL [--port PORT] [--served-model-name NAME] ...\n")
        sys.exit(2)
    args.model = model
    args.served_model_name = args.served_model_name or [model]
    problem = dp_problem(args)
    if problem:
        sys.stderr.write(
            "usage: vllm serve MODEL --data-parallel-size N --data-parallel-size-local L "
            "[--headless --data-parallel-start-rank R] --data-parallel-address HEAD "
            "--data-parallel-rpc-port P ...\n"
        )
        sys.stderr.write(f"vllm serve: error: {problem}\n")
        sys.exit(2)
    return args, unknown


def dp_problem(args: argparse.Namespace) -> str | None:
    """The data-parallel flags' consistency (what vLLM's arg checks refuse), and the role:
    sets ``args.dp_role`` to single (all ranks here), head (ranks 0..L-1 here, API, waits
    for the workers) or worker (headless: ranks R..R+L-1 here, no API)."""
    if args.nnodes != 1:
        problem = nodes_problem(args)
        if problem:
            return problem
    size = args.data_parallel_size
    local = size if args.data_parallel_size_local is None else args.data_parallel_size_local
    start = args.data_parallel_start_rank
    if size < 1:
        return f"--data-parallel-size must be at least 1, not {size}"
    lowest = 1 if args.headless else 0  # a head may hold no rank itself (API only)
    if not lowest <= local <= size:
        return (f"--data-parallel-size-local {local} must be between {lowest} and "
                f"--data-parallel-size {size}")
    if not 1 <= args.data_parallel_rpc_port <= 65535:
        return f"--data-parallel-rpc-port {args.data_parallel_rpc_port} is not a port"
    if args.headless:
        if not args.data_parallel_address:
            return "--headless needs --data-parallel-address (the head node's address)"
        start = 0 if start is None else start
        if not 0 <= start <= size - local:
            return (f"--data-parallel-start-rank {start} with --data-parallel-size-local {local} "
                    f"must lie within ranks 0..{size - 1}")
        args.dp_role = "worker"
    else:
        if start:
            return ("--data-parallel-start-rank is only applicable in headless mode; add "
                    "--headless")
        start = 0
        args.dp_role = "single" if local == size else "head"
    args.data_parallel_size_local = local
    args.data_parallel_start_rank = start
    if args.data_parallel_address is None:
        args.data_parallel_address = "127.0.0.1"  # vLLM's default data_parallel_master_ip
    return None


def nodes_problem(args: argparse.Namespace) -> str | None:
    """vLLM's multi-node multiprocessing mode (--nnodes N --node-rank R --master-addr A
    --master-port P, --headless on every node but rank 0) checked as vLLM does, then held
    as the data-parallel roles are: node 0 is the head (the API), nodes 1..N-1 join it over
    A:P, each holding its share of the one TP x PP world; /health waits for all of them."""
    n, rank = args.nnodes, args.node_rank
    world = args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size
    if n < 1:
        return f"--nnodes must be at least 1, not {n}"
    if world % n:
        return (f"`--nnodes {n}` must evenly divide the total world size ({world})")
    if not 0 <= rank < n:
        return f"`--node-rank` must be between 0 and {n - 1}; got `--node-rank {rank}`"
    if args.data_parallel_size != 1 or args.data_parallel_start_rank is not None:
        return "the stand-in holds --nnodes only with --data-parallel-size 1"
    if not 1 <= args.master_port <= 65535:
        return f"--master-port {args.master_port} is not a port"
    if bool(rank) != args.headless:
        return ("every node but --node-rank 0 runs --headless, and node 0 serves the API"
                if rank else "--node-rank 0 serves the API: remove --headless")
    args.data_parallel_size, args.data_parallel_size_local = n, 1
    args.data_parallel_start_rank = rank if rank else None
    args.data_parallel_address, args.data_parallel_rpc_port = args.master_addr, args.master_port
    return None


class State:
    def __init__(self, args: argparse.Namespace, unknown: list[str], argv: list[str]):
        self.args = args
        self.unknown = unknown
        self.argv = argv
        self.started = time.monotonic()
        self.start_delay = float(os.environ.get("STANDIN_START_DELAY", "0") or 0)
        self.never_healthy = os.environ.get("STANDIN_NEVER_HEALTHY", "") not in ("", "0")
        self.fail_requests = os.environ.get("STANDIN_FAIL_REQUESTS", "") not in ("", "0")
        slow = os.environ.get("STANDIN_SLOW_AFTER", "")
        self.slow_after = int(slow) if slow.isdigit() else None
        self.slow_seconds = float(os.environ.get("STANDIN_SLOW_SECONDS", "30") or 30)
        self.hold_until = os.environ.get("STANDIN_HOLD_UNTIL", "")
        self.lock = threading.Lock()
        self.counter = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.announced = False
        self.ranks = Coordinator(args) if args.dp_role == "head" else None

    def healthy(self) -> bool:
        if self.never_healthy:
            return False
        ok = time.monotonic() - self.started >= self.start_delay
        if self.ranks is not None and ok:
            ok = self.ranks.complete()
        if ok and not self.announced:
            self.announced = True
            log("INFO:     Application startup complete.")
        return ok

    def unhealthy_reason(self) -> str:
        if self.ranks is not None:
            rep = self.ranks.report()
            if rep["lost"]:
                return (f"data-parallel rank(s) {rank_list(map(int, rep['lost']))} lost "
                        f"(worker {', '.join(sorted(set(rep['lost'].values())))})")
            if rep["missing"]:
                return f"waiting for data-parallel rank(s) {rank_list(rep['missing'])}"
        return "model is loading"

    def rank_report(self) -> dict:
        """Who holds which data-parallel rank, and this instance's request count."""
        a = self.args
        if self.ranks is not None:
            rep = self.ranks.report()
        else:
            rep = {"role": a.dp_role, "size": a.data_parallel_size,
                   "joined": list(range(a.data_parallel_size)), "missing": [], "lost": {},
                   "workers": []}
        rep["healthy"] = self.healthy()
        rep["requests"] = self.requests
        rep["pid"] = os.getpid()
        return rep

    def next_id(self, prefix: str) -> str:
        with self.lock:
            self.counter += 1
            return f"{prefix}-{self.counter:08d}"


def rank_list(ranks) -> str:
    ranks = sorted(ranks)
    return ",".join(map(str, ranks)) if ranks else "none"


def heartbeat_seconds() -> float:
    return max(0.05, float(os.environ.get("STANDIN_DP_HEARTBEAT", "1") or 1))


class Coordinator:
    """The head's side of data parallelism: headless workers connect to
    --data-parallel-address:--data-parallel-rpc-port and speak a line protocol (one line each,
    ASCII, space-separated key=value fields)::

        worker: EVALPROV-DP/1 HELLO start_rank=R local=L size=N heartbeat=S node=H pid=P
        head:   WELCOME ranks=R,...          (or: REFUSED <reason>, and the head closes)
        worker: PING                          every S seconds
        head:   PONG

    A worker that closes its connection or sends nothing for 3 x S seconds is lost: its ranks
    are lost for good (as when one of vLLM's engine cores dies, the head does not recover; it
    has to be restarted), /health answers 503 naming them, and later hellos are refused."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.size = args.data_parallel_size
        self.address = args.data_parallel_address
        self.port = args.data_parallel_rpc_port
        self.lock = threading.Lock()
        self.owner: dict[int, str] = dict.fromkeys(range(args.data_parallel_size_local), "head")
        self.workers: dict[str, dict] = {}
        self.lost: dict[int, str] = {}

    def complete(self) -> bool:
        with self.lock:
            return not self.lost and len(self.owner) == self.size

    def missing(self) -> list[int]:
        with self.lock:
            return [r for r in range(self.size) if r not in self.owner]

    def report(self) -> dict:
        with self.lock:
            return {
                "role": "head",
                "size": self.size,
                "address": f"{self.address}:{self.port}",
                "joined": sorted(self.owner),
                "owner": {str(r): w for r, w in sorted(self.owner.items())},
                "missing": [r for r in range(self.size) if r not in self.owner],
                "lost": {str(r): w for r, w in sorted(self.lost.items())},
                "workers": [dict(w) for w in self.workers.values()],
            }

    def serve(self) -> None:
        try:
            lsock = socket.create_server((self.address, self.port), reuse_port=False)
        except OSError as e:
            log(f"ERROR:    cannot listen for data-parallel workers on {self.address}:"
                f"{self.port}: {e}")
            os._exit(EXIT_CODE_CRASH)
        log(f"INFO:     data-parallel head: waiting on {self.address}:{self.port} for ranks "
            f"{rank_list(self.missing())} of {self.size}")
        threading.Thread(target=self._accept, args=(lsock,), daemon=True).start()

    def _accept(self, lsock) -> None:
        while True:
            conn, peer = lsock.accept()
            threading.Thread(target=self._worker, args=(conn, peer), daemon=True).start()

    def _hello(self, line: str, peer) -> tuple[str | None, str]:
        """(worker id, reply) for a hello line; id None: refused."""
        parts = line.split()
        if parts[:2] != [DP_PROTOCOL, "HELLO"]:
            return None, f"REFUSED expected '{DP_PROTOCOL} HELLO ...', got {line[:60]!r}"
        f = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
        try:
            start, local, size = int(f["start_rank"]), int(f["local"]), int(f["size"])
            hb = float(f.get("heartbeat", "1"))
        except (KeyError, ValueError):
            return None, "REFUSED hello needs integer start_rank=, local=, size="
        if size != self.size:
            return None, f"REFUSED size={size} but the head has --data-parallel-size {self.size}"
        ranks = list(range(start, start + local))
        wid = f"{f.get('node', '?')}/pid {f.get('pid', '?')} ({peer[0]}:{peer[1]})"
        with self.lock:
            if self.lost:
                return None, (f"REFUSED the head lost rank(s) {rank_list(self.lost)}; "
                              "restart the head")
            taken = {r: self.owner[r] for r in ranks if r in self.owner}
            if taken or not ranks or ranks[-1] >= size or start < 0:
                return None, (f"REFUSED rank(s) {rank_list(ranks)} overlap or exceed the "
                              f"ranks 0..{size - 1} (taken: {rank_list(taken)})")
            for r in ranks:
                self.owner[r] = wid
            self.workers[wid] = {"id": wid, "node": f.get("node"), "pid": f.get("pid"),
                                 "peer": f"{peer[0]}:{peer[1]}", "ranks": ranks,
                                 "heartbeat": hb}
        return wid, f"WELCOME ranks={rank_list(ranks)}"

    def _worker(self, conn, peer) -> None:
        wid = None
        reason = "closed its connection"
        hb = 10 / 3  # the hello's own deadline is 10 s
        try:
            conn.settimeout(10)
            rfile = conn.makefile("r", encoding="ascii", errors="replace", newline="\n")
            wid, reply = self._hello(rfile.readline().strip(), peer)
            conn.sendall(reply.encode() + b"\n")
            if wid is None:
                log(f"WARNING:  data-parallel worker {peer[0]}:{peer[1]} refused: {reply}")
                return
            hb = self.workers[wid]["heartbeat"]
            log(f"INFO:     data-parallel worker {wid} joined with rank(s) "
                f"{rank_list(self.workers[wid]['ranks'])}; missing: {rank_list(self.missing())}")
            if self.complete():
                log(f"INFO:     data-parallel: all {self.size} ranks joined")
                Handler.state.healthy()  # announces startup once healthy
            conn.settimeout(3 * hb)
            while True:
                line = rfile.readline()
                if not line:
                    break
                if line.strip() == "PING":
                    conn.sendall(b"PONG\n")
        except TimeoutError:
            reason = f"stopped its heartbeats (nothing for {3 * hb:g} s)"
        except ConnectionResetError:  # a killed worker with a PONG still unread resets it
            reason = "closed its connection (reset)"
        except OSError as e:
            reason = f"connection failed: {e}"
        finally:
            conn.close()
            if wid is not None:
                self._lose(wid, reason)

    def _lose(self, wid: str, reason: str) -> None:
        with self.lock:
            ranks = [r for r, w in self.owner.items() if w == wid]
            for r in ranks:
                del self.owner[r]
                self.lost[r] = wid
            self.workers.pop(wid, None)
        log(f"ERROR:    data-parallel rank(s) {rank_list(ranks)} lost: worker {wid} {reason}; "
            "/health is 503 until the head is restarted")


def run_worker(args: argparse.Namespace) -> int:
    """A headless node: no API; join the head, keep the heartbeat, exit when the head goes."""
    import socket

    addr, port = args.data_parallel_address, args.data_parallel_rpc_port
    start, local = args.data_parallel_start_rank, args.data_parallel_size_local
    ranks = rank_list(range(start, start + local))
    hb = heartbeat_seconds()
    join_timeout = float(os.environ.get("STANDIN_DP_JOIN_TIMEOUT", "120") or 120)
    if args.nnodes > 1:  # vLLM's own line for a multi-node TP x PP worker
        log(f"INFO:     Launching vLLM (standin) headless multiproc executor, with head node "
            f"address {addr}:{port} for torch.distributed process group.")
    log(f"INFO:     headless data-parallel worker for rank(s) {ranks} of "
        f"{args.data_parallel_size}: joining the head at {addr}:{port}")
    deadline = time.monotonic() + join_timeout
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                log(f"ERROR:    could not reach the data-parallel head at {addr}:{port} "
                    f"within {join_timeout:g} s (STANDIN_DP_JOIN_TIMEOUT): {e}")
                return EXIT_CODE_HEAD_LOST
            time.sleep(min(0.2, hb))
    try:
        conn.settimeout(max(10.0, 3 * hb))
        hello = (f"{DP_PROTOCOL} HELLO start_rank={start} local={local} "
                 f"size={args.data_parallel_size} heartbeat={hb:g} "
                 f"node={os.uname().nodename} pid={os.getpid()}")
        conn.sendall(hello.encode() + b"\n")
        rfile = conn.makefile("r", encoding="ascii", errors="replace", newline="\n")
        reply = rfile.readline().strip()
        if not reply.startswith("WELCOME"):
            log(f"ERROR:    the data-parallel head at {addr}:{port} refused rank(s) {ranks}: "
                f"{reply or 'connection closed'}")
            return EXIT_CODE_HEAD_LOST
        log(f"INFO:     joined the data-parallel head at {addr}:{port} with rank(s) {ranks}")
        conn.settimeout(3 * hb)
        while True:
            conn.sendall(b"PING\n")
            if rfile.readline().strip() != "PONG":
                raise ConnectionError("connection closed")
            time.sleep(hb)
    except (OSError, ConnectionError) as e:
        why = "no heartbeat answer" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        log(f"ERROR:    lost the data-parallel head at {addr}:{port} ({why}); engine core "
            f"for rank(s) {ranks} shutting down")
        return EXIT_CODE_HEAD_LOST


def count_tokens(text: str) -> int:
    return max(1, len(re.findall(r"\w+|[^\w\s]", text))) if text else 0


_CHOICE_RE = re.compile(r"(?m)^\s*\(?([A-J])[\).:]\s+\S")


def answer_for(prompt: str) -> str:
    """A deterministic, plausible answer for ``prompt``."""
    letters = _CHOICE_RE.findall(prompt)
    if len(set(letters)) >= 2 or re.search(r"multiple.choice|Answer: \$?LETTER", prompt, re.I):
        return "Answer: A"
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return (
        "This is a deterministic answer from the evalprov stand-in server. "
        f"The reference code for this prompt is {digest}."
    )


def truncate(text: str, max_tokens: int | None) -> tuple[str, str]:
    if max_tokens is None or max_tokens <= 0:
        return text, "stop"
    pieces = re.findall(r"\S+\s*", text)
    if count_tokens(text) <= max_tokens:
        return text, "stop"
    out, used = "", 0
    for piece in pieces:
        n = count_tokens(piece)
        if used + n > max_tokens:
            break
        out += piece
        used += n
    return out.rstrip(), "length"


def chat_prompt(messages: list) -> str:
    parts = []
    for m in messages or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role', 'user')}: {content or ''}")
    return "\n".join(parts)


def last_user(messages: list) -> str:
    for m in reversed(messages or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
            return c or ""
    return ""


class Handler(BaseHTTPRequestHandler):
    server_version = "evalprov-standin/" + VERSION
    protocol_version = "HTTP/1.1"
    state: State  # set on the class before serving

    def log_message(self, fmt: str, *args) -> None:  # request log on stdout
        log(f"INFO:     {self.client_address[0]} - {fmt % args}")

    # ------------------------------------------------------------- helpers
    def send_json(self, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error_json(self, status: int, message: str, kind: str) -> None:
        self.send_json(
            status,
            {"object": "error", "message": message, "type": kind, "param": None, "code": status},
        )

    def read_json(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            obj = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self.send_error_json(400, "invalid JSON body", "BadRequestError")
            return None
        if not isinstance(obj, dict):
            self.send_error_json(400, "JSON body must be an object", "BadRequestError")
            return None
        return obj

    def authorized(self) -> bool:
        key = self.state.args.api_key or os.environ.get("VLLM_API_KEY")
        if not key or not self.path.startswith("/v1/"):
            return True
        if self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self.send_json(401, {"error": "Unauthorized"})
        return False

    # ------------------------------------------------------------- routes
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        st = self.state
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if st.healthy():
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error_json(503, st.unhealthy_reason(), "ServiceUnavailableError")
        elif path == "/evalprov/ranks":
            self.send_json(200, st.rank_report())
        elif path == "/evalprov/argv":
            self.send_json(
                200,
                {
                    "argv": st.argv,
                    "args": {k: v for k, v in vars(st.args).items() if k != "api_key"},
                    "unknown": st.unknown,
                    "env": {
                        "NVIDIA_VISIBLE_DEVICES": os.environ.get("NVIDIA_VISIBLE_DEVICES"),
                        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    },
                    "hostname": os.uname().nodename,
                    "pid": os.getpid(),
                },
            )
        elif path == "/version":
            self.send_json(200, {"version": VERSION})
        elif path == "/metrics":
            body = (
                f"vllm:num_requests_total {st.requests}\n"
                f"vllm:prompt_tokens_total {st.prompt_tokens}\n"
                f"vllm:generation_tokens_total {st.generation_tokens}\n"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/v1/models":
            if not self.authorized():
                return
            created = int(time.time())
            data = [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": st.args.model,
                    "parent": None,
                    "max_model_len": st.args.max_model_len,
                }
                for name in st.args.served_model_name
            ]
            self.send_json(200, {"object": "list", "data": data})
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self.send_json(404, {"detail": "Not Found"})
            return
        if not self.authorized():
            return
        req = self.read_json()
        if req is None:
            return
        st = self.state
        if not st.healthy():
            self.send_error_json(503, "model is loading", "ServiceUnavailableError")
            return
        if st.slow_after is not None and st.requests >= st.slow_after:
            time.sleep(st.slow_seconds)
        held = time.monotonic() + 600
        while st.hold_until and not os.path.exists(st.hold_until) and time.monotonic() < held:
            time.sleep(0.1)
        if st.fail_requests:
            log("ERROR:    STANDIN_FAIL_REQUESTS is set: failing the request")
            self.send_error_json(500, "simulated engine failure", "InternalServerError")
            return
        model = req.get("model")
        if model is not None and model not in st.args.served_model_name:
            self.send_error_json(404, f"The model `{model}` does not exist.", "NotFoundError")
            return
        model = model or st.args.served_model_name[0]
        max_tokens = req.get("max_tokens", req.get("max_completion_tokens"))
        n = int(req.get("n") or 1)
        if path == "/v1/completions":
            prompts = req.get("prompt", "")
            if not isinstance(prompts, list) or (prompts and isinstance(prompts[0], int)):
                prompts = [prompts]
            prompts = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
            self.complete(req, model, prompts, max_tokens, n)
        else:
            messages = req.get("messages") or []
            self.chat(req, model, messages, max_tokens, n)

    def account(self, prompt_tokens: int, completion_tokens: int) -> dict:
        st = self.state
        with st.lock:
            st.requests += 1
            st.prompt_tokens += prompt_tokens
            st.generation_tokens += completion_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def complete(self, req: dict, model: str, prompts: list[str], max_tokens, n: int) -> None:
        choices, ptok, ctok = [], 0, 0
        for prompt in prompts:
            text, finish = truncate(" " + answer_for(prompt), max_tokens)
            ptok += count_tokens(prompt)
            for _ in range(n):
                choices.append(
                    {
                        "index": len(choices),
                        "text": text,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                )
                ctok += count_tokens(text)
        rid = self.state.next_id("cmpl")
        created = int(time.time())
        if req.get("stream"):
            chunks = [
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [c],
                }
                for c in choices
            ]
            self.stream(chunks, self.account(ptok, ctok), rid, created, model, "text_completion")
            return
        self.send_json(
            200,
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": self.account(ptok, ctok),
            },
        )

    def chat(self, req: dict, model: str, messages: list, max_tokens, n: int) -> None:
        prompt = chat_prompt(messages)
        text, finish = truncate(answer_for(last_user(messages) or prompt), max_tokens)
        ptok = count_tokens(prompt)
        ctok = count_tokens(text) * n
        rid = self.state.next_id("chatcmpl")
        created = int(time.time())
        if req.get("stream"):
            chunks = []
            for i in range(n):
                for delta, fin in (
                    ({"role": "assistant", "content": ""}, None),
                    ({"content": text}, None),
                    ({}, finish),
                ):
                    chunks.append(
                        {
                            "id": rid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [
                                {"index": i, "delta": delta, "logprobs": None, "finish_reason": fin}
                            ],
                        }
                    )
            self.stream(
                chunks, self.account(ptok, ctok), rid, created, model, "chat.completion.chunk"
            )
            return
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            for i in range(n)
        ]
        self.send_json(
            200,
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": self.account(ptok, ctok),
            },
        )

    def stream(
        self, chunks: list, usage: dict, rid: str, created: int, model: str, obj: str
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for c in chunks:
            self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
        final = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        self.wfile.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parse_args(argv)
    log(f"INFO:     evalprov stand-in for vLLM {VERSION}")
    log(f"INFO:     non-default args: {json.dumps(vars(args))}")
    # names only: tests check that a secret reached the server without anything showing it
    names = sorted(k for k in os.environ if any(w in k for w in ("TOKEN", "KEY", "SECRET")))
    log(f"INFO:     secret environment names: {','.join(names) or '-'}")
    if unknown:
        log(f"INFO:     ignored extra args: {json.dumps(unknown)}")
    log(f"INFO:     NVIDIA_VISIBLE_DEVICES={os.environ.get('NVIDIA_VISIBLE_DEVICES')}")

    def stop(signum, _frame) -> None:
        log(f"INFO:     received signal {signum}, shutting down")
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    exit_after = os.environ.get("STANDIN_EXIT_AFTER")
    if exit_after:

        def crash() -> None:
            log(
                f"ERROR:    EngineCore failed: simulated crash after {exit_after}s "
                "(STANDIN_EXIT_AFTER)"
            )
            sys.stderr.write("RuntimeError: Engine core initialization failed (stand-in)\n")
            sys.stderr.flush()
            os._exit(EXIT_CODE_CRASH)

        t = threading.Timer(float(exit_after), crash)
        t.daemon = True
        t.start()

    if args.dp_role == "worker":
        return run_worker(args)
    state = State(args, unknown, ["vllm", *argv])
    Handler.state = state
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    if state.ranks is not None:
        state.ranks.serve()
    log(f"INFO:     Started server process [{os.getpid()}]")
    log(f"INFO:     Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    if state.start_delay <= 0:
        state.healthy()
    httpd.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
