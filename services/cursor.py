"""The poll cursor per country, in a compacted Kafka topic, so a restarted poller neither skips nor repeats.

The API filters on the probe's start time and late uploads appear "in the past", so each round asks again from
``since - lookback`` (``../shared/docs/ooni-api.md`` section 1.3). The cursor therefore holds two things:

* ``since``: the high-water start time up to which everything that had arrived has been produced;
* ``seen``: the uids already produced (or dead-lettered) whose start time is still inside the look-back
  overlap, so the overlap is not produced twice. Older entries are pruned once the regular rounds no longer get
  them and the late sweep has passed them (the poller says when: ``Poller._sweep_overlap``), after every page
  as well as after a round, so a backfill of days never holds more than the overlap and a page or two.
  They are kept as 72-bit digests grouped by start second, ~20 bytes each in the record instead of ~90: the
  record is one Kafka message (1 MB by default), and a busy country can have tens of thousands of uids in six
  hours (a record past half the limit is logged at WARNING, with what to do).

Uploads later than the look-back are caught by a periodic *late sweep* (``services.poller``), which re-reads
further back and keeps only items received since the last sweep; the cursor then also holds ``swept`` (where the
last complete sweep began) and ``late`` (digests of what sweeps produced, by receive time, so a sweep repeated
after a crash produces nothing twice; also those a regular round produced that the next sweep will read as late,
which ``seen`` may have pruned by then: a catch-up after an outage moves ``since`` hours at once).

It is written after Kafka acknowledged the page's measurements (at-least-once: a crash between the two
produces that page again, and the worker's uid de-duplication absorbs it).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from kafka import KafkaProducer

from censorwatch import bus
from censorwatch.config import Settings

log = logging.getLogger(__name__)

VERSION = 2  # 1: ``seen`` as {uid: ISO start}; read and converted on load
SIZE_WARNING_BYTES = 512 * 1024  # half of Kafka's default max.message.bytes


def uid_digest(uid: str) -> str:
    """The short identity kept for a uid: 72 bits of BLAKE2b (a collision among 100k uids: ~1e-11)."""
    return base64.urlsafe_b64encode(hashlib.blake2b(uid.encode(), digest_size=9).digest()).decode()


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _epoch(value: datetime) -> str:
    """Whole seconds without a fraction (OONI's start times are), else exact to the microsecond."""
    ts = value.timestamp()
    return str(int(ts)) if ts == int(ts) else f"{ts:.6f}"


def _parse(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass
class CountryCursor:
    """Where polling of one country stands."""

    cc: str
    floor: datetime  # the very first ``since`` (poll_start or now - initial look-back)
    since: datetime | None = None  # high-water mark; None until a first page was produced
    seen: dict[str, datetime] = field(default_factory=dict)  # uid_digest -> probe start time, inside the overlap
    swept: datetime | None = None  # start of the last complete late sweep (None: no sweep yet)
    late: dict[str, datetime] = field(default_factory=dict)  # uid_digest -> receive time, produced by sweeps

    def query_since(self, lookback: timedelta) -> datetime:
        """The ``since`` of the next request: the look-back behind the high-water, one more second for ties
        (start times have whole seconds and ``since`` is strict), floored to the second the API is sent."""
        edge = self.floor if self.since is None else self.since - lookback - timedelta(seconds=1)
        return edge.replace(microsecond=0)

    def knows(self, uid: str) -> bool:
        """Was this uid produced (or dead-lettered) already, inside the overlap?"""
        return uid_digest(uid) in self.seen

    def remember(self, uid: str, start_time: datetime) -> None:
        """Keep a uid in the overlap without moving the mark (a dead-lettered item's; ``record`` also moves it)."""
        self.seen[uid_digest(uid)] = start_time

    def knows_late(self, uid: str) -> bool:
        return uid_digest(uid) in self.late

    def remember_late(self, uid: str, received: datetime) -> None:
        """A late sweep produced (or dead-lettered) it: never again, and the mark does not move."""
        self.late[uid_digest(uid)] = received

    def swept_at(self, start: datetime, margin: timedelta) -> None:
        """A sweep that began at ``start`` completed: the next one keeps items received after ``start - margin``,
        so entries received before that are no longer needed."""
        self.swept = start
        self.late = {digest: received for digest, received in self.late.items() if received > start - margin}

    def record(self, uid: str, start_time: datetime, now: datetime) -> None:
        """Remember a produced (or dead-lettered) item; future probe clocks never moves the mark past now."""
        self.remember(uid, start_time)
        mark = min(start_time, now)
        if self.since is None or mark > self.since:
            self.since = mark

    def advance_to(self, mark: datetime) -> None:
        """After a complete round: nothing that had arrived by now is older than ``mark`` and unread."""
        if self.since is None or mark > self.since:
            self.since = mark

    def prune(self, lookback: timedelta) -> int:
        """Forget uids the next request cannot return (start time at or before its strict ``since``)."""
        edge = self.query_since(lookback)
        old = [uid for uid, start in self.seen.items() if start <= edge]
        for uid in old:
            del self.seen[uid]
        return len(old)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "version": VERSION,
                "cc": self.cc,
                "floor": _iso(self.floor),
                "since": _iso(self.since) if self.since else None,
                "seen": _grouped(self.seen),  # {start as epoch seconds: "digest digest ..."}
                "swept": _iso(self.swept) if self.swept else None,
                "late": _grouped(self.late),  # {receive time as epoch seconds: "digest ..."}
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> CountryCursor:
        raw = orjson.loads(data)
        stored = raw.get("seen") or {}
        if raw.get("version", 1) == 1:
            seen = {uid_digest(str(uid)): _parse(start) for uid, start in stored.items()}
        else:
            seen = _ungrouped(stored)
        return cls(
            cc=str(raw["cc"]),
            floor=_parse(raw["floor"]),
            since=_parse(raw["since"]) if raw.get("since") else None,
            seen=seen,
            swept=_parse(raw["swept"]) if raw.get("swept") else None,
            late=_ungrouped(raw.get("late") or {}),
        )


def _grouped(digests: dict[str, datetime]) -> dict[str, str]:
    by_time: dict[datetime, list[str]] = defaultdict(list)
    for digest, when in digests.items():
        by_time[when].append(digest)
    return {_epoch(when): " ".join(group) for when, group in by_time.items()}


def _ungrouped(stored: dict[str, Any]) -> dict[str, datetime]:
    return {
        digest: when
        for epoch, group in stored.items()
        for when in (datetime.fromtimestamp(float(epoch), UTC),)
        for digest in str(group).split()
    }


class CursorStore:
    """Loads every country's cursor from the compacted topic and writes one back after each produced page."""

    def __init__(self, settings: Settings, producer: KafkaProducer) -> None:
        self.settings = settings
        self.producer = producer
        self.topic = settings.topics.poller_cursor

    def load(self, now: datetime) -> dict[str, CountryCursor]:
        """One cursor per configured country: the stored one, or a fresh one starting at poll_start."""
        stored = bus.read_compacted(self.settings, self.topic)
        floor = self.settings.poll_start or now - timedelta(seconds=self.settings.poll_initial_lookback_seconds)
        if floor.tzinfo is None:
            floor = floor.replace(tzinfo=UTC)
        cursors: dict[str, CountryCursor] = {}
        for cc in self.settings.countries:
            value = stored.get(cc.encode())
            cursor: CountryCursor | None = None
            if value:
                try:
                    cursor = CountryCursor.from_bytes(value)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("cursor for %s in %s is unreadable (%s); starting from %s", cc, self.topic, exc, floor)
            if cursor is None:
                cursor = CountryCursor(cc=cc, floor=floor)
                log.info("%s: no stored cursor, polling from %s", cc, _iso(floor))
            else:
                log.info(
                    "%s: resuming at %s with %d uids in the overlap",
                    cc,
                    _iso(cursor.since) if cursor.since else _iso(cursor.floor),
                    len(cursor.seen),
                )
            cursors[cc] = cursor
        return cursors

    def save(self, cursor: CountryCursor, timeout: float = 30.0) -> None:
        data = cursor.to_bytes()
        if len(data) > SIZE_WARNING_BYTES:
            log.warning(
                "%s: the poll cursor is %d kB (%d uids in the look-back and the late sweep's overlap, %d late); past "
                "Kafka's message limit (1 MB) it cannot be saved: shorten poll_lookback_seconds (or "
                "poll_late_sweep_every_seconds, which the overlap grows with)",
                cursor.cc,
                len(data) // 1024,
                len(cursor.seen),
                len(cursor.late),
            )
        bus.send_all(self.producer, self.topic, [(cursor.cc.encode(), data)], timeout)
