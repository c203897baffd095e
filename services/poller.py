"""The OONI poller: list measurements per country, normalise, de-duplicate, produce keyed by country.

One round asks ``/api/v1/measurements`` for each configured country from ``cursor.since - lookback`` (late
uploads appear in the past) to tomorrow, ascending, and follows ``next_url``. Each page's new measurements are
produced with ``acks=all`` and only then is the cursor advanced and written (``services.cursor``), so a crash
re-produces at most one page and a restart never skips. Bad items go to the dead-letter topic; API trouble is
one log line per attempt and a retry next round. SIGTERM/SIGINT abandon the request in flight, flush, exit 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, Protocol

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError
from prometheus_client import start_http_server

from censorwatch import bus
from censorwatch.config import Settings
from censorwatch.models import DeadLetter, Measurement, utcnow
from services import metrics
from services.cursor import CountryCursor, CursorStore
from services.normalise import NormaliseError, normalise, parse_time
from services.ooni_client import (
    ApiUnavailable,
    ClientError,
    MalformedPage,
    OoniClient,
    Page,
    RequestAbandoned,
    Stopped,
)

log = logging.getLogger(__name__)

MAX_WINDOW = timedelta(days=179)  # the API refuses windows over 180 days (HTTP 400)
KAFKA_TIMEOUT = 30.0


class Enricher(Protocol):
    """Optional step between normalise and produce (``services.enrich``): may confirm an anomaly."""

    def begin_round(self) -> None: ...

    def __call__(self, measurement: Measurement, /) -> Measurement: ...


@dataclass
class CountryRound:
    """What one round did for one country (returned for tests and logs)."""

    cc: str
    pages: int = 0
    fetched: int = 0
    produced: int = 0
    duplicates: int = 0
    deadlettered: int = 0
    complete: bool = False
    error: str | None = None
    late: CountryRound | None = None  # the late sweep that followed this round, if one ran


def received_at(uid: str) -> datetime | None:
    """When OONI's collector received a measurement: its uid's ``YYYYMMDDHHMMSS.ffffff_`` prefix."""
    try:
        return datetime.strptime(uid[:21], "%Y%m%d%H%M%S.%f").replace(tzinfo=UTC) if uid[21:22] == "_" else None
    except ValueError:
        return None


def api_time(value: datetime) -> str:
    """``since``/``until`` as the API parses them: naive UTC, floored to the second (conservative)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _item_key(item: Any) -> str:
    """Identity of an item that did not normalise, so it is dead-lettered once, not once per round."""
    uid = item.get("measurement_uid") if isinstance(item, dict) else None
    if isinstance(uid, str) and uid and _encodable(uid):
        return uid[:200]
    try:
        text = orjson.dumps(item, default=str, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # lone surrogates (a page read by the lenient parser): json escapes them
        text = json.dumps(item, default=str, sort_keys=True).encode()
    return f"sha256:{hashlib.sha256(text).hexdigest()[:32]}"


def _is_uid(item: dict[str, Any]) -> bool:
    uid = item.get("measurement_uid")
    return isinstance(uid, str) and bool(uid)


def _payload(item: Any) -> str:
    """The item as JSON text for its dead letter; orjson cannot write lone surrogates, json escapes them."""
    try:
        return orjson.dumps(item, default=str).decode()
    except TypeError:
        return json.dumps(item, default=str)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _item_time(item: Any, default: datetime) -> datetime:
    try:
        return parse_time(item.get("measurement_start_time")) if isinstance(item, dict) else default
    except NormaliseError:
        return default


class Poller:
    """The poll loop, testable one round at a time (``poll_once``) and stoppable (``stop``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        client: OoniClient | None = None,
        producer: KafkaProducer | None = None,
        clock: Callable[[], datetime] = utcnow,
        stop: threading.Event | None = None,
        enricher: Enricher | None = None,
    ) -> None:
        self.settings = settings
        self.stop_event = stop or threading.Event()
        self.client = client or OoniClient(settings, stop=self.stop_event)
        self.producer = producer
        self._own_producer = producer is None
        self.clock = clock
        self.enricher = enricher
        self.lookback = timedelta(seconds=settings.poll_lookback_seconds)
        # The API shows a measurement some time after its uid's receive time: the late sweep allows this much.
        self.margin = timedelta(seconds=settings.poll_api_delay_seconds)
        self.cursors: dict[str, CountryCursor] = {}
        self.store: CursorStore | None = None
        self.rounds = 0
        self._sweep_retry: dict[str, datetime] = {}  # country -> when a cut-short late sweep may be tried again
        metrics.init_labels(settings.countries)
        metrics.init_last_success(settings.countries, time.time())

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self, retry_seconds: float = 2.0) -> bool:
        """Connect to Kafka and load the cursors, retrying while the broker is away; False if stopped."""
        attempt = 0
        while not self.stop_event.is_set():
            attempt += 1
            try:
                try:
                    bus.ensure_topics(self.settings, timeout=10.0)
                except (KafkaError, ConnectionError) as exc:
                    log.warning("could not check/create topics (%s); assuming they exist", exc)
                if self.producer is None:
                    self.producer = bus.producer(self.settings)
                self.store = CursorStore(self.settings, self.producer)
                self.cursors = self.store.load(self.clock())
                return True
            except (KafkaError, ConnectionError, TimeoutError) as exc:
                metrics.ERRORS.labels(kind="kafka").inc()
                delay = min(self.settings.http_max_backoff_seconds, retry_seconds * 2 ** min(attempt - 1, 6))
                log.warning(
                    "Kafka at %s not usable (%s); retrying in %.0f s",
                    self.settings.bootstrap(),
                    exc,
                    delay,
                )
                self.stop_event.wait(delay)
        return False

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        """Flush what was produced and close; the cursor was already written after each page."""
        if self.producer is not None:
            try:
                self.producer.flush(timeout=10)
                if self._own_producer:
                    self.producer.close(timeout=10)
            except KafkaError as exc:
                log.warning("flushing the producer failed: %s", exc)
        self.client.close()

    def run_forever(self) -> None:
        """Poll every ``poll_interval_seconds`` until stopped."""
        while not self.stop_event.is_set():
            started = time.monotonic()
            self.poll_once()
            elapsed = time.monotonic() - started
            self.stop_event.wait(max(0.0, self.settings.poll_interval_seconds - elapsed))

    # -- one round ----------------------------------------------------------------------------------------
    def poll_once(self) -> list[CountryRound]:
        """One round over every configured country."""
        if self.store is None and not self.start():
            return []
        self.rounds += 1
        if self.enricher is not None:
            self.enricher.begin_round()
        results = []
        for cc in self.settings.countries:
            if self.stop_event.is_set():
                break
            results.append(self.poll_country(cc))
        return results

    def params(self, cursor: CountryCursor, now: datetime) -> dict[str, Any]:
        since = cursor.query_since(self.lookback)
        tomorrow = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        until = min(tomorrow, since + MAX_WINDOW)  # a long backfill goes in steps the API accepts
        return {
            "probe_cc": cursor.cc,
            "test_name": ",".join(self.settings.test_names),
            "since": api_time(since),
            "until": api_time(until),
            "order": "asc",
            "order_by": "measurement_start_time",
            "limit": self.settings.poll_page_size,
        }

    def poll_country(self, cc: str) -> CountryRound:
        result = CountryRound(cc)
        cursor = self.cursors[cc]
        now = self.clock()
        params = self.params(cursor, now)
        if not self._read_pages(cursor, params, result, now):
            return result
        # Everything that had arrived by `now` was read: the next round may start `lookback` behind it.
        until = datetime.strptime(params["until"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        cursor.advance_to(min(now, until))
        self._prune(cursor)
        try:
            self._save(cursor)
        except (KafkaError, TimeoutError) as exc:
            metrics.ERRORS.labels(kind="kafka").inc()
            result.error = f"kafka: {exc}"
            log.warning("%s: writing the cursor failed (%s)", cc, exc)
            return result
        result.complete = True
        metrics.LAST_SUCCESS.labels(cc=cc).set(time.time())
        log.info(
            "%s: %d fetched, %d produced, %d duplicates, %d dead-lettered in %d page(s)",
            cc,
            result.fetched,
            result.produced,
            result.duplicates,
            result.deadlettered,
            result.pages,
        )
        if until >= now and not self.stop_event.is_set():  # caught up: look for uploads later than the look-back
            result.late = self.late_sweep(cursor, now)
        return result

    def late_sweep(self, cursor: CountryCursor, now: datetime) -> CountryRound | None:
        """Every ``poll_late_sweep_every_seconds``: produce what arrived since the last sweep too late for the
        look-back (a probe that was offline for a day, e.g. through a shutdown, uploads its queue when back).

        The API cannot filter on arrival, so the sweep re-reads from ``poll_late_sweep_seconds`` before now (data
        later than that is too late for detection) up to where the regular window begins, and keeps the items
        whose uid says they were received since the last sweep (less ``poll_api_delay_seconds``: the API shows
        them some time later) and that were already later than the look-back then. An item late by about the
        look-back is also one a regular round produced, possibly in this very call after an outage: the regular
        round marks such items in the cursor's ``late`` (``_handle_page``), so they are duplicates here. None when
        no sweep ran; the sweep's round otherwise.
        """
        s = self.settings
        if s.poll_late_sweep_seconds <= 0:
            return None
        every = timedelta(seconds=s.poll_late_sweep_every_seconds)
        if cursor.swept is not None and now < cursor.swept + every:
            return None
        if now < self._sweep_retry.get(cursor.cc, now):  # the last try was cut short: not again every round
            return None
        sweep = CountryRound(cursor.cc)
        if cursor.swept is not None:  # the first time only sets the mark: late uploads count from then on
            edge = cursor.query_since(self.lookback)
            since = max(now - timedelta(seconds=s.poll_late_sweep_seconds), cursor.floor)
            if since < edge:
                params = {**self.params(cursor, now), "since": api_time(since), "until": api_time(edge)}
                if not self._read_pages(cursor, params, sweep, now, sweep_after=cursor.swept - self.margin):
                    # Its mark stays, so the next try covers the same arrivals; an API that keeps failing it (or
                    # keeps repeating a page) is asked again after a sweep interval, not on every round.
                    if sweep.error != "stopped":
                        self._sweep_retry[cursor.cc] = now + every
                    return sweep
        cursor.swept_at(now, self.margin)
        try:
            self._save(cursor)
        except (KafkaError, TimeoutError) as exc:
            metrics.ERRORS.labels(kind="kafka").inc()
            sweep.error = f"kafka: {exc}"
            log.warning("%s: writing the cursor after a late sweep failed (%s)", cursor.cc, exc)
            return sweep
        sweep.complete = True
        if sweep.pages:
            log.info(
                "%s: late sweep: %d uploads later than the look-back, %d produced, %d dead-lettered in %d page(s)",
                cursor.cc,
                sweep.fetched,
                sweep.produced,
                sweep.deadlettered,
                sweep.pages,
            )
        return sweep

    def _read_pages(
        self,
        cursor: CountryCursor,
        params: dict[str, Any],
        result: CountryRound,
        now: datetime,
        sweep_after: datetime | None = None,
    ) -> bool:
        """Fetch and produce every page of a request; False (with ``result.error``) if the round was cut short.

        Pages follow an offset, so rows that shift under it while a request is read (an item removed, a page
        served twice) skip items; the only sign is a page repeating items of an earlier page of the same request.
        The next round re-reads the look-back before ``now``, which recovers a skip there; a repeat older than
        that (a backfill, a catch-up, a sweep) ends the request before the page, and the next round resumes from
        the cursor, which has not passed the skipped items.
        """
        cc = cursor.cc
        read: set[str] = set()  # uids of this request's pages so far
        try:
            for page in self.client.iter_measurement_pages(params):
                result.pages += 1
                uids = {i["measurement_uid"]: i for i in page.results if isinstance(i, dict) and _is_uid(i)}
                again = [_item_time(item, now) for uid, item in uids.items() if uid in read]
                if again and min(again) < now - self.lookback:
                    result.error = "rows shifted under the page offset (a page repeated items of an earlier one)"
                    log.warning("%s: %s; the next round resumes from the cursor", cc, result.error)
                    return False
                read.update(uids)
                self._handle_page(cursor, page, result, now, sweep_after)
                if self.stop_event.is_set():
                    result.error = "stopped"
                    return False
        except MalformedPage as exc:
            result.error = f"malformed page: {exc.reason}"
            self._deadletter_page(cc, exc)
            return False
        except (ApiUnavailable, ClientError) as exc:
            result.error = str(exc)
            log.warning("%s: poll round abandoned (%s); next round in %.0f s", cc, exc, self._interval())
            return False
        except (Stopped, RequestAbandoned):
            result.error = "stopped"
            log.info("%s: poll interrupted by shutdown", cc)
            return False
        except (KafkaError, TimeoutError) as exc:
            metrics.ERRORS.labels(kind="kafka").inc()
            result.error = f"kafka: {exc}"
            log.warning("%s: producing failed (%s); the page is retried next round", cc, exc)
            return False
        return True

    def _handle_page(
        self,
        cursor: CountryCursor,
        page: Page,
        result: CountryRound,
        now: datetime,
        sweep_after: datetime | None = None,
    ) -> None:
        """Produce the page's new items, dead-letter the malformed ones, then remember them in the cursor. In a
        late sweep (``sweep_after`` set) only the items received after it and later than the look-back are the
        sweep's; the others are the regular rounds' and are passed over without a count."""
        cc = cursor.cc
        fetched_at = self.clock()
        fresh: list[Measurement] = []
        fresh_uids: set[str] = set()
        dead: list[tuple[str, datetime, DeadLetter]] = []
        sweep = sweep_after is not None
        for index, item in enumerate(page.results):
            if sweep_after is not None and self._late_arrival(item, sweep_after) is None:
                continue
            result.fetched += 1
            metrics.FETCHED.labels(cc=cc).inc()
            try:
                m = normalise(item, fetched_at=fetched_at)
            except NormaliseError as exc:
                key = _item_key(item)
                if key in fresh_uids or cursor.knows(key) or (sweep and cursor.knows_late(key)):
                    result.duplicates += 1
                    metrics.DUPLICATES.labels(cc=cc).inc()
                    continue
                fresh_uids.add(key)
                source = f"{page.url}#results[{index}]"
                dead.append(
                    (
                        key,
                        _item_time(item, now),
                        DeadLetter.of("normalise", str(exc), _payload(item), key=key, source=source),
                    )
                )
                continue
            if m.uid in fresh_uids or cursor.knows(m.uid) or (sweep and cursor.knows_late(m.uid)):
                result.duplicates += 1
                metrics.DUPLICATES.labels(cc=cc).inc()
                continue
            fresh_uids.add(m.uid)
            if self.enricher is not None:
                m = self.enricher(m)
            fresh.append(m)
        assert self.producer is not None and self.store is not None
        topics = self.settings.topics
        if fresh:
            bus.send_all(
                self.producer,
                topics.measurements,
                [(m.cc.encode(), m.to_bytes()) for m in fresh],
                KAFKA_TIMEOUT,
            )
        if dead:
            bus.send_all(
                self.producer,
                topics.deadletter,
                [(cc.encode(), letter.to_bytes()) for _, _, letter in dead],
                KAFKA_TIMEOUT,
            )
            for _, _, letter in dead:
                log.warning("%s: dead-lettered item %s: %s", cc, letter.key, letter.reason)
        # Acknowledged: now (and only now) remember them and move the cursor.
        for m in fresh:
            if sweep:
                cursor.remember_late(m.uid, received_at(m.uid) or now)
            else:
                cursor.record(m.uid, m.start_time, now)
                self._mark_for_sweep(cursor, m.uid, m.start_time, now)
        for key, start, _ in dead:
            if sweep:
                cursor.remember_late(key, received_at(key) or now)  # a sweep's items all have a uid
            else:
                cursor.remember(key, start)
                self._mark_for_sweep(cursor, key, start, now)
        metrics.PRODUCED.labels(cc=cc).inc(len(fresh))
        if sweep:
            metrics.LATE_UPLOADS.labels(cc=cc).inc(len(fresh))
        metrics.ERRORS.labels(kind="malformed_item").inc(len(dead))
        metrics.DEADLETTER_TOTAL.labels(stage="normalise").inc(len(dead))
        result.produced += len(fresh)
        result.deadlettered += len(dead)
        if fresh or dead:
            if not sweep:
                self._prune(cursor)  # a long backfill moves `since` page by page: keep the record small as it goes
            self._save(cursor)

    def _prune(self, cursor: CountryCursor) -> None:
        """Forget produced uids the regular rounds can no longer get; ``since`` only grows, so this is safe after
        any page as well as after a round."""
        cursor.prune(self.lookback + self._sweep_overlap())

    def _mark_for_sweep(self, cursor: CountryCursor, uid: str, start: datetime, now: datetime) -> None:
        """A regular round's item that the next late sweep will read as late (received since the last sweep,
        later than the look-back, inside the sweep's reach) is kept in ``late`` by receive time, as if the sweep
        had produced it: ``seen`` is pruned by start time against the new ``since``, which a catch-up after an
        outage moves hours at once, while ``late`` is kept until a sweep has passed the receive time."""
        s = self.settings
        if s.poll_late_sweep_seconds <= 0 or cursor.swept is None:  # no sweep, or the next one only sets the mark
            return
        arrived = received_at(uid)
        if arrived is None or arrived <= cursor.swept - self.margin:
            return
        if start > arrived - self.lookback + self.margin or start < now - timedelta(seconds=s.poll_late_sweep_seconds):
            return
        cursor.remember_late(uid, arrived)

    def _sweep_overlap(self) -> timedelta:
        """How long past the look-back the cursor keeps produced uids, so the late sweep recognises what a regular
        round produced. A regular round catches an item started as early as the look-back before the previous
        round (up to a poll interval and a round's time before the item became visible); the first sweep that
        looks at it runs up to a sweep interval and a poll interval after that. Margins cover the API's delay
        and the round's time. About 300 uids an hour for Cambodia: kilobytes."""
        s = self.settings
        if s.poll_late_sweep_seconds <= 0:
            return timedelta(0)
        return 2 * self.margin + timedelta(seconds=s.poll_late_sweep_every_seconds + 2 * s.poll_interval_seconds)

    def _late_arrival(self, item: Any, after: datetime) -> datetime | None:
        """The receive time of an item a late sweep must produce: received after ``after`` and later than the
        look-back then (less the margin); None for the regular rounds' items and those it cannot tell."""
        uid = item.get("measurement_uid") if isinstance(item, dict) else None
        arrived = received_at(uid) if isinstance(uid, str) else None
        if arrived is None or arrived <= after:
            return None
        start = _item_time(item, arrived)
        return arrived if start <= arrived - self.lookback + self.margin else None

    def _deadletter_page(self, cc: str, exc: MalformedPage) -> None:
        """The page is kept for inspection; the same window is asked again next round."""
        assert self.producer is not None
        letter = DeadLetter.of("poller", exc.reason, exc.body, key=cc, source=exc.url)
        try:
            bus.send_all(
                self.producer,
                self.settings.topics.deadletter,
                [(cc.encode(), letter.to_bytes())],
                KAFKA_TIMEOUT,
            )
            metrics.DEADLETTER_TOTAL.labels(stage="poller").inc()
        except (KafkaError, TimeoutError) as kexc:
            metrics.ERRORS.labels(kind="kafka").inc()
            log.warning("%s: could not dead-letter a malformed page (%s)", cc, kexc)
        log.warning("%s: malformed page (%s); retrying next round", cc, exc.reason)

    def _save(self, cursor: CountryCursor) -> None:
        assert self.store is not None
        self.store.save(cursor, KAFKA_TIMEOUT)

    def _interval(self) -> float:
        return self.settings.poll_interval_seconds


def _install_signals(poller: Poller) -> dict[int, Any]:
    """SIGTERM/SIGINT set the stop event and abandon an HTTP request in flight (never a Kafka call)."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if not poller.stop_event.is_set():
            log.info("%s received: stopping the poller", signal.Signals(signum).name)
        poller.stop()
        if poller.client.in_request:
            raise RequestAbandoned

    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handle)
    return previous


def build_enricher(settings: Settings, client: OoniClient) -> Enricher | None:
    """The enrichment step when configured (``settings.enrich``), else None."""
    if not settings.enrich.enabled or settings.enrich.max_fetches_per_round == 0:
        return None
    from services.enrich import Enrichment

    return Enrichment(settings, client)


def run(settings: Settings) -> int:
    """``censorwatch poll``: poll until SIGTERM/SIGINT, then flush and exit 0."""
    if settings.metrics.poller_port:
        start_http_server(settings.metrics.poller_port, addr=settings.metrics.host)
        log.info("poller metrics on %s:%d", settings.metrics.host, settings.metrics.poller_port)
    poller = Poller(settings)
    poller.enricher = build_enricher(settings, poller.client)
    previous = _install_signals(poller)
    try:
        log.info(
            "polling %s for %s every %.0f s from %s",
            ",".join(settings.countries),
            ",".join(settings.test_names),
            settings.poll_interval_seconds,
            settings.ooni_api_url,
        )
        if poller.start():
            poller.run_forever()
    except RequestAbandoned:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        poller.close()
    log.info("poller stopped")
    return 0
