"""Metrics every service shares, declared once so two services in one process never register a name twice."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

DEADLETTER_TOTAL = Counter(
    "censorwatch_deadletter",
    "Records sent to the dead-letter topic instead of being processed, by the stage that refused them.",
    ["stage"],
)
CONSUMER_LAG = Gauge(
    "censorwatch_consumer_lag", "Messages behind the end of the topic, per consumer group.", ["group", "topic"]
)
