"""Judges for RIM tests: a real OpenAI-compatible HTTP server on 127.0.0.1 and a scripted
in-process client, both answering from a `respond` function."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JUDGE_MARKERS = {  # a phrase of each shipped judge prompt -> judge name
    "Judge the ACCURACY": "accuracy",
    "HELPFUL": "helpfulness",
    "REASONING PROCESS": "process",
    "DIAGNOSES": "diagnostic",
}
ESCALATION_MARKER = "Smaller judges evaluated"


def judgement(score, uncertainty=0.1, rationale="looks right", principles=None) -> str:
    principles = principles or [
        {"name": "correctness", "weight": 0.7, "description": "the result is right"},
        {"name": "clarity", "weight": 0.3, "description": "easy to follow"},
    ]
    return json.dumps({"principles": principles, "score": score, "rationale": rationale,
                       "uncertainty": uncertainty})


def judge_of(user_prompt: str) -> str:
    return next(name for marker, name in JUDGE_MARKERS.items() if marker in user_prompt)


class Call:
    """What a respond function sees: the judge, the model, the temperature, the user prompt."""

    def __init__(self, body: dict):
        self.body = body
        self.model = body["model"]
        self.temperature = body["temperature"]
        self.user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        self.escalated = ESCALATION_MARKER in self.user
        self.judge = judge_of(self.user)


class ScriptedClient:
    """An in-process judge backend (the `complete(request, timeout)` interface)."""

    def __init__(self, respond, *, close_after_reply=False):
        self.respond = respond
        self.close_after_reply = close_after_reply  # drop kept-alive connections silently
        self.peers: list[tuple] = []  # the client address of each request
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def complete(self, request, timeout):
        call = Call({"model": request.model, "temperature": request.temperature,
                     "messages": [{"role": r, "content": c} for r, c in request.messages]})
        with self._lock:
            self.calls.append(call)
        return self.respond(call)


def chat_reply(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


class JudgeServer:
    """`POST /v1/chat/completions` on 127.0.0.1. `respond(call, headers)` returns the reply text,
    or a `(status, body_bytes)` pair for raw replies; it may block (timeouts)."""

    def __init__(self, respond, *, close_after_reply=False):
        self.respond = respond
        self.close_after_reply = close_after_reply  # drop kept-alive connections silently
        self.peers: list[tuple] = []  # the client address of each request
        self.calls: list[Call] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.completed = 0
        self.release = threading.Event()  # set on stop: frees handlers that block on it
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                call = Call(body)
                with server._lock:
                    server.calls.append(call)
                    server.peers.append(self.client_address)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    out = server.respond(call, dict(self.headers))
                finally:
                    with server._lock:
                        server.in_flight -= 1
                status, payload = out if isinstance(out, tuple) else (200, chat_reply(out))
                try:
                    self._send(status, payload)
                except OSError:  # the client gave up (timeout) and closed the connection
                    return
                with server._lock:
                    server.completed += 1
                self.close_connection = server.close_after_reply

            def _send(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def rim_config(small_url="http://127.0.0.1:1/v1", large_url=None, **overrides) -> dict:
    """A test config: the shipped prompts, tiny limits (no waiting on backoff)."""
    cfg = {
        "small_model": {"backend": "openai", "model": "small-judge", "base_url": small_url},
        "large_model": {"backend": "openai", "model": "large-judge", "base_url": large_url or small_url},
        "temperatures": [0.2, 0.5, 0.8],
        "large_temperature": 0.3,
        "max_parallel": 4,
        "timeout_s": 5.0,
        "max_retries": 1,
        "backoff_s": 0.01,
        "parse_retries": 1,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg
