"""An aiosmtpd SMTP server on loopback that keeps every message it receives, for email delivery tests.

It can be started late or stopped and started again on the same port, to play "SMTP down for a while".
"""

from __future__ import annotations

import email
import email.policy
import threading
import time
from email.message import EmailMessage
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller


class _Collector:
    def __init__(self, box: SmtpServer) -> None:
        self.box = box

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        with self.box.cond:
            self.box.messages.append((list(envelope.rcpt_tos), msg))  # type: ignore[arg-type]
            self.box.cond.notify_all()
        return "250 OK"


class SmtpServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self.cond = threading.Condition()
        self._controller: Controller | None = None

    def start(self) -> SmtpServer:
        self._controller = Controller(_Collector(self), hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for(self, count: int, timeout: float = 20.0) -> list[tuple[list[str], EmailMessage]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} messages, got {len(self.messages)}")
                self.cond.wait(left)
            return list(self.messages)

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
