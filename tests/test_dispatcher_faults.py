"""The dispatcher under faults: a stop during a retry wait, failing reminders, a resolution that was not sent,
an SMTP server that fumbles QUIT, a bad silence record, an event the digest cannot render.

Real parts only (the Tansu broker, aiosmtpd, the loopback Slack fake); every wait is on a condition.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from kafka import TopicPartition

from alerts.dispatcher import GROUP, Dispatcher
from alerts.notifylog import NotificationLog, notice_key
from alerts.render import EmailRender
from alerts.silences import SilenceStore
from alerts.sinks import EmailSink
from censorwatch import bus
from censorwatch.config import AlertMatch, EmailSettings, Settings
from tests.conftest import free_port
from tests.fakes.events import life
from tests.fakes.slack_api import FakeSlackApi, SlackCall, SlackFault
from tests.fakes.smtp_server import SmtpServer
from tests.test_dispatcher import TOKEN, email_cfg, make_settings, metric, produce, running, slack_cfg, wait_until

SLACK = "slack:#kh-alerts"


def committed(settings: Settings) -> dict[int, int | None]:
    """The dispatcher group's committed offset per partition of the events topic."""
    c = bus.consumer(settings, group_id=GROUP)
    try:
        parts = sorted(c.partitions_for_topic(settings.topics.events) or set())
        return {p: c.committed(TopicPartition(settings.topics.events, p)) for p in parts}
    finally:
        c.close()


def heal(api: FakeSlackApi) -> None:
    """Slack is healthy again: drop the scripted faults not used yet."""
    with api._lock:
        api.faults.clear()


def reminders(api: FakeSlackApi, target: str = "www.rfa.org") -> list[SlackCall]:
    return [c for c in api.calls_of("chat.postMessage") if "Still ongoing" in c.text and target in c.text]


@pytest.mark.kafka
def test_stop_during_a_retry_wait_leaves_the_record_for_the_next_start(kafka_settings: Settings) -> None:
    """SIGTERM while Slack answers 500: nothing is committed, and the next start tells every receiver."""
    with FakeSlackApi(TOKEN) as api, SmtpServer(free_port()) as smtp:
        api.push(*[SlackFault.server_error(500)] * 10000)
        s = make_settings(
            kafka_settings, slack=slack_cfg(api, max_retry_seconds=600.0), email=email_cfg(smtp.port), console=False
        )
        produce(s, life()[:1])
        failed = metric("slack", "failed")
        with running(Dispatcher(s)) as out:
            wait_until(lambda: metric("slack", "failed") >= failed + 2, what="failed Slack attempts")
        assert out == {"rc": 0}
        assert all(offset in (None, 0) for offset in committed(s).values()), committed(s)

        heal(api)
        with running(Dispatcher(s)) as out:
            api.wait_for(lambda a: len(a.calls_of("chat.postMessage")) == 1)
            smtp.wait_for(1)
        assert out == {"rc": 0}
    assert len(smtp.messages) == 1


@pytest.mark.kafka
def test_failed_reminder_keeps_the_notice_and_waits_an_interval(kafka_settings: Settings) -> None:
    """A dead-lettered reminder has its own log entry (the notice stays "sent", so the resolution still goes out
    after a restart) and moves the reminder clock (no retry storm)."""
    with FakeSlackApi(TOKEN) as api:
        alerts = {"retry_initial_seconds": 0.1, "retry_max_backoff_seconds": 0.2, "repeat_interval_seconds": 1.5}
        s = make_settings(kafka_settings, slack=slack_cfg(api, max_retry_seconds=0.3), console=False, alerts=alerts)
        opened, resolved = life()[0], life()[-1]
        produce(s, [opened])
        with running(Dispatcher(s)) as out:
            api.wait_for(lambda a: len(a.calls_of("chat.postMessage")) == 1)
            api.push(*[SlackFault.server_error(500)] * 10000)
            dead = metric("slack", "deadlettered")
            wait_until(lambda: metric("slack", "deadlettered") >= dead + 2, what="two dead-lettered reminders")
        assert out == {"rc": 0}

        nlog = NotificationLog(s)
        nlog.load()
        assert nlog.entries[notice_key(opened, SLACK)]["status"] == "sent"
        assert nlog.notified(opened.event_id, SLACK)
        failed = sorted(
            datetime.fromisoformat(v["at"])
            for v in nlog.entries.values()
            if v.get("type") == "reminder" and v.get("status") == "deadlettered"
        )
        assert len(failed) >= 2
        assert all(b - a >= timedelta(seconds=1.4) for a, b in pairwise(failed))  # one try per repeat interval

        heal(api)
        produce(s, [resolved])
        with running(Dispatcher(s)) as out:
            api.wait_for(lambda a: any("Unblocked" in c.text for c in a.calls_of("chat.postMessage")))
        assert out == {"rc": 0}


@pytest.mark.kafka
def test_a_resolution_that_was_silenced_still_stops_the_reminders(kafka_settings: Settings) -> None:
    """The "resolved" version is silenced (so not sent); once the silence ends no "Still ongoing" follows."""
    with FakeSlackApi(TOKEN) as api:
        alerts = {
            "retry_initial_seconds": 0.1,
            "retry_max_backoff_seconds": 0.5,
            "repeat_interval_seconds": 1.0,
            "silences_refresh_seconds": 0.3,
        }
        s = make_settings(kafka_settings, slack=slack_cfg(api), console=False, alerts=alerts)
        opened, resolved = life()[0], life()[-1]
        control = life(event_id="KH|x", target="x.example.org")[0]  # stays open: its reminders pace the check
        produce(s, [opened, control])
        d = Dispatcher(s)
        with running(d) as out:
            api.wait_for(lambda a: len(reminders(a)) >= 1 and len(reminders(a, "x.example.org")) >= 1)
            store = SilenceStore(s)
            silence = store.add(AlertMatch(target=["www.rfa.org"]), timedelta(hours=1), "known")
            wait_until(lambda: d.silences.matching(opened) is not None, what="the silence to be loaded")
            silenced = metric("slack", "silenced")
            produce(s, [resolved])
            wait_until(lambda: metric("slack", "silenced") > silenced, what="the resolution to be silenced")
            n = len(reminders(api))
            store.expire(silence.id)
            wait_until(lambda: d.silences.matching(opened) is None, what="the silence to end")
            seen = len(reminders(api, "x.example.org"))
            api.wait_for(lambda a: len(reminders(a, "x.example.org")) >= seen + 3)  # three repeat intervals
        assert out == {"rc": 0}
    assert len(reminders(api)) == n


class _QuitRefused:
    """Accepts every message, then answers QUIT with 421 (as a server shutting down might)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content)
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return "421 closing anyway"


def test_an_accepted_mail_is_sent_even_if_quit_fails() -> None:
    handler = _QuitRefused()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        sink = EmailSink(
            EmailSettings(
                enabled=True,
                smtp_host="127.0.0.1",
                smtp_port=controller.port,
                starttls=False,
                recipients=["team@example.org"],
            )
        )
        sink.send(["team@example.org"], EmailRender("subject", "text\n", "<p>text</p>"), key="k")  # no error
    finally:
        controller.stop()
    assert len(handler.messages) == 1


@pytest.mark.kafka
def test_email_reminders_each_have_their_own_message_id(kafka_settings: Settings) -> None:
    with SmtpServer(free_port()) as smtp:
        alerts = {"retry_initial_seconds": 0.1, "repeat_interval_seconds": 0.5}
        s = make_settings(kafka_settings, email=email_cfg(smtp.port), console=False, alerts=alerts)
        produce(s, life()[:1])
        with running(Dispatcher(s)) as out:
            mails = smtp.wait_for(3)  # the notice and two reminders
        assert out == {"rc": 0}
    ids = [m["Message-ID"] for _, m in mails]
    assert len(set(ids)) == len(ids), ids


@pytest.mark.kafka
def test_an_invalid_silence_record_is_skipped(kafka_settings: Settings) -> None:
    """A broken record on the silences topic neither stops the dispatcher nor hides the valid silences."""
    with FakeSlackApi(TOKEN) as api:
        s = make_settings(kafka_settings, slack=slack_cfg(api), console=False)
        bus.ensure_topics(s)
        SilenceStore(s).add(AlertMatch(target=["www.rfa.org"]), timedelta(hours=1), "known")
        p = bus.producer(s)
        try:
            bus.send_all(p, s.topics.silences, [(b"broken", b'{"reason": "no match, no end"}')], timeout=30)
        finally:
            p.close()
        produce(s, life()[:1])
        silenced = metric("slack", "silenced")
        with running(Dispatcher(s)) as out:
            wait_until(lambda: metric("slack", "silenced") > silenced or "error" in out, what="the notice")
        assert out == {"rc": 0}
    assert api.calls_of("chat.postMessage") == []


@pytest.mark.kafka
def test_digest_skips_an_event_it_cannot_render(kafka_settings: Settings) -> None:
    """A silenced event dated year 9999 (its chart link overflows) is left out; the digest still goes out."""
    with SmtpServer(free_port()) as smtp:
        s = make_settings(
            kafka_settings,
            console=False,
            email=email_cfg(smtp.port),
            alerts={"digest": {"enabled": True, "hour_utc": 0}},
        )
        bus.ensure_topics(s)
        SilenceStore(s).add(AlertMatch(target=["far.example.org"]), timedelta(hours=1), "odd dates")
        far = life(event_id="KH|far", target="far.example.org")[0].model_copy(
            update={"last_seen": datetime(9999, 12, 31, 12, tzinfo=UTC)}
        )
        produce(s, [far, life()[0]])

        def digests() -> list[Any]:
            return [m for _, m in smtp.messages if "daily digest" in str(m["Subject"])]

        with running(Dispatcher(s)) as out:
            wait_until(lambda: bool(digests()) or "error" in out, what="the digest")
        assert out == {"rc": 0}
    body = digests()[0].get_body(("plain",)).get_content()
    assert "www.rfa.org blocked in Cambodia" in body and "far.example.org blocked" not in body
