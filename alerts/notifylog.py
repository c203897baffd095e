"""The durable notification log: what was delivered (or deliberately not) to whom, on a compacted topic.

Why: the dispatcher commits its consumer offset only after delivery, so after a crash it sees some events
again. Each notice is written here right after it was sent and before the offset is committed; on start the
log is read back, and a notice already in it is skipped. It also keeps each event's Slack root (channel, ts),
so a restarted dispatcher keeps threading under the same message, and it is what the daily digest reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from kafka import KafkaProducer

from alerts.sinks import SlackThread
from censorwatch import bus
from censorwatch.config import Settings
from censorwatch.models import Event


def notice_key(event: Event, receiver: str) -> str:
    return f"{event.notice_key}#{receiver}"


class NotificationLog:
    def __init__(self, settings: Settings, producer: KafkaProducer | None = None) -> None:
        self.settings = settings
        self.topic = settings.topics.notification_log
        self.producer = producer
        self.entries: dict[str, dict[str, Any]] = {}
        self._versions: dict[tuple[str, str], int] = {}
        self._roots: dict[tuple[str, str], SlackThread] = {}
        self._notified: set[tuple[str, str]] = set()
        self._told: dict[str, set[str]] = {}  # event_id -> receivers notified (read for every record)
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}  # last sent notice or reminder per pair
        self._handled: dict[tuple[str, str], dict[str, Any]] = {}  # newest notice per pair, whatever its status
        self._reminded: dict[tuple[str, str], datetime] = {}  # last sent notice or reminder try per pair

    def load(self) -> int:
        for key, value in bus.read_compacted(self.settings, self.topic).items():
            if value:
                self._index(key.decode("utf-8", "replace"), orjson.loads(value))
        return len(self.entries)

    def _index(self, key: str, value: dict[str, Any]) -> None:
        self.entries[key] = value
        kind = value.get("type")
        pair = (str(value.get("event_id")), str(value.get("receiver")))
        if kind == "root":
            self._roots[pair] = SlackThread(str(value["channel"]), str(value["ts"]))
        elif kind == "notice":
            self._versions[pair] = max(self._versions.get(pair, 0), int(value["version"]))
            prev = self._handled.get(pair)
            if prev is None or (value["version"], value["at"]) >= (prev["version"], prev["at"]):
                self._handled[pair] = value
        sent = value.get("status") == "sent"
        if kind in ("notice", "reminder") and sent:
            self._notified.add(pair)
            self._told.setdefault(pair[0], set()).add(pair[1])
            prev = self._latest.get(pair)
            if prev is None or (value["version"], value["at"]) >= (prev["version"], prev["at"]):
                self._latest[pair] = value
        if (kind == "notice" and sent) or kind == "reminder":  # a failed reminder waits a whole interval too
            at = datetime.fromisoformat(value["at"])
            self._reminded[pair] = max(self._reminded.get(pair, at), at)

    def write(self, key: str, value: dict[str, Any]) -> None:
        """Persist one entry and wait for the broker's ack (so it is durable before the offset commit)."""
        value = {**value, "at": value.get("at") or datetime.now(UTC).isoformat()}
        if self.producer is None:
            raise RuntimeError("notification log opened read-only")
        bus.send_all(self.producer, self.topic, [(key.encode(), orjson.dumps(value))], timeout=30)
        self._index(key, value)

    def handled_version(self, event_id: str, receiver: str) -> int:
        """The newest version of this event already handled for this receiver (0 = none)."""
        return self._versions.get((event_id, receiver), 0)

    def notified(self, event_id: str, receiver: str) -> bool:
        """Whether this receiver was ever actually told about the event (a resolved notice needs that)."""
        return (event_id, receiver) in self._notified

    def told(self, event_id: str) -> list[str]:
        """The receivers that were actually sent a notice (or reminder) of this event."""
        return sorted(self._told.get(event_id, ()))

    def root(self, event_id: str, receiver: str) -> SlackThread | None:
        return self._roots.get((event_id, receiver))

    def latest_handled(self, event_id: str, receiver: str) -> Event | None:
        """The newest version handled for this receiver, sent or not: a silenced "resolved" still ends the event."""
        value = self._handled.get((event_id, receiver))
        return Event.model_validate(value["event"]) if value is not None and "event" in value else None

    def latest_sent(self) -> Iterator[tuple[str, str, Event, datetime]]:
        """(event_id, receiver, latest event sent, last reminder clock) per pair: what reminders are rebuilt from.

        The clock is the last sent notice or reminder *attempt*, so a dead-lettered reminder is not retried on
        every loop turn but after another ``repeat_interval``.
        """
        for pair, value in self._latest.items():
            if "event" in value:
                at = self._reminded.get(pair) or datetime.fromisoformat(value["at"])
                yield (*pair, Event.model_validate(value["event"]), at)

    def since(self, start: datetime) -> Iterator[dict[str, Any]]:
        for value in self.entries.values():
            if value.get("type") == "notice" and datetime.fromisoformat(value["at"]) >= start:
                yield value
