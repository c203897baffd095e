"""The Faust worker on the real broker: live detection equals offline detection, poison is dead-lettered."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from censorwatch import bus
from censorwatch.broker import EmbeddedBroker
from censorwatch.config import Settings, load_settings
from censorwatch.models import DeadLetter, Event, Measurement
from services.replay import read_measurements, replay
from streams.detection import DetectionContext, Engine, run_offline
from tests.conftest import free_port
from tests.kafka_read import read_topic
from tests.services import Service, wait_until

KE_TELEGRAM = "events/ke-telegram-2023.jsonl"


@pytest.fixture(scope="session")
def worker_settings(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(
        kafka_bootstrap=broker.bootstrap,
        broker_kind="tansu",
        topic_prefix="worker-e2e",
        topic_partitions=1,
        kafka_session_timeout_seconds=6.0,
        countries=["KE"],
        state_dir=tmp_path_factory.mktemp("worker-state"),
        metrics={"poller_port": 0, "worker_port": free_port(), "dispatcher_port": 0},
    )


@pytest.fixture(scope="session")
def worker(worker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One Faust worker for the whole session (group joins on Tansu are slow)."""
    bus.ensure_topics(worker_settings)
    service = Service(["worker"], worker_settings, tmp_path_factory.mktemp("worker"), name="worker").start()
    try:
        wait_until(
            lambda: service.check() and _scrape(worker_settings) is not None,
            60,
            "the worker's metrics endpoint",
        )
        yield service
    finally:
        code = service.stop()
        assert code == 0, f"worker exited with {code} on SIGTERM:\n{service.log()[-3000:]}"


def _scrape(settings: Settings) -> str | None:
    url = f"http://127.0.0.1:{settings.metrics.worker_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def _metric(settings: Settings, line_prefix: str) -> float:
    text = _scrape(settings) or ""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))


def _events(settings: Settings) -> list[Event]:
    return [Event.from_bytes(r.value) for r in read_topic(settings, settings.topics.events)]


def _shape(e: Event) -> tuple[object, ...]:
    """What must agree between live and offline (emission metadata such as source_time aside)."""
    return (
        e.event_id,
        e.version,
        e.action,
        e.target,
        [(a.asn, a.blocked, a.total) for a in e.asns],
        e.methods,
    )


def test_live_worker_emits_exactly_the_offline_events(
    worker: Service, worker_settings: Settings, shared_data: Path
) -> None:
    path = shared_data / KE_TELEGRAM
    measurements = [m for _, m in read_measurements(path) if isinstance(m, Measurement)]
    _, expected, _ = run_offline(
        Engine(worker_settings.detection, DetectionContext.from_settings(worker_settings)), measurements
    )
    assert expected, "the Kenya corpus must produce events offline"

    summary = replay(worker_settings, [path])
    assert summary.produced == len(measurements)

    live = wait_until(
        lambda: worker.check() and (ev := _events(worker_settings)) and len(ev) >= len(expected) and ev,
        120,
        f"{len(expected)} events on the events topic",
    )
    assert [_shape(e) for e in live] == [_shape(e) for e in expected]
    processed = wait_until(
        lambda: (
            _metric(worker_settings, 'censorwatch_worker_measurements_processed_total{cc="KE"')
            >= len(measurements)
            and _metric(worker_settings, 'censorwatch_worker_measurements_processed_total{cc="KE"')
        ),
        30,
        "the processed-measurements metric",
    )
    assert processed == len(measurements)


def test_poison_records_are_dead_lettered_and_the_stream_goes_on(
    worker: Service, worker_settings: Settings
) -> None:
    producer = bus.producer(worker_settings)
    good = Measurement(
        uid="20231015000000.000000_XA_telegram_poison00000001",
        report_id="20231015T000000Z_telegram_XA_1_n1_poison",
        cc="XA",
        asn=1,
        test_name="telegram",
        start_time="2023-10-15T00:00:00Z",
        target="telegram",
    )
    bus.send_all(
        producer,
        worker_settings.topics.measurements,
        [(b"XA", b"{not json"), (b"XA", orjson.dumps({"uid": "x"})), (b"XA", good.to_bytes())],
        timeout=30,
    )
    producer.close()

    def worker_letters() -> list[DeadLetter]:
        records = read_topic(worker_settings, worker_settings.topics.deadletter)
        letters = [DeadLetter.from_bytes(r.value) for r in records]
        return [d for d in letters if d.stage == "worker" and d.key == "XA"]

    letters = wait_until(
        lambda: worker.check() and len(found := worker_letters()) >= 2 and found,
        60,
        "two dead letters from the worker",
    )
    reasons = " | ".join(d.reason for d in letters)
    assert "JSONDecodeError" in reasons
    assert "ValidationError" in reasons
    assert {d.payload for d in letters} >= {"{not json", '{"uid":"x"}'}
    # the good record after the poison was processed
    wait_until(
        lambda: _metric(worker_settings, 'censorwatch_worker_measurements_processed_total{cc="XA"') == 1,
        30,
        "the valid record after the poison to be processed",
    )
    assert _metric(worker_settings, 'censorwatch_deadletter_total{stage="worker"}') >= 2
