"""Confirmed evidence from raw measurement bodies: block-page and DNS fingerprints, Cambodia's included.

OONI marks a measurement ``confirmed`` only when one of its fingerprints matches, and its list has no
Cambodian entries, yet Cambodian ISPs answered blocked names with known addresses
(``kh_dns_blocking_indicators.csv``). A single confirmed measurement is strong evidence
(``../shared/docs/lessons.md``), so for anomalous measurements of the configured countries the poller fetches
the raw body (``/api/v1/raw_measurement``, within a budget per round, because each fetch costs API quota) and
matches it here. The matcher is pure: ``match_raw`` and ``confirmation`` take a parsed body.

OONI's rule (fastpath ``match_fingerprints`` / ``is_confirmed``): DNS answers equal to a DNS pattern; HTTP
body ``contains`` and header ``full``/``prefix``/``contains`` patterns on every response; a match confirms
when the probe's country is in ``expected_countries`` or the scope is ``isp`` or ``nat``. ``regexp``
patterns are not used (the fastpath does not use them either).
"""

from __future__ import annotations

import base64
import binascii
import csv
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from censorwatch.config import Settings
from censorwatch.models import Measurement
from services import metrics
from services.ooni_client import OoniClient, OoniError

log = logging.getLogger(__name__)

CONFIRMING_SCOPES = frozenset({"isp", "nat"})
BLOCKING_WORDS = ("blocking", "confirmed", "likely", "bogon")
MAX_BODY = 1 << 20  # match at most the first MiB of a body


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
        """OONI's ``is_confirmed``: the country expects it, or it is an ISP- or country-wide block page."""
        return cc in self.expected_countries or self.scope in CONFIRMING_SCOPES

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
        db = cls(local_dns=dict(local or {}))
        for kind in ("dns", "http"):
            for row in ooni.get(kind, []):
                fp = _fingerprint(row)
                if fp.location == "dns":
                    db.dns.setdefault(fp.pattern, []).append(fp)
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
    for query in queries if isinstance(queries, list) else []:
        answers = query.get("answers") if isinstance(query, dict) else None
        for answer in answers if isinstance(answers, list) else []:
            if not isinstance(answer, dict):
                continue
            for key in ("ipv4", "ipv6", "hostname"):
                value = answer.get(key)
                if isinstance(value, str) and value:
                    out.append(value)
    return out


def _body_text(body: Any) -> str:
    if isinstance(body, str):
        return body[:MAX_BODY]
    if isinstance(body, dict) and body.get("format") == "base64" and isinstance(body.get("data"), str):
        try:
            raw = base64.b64decode(body["data"][: MAX_BODY * 2], validate=False)
        except (binascii.Error, ValueError):
            return ""
        return raw[:MAX_BODY].decode("utf-8", errors="replace")
    return ""


def _headers(response: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    hlist = response.get("headers_list")
    if isinstance(hlist, list):
        for pair in hlist:
            if isinstance(pair, list | tuple) and len(pair) == 2:
                out.append((str(pair[0]).lower(), _body_text(pair[1]) or str(pair[1])))
        if out:
            return out
    headers = response.get("headers")
    if isinstance(headers, dict):
        for name, value in headers.items():
            values = value if isinstance(value, list) else [value]
            out.extend((str(name).lower(), _body_text(v) or str(v)) for v in values)
    return out


def http_responses(raw: Any) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(body text, lower-cased headers) of every HTTP response (``test_keys.requests[].response``)."""
    requests = _test_keys(raw).get("requests")
    for request in requests if isinstance(requests, list) else []:
        response = request.get("response") if isinstance(request, dict) else None
        if isinstance(response, dict):
            yield _body_text(response.get("body")), _headers(response)


# -- matching ---------------------------------------------------------------------------------------------


def match_raw(raw: Any, db: FingerprintDB, cc: str | None = None) -> list[Match]:
    """Every fingerprint and local indicator found in a raw measurement, confirming or not."""
    cc = (cc or (raw.get("probe_cc") if isinstance(raw, dict) else None) or "").upper()
    found: list[Match] = []
    local = db.local_dns.get(cc, {})
    for answer in dict.fromkeys(dns_answers(raw)):
        if answer in local:
            found.append(Match(f"dns:{answer}", "dns", answer, True))
        for fp in db.dns.get(answer, []):
            found.append(Match(f"ooni:{fp.name}", "dns", answer, fp.confirms(cc)))
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


class Enrichment:
    """Confirms anomalies of the configured countries from their raw bodies, at most N fetches per round."""

    def __init__(self, settings: Settings, client: OoniClient, db: FingerprintDB | None = None) -> None:
        self.section = settings.enrich
        self.countries = {cc.upper() for cc in self.section.countries}
        self.tests = set(self.section.test_names)
        self.client = client
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
            raw = self.client.raw_measurement(m.uid)
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
