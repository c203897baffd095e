"""Every metric the detection worker exports, declared in one place.

Per (cc, ASN, target) values are never plain labelled metrics: they come from ``SeriesCollector`` over the live
state, which only exposes series that are watched or currently anomalous, up to a fixed cap, so cardinality stays
bounded however many domains the probes test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from censorwatch.metrics_common import CONSUMER_LAG as CONSUMER_LAG
from censorwatch.metrics_common import DEADLETTER_TOTAL as DEADLETTER_TOTAL

MEASUREMENTS_PROCESSED = Counter(
    "censorwatch_worker_measurements_processed",
    "Measurements run through the detection engine, by OONI's disjoint outcome.",
    ["cc", "outcome"],
)
DUPLICATES = Counter("censorwatch_worker_duplicates", "Measurements dropped because their uid was already counted.")
LATE_MEASUREMENTS = Counter(
    "censorwatch_worker_late_measurements",
    "Measurements older than the watermark: 'revised' (inside the revision window) or 'too_late' (ignored).",
    ["kind"],
)
INPUT_GAPS = Counter(
    "censorwatch_worker_input_gaps",
    "Jumps in the measurement topic's offsets (records that never reached the agent); each restarts the worker, "
    "which reads them again from the committed offset.",
)
INPUT_EXPIRED = Counter(
    "censorwatch_worker_input_expired",
    "Measurement records deleted by the topic's retention before the worker read them (their evidence is lost).",
)
EVENTS_EMITTED = Counter(
    "censorwatch_worker_events_emitted", "Event notices emitted to the events topic.", ["kind", "action"]
)
EVENTS_OPEN = Gauge("censorwatch_worker_events_open", "Events currently open.", ["kind", "cc"])
ALERTS_CAPPED = Counter(
    "censorwatch_worker_alerts_capped", "Event notices dropped by the per-run alert cap (recorded, not sent)."
)
ASSIGNED_PARTITIONS = Gauge(
    "censorwatch_worker_assigned_partitions",
    "Partitions of the measurement topic this worker owns since the last rebalance (0: idle, e.g. more workers "
    "than partitions).",
)
PROCESSING_LATENCY = Histogram(
    "censorwatch_worker_processing_latency_seconds",
    "From the poller fetching a measurement to the worker emitting the event it triggered.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
)


@dataclass(frozen=True)
class SeriesSample:
    cc: str
    asn: int
    target: str
    share: float  # blocked share k/n in the current window
    measurements: int


class SeriesCollector(Collector):
    """Exposes per-series anomaly shares for the series the worker chose to publish (bounded by ``cap``)."""

    def __init__(self, cap: int = 2000) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._series: dict[tuple[str, int, str], SeriesSample] = {}

    def publish(self, sample: SeriesSample) -> None:
        key = (sample.cc, sample.asn, sample.target)
        with self._lock:
            if key in self._series or len(self._series) < self.cap:
                self._series[key] = sample

    def withdraw(self, cc: str, asn: int, target: str) -> None:
        with self._lock:
            self._series.pop((cc, asn, target), None)

    def __len__(self) -> int:
        return len(self._series)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        share = GaugeMetricFamily(
            "censorwatch_series_anomaly_share",
            "Blocked share (anomaly + confirmed over non-failed measurements) in the evidence window.",
            labels=["cc", "asn", "target"],
        )
        count = GaugeMetricFamily(
            "censorwatch_series_measurements",
            "Measurements in the evidence window of the series.",
            labels=["cc", "asn", "target"],
        )
        with self._lock:
            samples = list(self._series.values())
        for s in samples:
            labels = [s.cc, str(s.asn), s.target]
            share.add_metric(labels, s.share)
            count.add_metric(labels, s.measurements)
        yield share
        yield count


SERIES = SeriesCollector()
REGISTRY.register(SERIES)
