"""The Faust worker on the real broker: live detection equals offline detection, poison is dead-lettered."""

from __future__ import annotations

from pathlib import Path

import orjson

from censorwatch import bus
from censorwatch.config import Settings
from censorwatch.models import DeadLetter, Event, Measurement
from services.replay import read_measurements, replay
from streams.detection import DetectionContext, Engine, run_offline
from tests.kafka_read import read_topic
from tests.services import Service, scrape, wait_until

KE_TELEGRAM = "events/ke-telegram-2023.jsonl"


def _metric(settings: Settings, line_prefix: str) -> float:
    text = scrape(settings.metrics.worker_port) or ""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))


def _events(settings: Settings, cc: str) -> list[Event]:
    """The country's events (other tests share the session pipeline with other countries)."""
    return [e for r in read_topic(settings, settings.topics.events) if (e := Event.from_bytes(r.value)).cc == cc]


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
    worker: Service, pipeline_settings: Settings, shared_data: Path
) -> None:
    path = shared_data / KE_TELEGRAM
    measurements = [m for _, m in read_measurements(path) if isinstance(m, Measurement)]
    _, expected, _ = run_offline(
        Engine(pipeline_settings.detection, DetectionContext.from_settings(pipeline_settings)), measurements
    )
    assert expected, "the Kenya corpus must produce events offline"

    summary = replay(pipeline_settings, [path])
    assert summary.produced == len(measurements)

    live = wait_until(
        lambda: worker.check() and (ev := _events(pipeline_settings, "KE")) and len(ev) >= len(expected) and ev,
        120,
        f"{len(expected)} events on the events topic",
    )
    assert [_shape(e) for e in live] == [_shape(e) for e in expected]
    processed = wait_until(
        lambda: (
            _metric(pipeline_settings, 'censorwatch_worker_measurements_processed_total{cc="KE"') >= len(measurements)
            and _metric(pipeline_settings, 'censorwatch_worker_measurements_processed_total{cc="KE"')
        ),
        30,
        "the processed-measurements metric",
    )
    assert processed == len(measurements)


def test_poison_records_are_dead_lettered_and_the_stream_goes_on(worker: Service, pipeline_settings: Settings) -> None:
    producer = bus.producer(pipeline_settings)
    good = Measurement(
        uid="20231015000000.000000_XA_telegram_poison00000001",
        report_id="20231015T000000Z_telegram_XA_1_n1_poison",
        cc="XA",
        asn=1,
        test_name="telegram",
        start_time="2023-10-15T00:00:00Z",
        target="telegram",
    )
    # Found in review, both escaped the agent (Faust then acknowledged the batch, losing the records around them):
    # a record with no value, and a measurement from another producer whose fetch time has no time zone.
    naive = orjson.loads(
        Measurement(
            uid="20231015000000.000000_XA_webconnectivity_poison00000002",
            report_id="20231015T000000Z_webconnectivity_XA_1_n1_poison",
            cc="XA",
            asn=1,
            test_name="web_connectivity",
            start_time="2023-10-15T00:00:00Z",  # type: ignore[arg-type]
            input="https://naive.example/",
            target="naive.example",
            anomaly=True,
            confirmed=True,  # a confirmed block opens an event at once: the notice measures its latency
            blocking_type="dns",
        ).to_bytes()
    )
    naive["fetched_at"] = "2023-10-15T00:05:00"  # no time zone
    bus.send_all(
        producer,
        pipeline_settings.topics.measurements,
        [
            (b"XA", b"{not json"),
            (b"XA", orjson.dumps({"uid": "x"})),
            (b"XA", None),
            (b"XA", good.to_bytes()),
            (b"XA", orjson.dumps(naive)),
        ],
        timeout=30,
    )
    producer.close()

    def worker_letters() -> list[DeadLetter]:
        records = read_topic(pipeline_settings, pipeline_settings.topics.deadletter)
        letters = [DeadLetter.from_bytes(r.value) for r in records]
        return [d for d in letters if d.stage == "worker" and d.key == "XA"]

    letters = wait_until(
        lambda: worker.check() and len(found := worker_letters()) >= 3 and found,
        60,
        "three dead letters from the worker",
    )
    reasons = " | ".join(d.reason for d in letters)
    assert "JSONDecodeError" in reasons
    assert "ValidationError" in reasons
    assert "the record has no value" in reasons
    assert {d.payload for d in letters} >= {"{not json", '{"uid":"x"}'}
    # the valid records after the poison were processed, and the confirmed one opened its event
    wait_until(
        lambda: _metric(pipeline_settings, 'censorwatch_worker_measurements_processed_total{cc="XA"') == 2,
        30,
        "the valid records after the poison to be processed",
    )
    opened = wait_until(lambda: [e for e in _events(pipeline_settings, "XA") if e.target == "naive.example"], 30, "")
    assert [e.action.value for e in opened] == ["opened"]
    assert _metric(pipeline_settings, 'censorwatch_deadletter_total{stage="worker"}') >= 3
    assert len(worker_letters()) == 3
    # The backlog alert reads the workers' lag on the measurement topic (found in review: never exported); every
    # record handled, it is 0.
    topics = pipeline_settings.topics
    lag = f'censorwatch_consumer_lag{{group="{topics.worker_group}",topic="{topics.measurements}"}}'
    wait_until(lambda: (text := scrape(pipeline_settings.metrics.worker_port) or "") and lag + " 0.0" in text, 30, lag)


def test_continuity_notices_records_that_never_reached_the_agent() -> None:
    from streams.app import Continuity

    c = Continuity()
    assert [c.check(0, o) for o in (5, 6, 7)] == ["ok", "ok", "ok"]  # the first record sets the expectation
    assert c.check(0, 10) == "gap" and c.expected[0] == 8  # 8 and 9 never arrived
    assert c.check(0, 11) == "gap"  # nothing after a gap is taken (the worker restarts from the commit)
    assert c.check(1, 3) == "ok"  # partitions are independent
    assert [c.check(0, o) for o in (8, 9, 10)] == ["ok"] * 3
    assert c.check(0, 6) == "ok" and c.expected[0] == 7  # a redelivery after a rebalance: de-duplicated downstream

    # At each assignment the consumer is positioned at the group's committed offset; the next record must be there.
    fresh = Continuity()
    fresh.seeked(0, 40)
    assert fresh.check(0, 42) == "gap" and fresh.expected[0] == 40  # 40 and 41 were dropped before the first record
    fresh.seeked(1, 40)
    assert fresh.check(1, 40) == "ok"
    fresh.seeked(1, 30)  # committed behind what this process handled: the redeliveries are fine, a jump is not
    assert fresh.expected[1] == 41 and fresh.check(1, 35) == "ok" and fresh.check(1, 37) == "gap"
    fresh.seeked(2, 90)  # another worker moved the partition on while it was away: no false gap
    fresh.seeked(2, None)
    fresh.seeked(3, 0)  # nothing committed: where to start is the offset-reset policy's choice
    assert fresh.check(2, 90) == "ok" and fresh.check(3, 17) == "ok"

    # Records that retention deleted before they were read cannot be read again: counted as lost, not restarted for.
    gone = Continuity()
    gone.seeked(0, 100)
    assert gone.check(0, 130) == "gap"
    assert gone.expire(0, 130, log_start=120) == 0  # 120..129 still exist: read them again
    assert gone.expire(0, 130, log_start=None) == 0  # unknown: read again
    assert gone.expire(0, 130, log_start=130) == 30 and gone.expected[0] == 131
    assert gone.check(0, 131) == "ok"


def test_flush_producer_waits_for_table_writes_that_fausts_own_flush_leaves_queued() -> None:
    """Faust's buffer flush gives up after 0.1 s without progress; the marker must not overtake a slow state write
    into the broker's batches (on Tansu, the batch boundary decides what readers and table recovery see)."""
    import asyncio
    import types

    from faust.transport.producer import ProducerBuffer

    from streams.app import flush_producer

    async def scenario() -> tuple[int, int, int]:
        buffer = ProducerBuffer()
        buffer.app = types.SimpleNamespace(conf=types.SimpleNamespace(producer_threaded=False))  # type: ignore[assignment]
        sent: list[object] = []
        client_flushes: list[int] = []

        async def slow_send(fut: object) -> None:  # a busy client: each hand-over takes longer than 0.1 s
            await asyncio.sleep(0.15)
            sent.append(fut)

        class Producer:
            def __init__(self) -> None:
                self.buffer = buffer

            async def flush(self) -> None:
                client_flushes.append(len(sent))

        buffer._send_pending = slow_send  # type: ignore[method-assign]
        await buffer.start()
        try:
            for i in range(3):
                buffer.put(i)  # type: ignore[arg-type]
            await buffer.flush()
            after_faust = len(sent)
            for i in range(3, 6):
                buffer.put(i)  # type: ignore[arg-type]
            await flush_producer(Producer())
            return after_faust, len(sent), client_flushes[-1]
        finally:
            await buffer.stop()

    after_faust, after_ours, at_client_flush = asyncio.run(scenario())
    assert after_faust < 3, "the premise: Faust's own flush returns with writes still queued"
    assert after_ours == 6 and at_client_flush == 6, "every write reached the client before the client was flushed"
