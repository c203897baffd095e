"""Silences: "don't notify about X until T, because R", kept in a compacted topic so every dispatcher and the
``censorwatch silence`` command share them and a restart forgets none.

Expiring a silence rewrites it with ``ends_at = now`` rather than deleting it, so the daily digest can still
say what was silenced and why.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from pydantic import Field

from alerts.routing import matches
from censorwatch import bus
from censorwatch.config import AlertMatch, Settings
from censorwatch.models import Event, Wire, utcnow

log = logging.getLogger(__name__)


class Silence(Wire):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    match: AlertMatch
    starts_at: datetime = Field(default_factory=utcnow)
    ends_at: datetime
    reason: str = Field(min_length=1, max_length=500)
    created_by: str = ""
    created_at: datetime = Field(default_factory=utcnow)

    def active(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        return self.starts_at <= now < self.ends_at

    def describe(self) -> str:
        m = {k: v for k, v in self.match.model_dump(exclude_defaults=True).items() if v not in ([], None)}
        what = ", ".join(f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in m.items())
        until = self.ends_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        by = f" by {self.created_by}" if self.created_by else ""
        return f"{self.id}: {what or 'everything'} until {until}{by}: {self.reason}"


class SilenceStore:
    """Reads and writes silences on ``settings.topics.silences``; keeps the latest copy in memory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topics.silences
        self.silences: dict[str, Silence] = {}

    def load(self) -> list[Silence]:
        """Read every silence; an invalid record is logged and skipped, never a reason to stop the dispatcher.

        Parsed into a new dict and swapped in, so a failed read leaves the silences known before intact.
        """
        latest = bus.read_compacted(self.settings, self.topic)
        silences: dict[str, Silence] = {}
        for key, value in latest.items():
            if not value:
                continue
            try:
                s = Silence.from_bytes(value)
            except Exception as exc:  # a hand-written or foreign record: skip it, keep the others
                name = key.decode("utf-8", "replace") if key else "?"
                why = " ".join(str(exc).split())[:300]
                log.warning("silence %r skipped: not a valid silence (%s)", name[:100], why)
                continue
            silences[s.id] = s
        self.silences = silences
        return sorted(silences.values(), key=lambda s: s.created_at)

    def _write(self, silence: Silence) -> Silence:
        p = bus.producer(self.settings)
        try:
            bus.send_all(p, self.topic, [(silence.id.encode(), silence.to_bytes())], timeout=30)
        finally:
            p.close()
        self.silences[silence.id] = silence
        return silence

    def add(self, match: AlertMatch, duration: timedelta, reason: str, created_by: str = "") -> Silence:
        now = datetime.now(UTC)
        return self._write(
            Silence(match=match, starts_at=now, ends_at=now + duration, reason=reason, created_by=created_by)
        )

    def expire(self, silence_id: str) -> Silence:
        self.load()
        if silence_id not in self.silences:
            raise KeyError(silence_id)
        s = self.silences[silence_id]
        return self._write(s.model_copy(update={"ends_at": min(s.ends_at, datetime.now(UTC))}))

    def matching(self, event: Event, now: datetime | None = None) -> Silence | None:
        for s in self.silences.values():
            if s.active(now) and matches(s.match, event):
                return s
        return None

    def active(self, now: datetime | None = None) -> list[Silence]:
        return [s for s in self.silences.values() if s.active(now)]
