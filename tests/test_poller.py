"""The poller on the real broker against the loopback OONI fake: exactly once, dead letters, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from censorwatch import bus
from censorwatch.config import Settings
from censorwatch.models import DeadLetter, Measurement
from services.cursor import CountryCursor
from services.ooni_client import OoniClient, Page
from services.poller import Poller
from tests.conftest import ROOT, free_port
from tests.fakes.ooni_api import FakeOoniApi, Fault, load_recorded_items, make_item, parse_api_time
from tests.kafka_read import read_topic

pytestmark = pytest.mark.kafka

NOW = datetime.now(UTC).replace(microsecond=0)


def recorded(shared_data: Path) -> list[dict[str, Any]]:
    """The recorded real list items, their start times moved (keeping their spacing) to end two days before now:
    the poller's first window reaches back only so far, and fixed dates would fall out of it as time passes."""
    items: dict[str, dict[str, Any]] = {}
    for path in sorted((shared_data / "ooni/api-responses/search").glob("*.json")):
        for item in load_recorded_items(path):
            items[item["measurement_uid"]] = item
    starts = {uid: parse_api_time(str(i["measurement_start_time"])) for uid, i in items.items()}
    shift = NOW - timedelta(days=2) - max(starts.values())
    return [
        {**i, "measurement_start_time": f"{starts[uid] + shift:%Y-%m-%dT%H:%M:%S}.000000Z"} for uid, i in items.items()
    ]


def kh_series(
    start: datetime, steps: int, *, seq0: int = 0, step: timedelta = timedelta(hours=1)
) -> list[dict[str, Any]]:
    """Simulated: one domain on one ASN turning anomalous half-way, plus a signal test per step."""
    out = []
    for h in range(steps):
        t = start + h * step
        blocked = h >= steps // 2
        out.append(make_item(start=t, anomaly=blocked, blocking_type="dns" if blocked else None, seq=seq0 + h))
        out.append(make_item(start=t, test_name="signal", asn=131207, seq=seq0 + h))
    return out


def measurements(settings: Settings) -> list[tuple[bytes, Measurement]]:
    return [(r.key, Measurement.from_bytes(r.value)) for r in read_topic(settings, settings.topics.measurements)]


def metric(name: str, labels: Mapping[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, dict(labels or {})) or 0.0


def poller_settings(kafka_settings: Settings, api: FakeOoniApi, countries: list[str], **kw: Any) -> Settings:
    update = {
        "ooni_api_url": api.base_url,
        "countries": countries,
        "poll_start": NOW - timedelta(days=3),  # relative: a fixed date falls out of the poller's first window
        "poll_page_size": 5,
        "poll_lookback_seconds": 6 * 3600.0,
        **kw,
    }
    s = kafka_settings.model_copy(update=update)
    bus.ensure_topics(s)
    return s


class StopAfterPages(OoniClient):
    """Sets the stop event after n pages: a poller stopped in the middle of a round."""

    def __init__(self, settings: Settings, n: int, stop: threading.Event) -> None:
        super().__init__(settings, stop=stop, backoff_base=0.01)
        self.n = n

    def iter_measurement_pages(self, params: Mapping[str, Any]) -> Iterator[Page]:
        for page in super().iter_measurement_pages(params):
            self.n -= 1
            if self.n <= 0:
                self.stop.set()
            yield page


def make_poller(settings: Settings, **kw: Any) -> Poller:
    stop = kw.pop("stop", None) or threading.Event()
    client = kw.pop("client", None) or OoniClient(settings, stop=stop, backoff_base=0.01)
    return Poller(settings, client=client, stop=stop, **kw)


def test_everything_arrives_exactly_once_through_faults(kafka_settings: Settings, shared_data: Path) -> None:
    kh = kh_series(NOW - timedelta(hours=5), 24, step=timedelta(minutes=10))
    items = recorded(shared_data) + kh
    countries = sorted({i["probe_cc"] for i in items})
    with FakeOoniApi(items) as api:
        settings = poller_settings(kafka_settings, api, countries)
        api.push(Fault.rate_limited(retry_after=0.05), Fault.server_error())
        # Rows shift under the offset: page 3 repeats page 2's items and skips its own this round.
        api.push(Fault.repeated_page(when={"probe_cc": "KH", "offset": "10"}))
        before = {cc: metric("censorwatch_poller_measurements_produced_total", {"cc": cc}) for cc in countries}
        rl_before = metric("censorwatch_poller_errors_total", {"kind": "rate_limited"})
        se_before = metric("censorwatch_poller_errors_total", {"kind": "server_error"})
        poller = make_poller(settings)
        started = time.time()  # the last-success clocks start at the poller's start; a success moves them on
        try:
            rounds = poller.poll_once()
            assert all(r.complete for r in rounds), [r for r in rounds if not r.complete]
            assert api.pending_faults == 0
            kh_round = next(r for r in rounds if r.cc == "KH")
            assert kh_round.duplicates == 5 and kh_round.produced == len(kh) - 5
            second = poller.poll_once()  # the look-back recovers the skipped ones, nothing else is new
            assert sum(r.produced for r in second) == 5
        finally:
            poller.close()
        # since = cursor - lookback, until = tomorrow, asc, comma list of tests
        first = api.requests_to()[0].params
        assert first["order"] == "asc" and first["order_by"] == "measurement_start_time"
        assert first["test_name"] == ",".join(settings.test_names)
    got = measurements(settings)
    uids = [m.uid for _, m in got]
    assert sorted(uids) == sorted(i["measurement_uid"] for i in items)
    assert len(set(uids)) == len(uids)
    assert all(key == m.cc.encode() for key, m in got)  # keyed by country code
    assert all(m.fetched_at is not None for _, m in got)
    for cc in countries:
        n = sum(1 for i in items if i["probe_cc"] == cc)
        assert metric("censorwatch_poller_measurements_produced_total", {"cc": cc}) - before[cc] == n
        assert metric("censorwatch_poller_last_success_timestamp_seconds", {"cc": cc}) >= started
    assert metric("censorwatch_poller_errors_total", {"kind": "rate_limited"}) == rl_before + 1
    assert metric("censorwatch_poller_errors_total", {"kind": "server_error"}) == se_before + 1


def test_malformed_item_and_page_are_dead_lettered_and_polling_goes_on(kafka_settings: Settings) -> None:
    good = kh_series(NOW - timedelta(hours=5), 3)
    bad = make_item(start=NOW - timedelta(hours=4), seq=99)
    bad["probe_asn"] = "AS-not-a-number"
    with FakeOoniApi([*good, bad]) as api:
        settings = poller_settings(kafka_settings, api, ["KH"], poll_page_size=100)
        dl_before = metric("censorwatch_deadletter_total", {"stage": "normalise"})
        poller = make_poller(settings)
        try:
            api.push(Fault.truncated())
            first = poller.poll_once()[0]
            assert not first.complete and first.error and "malformed page" in first.error
            second = poller.poll_once()[0]  # retried next round
            assert second.complete and second.produced == len(good) and second.deadlettered == 1
            third = poller.poll_once()[0]  # the bad item is not dead-lettered again every round
            assert third.deadlettered == 0 and third.produced == 0
        finally:
            poller.close()
    assert sorted(m.uid for _, m in measurements(settings)) == sorted(i["measurement_uid"] for i in good)
    letters = [DeadLetter.from_bytes(r.value) for r in read_topic(settings, settings.topics.deadletter)]
    by_stage = {d.stage: d for d in letters}
    assert len(letters) == 2
    assert "probe_asn" in by_stage["normalise"].reason
    assert bad["measurement_uid"] in by_stage["normalise"].payload
    assert "not valid JSON" in by_stage["poller"].reason
    assert metric("censorwatch_deadletter_total", {"stage": "normalise"}) == dl_before + 1


def test_a_page_repeated_in_a_backfill_ends_the_round_and_the_next_one_gets_what_it_skipped(
    kafka_settings: Settings,
) -> None:
    """Found in review: a page served twice in a round longer than the look-back skipped a page for good (the
    next round's look-back does not reach back that far). The repeat now ends the request before that page."""
    start = NOW - timedelta(days=2)
    items = [make_item(start=start + timedelta(minutes=30 * i, seconds=5), seq=i) for i in range(2 * 48)]
    with FakeOoniApi(items) as api:
        settings = poller_settings(kafka_settings, api, ["KH"], poll_start=start, poll_page_size=20)
        api.push(Fault.repeated_page(when={"probe_cc": "KH", "offset": "40"}))  # page 3 = page 2; its own skipped
        poller = make_poller(settings)
        try:
            first = poller.poll_once()[0]
            assert not first.complete and "rows shifted" in str(first.error) and first.produced == 40
            second = poller.poll_once()[0]
            assert second.complete and second.produced == len(items) - 40
        finally:
            poller.close()
    uids = [m.uid for _, m in measurements(settings)]
    assert sorted(uids) == sorted(i["measurement_uid"] for i in items)


def test_an_item_only_the_json_module_reads_is_dead_lettered_alone_and_the_page_goes_through(
    kafka_settings: Settings,
) -> None:
    """The fake writes pages with Python's json: a lone surrogate as ``"\\udcff"``, inf as ``Infinity`` and a
    400-digit integer as such, all of which orjson refuses. The page is usable; only those items are bad, and
    each is dead-lettered once, with its reason, not the whole page every round."""
    good = kh_series(NOW - timedelta(hours=5), 4)
    surrogate = make_item(start=NOW - timedelta(hours=4, minutes=30), input="https://www.rfa.org/\udcff", seq=91)
    huge = make_item(start=NOW - timedelta(hours=3, minutes=30), seq=92)
    huge["probe_asn"] = 10**400
    infinite = make_item(start=NOW - timedelta(hours=2, minutes=30), seq=93)
    infinite["anomaly"] = float("inf")
    odd_uid = make_item(start=NOW - timedelta(hours=1, minutes=30), seq=94)
    odd_uid["measurement_uid"] += "\udcff"  # keyed by a digest of its content, which orjson cannot write
    bad = [surrogate, huge, infinite, odd_uid]
    with FakeOoniApi([*good, *bad]) as api:
        settings = poller_settings(kafka_settings, api, ["KH"], poll_page_size=4)
        poller = make_poller(settings)
        try:
            first = poller.poll_once()[0]
            assert first.complete, first.error
            assert first.produced == len(good) and first.deadlettered == len(bad)
            second = poller.poll_once()[0]
            assert second.complete and second.produced == 0 and second.deadlettered == 0
            assert second.duplicates == len(good) + len(bad)
        finally:
            poller.close()
    assert sorted(m.uid for _, m in measurements(settings)) == sorted(i["measurement_uid"] for i in good)
    letters = [DeadLetter.from_bytes(r.value) for r in read_topic(settings, settings.topics.deadletter)]
    assert {d.stage for d in letters} == {"normalise"} and len(letters) == len(bad)
    reasons = " | ".join(sorted(d.reason for d in letters))
    for reason in ("input is not valid UTF-8", "a 401-digit number", "non-finite number (inf)", "not a printable"):
        assert reason in reasons
    assert sum("\\udcff" in d.payload for d in letters) == 2  # kept as JSON escapes
    assert sum(str(d.key).startswith("sha256:") for d in letters) == 1


def test_restart_mid_run_with_late_items_neither_skips_nor_repeats(kafka_settings: Settings) -> None:
    items = kh_series(NOW - timedelta(hours=40), 36)  # 72 items, page size 5: ~15 pages
    with FakeOoniApi(items) as api:
        settings = poller_settings(kafka_settings, api, ["KH"])
        stop = threading.Event()
        first = make_poller(settings, stop=stop, client=StopAfterPages(settings, 4, stop))
        try:
            r = first.poll_once()[0]
        finally:
            first.close()
        assert r.error == "stopped" and r.produced == 20
        # Late uploads inside the look-back window, and a new measurement, appear while it is down.
        late = kh_series(NOW - timedelta(hours=3), 2, seq0=1000)
        api.add_items(late)
        second = make_poller(settings)
        try:
            assert second.poll_once()[0].complete
            later = [make_item(start=NOW - timedelta(hours=1), seq=2000)]
            later += kh_series(NOW - timedelta(hours=5, minutes=30), 1, seq0=3000)  # late, in the overlap
            api.add_items(later)
            assert second.poll_once()[0].produced == len(later)
        finally:
            second.close()
    uids = [m.uid for _, m in measurements(settings)]
    expected = [i["measurement_uid"] for i in items + late + later]
    assert len(uids) == len(set(uids))
    assert sorted(uids) == sorted(expected)
    # The cursor on its compacted topic holds the overlap (and what the late sweep may still read), not the whole
    # history of 40 hours.
    stored = bus.read_compacted(settings, settings.topics.poller_cursor)
    cursor = CountryCursor.from_bytes(stored[b"KH"] or b"")
    assert cursor.since is not None and cursor.since >= NOW - timedelta(seconds=5)
    kept = timedelta(hours=6) + second._sweep_overlap()
    assert timedelta(hours=6) < kept < timedelta(hours=10)
    edge = cursor.query_since(kept)
    assert cursor.seen and all(t > edge for t in cursor.seen.values())
    assert edge >= NOW - kept - timedelta(seconds=2)


def test_late_sweep_produces_uploads_later_than_the_look_back_once_even_across_a_crash(
    kafka_settings: Settings,
) -> None:
    """A probe offline through a shutdown uploads its queue a day later: the regular rounds cannot see it (its
    start times are before the look-back); the hourly late sweep produces it, and neither a sweep cut short and
    repeated by a new process nor the regular rounds produce anything twice, not even an item late by about the
    look-back, which both see."""
    clock = [NOW]
    on_time = kh_series(NOW - timedelta(hours=3), 3)
    late_before = metric("censorwatch_poller_late_uploads_total", {"cc": "KH"})
    with FakeOoniApi(on_time) as api:
        settings = poller_settings(kafka_settings, api, ["KH"], poll_start=NOW - timedelta(days=4))
        first = make_poller(settings, clock=lambda: clock[0])
        try:
            r = first.poll_once()[0]
            assert r.complete and r.produced == len(on_time)
            assert r.late is not None and r.late.complete and r.late.pages == 0  # the first sweep sets the mark
            arrived = NOW + timedelta(minutes=20)
            queued = [  # measured 30 h before, received now: 12 items, 3 pages of the sweep
                make_item(start=NOW - timedelta(hours=30, minutes=i), received=arrived, seq=5000 + i) for i in range(12)
            ]
            slightly = [make_item(start=NOW - timedelta(hours=2), received=arrived, seq=6000)]  # the look-back's
            # Late by about the look-back: a regular round produces it, and the sweep later reads it as late too.
            lookback = timedelta(seconds=settings.poll_lookback_seconds)
            band = [make_item(start=arrived - lookback + timedelta(minutes=5), received=arrived, seq=7000)]
            api.add_items(queued + slightly + band)
            clock[0] = NOW + timedelta(minutes=30)
            r = first.poll_once()[0]
            assert r.produced == 2 and r.late is None  # not an hour since the last sweep
        finally:
            first.close()
        clock[0] = NOW + timedelta(hours=1, minutes=5)
        stop = threading.Event()
        cut = make_poller(settings, clock=lambda: clock[0], stop=stop, client=StopAfterPages(settings, 1, stop))
        try:
            assert cut.start()
            sweep = cut.late_sweep(cut.cursors["KH"], clock[0])
            assert sweep is not None and not sweep.complete and sweep.produced == 5
        finally:
            cut.close()
        again = make_poller(settings, clock=lambda: clock[0])
        try:
            r = again.poll_once()[0]
            assert r.complete and r.produced == 0
            assert r.late is not None and r.late.complete and r.late.produced == len(queued) - 5
            # the cut sweep's five, and the band item: the cursor still knew that a regular round produced it
            assert r.late.duplicates == 5 + 1
            clock[0] = NOW + timedelta(hours=2, minutes=10)
            r = again.poll_once()[0]
            assert r.late is not None and r.late.complete and r.late.produced == 0 and r.late.pages >= 3
        finally:
            again.close()
    uids = [m.uid for _, m in measurements(settings)]
    assert sorted(uids) == sorted(i["measurement_uid"] for i in on_time + queued + slightly + band)
    assert metric("censorwatch_poller_late_uploads_total", {"cc": "KH"}) == late_before + len(queued)


def test_the_cursor_stays_small_through_a_long_backfill(kafka_settings: Settings) -> None:
    """The cursor is written after every page; pruned only after a complete round, a backfill of days at a busy
    country's rate grew it past Kafka's 1 MB message limit in the middle of the round and polling wedged. Every
    record written keeps about the look-back and the sweep's overlap, not the whole backfill."""
    start = NOW - timedelta(days=3)
    items = [make_item(start=start + timedelta(minutes=10 * i, seconds=5), seq=i) for i in range(3 * 24 * 6)]
    with FakeOoniApi(items) as api:
        settings = poller_settings(kafka_settings, api, ["KH"], poll_start=start, poll_page_size=20)
        poller = make_poller(settings)
        try:
            r = poller.poll_once()[0]
            assert r.complete and r.produced == len(items) and r.pages > 20
            kept = poller.lookback + poller._sweep_overlap()
        finally:
            poller.close()
    records = [CountryCursor.from_bytes(rec.value) for rec in read_topic(settings, settings.topics.poller_cursor)]
    assert len(records) > 20  # one per page, and the round's
    bound = kept // timedelta(minutes=10) + 2 * settings.poll_page_size
    assert max(len(c.seen) for c in records) <= bound < len(items) // 4


def test_an_upload_late_during_an_outage_is_produced_once_by_the_catch_up_not_again_by_the_sweep(
    kafka_settings: Settings,
) -> None:
    """After an outage longer than about 1.5 h the catch-up round produces what was uploaded meanwhile, moves
    ``since`` hours at once and prunes against it; the late sweep in the same call then reads an upload that was
    later than the look-back: it must know that the catch-up produced it, and so must the sweep after it."""
    clock = [NOW]
    with FakeOoniApi(kh_series(NOW - timedelta(hours=1), 1)) as api:
        settings = poller_settings(kafka_settings, api, ["KH"], poll_start=NOW - timedelta(days=1))
        poller = make_poller(settings, clock=lambda: clock[0])
        try:
            r = poller.poll_once()[0]
            assert r.complete and r.late is not None and r.late.complete  # the sweep mark is set
            # The API (or the poller) is away for three hours; just before it is back, a probe uploads a
            # measurement 8 h old: the catch-up round reads it (its window starts 6 h before the old `since`),
            # and so do this call's sweep and the next one (received after this sweep's start less the margin).
            arrived = NOW + timedelta(hours=2, minutes=55)
            late = make_item(start=arrived - timedelta(hours=8), received=arrived, seq=77)
            api.add_items([late])
            clock[0] = NOW + timedelta(hours=3)
            r = poller.poll_once()[0]
            assert r.complete and r.produced == 1
            assert r.late is not None and r.late.complete and r.late.produced == 0 and r.late.duplicates == 1
            clock[0] = NOW + timedelta(hours=4, minutes=5)  # the next sweep still reads it as late
            r = poller.poll_once()[0]
            assert r.late is not None and r.late.complete and r.late.produced == 0 and r.late.duplicates == 1
            assert len(poller.cursors["KH"].late) <= 1
        finally:
            poller.close()
    uids = [m.uid for _, m in measurements(settings)]
    assert uids.count(late["measurement_uid"]) == 1


def test_an_upload_the_api_shows_late_is_still_swept(kafka_settings: Settings) -> None:
    """Found in review: the sweep allowed 15 minutes between a measurement's receive time and the API showing it.
    An upload late by a little less than the look-back and shown 25 minutes after it was received fell between
    the regular rounds (their window had moved past its start) and the sweep (not late enough for it)."""
    clock = [NOW]
    with FakeOoniApi(kh_series(NOW - timedelta(hours=1), 1)) as api:
        settings = poller_settings(kafka_settings, api, ["KH"])
        assert settings.poll_api_delay_seconds >= 25 * 60
        poller = make_poller(settings, clock=lambda: clock[0])
        try:
            assert poller.poll_once()[0].late is not None  # sets the sweep's mark
            arrived = NOW + timedelta(minutes=10)
            item = make_item(start=arrived - poller.lookback + timedelta(minutes=20), received=arrived, seq=88)
            clock[0] = NOW + timedelta(minutes=34)
            assert poller.poll_once()[0].produced == 0  # not shown yet
            api.add_items([item])  # shown 25 minutes after it was received
            clock[0] = NOW + timedelta(minutes=35)
            assert poller.poll_once()[0].produced == 0  # the regular window starts after it now
            clock[0] = NOW + timedelta(hours=1, minutes=5)
            r = poller.poll_once()[0]
            assert r.late is not None and r.late.complete and r.late.produced == 1
        finally:
            poller.close()
    assert [m.uid for _, m in measurements(settings)].count(item["measurement_uid"]) == 1


def test_a_late_sweep_cut_short_by_a_repeated_page_is_tried_again_after_an_interval(kafka_settings: Settings) -> None:
    """Found in review: a sweep reads only data older than the look-back, so a repeated page always ends it; it
    was then tried again on every round (every minute, 72 h of pages). It waits a sweep interval instead, and the
    next try produces the rest, each upload once."""
    clock = [NOW]
    with FakeOoniApi(kh_series(NOW - timedelta(hours=1), 1)) as api:
        settings = poller_settings(kafka_settings, api, ["KH"])
        poller = make_poller(settings, clock=lambda: clock[0])
        try:
            assert poller.poll_once()[0].late is not None  # sets the sweep's mark
            arrived = NOW + timedelta(minutes=20)
            queued = [
                make_item(start=NOW - timedelta(hours=30, minutes=i), received=arrived, seq=500 + i) for i in range(12)
            ]
            api.add_items(queued)
            api.push(Fault.repeated_page(when={"probe_cc": "KH", "offset": "5"}))  # the sweep's second page
            clock[0] = NOW + timedelta(hours=1, minutes=5)
            r = poller.poll_once()[0]
            assert r.late is not None and not r.late.complete and "rows shifted" in str(r.late.error)
            clock[0] = NOW + timedelta(hours=1, minutes=10)
            assert poller.poll_once()[0].late is None  # not on every round
            clock[0] = NOW + timedelta(hours=2, minutes=10)
            r = poller.poll_once()[0]
            assert r.late is not None and r.late.complete and r.late.produced == len(queued) - 5
        finally:
            poller.close()
    uids = [m.uid for _, m in measurements(settings)]
    assert all(uids.count(i["measurement_uid"]) == 1 for i in queued)


def test_future_probe_clock_does_not_move_the_cursor_past_now(kafka_settings: Settings) -> None:
    # As far ahead as the API's default window serves (until = tomorrow 00:00 UTC), whatever the hour of the run.
    midnight = datetime(NOW.year, NOW.month, NOW.day, tzinfo=UTC) + timedelta(days=1)
    future = make_item(start=min(NOW + timedelta(hours=20), midnight - timedelta(seconds=1)), seq=1)
    with FakeOoniApi([future]) as api:
        settings = poller_settings(kafka_settings, api, ["KH"])
        poller = make_poller(settings, clock=lambda: NOW)
        try:
            assert poller.poll_once()[0].produced == 1
            assert poller.cursors["KH"].since == NOW
            assert poller.poll_once()[0].duplicates == 1  # still returned, still not produced twice
        finally:
            poller.close()


def test_run_forever_stops_promptly(kafka_settings: Settings) -> None:
    with FakeOoniApi(kh_series(NOW - timedelta(hours=2), 1)) as api:
        settings = poller_settings(kafka_settings, api, ["KH"], poll_interval_seconds=60)
        poller = make_poller(settings)
        thread = threading.Thread(target=poller.run_forever)
        thread.start()
        wait_for(lambda: poller.rounds >= 1 and bool(api.requests_to()), 20)
        t0 = time.monotonic()
        poller.stop()
        thread.join(10)
        poller.close()
        assert not thread.is_alive() and time.monotonic() - t0 < 5


def wait_for(cond: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout} s")
        time.sleep(0.05)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_censorwatch_poll_serves_metrics_and_exits_0_on_sigterm_mid_request(kafka_settings: Settings) -> None:
    with FakeOoniApi(kh_series(NOW - timedelta(hours=2), 2)) as api:
        settings = poller_settings(kafka_settings, api, ["KH"])
        port = free_port()
        env = {
            **os.environ,
            "CENSORWATCH_KAFKA_BOOTSTRAP": settings.bootstrap(),
            "CENSORWATCH_TOPIC_PREFIX": settings.topic_prefix,
            "CENSORWATCH_OONI_API_URL": api.base_url,
            "CENSORWATCH_COUNTRIES": '["KH"]',
            "CENSORWATCH_POLL_INTERVAL_SECONDS": "1",
            "CENSORWATCH_METRICS__POLLER_PORT": str(port),
            "CENSORWATCH_HTTP_TIMEOUT_SECONDS": "60",
        }
        proc = subprocess.Popen([sys.executable, "-m", "censorwatch", "poll"], env=env, cwd=ROOT)
        try:
            wait_for(
                lambda: 'censorwatch_poller_measurements_produced_total{cc="KH"} 4.0' in _try_scrape(port),
                30,
                "a completed round",
            )
            api.push(Fault.slow(60))  # the next request hangs; SIGTERM must not wait for it
            wait_for(lambda: api.pending_faults == 0, 10, "the slow request")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
            assert time.monotonic() - t0 < 5
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(measurements(settings)) == 4


def _try_scrape(port: int) -> str:
    try:
        return scrape(port)
    except OSError:
        return ""


def test_api_unreachable_never_crashes_and_recovers(kafka_settings: Settings) -> None:
    with FakeOoniApi() as gone:
        dead_url = gone.base_url
    with FakeOoniApi(kh_series(NOW - timedelta(hours=2), 2)) as api:
        settings = poller_settings(kafka_settings, api, ["KH"])
        stop = threading.Event()
        client = OoniClient(
            settings.model_copy(update={"ooni_api_url": dead_url}),
            stop=stop,
            max_attempts=2,
            sleep=lambda s: None,
        )
        poller = make_poller(settings, stop=stop, client=client)
        try:
            for _ in range(2):
                r = poller.poll_once()[0]
                assert not r.complete and r.error and "cannot connect" in r.error
            poller.client = OoniClient(settings, stop=stop)  # the network is back
            assert poller.poll_once()[0].produced == 4
        finally:
            poller.close()
