"""A loopback HTTP server speaking the bits of the Slack Web API censorwatch uses, for tests.

``chat.postMessage``, ``chat.update`` and ``auth.test``, form or JSON bodies, a Bearer token check;
answers ``{"ok": true, "ts": ..., "channel": ...}`` like Slack. Scripted faults (429 with
``Retry-After``, 5xx, ``ok: false`` errors) are used once each,
in order. Every call is recorded with its arrival time.

    with FakeSlackApi(token="xoxb-test") as slack:
        slack.push(SlackFault.rate_limited(retry_after=1))
        settings = load_settings(slack={"enabled": True, "token": "xoxb-test", "base_url": slack.base_url})
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs


@dataclass(frozen=True)
class SlackFault:
    status: int = 500
    body: dict[str, Any] | str = field(default_factory=lambda: "Internal Server Error")
    headers: dict[str, str] = field(default_factory=dict)
    method: str = ""  # only for this API method ("" = any)

    @classmethod
    def rate_limited(cls, retry_after: int = 1, method: str = "") -> SlackFault:
        return cls(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(retry_after)}, method)

    @classmethod
    def server_error(cls, status: int = 500, method: str = "") -> SlackFault:
        return cls(status, "upstream went away", {}, method)

    @classmethod
    def error(cls, error: str, method: str = "") -> SlackFault:
        return cls(200, {"ok": False, "error": error}, {}, method)


@dataclass(frozen=True)
class SlackCall:
    method: str
    params: dict[str, Any]
    at: float
    status: int

    @property
    def text(self) -> str:
        """Everything a reader would see: the fallback text and every block's text."""
        parts = [str(self.params.get("text", ""))]
        blocks = self.params.get("blocks") or []
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        for b in blocks:
            if "text" in b:
                parts.append(b["text"]["text"])
            for e in b.get("elements", []):
                parts.append(e.get("text", ""))
        return "\n".join(parts)


class FakeSlackApi:
    def __init__(self, token: str = "xoxb-test") -> None:  # noqa: S107
        self.token = token
        self.calls: list[SlackCall] = []
        self.faults: list[SlackFault] = []
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}  # (channel id, ts) -> current params
        self._lock = threading.RLock()  # wait_for's predicate may call calls_of under the lock
        self._cond = threading.Condition(self._lock)
        self._seq = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                fake._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/"

    def push(self, *faults: SlackFault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def channel_id(self, name: str) -> str:
        return "C" + "".join(c for c in name.upper() if c.isalnum())[:10] if name.startswith("#") else name

    def calls_of(self, method: str, ok_only: bool = True) -> list[SlackCall]:
        with self._lock:
            return [c for c in self.calls if c.method == method and (c.status == 200 or not ok_only)]

    def wait_for(self, predicate: Callable[[FakeSlackApi], bool], timeout: float = 20.0) -> None:
        """Block until ``predicate(self)`` holds (re-checked on every call), or fail with what was seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(c.method, c.status) for c in self.calls]
                    raise AssertionError(f"timed out; calls so far: {seen}")
                self._cond.wait(min(left, 0.2))

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        method = h.path.rsplit("/", 1)[-1]
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        ctype = h.headers.get("Content-Type", "")
        if "json" in ctype:
            params: dict[str, Any] = json.loads(raw or b"{}")
        else:
            params = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            status, body, headers = 200, {"ok": False, "error": "invalid_auth"}, {}
        else:
            status, body, headers = self._answer(method, params)
        with self._cond:
            self.calls.append(SlackCall(method, params, time.monotonic(), status))
            self._cond.notify_all()
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _answer(self, method: str, params: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            for i, f in enumerate(self.faults):
                if not f.method or f.method == method:
                    del self.faults[i]
                    return f.status, f.body, dict(f.headers)
            if method == "auth.test":
                return 200, {"ok": True, "user_id": "UCENSORWATCH", "team": "test"}, {}
            channel = self.channel_id(str(params.get("channel", "")))
            if not channel:
                return 200, {"ok": False, "error": "channel_not_found"}, {}
            if method == "chat.postMessage":
                self._seq += 1
                ts = f"{int(time.time())}.{self._seq:06d}"
                self.messages[(channel, ts)] = dict(params)
                return 200, {"ok": True, "channel": channel, "ts": ts}, {}
            if method == "chat.update":
                key = (channel, str(params.get("ts")))
                if key not in self.messages:
                    return 200, {"ok": False, "error": "message_not_found"}, {}
                self.messages[key] = dict(params)
                return 200, {"ok": True, "channel": channel, "ts": key[1]}, {}
            return 404, {"ok": False, "error": "unknown_method"}, {}

    def __enter__(self) -> FakeSlackApi:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()
