"""The poll cursor per country, in a compacted Kafka topic, so a restarted poller neither skips nor repeats.

The API filters on the probe's start time and late uploads appear "in the past", so each round asks again from
``since - lookback`` (``../shared/docs/ooni-api.md`` section 1.3). The cursor therefore holds two things:

* ``since``: the high-water start time up to which everything that had arrived has been produced;
* ``seen``: the uids already produced (or dead-lettered) whose start time is still inside the look-back
  overlap, so the overlap is not produced twice. Older entries are pruned: the API no longer returns them.

It is written after Kafka acknowledged the page's measurements (at-least-once: a crash between the two
produces that page again, and the worker's uid de-duplication absorbs it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
from kafka import KafkaProducer

from censorwatch import bus
from censorwatch.config import Settings

log = logging.getLogger(__name__)

VERSION = 1


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _parse(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass
class CountryCursor:
    """Where polling of one country stands."""

    cc: str
    floor: datetime  # the very first ``since`` (poll_start or now - initial look-back)
    since: datetime | None = None  # high-water mark; None until a first page was produced
    seen: dict[str, datetime] = field(default_factory=dict)  # uid -> probe start time, inside the overlap

    def query_since(self, lookback: timedelta) -> datetime:
        """The ``since`` of the next request: the look-back behind the high-water, one more second for ties
        (start times have whole seconds and ``since`` is strict), floored to the second the API is sent."""
        edge = self.floor if self.since is None else self.since - lookback - timedelta(seconds=1)
        return edge.replace(microsecond=0)

    def record(self, uid: str, start_time: datetime, now: datetime) -> None:
        """Remember a produced (or dead-lettered) item; future probe clocks never moves the mark past now."""
        self.seen[uid] = start_time
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
                "seen": {uid: _iso(start) for uid, start in self.seen.items()},
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> CountryCursor:
        raw = orjson.loads(data)
        return cls(
            cc=str(raw["cc"]),
            floor=_parse(raw["floor"]),
            since=_parse(raw["since"]) if raw.get("since") else None,
            seen={str(uid): _parse(start) for uid, start in (raw.get("seen") or {}).items()},
        )


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
        bus.send_all(self.producer, self.topic, [(cursor.cc.encode(), cursor.to_bytes())], timeout)
