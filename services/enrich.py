"""Confirmed evidence from raw measurement bodies: block-page and DNS fingerprints, Cambodia's included.

OONI marks a measurement ``confirmed`` only when one of its fingerprints matches, and its list has no
Cambodian entries, yet Cambodian ISPs answered blocked names with known addresses
(``kh_dns_blocking_indicators.csv``). A single confirmed measurement is strong evidence
(``../shared/docs/lessons.md``), so for anomalous measurements of the configured countries the poller fetches
the raw body (``/api/v1/raw_measurement``, within a budget per round, because each fetch costs API quota) and
matches it here. The matcher is pure: ``match_raw`` and ``confirmation`` take a parsed body.

Matching follows OONI's fastpath (``match_fingerprints``): DNS answers equal to a DNS pattern; HTTP body
``contains`` and header ``full``/``prefix``/``contains`` patterns on every response (``regexp`` patterns are
not used, as in the fastpath). What confirms is stricter than the fastpath, because one confirmed measurement
opens an event:

- a fingerprint with ``expected_countries`` confirms only in those countries; one without (global) confirms
  when its scope is ``isp`` or ``nat``;
- a DNS answer the control resolver also got never confirms (the name really resolves there);
- a private, loopback, reserved, link-local or unspecified answer (127.0.0.1, 10.x) confirms only when the
  control (``test_keys.control.dns.addrs``) resolved the name to at least one public address: without that a
  bogon may be a split-horizon or broken name, not a block.

A raw body comes from the network, so at most ``MAX_RESPONSES`` queries, answers and HTTP responses and
``MAX_BODY_TOTAL`` characters of bodies are examined per measurement.
"""

from __future__ import annotations

import base64
import binascii
import csv
import ipaddress
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import requests

from censorwatch.config import Settings
from censorwatch.models import Measurement
from services import metrics
from services.ooni_client import ApiUnavailable, OoniClient, OoniError

log = logging.getLogger(__name__)

CONFIRMING_SCOPES = frozenset({"isp", "nat"})
BLOCKING_WORDS = ("blocking", "confirmed", "likely", "bogon")
MAX_BODY = 1 << 20  # match at most the first MiB of a body
MAX_BODY_TOTAL = 4 << 20  # ... and 4 Mi characters of bodies per measurement (~0.5 s of matching at worst)
MAX_RESPONSES = 50  # DNS queries, answers per query, HTTP responses and headers per response examined
MAX_HEADER_VALUE = 8 << 10
RAW_TIMEOUT_SECONDS = 10.0  # per raw-body request (capped by settings.http_timeout_seconds)


@dataclass(frozen=True)
class Fingerprint:
    """One OONI fingerprint: where to look (``dns``, ``body``, ``header.<name>``), what and how to compare."""

    name: str
    scope: str
    location: str
    pattern: str
    pattern_type: str
    expected_countries: frozenset[str] = frozenset()

    def confirms(self, cc: str) -> bool:
        """A country's fingerprint confirms only there (Iran's 10.10.34.x is no block elsewhere); a global one
        (no ``expected_countries``) when it is an ISP- or country-wide block page."""
        if self.expected_countries:
            return cc in self.expected_countries
        return self.scope in CONFIRMING_SCOPES

    def matches(self, value: str) -> bool:
        if self.pattern_type == "full":
            return value == self.pattern
        if self.pattern_type == "prefix":
            return value.startswith(self.pattern)
        if self.pattern_type == "contains":
            return self.pattern in value
        return False  # regexp: not used by OONI's fastpath


@dataclass(frozen=True)
class Match:
    """What matched: ``label`` is what goes into ``Measurement.confirmed_by``."""

    label: str
    where: str  # dns | body | header.<name>
    value: str
    confirmed: bool


@dataclass
class FingerprintDB:
    """OONI's DNS and HTTP fingerprints plus local DNS block answers per country."""

    dns: dict[str, list[Fingerprint]] = field(default_factory=dict)  # answer -> fingerprints
    http: list[Fingerprint] = field(default_factory=list)
    local_dns: dict[str, dict[str, str]] = field(default_factory=dict)  # cc -> answer -> classification

    @classmethod
    def from_data(cls, ooni: dict[str, Any], local: dict[str, dict[str, str]] | None = None) -> FingerprintDB:
        # keyed by the comparable form of an address: an answer "d0::11" finds an indicator "D0::11"
        db = cls(local_dns={cc: {_same_key(a): c for a, c in answers.items()} for cc, answers in (local or {}).items()})
        for kind in ("dns", "http"):
            for row in ooni.get(kind, []):
                fp = _fingerprint(row)
                if fp.location == "dns":
                    db.dns.setdefault(_same_key(fp.pattern), []).append(fp)
                else:
                    db.http.append(fp)
        return db


def _fingerprint(row: dict[str, Any]) -> Fingerprint:
    expected = row.get("expected_countries") or []
    if isinstance(expected, str):  # OONI's original files: "AE,SA"
        expected = expected.split(",")
    return Fingerprint(
        name=str(row["name"]),
        scope=str(row.get("scope", "")),
        location=str(row["location_found"]).lower(),
        pattern=str(row["pattern"]),
        pattern_type=str(row.get("pattern_type", "full")),
        expected_countries=frozenset(c.strip().upper() for c in expected if c.strip()),
    )


def load_ooni_fingerprints(dns_file: Path, http_file: Path) -> dict[str, Any]:
    """OONI's original fingerprint files (lists of rows) as the ``{"dns": [...], "http": [...]}`` mapping."""
    return {
        "dns": orjson.loads(dns_file.read_bytes()),
        "http": orjson.loads(http_file.read_bytes()),
    }


def load_local_indicators(path: Path | str, cc: str) -> dict[str, str]:
    """DNS answers classified as blocking (not ``false_positive``, not unclassified ``suspicious``)."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            kind = (row.get("type") or "").strip()
            classification = (row.get("classification") or "").strip().lower()
            if kind != "dns_answer_ip" or "false_positive" in classification:
                continue
            if classification.startswith("suspicious") or not any(w in classification for w in BLOCKING_WORDS):
                continue
            out.setdefault(row["indicator"].strip(), row["classification"].strip())
    log.debug("%d blocking DNS answers for %s", len(out), cc)
    return out


@cache
def packaged_db() -> FingerprintDB:
    """The copies shipped in ``services/data`` (see its README): what an installed poller uses."""
    data = resources.files("services.data")
    ooni = orjson.loads(data.joinpath("ooni_fingerprints.json").read_bytes())
    with resources.as_file(data.joinpath("kh_dns_blocking_indicators.csv")) as kh:
        local = {"KH": load_local_indicators(kh, "KH")}
    return FingerprintDB.from_data(ooni, local)


# -- reading raw bodies -----------------------------------------------------------------------------------


def _test_keys(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    tk = raw.get("test_keys")
    return tk if isinstance(tk, dict) else {}


def dns_answers(raw: Any) -> list[str]:
    """Every A/AAAA/CNAME answer the probe got (``test_keys.queries[].answers[]``)."""
    out: list[str] = []
    queries = _test_keys(raw).get("queries")
    for query in queries[:MAX_RESPONSES] if isinstance(queries, list) else []:
        answers = query.get("answers") if isinstance(query, dict) else None
        for answer in answers[:MAX_RESPONSES] if isinstance(answers, list) else []:
            if not isinstance(answer, dict):
                continue
            for key in ("ipv4", "ipv6", "hostname"):
                value = answer.get(key)
                if isinstance(value, str) and value:
                    out.append(value)
    return out


def control_addrs(raw: Any) -> list[str]:
    """What the control resolver got for the name (``test_keys.control.dns.addrs``): addresses and CNAMEs."""
    control = _test_keys(raw).get("control")
    dns = control.get("dns") if isinstance(control, dict) else None
    addrs = dns.get("addrs") if isinstance(dns, dict) else None
    return [a for a in addrs[:MAX_RESPONSES] if isinstance(a, str) and a] if isinstance(addrs, list) else []


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _same_key(value: str) -> str:
    """Comparable form: ``D0::11`` and ``d0:0::11`` are one address, ``Example.org.`` is ``example.org``."""
    ip = _ip(value)
    return ip.compressed if ip is not None else value.lower().rstrip(".")


def is_bogon(value: str) -> bool:
    """An address no public name resolves to: a block answer only if the control saw a public one."""
    ip = _ip(value)
    return ip is not None and (
        ip.is_private or ip.is_loopback or ip.is_reserved or ip.is_link_local or ip.is_unspecified
    )


def _body_text(body: Any, limit: int = MAX_BODY) -> str:
    limit = min(limit, MAX_BODY)
    if isinstance(body, str):
        return body[:limit]
    if isinstance(body, dict) and body.get("format") == "base64" and isinstance(body.get("data"), str):
        try:
            raw = base64.b64decode(body["data"][: limit * 2], validate=False)
        except (binascii.Error, ValueError):
            return ""
        return raw[:limit].decode("utf-8", errors="replace")[:limit]
    return ""


def _header_value(value: Any) -> str:
    return (_body_text(value, MAX_HEADER_VALUE) or str(value))[:MAX_HEADER_VALUE]


def _headers(response: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    hlist = response.get("headers_list")
    if isinstance(hlist, list):
        for pair in hlist[:MAX_RESPONSES]:
            if isinstance(pair, list | tuple) and len(pair) == 2:
                out.append((str(pair[0])[:MAX_HEADER_VALUE].lower(), _header_value(pair[1])))
        if out:
            return out
    headers = response.get("headers")
    if isinstance(headers, dict):
        for name, value in list(headers.items())[:MAX_RESPONSES]:
            values = value[:MAX_RESPONSES] if isinstance(value, list) else [value]
            out.extend((str(name)[:MAX_HEADER_VALUE].lower(), _header_value(v)) for v in values)
    return out[:MAX_RESPONSES]


def http_responses(raw: Any) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(body text, lower-cased headers) of the first ``MAX_RESPONSES`` HTTP responses
    (``test_keys.requests[].response``), bodies within ``MAX_BODY_TOTAL`` characters together."""
    requests = _test_keys(raw).get("requests")
    left = MAX_BODY_TOTAL
    for request in requests[:MAX_RESPONSES] if isinstance(requests, list) else []:
        response = request.get("response") if isinstance(request, dict) else None
        if isinstance(response, dict):
            body = _body_text(response.get("body"), left) if left > 0 else ""
            left -= len(body)
            yield body, _headers(response)


# -- matching ---------------------------------------------------------------------------------------------


def match_raw(raw: Any, db: FingerprintDB, cc: str | None = None) -> list[Match]:
    """Every fingerprint and local indicator found in a raw measurement, confirming or not."""
    if not cc:
        probe_cc = raw.get("probe_cc") if isinstance(raw, dict) else None
        cc = probe_cc if isinstance(probe_cc, str) else ""
    cc = cc.upper()
    found: list[Match] = []
    local = db.local_dns.get(cc, {})
    control = control_addrs(raw)
    control_keys = {_same_key(a) for a in control}
    control_public = any(_ip(a) is not None and not is_bogon(a) for a in control)

    def answer_counts(answer: str) -> bool:
        """Not what the control got too; a bogon only against a public control answer."""
        if _same_key(answer) in control_keys:
            return False
        return control_public or not is_bogon(answer)

    for answer in dict.fromkeys(dns_answers(raw)):
        key = _same_key(answer)
        if key in local:
            found.append(Match(f"dns:{answer}", "dns", answer, answer_counts(answer)))
        for fp in db.dns.get(key, []):
            found.append(Match(f"ooni:{fp.name}", "dns", answer, fp.confirms(cc) and answer_counts(answer)))
    for body, headers in http_responses(raw):
        for fp in db.http:
            if fp.location == "body":
                if body and fp.matches(body):
                    found.append(Match(f"ooni:{fp.name}", "body", fp.pattern[:80], fp.confirms(cc)))
            elif fp.location.startswith("header."):
                name = fp.location.removeprefix("header.")
                for hname, value in headers:
                    if hname == name and fp.matches(value):
                        found.append(Match(f"ooni:{fp.name}", fp.location, value[:200], fp.confirms(cc)))
    return found


def confirmation(raw: Any, db: FingerprintDB, cc: str | None = None) -> str | None:
    """The ``confirmed_by`` label of the first confirming match, or None."""
    for match in match_raw(raw, db, cc):
        if match.confirmed:
            return match.label
    return None


# -- the poller step --------------------------------------------------------------------------------------


class RawClient(OoniClient):
    """The poller's client for raw bodies: one attempt, a short timeout. A body is a bonus, so a failing
    endpoint must cost a round seconds, not the list client's retries and back-off (20 fetches x 5 attempts).
    It shares the poller client's session and stop event and raises its ``in_request``, so a SIGTERM still
    abandons a raw fetch in flight."""

    def __init__(self, parent: OoniClient) -> None:
        super().__init__(parent.settings, session=parent.session, stop=parent.stop, max_attempts=1)
        self.parent = parent
        self.timeout = min(parent.timeout, RAW_TIMEOUT_SECONDS)

    def _attempt(self, url: str) -> tuple[requests.Response | None, str, str]:
        self.parent.in_request = True
        try:
            return super()._attempt(url)
        finally:
            self.parent.in_request = False


class Enrichment:
    """Confirms anomalies of the configured countries from their raw bodies, at most N fetches per round.

    The first unavailable answer (5xx, 429, timeout, connection error) ends fetching for the round: the rest
    pass unconfirmed, as when the budget is spent, instead of each waiting for the same failure.
    """

    def __init__(self, settings: Settings, client: OoniClient, db: FingerprintDB | None = None) -> None:
        self.section = settings.enrich
        self.countries = {cc.upper() for cc in self.section.countries}
        self.tests = set(self.section.test_names)
        self.client = client
        self.raw_client = RawClient(client)
        self.db = db or packaged_db()
        self.remaining = self.section.max_fetches_per_round

    def begin_round(self) -> None:
        self.remaining = self.section.max_fetches_per_round

    def wanted(self, m: Measurement) -> bool:
        return m.anomaly and not m.confirmed and not m.failure and m.cc in self.countries and m.test_name in self.tests

    def __call__(self, m: Measurement) -> Measurement:
        if not self.wanted(m):
            return m
        if self.remaining <= 0:
            metrics.ENRICHMENTS.labels(outcome="skipped_budget").inc()
            return m
        self.remaining -= 1
        try:
            raw = self.raw_client.raw_measurement(m.uid)
        except ApiUnavailable as exc:
            self.remaining = 0
            metrics.ENRICHMENTS.labels(outcome="failed").inc()
            log.info("%s: raw bodies unavailable (%s); no more fetches this round", m.uid, exc)
            return m
        except OoniError as exc:
            metrics.ENRICHMENTS.labels(outcome="failed").inc()
            log.info("%s: raw body not available for confirmation (%s)", m.uid, exc)
            return m
        label = confirmation(raw, self.db, m.cc)
        if label is None:
            metrics.ENRICHMENTS.labels(outcome="unconfirmed").inc()
            return m
        metrics.ENRICHMENTS.labels(outcome="confirmed").inc()
        log.info("%s %s on AS%d confirmed by %s", m.cc, m.target, m.asn, label)
        return m.model_copy(update={"confirmed": True, "confirmed_by": label})


def enrich_all(measurements: Iterable[Measurement], enrichment: Enrichment) -> list[Measurement]:
    """Convenience for offline use: one round over a batch."""
    enrichment.begin_round()
    return [enrichment(m) for m in measurements]
