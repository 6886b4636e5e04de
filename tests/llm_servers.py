"""Fake LLM APIs for the llm proposer's specifications: real HTTP on 127.0.0.1, scripted replies.

`FakeOpenAI` serves POST /v1/chat/completions and `FakeAnthropic` POST /v1/messages, each from a
list of scripted steps, one per request received:

    "text"                              a 200 reply whose content is the text
    Status(429, headers={...})          an error reply (JSON error body)
    Sleep(2.0, "text")                  wait, then reply (to outlast a client's timeout)

Every request is recorded (path, headers, JSON body) in `.requests`. When the script runs out,
the server answers 500, so a test that asks more than it scripted fails loudly.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Status:
    code: int
    headers: dict = field(default_factory=dict)
    message: str = "scripted error"


@dataclass
class Sleep:
    seconds: float
    then: object


@dataclass
class Request:
    path: str
    headers: dict
    body: dict
    at: float = field(default_factory=time.monotonic)  # when it arrived


class _FakeAPI:
    path = "/"

    def __init__(self, script: list, *, input_tokens: int = 1000, output_tokens: int = 100):
        self.script = list(script)
        self.requests: list[Request] = []
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode(errors="replace")}
                with api.lock:
                    api.requests.append(Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    step = api.script.pop(0) if api.script else Status(500, message="the fake server's script ran out")
                if self.path.split("?")[0] != api.path:
                    step = Status(404, message=f"no such path {self.path}")
                while isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = step.then
                if isinstance(step, Status):
                    self._send(step.code, api.error_body(step), step.headers)
                else:
                    self._send(200, api.reply_body(str(step), body))

            def _send(self, code: int, payload: dict, headers: dict | None = None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def reply_body(self, text: str, request: dict) -> dict:
        raise NotImplementedError

    def error_body(self, step: Status) -> dict:
        raise NotImplementedError


class FakeOpenAI(_FakeAPI):
    """OpenAI's chat completions; the client's base_url is `.base_url` (ending in /v1)."""

    path = "/v1/chat/completions"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def reply_body(self, text: str, request: dict) -> dict:
        return {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 1700000000,
            "model": request.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens,
                      "total_tokens": self.input_tokens + self.output_tokens},
        }

    def error_body(self, step: Status) -> dict:
        return {"error": {"message": step.message, "type": "scripted", "code": None}}


class FakeAnthropic(_FakeAPI):
    """Anthropic's Messages API; the client's base_url is `.base_url` (the root)."""

    path = "/v1/messages"

    @property
    def base_url(self) -> str:
        return self.url

    def reply_body(self, text: str, request: dict) -> dict:
        return {
            "id": f"msg_{len(self.requests)}", "type": "message", "role": "assistant",
            "model": request.get("model", ""), "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        }

    def error_body(self, step: Status) -> dict:
        kind = {429: "rate_limit_error", 401: "authentication_error", 529: "overloaded_error"}.get(step.code, "api_error")
        return {"type": "error", "error": {"type": kind, "message": step.message}}
