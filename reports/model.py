"""Typed inputs and tables of an advocacy report.

Every source (aggregation API, event log, recorded measurements) is reduced to the same ``ReportInput`` of
partial aggregates, because the API cannot give all dimensions at once (two axes per request). The pure core
(``reports.core``) turns that into the same ``Report`` tables whatever the source, so the renderers never know
where the numbers came from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date

# blocking_type (scores.analysis / aggregation axis) -> the method names advocates use
METHODS = {"dns": "DNS", "tcp_ip": "TCP", "http-failure": "HTTP", "http-diff": "HTTP", "tls": "TLS"}


def method_name(blocking_type: str | None) -> str | None:
    """OONI's blocking types as DNS/TCP/HTTP; None when a measurement names no method."""
    if not blocking_type:
        return None
    key = blocking_type.strip().lower()
    if key in METHODS:
        return METHODS[key]
    if key.upper() in METHODS.values():
        return key.upper()
    if key.startswith("http"):
        return "HTTP"
    if key.startswith("tcp"):
        return "TCP"
    return key


@dataclass
class Counts:
    """OONI's disjoint counters (aggregation API SQL): failure wins, then confirmed, then anomaly, else ok."""

    measurement_count: int = 0
    ok_count: int = 0
    anomaly_count: int = 0
    confirmed_count: int = 0
    failure_count: int = 0

    def add(self, other: Counts) -> None:
        self.measurement_count += other.measurement_count
        self.ok_count += other.ok_count
        self.anomaly_count += other.anomaly_count
        self.confirmed_count += other.confirmed_count
        self.failure_count += other.failure_count

    def add_outcome(self, outcome: str) -> None:
        """One measurement of class ``ok|anomaly|confirmed|failure`` (``Measurement.outcome``)."""
        self.measurement_count += 1
        setattr(self, f"{outcome}_count", getattr(self, f"{outcome}_count") + 1)

    @property
    def blocked(self) -> int:
        """Blocked or likely blocked: anomaly + confirmed (failures are not evidence either way)."""
        return self.anomaly_count + self.confirmed_count

    @property
    def valid(self) -> int:
        return self.measurement_count - self.failure_count

    @classmethod
    def from_row(cls, row: dict[str, object]) -> Counts:
        def num(key: str) -> int:
            value = row.get(key, 0)
            return int(value) if isinstance(value, int | float | str) and str(value) != "" else 0

        return cls(
            num("measurement_count"),
            num("ok_count"),
            num("anomaly_count"),
            num("confirmed_count"),
            num("failure_count"),
        )


@dataclass
class PairEvidence:
    """What one ISP (ASN) showed for one website over the period."""

    counts: Counts = field(default_factory=Counts)
    methods: Counter[str] = field(default_factory=Counter)  # blocked measurements per method
    first: date | None = None  # first day with blocked evidence
    last: date | None = None
    decided: bool | None = None  # events: the detection engine already decided; None = apply the report rule
    links: list[str] = field(default_factory=list)

    def see(self, day: date) -> None:
        self.first = day if self.first is None or day < self.first else self.first
        self.last = day if self.last is None or day > self.last else self.last


@dataclass
class ReportInput:
    """Partial aggregates for one country and period, as a source could produce them.

    ``has_totals`` is False for the event log: it knows the blocked websites, not what was measured.
    """

    cc: str
    since: date
    until: date  # inclusive
    source: str
    simulated: bool = False
    has_totals: bool = True
    day_domain: dict[tuple[date, str], Counts] = field(default_factory=dict)
    domain_category: dict[str, str] = field(default_factory=dict)
    domain_urls: dict[str, Counter[str]] = field(default_factory=dict)
    pairs: dict[tuple[str, int], PairEvidence] = field(default_factory=dict)
    site_links: dict[str, list[str]] = field(default_factory=dict)
    # domain key -> the source's own spellings of it (the API's netloc: case and port kept), for queries and links
    domain_spellings: dict[str, list[str]] = field(default_factory=dict)
    asn_names: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rule:
    """When a (website, ISP) pair counts as blocked in a report built from counts (not from events).

    A report heuristic, not an OONI verdict: at least ``min_blocked`` anomalous or confirmed measurements and
    at least ``min_share`` of the non-failed ones. Confirmed measurements (known block pages) count like
    anomalies: one stray block page on a big ISP should not, alone, put a site in a report to a ministry.
    """

    min_blocked: int = 3
    min_share: float = 0.2

    def blocked(self, c: Counts) -> bool:
        return c.blocked >= self.min_blocked and c.valid > 0 and c.blocked / c.valid >= self.min_share


# ---- output tables -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    measurements: int | None
    websites: int | None
    isps: int | None
    blocked_websites: int
    blocking_isps: int


@dataclass(frozen=True)
class CategoryRow:
    code: str
    name: str
    websites: int
    measurements: int
    blocked: int  # anomaly + confirmed measurements

    @property
    def share(self) -> float:
        return self.blocked / self.measurements if self.measurements else 0.0


@dataclass(frozen=True)
class MonthRow:
    month: str  # YYYY-MM
    counts: Counts


@dataclass(frozen=True)
class Isp:
    asn: int
    name: str

    @property
    def label(self) -> str:
        return f"{self.name} (AS{self.asn})" if self.name else f"AS{self.asn}"


@dataclass(frozen=True)
class BlockedSite:
    domain: str
    url: str
    category: str
    isps: tuple[Isp, ...]
    methods: tuple[str, ...]
    first: date | None
    last: date | None
    measurements: int  # measurements of the site on the blocking ISPs (failures included)
    blocked_measurements: int
    links: tuple[str, ...]


@dataclass(frozen=True)
class IspRow:
    isp: Isp
    websites_blocked: int
    by_method: tuple[tuple[str, int], ...]  # method -> websites


@dataclass
class Report:
    cc: str
    since: date
    until: date
    source: str
    simulated: bool
    summary: Summary
    categories: list[CategoryRow]
    months: list[MonthRow]
    blocked: list[BlockedSite]
    isps: list[IspRow]
    daily: list[tuple[date, Counts]]
    category_series: dict[str, list[tuple[date, Counts]]]  # category code -> buckets
    series_grain: str
    matrix: dict[tuple[str, int], int]  # (domain, asn) -> blocked measurements, blocking pairs only
    rule: Rule
    notes: list[str]
    has_totals: bool = True  # False: an event log (categories and months are unknown, not empty)
