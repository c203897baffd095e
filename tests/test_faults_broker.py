"""Broker faults under the poller: a broker behind a loopback TCP proxy that refuses, resets, drops and delays.

What must hold in every case: each measurement the API served is on the measurement topic exactly once (by uid),
and the poller never crashes. A second Tansu broker advertises the proxy's port, so every client connection,
including the ones kafka-python opens after reading metadata, goes through the proxy.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from censorwatch.broker import EmbeddedBroker
from censorwatch.config import Settings, load_settings
from censorwatch.models import Measurement
from services.ooni_client import OoniClient, Page
from services.poller import Poller
from tests.conftest import free_port
from tests.fakes.ooni_api import FakeOoniApi, make_item
from tests.fakes.tcp_proxy import TcpProxy
from tests.kafka_read import read_topic
from tests.services import wait_until

pytestmark = pytest.mark.kafka

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TcpProxy, EmbeddedBroker]]:
    """A broker of its own (so faults never touch the session broker), reachable only through the proxy."""
    proxy_port, broker_port = free_port(), free_port()
    log_file = tmp_path_factory.mktemp("proxied-broker") / "broker.log"
    broker = EmbeddedBroker(broker_port, log_file, advertised_port=proxy_port).start()
    proxy = TcpProxy(("127.0.0.1", broker_port), port=proxy_port).start()
    try:
        yield proxy, broker
    finally:
        proxy.stop()
        broker.stop()


@pytest.fixture
def proxy(proxied: tuple[TcpProxy, EmbeddedBroker]) -> Iterator[TcpProxy]:
    p = proxied[0]
    p.resume()
    p.delay = 0.0
    yield p
    p.resume()
    p.delay = 0.0


def _settings(proxy: TcpProxy, api: FakeOoniApi, tmp_path: Path, **kw: Any) -> Settings:
    return load_settings(
        kafka_bootstrap=proxy.address,
        topic_prefix=f"f{uuid.uuid4().hex[:10]}",
        topic_partitions=2,
        kafka_session_timeout_seconds=6.0,
        state_dir=tmp_path / "state",
        metrics={"poller_port": 0, "worker_port": 0, "dispatcher_port": 0},
        ooni_api_url=api.base_url,
        countries=["KH"],
        test_names=["web_connectivity", "signal"],
        poll_start=NOW - timedelta(days=2),
        poll_page_size=10,
        poll_interval_seconds=1.0,
        **kw,
    )


def _items(n: int, seq0: int = 0) -> list[dict[str, Any]]:
    """Simulated list items: one site on three ASNs over the last day, blocked (DNS) in the second half."""
    start = NOW - timedelta(hours=20)
    return [
        make_item(
            start=start + timedelta(minutes=5 * i),
            asn=(38623, 17976, 24416)[i % 3],
            seq=seq0 + i,
            anomaly=i >= n // 2,
            blocking_type="dns" if i >= n // 2 else None,
        )
        for i in range(n)
    ]


def _uids_on_topic(settings: Settings) -> Counter[str]:
    records = read_topic(settings, settings.topics.measurements, timeout=30)
    return Counter(Measurement.from_bytes(r.value).uid for r in records)


def _assert_exactly_once(settings: Settings, items: list[dict[str, Any]]) -> None:
    got = _uids_on_topic(settings)
    twice = {uid: n for uid, n in got.items() if n > 1}
    assert not twice, f"{len(twice)} measurements produced more than once"
    assert set(got) == {i["measurement_uid"] for i in items}


class CuttingClient(OoniClient):
    """Resets every broker connection right after each page is fetched, i.e. just before it is produced."""

    def __init__(self, settings: Settings, proxy: TcpProxy, stop: threading.Event) -> None:
        super().__init__(settings, stop=stop, backoff_base=0.01)
        self.proxy = proxy
        self.cuts = 0

    def iter_measurement_pages(self, params: Mapping[str, Any]) -> Iterator[Page]:
        for page in super().iter_measurement_pages(params):
            self.cuts += self.proxy.cut() > 0
            yield page


def test_broker_unreachable_at_start_then_everything_is_produced_once(proxy: TcpProxy, tmp_path: Path) -> None:
    items = _items(40)
    proxy.reject()  # listening, but every connection is reset at once: observably unreachable
    with FakeOoniApi(items) as api:
        settings = _settings(proxy, api, tmp_path)
        stop = threading.Event()
        poller = Poller(settings, client=OoniClient(settings, stop=stop, backoff_base=0.01), stop=stop)
        thread = threading.Thread(target=lambda: poller.start(retry_seconds=0.2) and poller.run_forever())
        thread.start()
        try:
            wait_until(lambda: proxy.rejected >= 3, 30, "the poller to try the unreachable broker")
            assert thread.is_alive()
            assert api.requests_to() == [], "nothing is fetched while it cannot be produced"
            proxy.resume()
            wait_until(lambda: len(_uids_on_topic(settings)) >= len(items), 60, "every measurement on the topic")
            wait_until(lambda: poller.rounds >= 2, 30, "a second round (which must add nothing)")
        finally:
            poller.stop()
            thread.join(30)
            poller.close()
        assert not thread.is_alive()
    _assert_exactly_once(settings, items)


def test_connections_reset_before_every_page_lose_and_repeat_nothing(proxy: TcpProxy, tmp_path: Path) -> None:
    items = _items(120)
    with FakeOoniApi(items) as api:
        settings = _settings(proxy, api, tmp_path)
        stop = threading.Event()
        client = CuttingClient(settings, proxy, stop)
        poller = Poller(settings, client=client, stop=stop)
        try:
            rounds = [poller.poll_once()[0] for _ in range(3)]
        finally:
            poller.close()
    assert client.cuts >= 12, "the connections were really cut, page after page"
    assert sum(r.produced for r in rounds) == len(items)
    assert rounds[0].complete or rounds[1].complete
    _assert_exactly_once(settings, items)


def test_connections_dropped_mid_request_lose_nothing_and_detection_counts_each_once(
    proxy: TcpProxy, tmp_path: Path
) -> None:
    """Cuts land while produce requests are in flight, so an acknowledgement can be lost after the broker
    wrote the batch. kafka-python retries (idempotent producer), but Tansu 0.6 does not de-duplicate producer
    sequence numbers, so the topic may hold copies; a page whose retries ran out is produced again next round.
    What must hold: nothing is lost, copies are the same measurement, and the detection engine (uid
    de-duplication) counts each measurement once: its events equal those of the de-duplicated input.
    """
    items = _items(60)
    with FakeOoniApi(items) as api:
        settings = _settings(proxy, api, tmp_path)
        stop = threading.Event()
        poller = Poller(settings, client=OoniClient(settings, stop=stop, backoff_base=0.01), stop=stop)
        assert poller.start(retry_seconds=0.2)
        proxy.delay = 0.005
        chaos_stop = threading.Event()
        rng = random.Random(7)

        def chaos() -> None:  # a cut after every few KB forwarded: mid-request, whatever the machine's speed
            mark, every = proxy.bytes_forwarded, rng.randint(1500, 8000)
            while not chaos_stop.wait(0.005):
                if proxy.bytes_forwarded - mark >= every:
                    proxy.cut()
                    mark, every = proxy.bytes_forwarded, rng.randint(1500, 8000)

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        try:
            produced = 0
            for _ in range(8):
                r = poller.poll_once()[0]
                produced += r.produced
                if r.complete and produced >= len(items):
                    break
        finally:
            chaos_stop.set()
            chaos_thread.join(5)
            proxy.delay = 0.0
            poller.close()
    assert proxy.cuts >= 5, proxy.cuts
    records = read_topic(settings, settings.topics.measurements, timeout=30)
    on_topic = [Measurement.from_bytes(r.value) for r in records]
    assert {m.uid for m in on_topic} == {i["measurement_uid"] for i in items}, "nothing lost"
    by_uid: dict[str, dict[str, Any]] = {}
    for m in on_topic:  # a retried batch is byte-identical; a page re-produced next round has a new fetched_at
        fields = m.model_dump(exclude={"fetched_at"})
        assert by_uid.setdefault(m.uid, fields) == fields, "a repeated uid is the same measurement"
    copies = len(on_topic) - len(by_uid)

    from streams.detection import DetectionContext, Engine, run_offline

    def run(ms: list[Measurement]) -> tuple[list[tuple[object, ...]], Counter[str]]:
        engine = Engine(settings.detection, DetectionContext.from_settings(settings))
        _, events, counters = run_offline(engine, ms)
        return [(e.event_id, e.version, e.action, e.blocked, e.total) for e in events], counters

    seen: set[str] = set()
    first_copies = [m for m in on_topic if not (m.uid in seen or seen.add(m.uid))]  # type: ignore[func-returns-value]
    dedup_events, _ = run(first_copies)
    assert dedup_events, "the input opens an event, so the comparison means something"
    topic_events, counters = run(on_topic)
    assert topic_events == dedup_events
    assert counters.get("duplicate", 0) == copies
