"""The dispatcher on the real (Tansu) broker, with a loopback Slack Web API and an aiosmtpd server.

Every wait is on a condition with a timeout: Slack calls seen, emails received, a metric reaching a value.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import pytest
from prometheus_client import REGISTRY

from alerts.dispatcher import Dispatcher
from censorwatch import bus
from censorwatch.config import Settings, load_settings
from censorwatch.models import DeadLetter, Event
from tests.conftest import free_port
from tests.fakes.events import life
from tests.fakes.slack_api import FakeSlackApi, SlackFault
from tests.fakes.smtp_server import SmtpServer
from tests.kafka_read import read_topic

pytestmark = pytest.mark.kafka
TOKEN = "xoxb-test-token"


class Crash(Exception):
    """Stands for the process dying between the send (logged) and the offset commit."""


def make_settings(base: Settings, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap": base.kafka_bootstrap,
        "topic_prefix": base.topic_prefix,
        "topic_partitions": 2,
        "kafka_session_timeout_seconds": 6.0,
        "state_dir": base.state_dir,
        "metrics": {"poller_port": 0, "worker_port": 0, "dispatcher_port": 0},
        "alerts": {"retry_initial_seconds": 0.1, "retry_max_backoff_seconds": 0.5},
    }
    return load_settings(**(values | kw))


def slack_cfg(api: FakeSlackApi, **kw: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "token": TOKEN,
        "base_url": api.base_url,
        "channel": "#kh-alerts",
        "min_interval_seconds": 0.0,
        "timeout_seconds": 5,
    } | kw


def email_cfg(port: int, **kw: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "starttls": False,
        "recipients": ["team@example.org"],
        "timeout_seconds": 5,
    } | kw


def produce(settings: Settings, events: list[Event], raw: list[bytes] | None = None) -> None:
    bus.ensure_topics(settings)
    p = bus.producer(settings)
    try:
        records = [(b"bad", r) for r in raw or []] + [(e.event_id.encode(), e.to_bytes()) for e in events]
        bus.send_all(p, settings.topics.events, records, timeout=30)
    finally:
        p.close()


def metric(sink: str, outcome: str) -> float:
    v = REGISTRY.get_sample_value("censorwatch_notifications_total", {"sink": sink, "outcome": outcome})
    return v or 0.0


def wait_until(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def running(d: Dispatcher) -> Iterator[dict[str, Any]]:
    """Run a dispatcher in a thread; on exit stop it and check it returned 0 (or record what it raised)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["rc"] = d.run()
        except BaseException as exc:  # the crash hook's exception ends up here
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        yield out
    finally:
        d.stop()
        t.join(60)
        assert not t.is_alive(), "dispatcher did not stop"


def test_whole_life_of_an_event_on_slack_and_email(kafka_settings: Settings) -> None:
    with FakeSlackApi(TOKEN) as api, SmtpServer(free_port()) as smtp:
        s = make_settings(kafka_settings, slack=slack_cfg(api), email=email_cfg(smtp.port))
        events = life()
        produce(s, events, raw=[b"{not json", b'{"event_id": "x"}'])
        d = Dispatcher(s)
        with running(d) as out:
            api.wait_for(lambda a: len(a.calls_of("chat.postMessage")) == 4 and len(a.calls_of("chat.update")) == 3)
            mails = smtp.wait_for(4)
        assert out == {"rc": 0}

    posts = api.calls_of("chat.postMessage")
    updates = api.calls_of("chat.update")
    root, replies = posts[0], posts[1:]
    assert "thread_ts" not in root.params and root.params["channel"] == "#kh-alerts"
    assert "www.rfa.org blocked in Cambodia on 1 ISP — DNS" in root.text
    root_ts = next(iter(api.messages))[1]
    assert [r.params["thread_ts"] for r in replies] == [root_ts] * 3
    assert all(u.params["ts"] == root_ts and u.params["channel"] == "CKHALERTS" for u in updates)
    assert "on 3 ISPs — DNS" in updates[0].text and "DNS, HTTP failure" in updates[1].text
    assert "unblocked in Cambodia" in updates[2].text
    assert replies[-1].text.startswith("Unblocked: www.rfa.org unblocked in Cambodia")
    assert replies[-1].params.get("reply_broadcast") is True
    assert not any(r.params.get("reply_broadcast") for r in replies[:-1])
    assert len(api.calls) == 7  # nothing else was sent

    subjects = [" ".join(str(m["Subject"]).split()) for _, m in mails]  # unfold encoded words
    assert subjects[0] == "[censorwatch] New: www.rfa.org blocked in Cambodia on 1 ISP — DNS"
    assert subjects[-1] == "[censorwatch] Unblocked: www.rfa.org unblocked in Cambodia"
    assert all(to == ["team@example.org"] for to, _ in mails)
    first = mails[0][1]
    assert first.get_body(("plain",)) is not None and first.get_body(("html",)) is not None
    assert mails[1][1]["In-Reply-To"] == mails[2][1]["In-Reply-To"]

    dead = [DeadLetter.from_bytes(v) for v in read_all(s, s.topics.deadletter)]
    assert len(dead) == 2 and all(d.stage == "dispatcher" and "undecodable" in d.reason for d in dead)


def read_all(settings: Settings, topic: str) -> list[bytes]:
    return [r.value for r in read_topic(settings, topic)]


def test_crash_between_send_and_commit_sends_no_duplicate(kafka_settings: Settings) -> None:
    with FakeSlackApi(TOKEN) as api:
        s = make_settings(kafka_settings, slack=slack_cfg(api), console=False)
        produce(s, life()[:1])

        def crash(key: str) -> None:
            raise Crash(key)

        with running(Dispatcher(s, after_send=crash)) as out:
            wait_until(lambda: "error" in out, what="the crash")
        assert isinstance(out["error"], Crash)
        assert len(api.calls_of("chat.postMessage")) == 1

        before = metric("slack", "duplicate")
        with running(Dispatcher(s)) as out2:
            wait_until(lambda: metric("slack", "duplicate") > before, what="the duplicate to be recognised")
            produce(s, life()[1:2])  # the thread goes on under the same root after the restart
            api.wait_for(lambda a: len(a.calls_of("chat.postMessage")) == 2)
        assert out2 == {"rc": 0}
    posts = api.calls_of("chat.postMessage")
    assert posts[1].params["thread_ts"] == next(iter(api.messages))[1]


def test_slack_429_retry_after_and_5xx_are_retried(kafka_settings: Settings) -> None:
    with FakeSlackApi(TOKEN) as api:
        api.push(SlackFault.rate_limited(retry_after=1), *[SlackFault.server_error(503)] * 3)
        s = make_settings(kafka_settings, slack=slack_cfg(api), console=False)
        produce(s, life()[:1])
        failed = metric("slack", "failed")
        with running(Dispatcher(s)):
            api.wait_for(lambda a: len(a.calls_of("chat.postMessage")) == 1)
    calls = api.calls_of("chat.postMessage", ok_only=False)
    assert [c.status for c in calls] == [429, 503, 503, 503, 200]
    assert calls[1].at - calls[0].at >= 1.0  # Retry-After honoured
    assert metric("slack", "failed") > failed


def test_slack_rate_limited_for_a_minute_delivers_once_after_it(kafka_settings: Settings) -> None:
    """Slack answers 429 for a minute (three times Retry-After 20): the notice waits, is not dead-lettered (the
    sink's retry budget is 120 s), and is posted exactly once when Slack accepts it again."""
    with FakeSlackApi(TOKEN) as api:
        api.push(*[SlackFault.rate_limited(retry_after=20)] * 3)
        s = make_settings(kafka_settings, slack=slack_cfg(api), console=False)
        produce(s, life()[:1])
        dead = metric("slack", "deadlettered")
        with running(Dispatcher(s)):
            api.wait_for(lambda a: len(a.calls_of("chat.postMessage")) == 1, timeout=120)
    calls = api.calls_of("chat.postMessage", ok_only=False)
    assert [c.status for c in calls] == [429, 429, 429, 200]
    assert all(b.at - a.at >= 20.0 for a, b in pairwise(calls))  # Retry-After honoured
    assert calls[-1].at - calls[0].at >= 60.0
    assert metric("slack", "deadlettered") == dead


def test_smtp_down_then_up_delivers_once(kafka_settings: Settings) -> None:
    port = free_port()
    s = make_settings(kafka_settings, email=email_cfg(port), console=False)
    produce(s, life()[:1])
    failed = metric("email", "failed")
    smtp = SmtpServer(port)
    with running(Dispatcher(s)):
        wait_until(lambda: metric("email", "failed") >= failed + 2, what="failed SMTP attempts")
        smtp.start()
        mails = smtp.wait_for(1)
    smtp.stop()
    assert len(mails) == 1 and len(smtp.messages) == 1


def test_dead_letter_after_max_retry(kafka_settings: Settings) -> None:
    with FakeSlackApi(TOKEN) as api:
        api.push(*[SlackFault.server_error(500)] * 50)
        s = make_settings(kafka_settings, slack=slack_cfg(api, max_retry_seconds=1.0), console=False)
        produce(s, life()[:1])
        before = metric("slack", "deadlettered")
        with running(Dispatcher(s)):
            wait_until(lambda: metric("slack", "deadlettered") > before, what="dead-lettering")
    dead = [DeadLetter.from_bytes(v) for v in read_all(s, s.topics.deadletter)]
    assert len(dead) == 1 and "slack:#kh-alerts" in dead[0].reason


def test_sigterm_finishes_commits_and_exits_zero(kafka_settings: Settings) -> None:
    import os
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CENSORWATCH_")}
    env |= {
        "CENSORWATCH_KAFKA_BOOTSTRAP": kafka_settings.bootstrap(),
        "CENSORWATCH_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "CENSORWATCH_METRICS__DISPATCHER_PORT": "0",
        "CENSORWATCH_KAFKA_SESSION_TIMEOUT_SECONDS": "6",
    }
    produce(kafka_settings, life()[:1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "censorwatch", "dispatch"], env=env, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: any("ALERT New: www.rfa.org" in line for line in lines), what="the console alert")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert any("dispatcher stopped" in line for line in lines)


def test_heartbeat_tells_no_alerts_from_no_delivery(kafka_settings: Settings) -> None:
    """Every interval the heartbeat receivers hear the dispatcher is alive and what it delivered since."""
    with FakeSlackApi(TOKEN) as api:
        alerts = {
            "retry_initial_seconds": 0.1,
            "retry_max_backoff_seconds": 0.5,
            "heartbeat_receivers": ["slack:#ops"],
            "heartbeat_interval_seconds": 0.5,
        }
        s = make_settings(kafka_settings, slack=slack_cfg(api), console=False, alerts=alerts)
        produce(s, life()[:1])

        def beats(a: FakeSlackApi) -> list[Any]:
            return [c for c in a.calls_of("chat.postMessage") if c.params["channel"] == "#ops"]

        def delivered(a: FakeSlackApi) -> int:
            return sum(int(re.search(r"(\d+) notices delivered", c.text).group(1)) for c in beats(a))  # type: ignore[union-attr]

        with running(Dispatcher(s)):
            api.wait_for(lambda a: len(a.calls_of("chat.postMessage")) >= 1 and delivered(a) >= 1)
            n = len(beats(api))
            api.wait_for(lambda a: len(beats(a)) >= n + 2)  # it keeps beating while nothing happens
    alerts_posted = [c for c in api.calls_of("chat.postMessage") if c.params["channel"] == "#kh-alerts"]
    assert len(alerts_posted) == 1
    assert delivered(api) == 1  # each delivery counted in exactly one heartbeat
    for beat in beats(api):
        assert beat.text.startswith("censorwatch dispatcher alive at ") and "blocks" not in beat.params
    assert REGISTRY.get_sample_value("censorwatch_dispatcher_last_delivery_timestamp_seconds", {"sink": "slack"})


def test_reminders_repeat_in_the_thread_while_open_and_stop_once_resolved(kafka_settings: Settings) -> None:
    with FakeSlackApi(TOKEN) as api:
        alerts = {"retry_initial_seconds": 0.1, "retry_max_backoff_seconds": 0.5, "repeat_interval_seconds": 0.5}
        s = make_settings(kafka_settings, slack=slack_cfg(api), console=False, alerts=alerts)
        opened, resolved = life()[0], life()[-1]
        control = life(event_id="KH|x", target="x.example.org")[0]  # stays open: its reminders pace the check
        produce(s, [opened, control])

        def reminders(a: FakeSlackApi, target: str = "www.rfa.org") -> list[Any]:
            return [c for c in a.calls_of("chat.postMessage") if "Still ongoing" in c.text and target in c.text]

        with running(Dispatcher(s)):
            api.wait_for(lambda a: len(reminders(a)) >= 2)
            produce(s, [resolved])
            api.wait_for(lambda a: any("Unblocked" in c.text for c in a.calls_of("chat.postMessage")))
            after_resolution = len(reminders(api))
            # Three more reminders of the open event (three repeat intervals, however slow the machine) with this
            # one resolved: at most one reminder of it that was already in flight.
            seen = len(reminders(api, "x.example.org"))
            api.wait_for(lambda a: len(reminders(a, "x.example.org")) >= seen + 3)
            assert len(reminders(api)) <= after_resolution + 1
    root_ts = next(ts for (_, ts), m in api.messages.items() if "www.rfa.org" in str(m))
    assert all(r.params.get("thread_ts") == root_ts for r in reminders(api))
    assert len(api.calls_of("chat.update")) == 1  # reminders reply in the thread; only the resolution edits the root
