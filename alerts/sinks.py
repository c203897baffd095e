"""The only places in censorwatch that send alerts: console (log), Slack (Web API), email (SMTP).

Each sink turns its transport's failures into one ``DeliveryError`` that says whether trying again can help
(``transient``) and how long the far end asked us to wait (``retry_after``), so the dispatcher owns a single
retry policy for every sink.
"""

from __future__ import annotations

import hashlib
import logging
import math
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any
from urllib.error import URLError

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)

from alerts import escape
from alerts.render import EmailRender, Renderer
from censorwatch.config import EmailSettings, SlackSettings
from censorwatch.models import Event, EventAction

log = logging.getLogger(__name__)
console_log = logging.getLogger("censorwatch.alerts")

# Slack "ok": false errors that go away by themselves; anything else (bad channel, bad token) needs a human.
SLACK_TRANSIENT = {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
# The root was deleted or is too old to edit: start a fresh thread instead of failing the notice forever.
SLACK_ROOT_GONE = {"message_not_found", "cant_update_message", "thread_not_found", "edit_window_closed"}


class DeliveryError(Exception):
    """A failed send: ``transient`` ones are retried (after ``retry_after``), others dead-lettered."""

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


@dataclass(frozen=True)
class SlackThread:
    """Where an event's root message lives: the channel *id* Slack answered with, and the message ``ts``."""

    channel: str
    ts: str


class ConsoleSink:
    """The default sink: one log line per notice, so a bare ``censorwatch up`` shows alerts."""

    name = "console"

    def deliver(self, event: Event, renderer: Renderer, reminder: bool = False) -> None:
        prefix = "REMINDER " if reminder else ""
        console_log.warning("ALERT %s%s", prefix, renderer.console(event))

    def send_text(self, text: str) -> None:
        console_log.warning("%s", escape.one_line(text))


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return str(value[0] if isinstance(value, list) else value)
    return None


def _retry_after(headers: Mapping[str, Any]) -> float | None:
    value = _header(headers, "Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class SlackSink:
    """Slack via slack-sdk's ``WebClient``: a root message per event, updates in its thread, root edited.

    The SDK's own retry handlers (429 with ``Retry-After``, 5xx, connection resets) absorb short blips; what
    is left becomes a ``DeliveryError`` for the dispatcher's longer retry/dead-letter policy.
    """

    name = "slack"

    def __init__(
        self,
        settings: SlackSettings,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.token is None:
            raise ValueError("slack token is not set")
        self.client = WebClient(
            token=settings.token.get_secret_value(),
            base_url=settings.base_url,
            timeout=max(1, math.ceil(settings.timeout_seconds)),
            retry_handlers=[
                RateLimitErrorRetryHandler(max_retry_count=1),
                ServerErrorRetryHandler(max_retry_count=1),
                ConnectionErrorRetryHandler(max_retry_count=1),
            ],
        )
        self.min_interval = settings.min_interval_seconds
        self._sleep = sleep
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def _pace(self, channel: str) -> None:
        """At most one call per ``min_interval`` per channel (Slack allows about one message per second)."""
        with self._lock:
            wait = self._last.get(channel, -math.inf) + self.min_interval - self._clock()
            if wait > 0:
                self._sleep(wait)
            self._last[channel] = self._clock()

    def _call(self, pace_key: str, method: str, **kwargs: Any) -> dict[str, Any]:
        self._pace(pace_key)
        try:
            response = getattr(self.client, method)(**kwargs)
        except SlackApiError as exc:
            status = exc.response.status_code
            data = exc.response.data if isinstance(exc.response.data, dict) else {}
            error = str(data.get("error") or f"HTTP {status}")
            transient = status == 429 or status >= 500 or error in SLACK_TRANSIENT
            retry_after = _retry_after(exc.response.headers or {})
            raise DeliveryError(f"slack {method}: {error}", transient=transient, retry_after=retry_after) from None
        except (SlackClientError, URLError, OSError, ValueError) as exc:
            raise DeliveryError(f"slack {method}: {type(exc).__name__}: {exc}", transient=True) from None
        finally:
            with self._lock:
                self._last[pace_key] = self._clock()
        return dict(response.data) if isinstance(response.data, dict) else {}

    def deliver(
        self,
        event: Event,
        channel: str,
        renderer: Renderer,
        root: SlackThread | None,
        on_root: Callable[[SlackThread], None],
        reminder: bool = False,
    ) -> SlackThread:
        """Post the root (first notice), or edit it and reply in its thread; ``on_root`` keeps a new root."""
        msg = renderer.slack(event, reminder)
        if root is not None and not reminder:
            try:
                self._call(
                    channel,
                    "chat_update",
                    channel=root.channel,
                    ts=root.ts,
                    text=msg.root.text,
                    blocks=msg.root.blocks,
                )
            except DeliveryError as exc:
                if str(exc).rsplit(": ", 1)[-1] not in SLACK_ROOT_GONE:
                    raise
                log.warning("slack root of %s is gone (%s); starting a new thread", event.event_id, exc)
                root = None
        if root is None:
            data = self._call(
                channel,
                "chat_postMessage",
                channel=channel,
                text=msg.root.text,
                blocks=msg.root.blocks,
                unfurl_links=False,
                unfurl_media=False,
            )
            root = SlackThread(str(data.get("channel") or channel), str(data["ts"]))
            on_root(root)
            return root
        self._call(
            channel,
            "chat_postMessage",
            channel=root.channel,
            thread_ts=root.ts,
            text=msg.reply.text,
            blocks=msg.reply.blocks,
            reply_broadcast=event.action is EventAction.RESOLVED,
            unfurl_links=False,
            unfurl_media=False,
        )
        return root

    def send_text(self, channel: str, text: str) -> None:
        """A plain notice (heartbeat): escaped, no blocks."""
        self._call(channel, "chat_postMessage", channel=channel, text=escape.slack(escape.one_line(text)))


def _msgid(*parts: str) -> str:
    return f"<{hashlib.sha256('#'.join(parts).encode()).hexdigest()[:32]}@censorwatch>"


class EmailSink:
    """SMTP with optional STARTTLS or implicit TLS, auth and timeouts; one multipart (text + HTML) message.

    Headers go through ``email.message.EmailMessage``, which refuses CR/LF in a header value, and the subject
    is already one line (``escape.header``): untrusted text cannot add a header.
    """

    name = "email"

    def __init__(self, settings: EmailSettings) -> None:
        self.settings = settings

    def build(self, recipients: list[str], render: EmailRender, key: str, thread: str | None) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = escape.header(render.subject)
        msg["From"] = self.settings.sender
        msg["To"] = ", ".join(recipients)
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = _msgid(key)  # deterministic: a rare duplicate is recognisable as one
        if thread:  # mail clients thread an event's notices together
            msg["In-Reply-To"] = msg["References"] = _msgid(thread)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(render.text)
        msg.add_alternative(render.html, subtype="html")
        return msg

    def send(self, recipients: list[str], render: EmailRender, key: str, thread: str | None = None) -> None:
        msg = self.build(recipients, render, key, thread)
        s = self.settings
        try:
            smtp: smtplib.SMTP
            if s.ssl:
                smtp = smtplib.SMTP_SSL(
                    s.smtp_host, s.smtp_port, timeout=s.timeout_seconds, context=ssl.create_default_context()
                )
            else:
                smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout_seconds)
            try:
                if s.starttls and not s.ssl:
                    smtp.starttls(context=ssl.create_default_context())
                if s.username:
                    smtp.login(s.username, s.password.get_secret_value() if s.password else "")
                smtp.send_message(msg, from_addr=s.sender, to_addrs=recipients)
            except BaseException:
                _quit(smtp)  # its own failure must not replace the real error
                raise
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            raise DeliveryError(
                f"smtp: recipients refused {codes}", transient=all(400 <= c < 500 for c in codes)
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"smtp: {exc.smtp_code} {exc.smtp_error!r}", transient=400 <= exc.smtp_code < 500
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise DeliveryError(f"smtp: {exc}", transient=False) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"smtp: {type(exc).__name__}: {exc}", transient=True) from None
        # The server accepted the message: a failing QUIT must not make us send it again or dead-letter it.
        _quit(smtp)


def _quit(smtp: smtplib.SMTP) -> None:
    """Say goodbye and close; a QUIT that fails (or is answered with anything but 221) changes nothing."""
    try:
        code, reply = smtp.docmd("QUIT")
        if code != 221:
            log.info("smtp: QUIT answered %d %r; ignored", code, reply[:200])
    except (smtplib.SMTPException, OSError) as exc:
        log.info("smtp: QUIT failed (%s); ignored", exc)
    finally:
        smtp.close()
