"""Issue 2 end to end on the real broker: fake OONI API -> poller -> worker -> dispatcher -> Slack and SMTP.

The fake API serves the recorded pages plus a synthetic (simulated) Cambodian series in which one domain on one
ASN turns anomalous; the poller meets a 429 and a 500 on the way and is restarted mid-run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from censorwatch.config import Settings
from censorwatch.models import Event, EventAction, Measurement
from tests.conftest import free_port
from tests.fakes.ooni_api import FakeOoniApi, Fault, load_recorded_items, make_item
from tests.fakes.slack_api import FakeSlackApi
from tests.fakes.smtp_server import SmtpServer
from tests.kafka_read import read_topic
from tests.services import Service, metric_value, wait_until

DOMAIN_URL = "https://www.kamnotra.io/"  # a site blocked in Cambodia in July 2023; the series itself is simulated
ASN = 38623


def blocking_series(now: datetime) -> tuple[list[dict], list[dict]]:
    """Clean measurements four days ago, then DNS anomalies from several probe runs in the last hours (simulated).

    The anomalies start inside the poller's look-back window, as late uploads do."""
    clean = [make_item(start=now - timedelta(days=4, hours=i), input=DOMAIN_URL, asn=ASN, seq=i) for i in range(8)]
    blocked = [
        make_item(
            start=now - timedelta(hours=5) + timedelta(minutes=20 * i),
            input=DOMAIN_URL,
            asn=ASN,
            anomaly=True,
            blocking_type="dns",
            seq=100 + i,
        )
        for i in range(10)
    ]
    return clean, blocked


@pytest.fixture
def slack() -> Iterator[FakeSlackApi]:
    with FakeSlackApi() as fake:
        yield fake


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer(free_port()) as server:
        yield server


def test_recorded_and_blocking_measurements_become_slack_and_email_alerts(
    worker: Service,
    pipeline_settings: Settings,
    slack: FakeSlackApi,
    smtp: SmtpServer,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    recorded = []
    for page in sorted((shared_data / "ooni/api-responses/search").glob("*.json")):
        recorded += load_recorded_items(page)
    clean, blocked = blocking_series(now)
    countries = sorted({i["probe_cc"] for i in recorded} | {"KH"})
    settings = pipeline_settings.model_copy(
        update={
            "countries": countries,
            "poll_start": min(datetime.fromisoformat(i["measurement_start_time"]) for i in recorded)
            - timedelta(days=1),
            "poll_interval_seconds": 1.0,
            "poll_page_size": 20,
            "http_max_backoff_seconds": 2.0,
            "slack": pipeline_settings.slack.model_copy(
                update={"enabled": True, "token": slack.token, "base_url": slack.base_url, "channel": "#kh-alerts"}
            ),
            "email": pipeline_settings.email.model_copy(
                update={
                    "enabled": True,
                    "smtp_host": "127.0.0.1",
                    "smtp_port": smtp.port,
                    "starttls": False,
                    "sender": "censorwatch@example.org",
                    "recipients": ["team@example.org"],
                }
            ),
        }
    )
    unique_recorded = {i["measurement_uid"] for i in recorded}
    with FakeOoniApi(recorded + clean) as api:
        api.push(Fault.rate_limited(retry_after=1), Fault.server_error())
        settings = settings.model_copy(update={"ooni_api_url": api.base_url})
        work = tmp_path / "services"
        dispatcher = Service(["dispatch"], settings, work, name="dispatch").start()
        poller = Service(["poll"], settings, work, name="poll").start()
        try:
            port = settings.metrics.poller_port
            wait_until(
                lambda: (
                    poller.check()
                    and metric_value(port, "censorwatch_poller_measurements_produced_total")
                    >= len(unique_recorded) + len(clean)  # the counter counts every country: all of them
                ),
                90,
                "the recorded measurements to be produced",
            )
            assert api.pending_faults == 0, "the 429 and the 500 were served"
            # restart the poller mid-run; new (and late) measurements arrive while it is down
            assert poller.stop() == 0
            api.add_items(blocked)
            poller = Service(["poll"], settings, work, name="poll2").start()
            wait_until(
                lambda: (
                    poller.check()
                    and metric_value(port, "censorwatch_poller_measurements_produced_total") >= len(blocked)
                ),
                90,
                "the blocking series to be produced after the restart",
            )

            # the incident on the events topic
            def kamnotra_events() -> list[Event]:
                records = read_topic(settings, settings.topics.events)
                return [e for r in records if (e := Event.from_bytes(r.value)).target == "www.kamnotra.io"]

            events = wait_until(lambda: worker.check() and kamnotra_events(), 90, "the kamnotra.io incident")
            opened = events[0]
            assert opened.action is EventAction.OPENED
            assert opened.cc == "KH"
            assert [a.asn for a in opened.asns] == [ASN]
            assert "dns" in opened.methods
            assert opened.blocked >= settings.detection.min_measurements
            assert opened.probes >= settings.detection.min_probes

            # Slack: the root message for the event, with the evidence
            slack.wait_for(lambda s: any("kamnotra.io" in c.text for c in s.calls_of("chat.postMessage")), timeout=60)
            post = next(c for c in slack.calls_of("chat.postMessage") if "kamnotra.io" in c.text)
            assert "Cambodia" in post.text
            assert f"AS{ASN}" in post.text or str(ASN) in post.text

            # email: a multipart message for the event
            def kamnotra_mail() -> list:
                return [m for _, m in smtp.messages if "kamnotra.io" in str(m["Subject"])]

            mails = wait_until(dispatcher.check and kamnotra_mail, 60, "the alert e-mail")
            assert mails[0].get_content_type() == "multipart/alternative"
            assert mails[0]["To"] == "team@example.org"

            # no duplicates: every uid once on the measurement topic despite the restart and the look-back
            ours = unique_recorded | {i["measurement_uid"] for i in clean + blocked}

            def produced() -> Counter[str] | None:
                uids = Counter(
                    Measurement.from_bytes(r.value).uid
                    for r in read_topic(settings, settings.topics.measurements)
                    if r.key != b"XA" and not r.value.startswith(b'{"__tick__"')  # XA: the worker test's poison
                )
                return uids if ours <= set(uids) else None

            uids = wait_until(produced, 60, "every measurement on the topic")
            assert {u for u, n in uids.items() if n > 1 and u in ours} == set()
            # metrics over HTTP
            assert metric_value(settings.metrics.dispatcher_port, "censorwatch_notifications_total{") >= 1
            assert metric_value(settings.metrics.worker_port, "censorwatch_worker_events_emitted_total") >= 1
        finally:
            assert poller.stop() == 0, poller.log()[-3000:]
            assert dispatcher.stop() == 0, dispatcher.log()[-3000:]
