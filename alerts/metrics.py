"""Every metric the dispatcher exports, named as in DEVELOPERS.md (base units; labels sink, outcome)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from censorwatch.metrics_common import CONSUMER_LAG as CONSUMER_LAG
from censorwatch.metrics_common import DEADLETTER_TOTAL as DEADLETTER_TOTAL

OUTCOMES = ("sent", "failed", "duplicate", "silenced", "inhibited", "deadlettered")
SINKS = ("console", "slack", "email")

NOTIFICATIONS = Counter(
    "censorwatch_notifications",
    "Notices handled per sink: sent, failed (one attempt), duplicate (already in the notification log), "
    "silenced, inhibited, deadlettered (gave up).",
    ["sink", "outcome"],
)
NOTIFICATION_DURATION = Histogram(
    "censorwatch_notification_duration_seconds",
    "Time to deliver one notice to one receiver, retries included.",
    ["sink"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
HEARTBEAT = Gauge(
    "censorwatch_dispatcher_heartbeat_timestamp_seconds",
    "Last time the dispatcher loop ran: tells 'no alerts' from 'no delivery'.",
)
LAST_DELIVERY = Gauge(
    "censorwatch_dispatcher_last_delivery_timestamp_seconds",
    "Last time a notice (or heartbeat notice) was delivered, per sink.",
    ["sink"],
)

for _sink in SINKS:  # export zeros from the start so rate() and absent() behave
    LAST_DELIVERY.labels(_sink)
    NOTIFICATION_DURATION.labels(_sink)
    for _outcome in OUTCOMES:
        NOTIFICATIONS.labels(_sink, _outcome)
