"""The data that crosses process boundaries: measurements in, events out, dead letters aside.

Everything on a topic is one of these models serialised as JSON (``to_bytes`` / ``from_bytes``), so every
producer and consumer agrees on the shape and a bad record fails in one place with a clear reason.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

EXPLORER = "https://explorer.ooni.org"
SIM_MARK = "sim"  # simulated measurements (services/simulate.py): the uid's last part starts with it


def utcnow() -> datetime:
    return datetime.now(UTC)


def explorer_measurement_url(uid: str) -> str:
    return f"{EXPLORER}/m/{uid}"


# How a blocking method is named to people (alerts, summaries); the codes are OONI's blocking types and the
# engine's: "fingerprint" (confirmed by a known fingerprint, no type given), "unspecified" (an anomaly, no type).
METHOD_NAMES = {
    "dns": "DNS",
    "tcp_ip": "TCP/IP",
    "http-failure": "HTTP failure",
    "http-diff": "HTTP diff",
    "fingerprint": "fingerprint match",
}


def method_names(methods: Iterable[str]) -> str:
    """``["dns", "tcp_ip"]`` -> ``"DNS, TCP/IP"``; "unspecified" says nothing and is left out (empty if that is all:
    the caller says "method unknown"); an unknown code is shown as it is."""
    return ", ".join(METHOD_NAMES.get(m, m) for m in methods if m != "unspecified")


class Outcome(enum.StrEnum):
    """OONI's disjoint classes (aggregation API): failure wins, then confirmed, then anomaly, else ok."""

    OK = "ok"
    ANOMALY = "anomaly"
    CONFIRMED = "confirmed"
    FAILURE = "failure"


class Wire(BaseModel):
    """JSON (de)serialisation shared by every model that goes on a topic."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, data: bytes | str) -> Any:
        return cls.model_validate(orjson.loads(data))


class Measurement(Wire):
    """One OONI measurement, normalised from a ``/api/v1/measurements`` list item."""

    uid: str = Field(min_length=1, max_length=200)
    report_id: str = Field(default="", max_length=200, description="probe run identity (a 'probe')")
    cc: str = Field(pattern=r"^[A-Z]{2}$", description="ISO 3166 alpha-2, upper case (a bounded metric label)")
    asn: int = Field(ge=0)
    test_name: str
    start_time: datetime = Field(description="probe-reported start time, UTC")
    input: str | None = None
    target: str = Field(min_length=1, description="domain for web_connectivity, else the test name")
    anomaly: bool = False
    confirmed: bool = False
    failure: bool = False
    blocking_type: str | None = Field(default=None, description="scores.analysis.blocking_type")
    confirmed_by: str | None = Field(
        default=None, description="fingerprint that confirmed it locally (enrichment), e.g. 'dns:36.37.242.94'"
    )
    fetched_at: datetime | None = Field(default=None, description="when the poller fetched it")

    @field_validator("start_time", "fetched_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """Times are UTC: a naive one (a hand-made record, another producer) is read as UTC, never as local time,
        and never compared with an aware one (a TypeError in the worker)."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @property
    def outcome(self) -> Outcome:
        if self.failure:
            return Outcome.FAILURE
        if self.confirmed:
            return Outcome.CONFIRMED
        if self.anomaly:
            return Outcome.ANOMALY
        return Outcome.OK

    @property
    def explorer_url(self) -> str:
        return explorer_measurement_url(self.uid)

    @property
    def simulated(self) -> bool:
        """Simulated input is marked in its uid (``..._sim<hex>``): whatever is built on it must say so."""
        return self.uid.startswith(SIM_MARK, self.uid.rfind("_") + 1)  # the part after the last "_"

    @property
    def series_key(self) -> str:
        """Partition and table key: ``cc|asn|target``."""
        return series_key(self.cc, self.asn, self.target)


def series_key(cc: str, asn: int, target: str) -> str:
    return f"{cc}|{asn}|{target}"


class EventKind(enum.StrEnum):
    TARGET_BLOCKED = "target_blocked"  # one target (site or app) blocked in a country, across ASNs
    NETWORK_OUTAGE = "network_outage"  # many targets failing on one ASN at once
    COVERAGE_GAP = "coverage_gap"  # a watched network sent no measurements


class EventAction(enum.StrEnum):
    OPENED = "opened"
    UPDATED = "updated"  # ISPs joined or left, method changed
    REVISED = "revised"  # late data changed the evidence
    RESOLVED = "resolved"


class AsnEvidence(BaseModel):
    """The evidence from one network (ISP) inside an event."""

    model_config = ConfigDict(frozen=True)

    asn: int
    name: str = ""
    state: Literal["ok", "blocked", "down", "insufficient"] = "blocked"
    blocked: int = Field(default=0, description="k: anomalous + confirmed measurements in the window")
    total: int = Field(default=0, description="n: measurements in the window (failures excluded)")
    confirmed: int = 0
    failures: int = 0
    probes: int = Field(default=0, description="distinct probe runs (report ids)")
    share_low: float = 0.0
    share_high: float = 1.0
    methods: list[str] = Field(default_factory=list)
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    already_blocked: bool = Field(default=False, description="blocked when monitoring began")


ChangeKind = Literal[
    "opened",  # one ISP's series crossed the bar
    "opened_pooled",  # the evidence pooled across ISPs did
    "joined",
    "cleared",
    "resolved",
    "methods",
    "revised",  # late measurements changed the evidence
    "outage_opened",
    "outage_resolved",
    "gap_opened",
    "gap_resolved",
    "gap_window_ended",
]


class Change(BaseModel):
    """What one version of an event says happened, as data: the renderer puts it in the reader's language
    (``Event.summary`` says it in English, for logs and for readers of older events)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    what: ChangeKind
    asn: int | None = None  # the network it is about
    isps: int = 0  # networks in the event after it
    blocked: int = 0  # of total: measurements (revised) or targets (outages)
    total: int = 0
    hours: int = 0  # silent for (coverage gaps)
    since: str = ""  # the day a series was first measured, when it was already blocked then


class Event(Wire):
    """An incident as a rapid-response team sees it: one per (cc, target) or (cc, ASN), growing over time.

    ``(event_id, version)`` identifies one notice: the dispatcher's notification log is keyed on it, so a replay
    or a restart never sends the same notice twice.
    """

    event_id: str
    version: int = Field(ge=1)
    kind: EventKind
    action: EventAction
    cc: str
    target: str = Field(default="", description="domain or app; empty for network events")
    test_name: str = ""
    asn: int | None = Field(default=None, description="for network events")
    category: str | None = Field(default=None, description="Citizen Lab category code")
    asns: list[AsnEvidence] = Field(default_factory=list, description="networks currently in the event")
    cleared_asns: list[int] = Field(default_factory=list, description="networks that were in it and cleared")
    methods: list[str] = Field(default_factory=list, description="all blocking methods seen")
    blocked: int = 0
    total: int = 0
    probes: int = 0
    share_low: float = 0.0
    share_high: float = 1.0
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    already_blocked: bool = False
    severity: Literal["info", "warning", "critical"] = "warning"
    watch: str | None = Field(default=None, description="watch window label routing can match on")
    summary: str = Field(default="", description="one line of what changed in this version (English)")
    change: Change | None = Field(default=None, description="the same as data, for the reader's language")
    explorer_links: list[str] = Field(default_factory=list, description="a few measurements as evidence")
    simulated: bool = Field(default=False, description="from simulated data: must say so wherever shown")
    emitted_at: datetime = Field(default_factory=utcnow)
    source_time: datetime | None = Field(default=None, description="fetch time of the triggering measurement")

    @property
    def notice_key(self) -> str:
        return f"{self.event_id}#{self.version}"


class DeadLetter(Wire):
    """Something that could not be processed, kept whole with the reason so nothing is lost."""

    stage: str = Field(description="poller | normalise | worker | dispatcher")
    reason: str
    payload: str = Field(description="the original record, as text (truncated to 64 KiB)")
    key: str | None = None
    source: str | None = Field(default=None, description="URL, topic/partition/offset or file:line")
    at: datetime = Field(default_factory=utcnow)

    @classmethod
    def of(cls, stage: str, reason: str, payload: bytes | str | object, **kw: Any) -> DeadLetter:
        if isinstance(payload, bytes):
            text = payload[:65536].decode("utf-8", errors="backslashreplace")
        elif isinstance(payload, str):
            text = payload[:65536]
        else:
            text = orjson.dumps(payload, default=str).decode()[:65536]
        return cls(stage=stage, reason=reason[:2000], payload=text, **kw)
