"""Every metric the poller (and replay/enrichment) exports, names as in DEVELOPERS.md ("Metric names").

Labels stay bounded: ``cc`` comes from the configured countries, ``kind`` and ``outcome`` from fixed lists.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from censorwatch.metrics_common import DEADLETTER_TOTAL as DEADLETTER_TOTAL

ERROR_KINDS = (
    "rate_limited",
    "server_error",
    "client_error",
    "timeout",
    "connection",
    "malformed_page",
    "malformed_item",
    "kafka",
)
ENRICH_OUTCOMES = ("confirmed", "unconfirmed", "failed", "skipped_budget")

FETCHED = Counter("censorwatch_poller_measurements_fetched", "List items received from the OONI API.", ["cc"])
PRODUCED = Counter(
    "censorwatch_poller_measurements_produced",
    "Measurements acknowledged by Kafka on the measurement topic.",
    ["cc"],
)
DUPLICATES = Counter(
    "censorwatch_poller_duplicates",
    "List items skipped because their uid was already produced (look-back overlap, repeated pages).",
    ["cc"],
)
LATE_UPLOADS = Counter(
    "censorwatch_poller_late_uploads",
    "Measurements the late sweep produced: uploaded later than the look-back (a burst can mean probes are back "
    "online after a shutdown).",
    ["cc"],
)
ERRORS = Counter("censorwatch_poller_errors", "Poller failures by kind.", ["kind"])
LAST_SUCCESS = Gauge(
    "censorwatch_poller_last_success_timestamp_seconds",
    "Unix time of the last poll round that completed for the country.",
    ["cc"],
)
QUOTA_REMAINING = Gauge(
    "censorwatch_poller_api_quota_remaining",
    "X-RateLimit-Remaining of the last OONI API answer; NaN until an answer carried the header.",
)
# Not 0: a 0 before the first answer (or from an API that never sends the header) would read as "quota
# exhausted" and fire CensorwatchApiQuotaExhausted. PromQL comparisons are false for NaN.
QUOTA_REMAINING.set(float("nan"))
REQUEST_DURATION = Histogram(
    "censorwatch_poller_request_duration_seconds",
    "Wall time of one HTTP request to the OONI API (every attempt, failed ones too).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
ENRICHMENTS = Counter(
    "censorwatch_poller_enrichments",
    "Anomalous measurements looked at by enrichment, by outcome (confirmed, unconfirmed, failed, skipped_budget).",
    ["outcome"],
)


def init_labels(countries: Iterable[str]) -> None:
    """Create every label value up front so dashboards and rate() see zeros instead of missing series."""
    for cc in countries:
        FETCHED.labels(cc=cc)
        PRODUCED.labels(cc=cc)
        DUPLICATES.labels(cc=cc)
        LATE_UPLOADS.labels(cc=cc)
    for kind in ERROR_KINDS:
        ERRORS.labels(kind=kind)
    for outcome in ENRICH_OUTCOMES:
        ENRICHMENTS.labels(outcome=outcome)
    for stage in ("poller", "normalise"):
        DEADLETTER_TOTAL.labels(stage=stage)


def init_last_success(countries: Iterable[str], started: float) -> None:
    """Start every country's last-success clock at the poller's start time.

    Without a series a country whose polls never succeed could not be told apart from one not configured, so
    CensorwatchPollerStalled could not fire for it. The start time, not 0, makes it fire after the usual threshold.
    A country that already has a value (a success) keeps it.
    """
    for cc in countries:
        child = LAST_SUCCESS.labels(cc=cc)
        if REGISTRY.get_sample_value("censorwatch_poller_last_success_timestamp_seconds", {"cc": cc}) == 0.0:
            child.set(started)
