#!/usr/bin/env python3
"""An OpenAI-compatible stand-in for vLLM (stdlib only), for the evalprov testbed.

Started like the real image: ``vllm serve MODEL --port 8000 --served-model-name NAME ...``
(the image's ``vllm`` launcher runs this file with the same arguments).

Endpoints: GET /health, GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (optionally ``"stream": true``), GET /version,
GET /metrics, and GET /evalprov/argv (argv, parsed args, unknown args and
NVIDIA_VISIBLE_DEVICES, for tests).

Behaviour switches (environment):
  STANDIN_START_DELAY=SECONDS  /health answers 503 until SECONDS after start
  STANDIN_NEVER_HEALTHY=1      /health always 503
  STANDIN_EXIT_AFTER=SECONDS   print an error and exit with code 3 after SECONDS
  STANDIN_FAIL_REQUESTS=1      completions / chat completions answer HTTP 500
  STANDIN_SLOW_AFTER=N         after N answered requests, each one waits first (a task that
                               outlives a job's time limit): STANDIN_SLOW_SECONDS (30)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.0.0+evalprov.standin"
EXIT_CODE_CRASH = 3


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
    return args, unknown


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
        self.lock = threading.Lock()
        self.counter = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.announced = False

    def healthy(self) -> bool:
        if self.never_healthy:
            return False
        ok = time.monotonic() - self.started >= self.start_delay
        if ok and not self.announced:
            self.announced = True
            log("INFO:     Application startup complete.")
        return ok

    def next_id(self, prefix: str) -> str:
        with self.lock:
            self.counter += 1
            return f"{prefix}-{self.counter:08d}"


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
                self.send_error_json(503, "model is loading", "ServiceUnavailableError")
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
    state = State(args, unknown, ["vllm", *argv])
    Handler.state = state
    log(f"INFO:     evalprov stand-in for vLLM {VERSION}")
    log(f"INFO:     non-default args: {json.dumps(vars(args))}")
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

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    log(f"INFO:     Started server process [{os.getpid()}]")
    log(f"INFO:     Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    if state.start_delay <= 0:
        state.healthy()
    httpd.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
