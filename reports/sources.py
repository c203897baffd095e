"""The three ways to get a ``ReportInput``: the OONI aggregation API, an event log, recorded measurements.

Each returns the same partial aggregates (``reports.model.ReportInput``); nothing here decides what is blocked
(except that events arrive already decided by the detection engine).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from censorwatch.models import Event, EventKind, Outcome
from reports.core import References, domain_of
from reports.model import Counts, PairEvidence, ReportInput, Rule, method_name
from services.normalise import NormaliseError, normalise

log = logging.getLogger(__name__)

AGGREGATION_PATH = "/api/v1/aggregation"
WEB_TEST = "web_connectivity"
LINKS_PER_PAIR = 3
MAX_DETAIL_DOMAINS = 60  # per-site follow-up queries (methods, period); each costs API quota
_CATEGORY = re.compile(r"^[A-Z]+$")

GetJson = Callable[[str, Mapping[str, Any]], Any]


class SourceError(ValueError):
    """Input that cannot give a report (a refused query, a malformed answer); ``str(exc)`` says why."""


# ---- recorded measurements -----------------------------------------------------------------------


def iter_json_items(paths: Iterable[Path]) -> Iterator[tuple[str, Any]]:
    """(where, item) for each JSONL line; a line holding a saved API page yields its ``results``."""
    for path in paths:
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{lineno}"
                try:
                    data = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    yield where, SourceError(f"not JSON ({exc.msg})")
                    continue
                if isinstance(data, dict) and isinstance(data.get("body"), dict):
                    data = data["body"]  # recorded answer wrapper
                if isinstance(data, dict) and isinstance(data.get("results"), list):
                    for item in data["results"]:
                        yield where, item
                else:
                    yield where, data


def from_measurements(items: Iterable[tuple[str, Any]], cc: str, since: date, until: date) -> ReportInput:
    """Aggregate list items (or fastpath rows) of ``web_connectivity`` in the country and period.

    Items are normalised with ``services.normalise`` and de-duplicated on ``measurement_uid``; items that
    do not normalise are counted in a note, as the stream would dead-letter them. If none normalises, the input
    is not measurements at all (an event log, a wrong file): ``SourceError``, not a report of "0 blocked".
    """
    inp = ReportInput(cc=cc, since=since, until=until, source="recorded measurements")
    seen: set[str] = set()
    bad = dupes = read = 0
    for where, item in items:
        if isinstance(item, Exception):
            bad += 1
            log.debug("%s: %s", where, item)
            continue
        try:
            m = normalise(item)
        except NormaliseError as exc:
            bad += 1
            log.debug("%s: %s", where, exc)
            continue
        read += 1
        if m.simulated or (isinstance(item, dict) and item.get("simulated")):
            inp.simulated = True
        day = m.start_time.date()
        if m.cc != cc or m.test_name != WEB_TEST or not since <= day <= until:
            continue
        if m.uid in seen:
            dupes += 1
            continue
        seen.add(m.uid)
        outcome = m.outcome.value
        dom = m.target
        inp.day_domain.setdefault((day, dom), Counts()).add_outcome(outcome)
        inp.domain_urls.setdefault(dom, Counter())[m.input or dom] += 1
        ev = inp.pairs.setdefault((dom, m.asn), PairEvidence())
        ev.counts.add_outcome(outcome)
        if m.outcome in (Outcome.ANOMALY, Outcome.CONFIRMED):
            ev.see(day)
            method = method_name(m.blocking_type)
            if method:
                ev.methods[method] += 1
            if len(ev.links) < LINKS_PER_PAIR:
                ev.links.append(m.explorer_url)
    if bad and not read:
        raise SourceError(
            f"none of the {bad} input items could be read as a measurement (an event log? --source events)"
        )
    if bad:
        inp.notes.append(f"{bad} input lines could not be read as measurements and were skipped.")
    if dupes:
        inp.notes.append(f"{dupes} duplicate measurements (same measurement_uid) were counted once.")
    return inp


# ---- event log -----------------------------------------------------------------------------------


def iter_events(paths: Iterable[Path]) -> Iterator[Event | SourceError]:
    """Events from JSONL (one ``Event`` JSON per line, as on the events topic)."""
    for where, data in iter_json_items(paths):
        if isinstance(data, Exception):
            yield SourceError(f"{where}: {data}")
            continue
        try:
            yield Event.model_validate(data)
        except ValueError as exc:
            yield SourceError(f"{where}: not an Event ({str(exc).splitlines()[0]})")


def from_events(events: Iterable[Event | SourceError], cc: str, since: date, until: date) -> ReportInput:
    """Blocked websites and ISPs as the detection engine saw them; no totals (an event log has none).

    An event is a sequence of versions; a network counts as blocking if any version in the period showed it
    blocked, with the evidence of its latest such version and the earliest/latest evidence over all of them.
    If no line is an event, the input is something else (measurements, a wrong file): ``SourceError``.
    """
    inp = ReportInput(cc=cc, since=since, until=until, source="event log", has_totals=False)
    inp.notes.append("An event log records only what the detection engine found: no totals, categories or months.")
    bad = read = 0
    versions: dict[str, list[Event]] = {}
    for ev in events:
        if isinstance(ev, SourceError):
            bad += 1
            continue
        read += 1
        if ev.kind != EventKind.TARGET_BLOCKED or ev.cc != cc or not ev.target:
            continue
        if ev.test_name and ev.test_name != WEB_TEST:
            continue
        versions.setdefault(ev.event_id, []).append(ev)
    for evs in versions.values():
        evs.sort(key=lambda e: e.version)
        for ev in evs:
            inp.simulated = inp.simulated or ev.simulated
            dom = ev.target
            if ev.category:
                inp.domain_category[dom] = ev.category
            for a in ev.asns:
                if a.state != "blocked":
                    continue
                first = _day(a.first_seen or ev.first_seen)
                last = _day(a.last_seen or ev.last_seen) or first
                if first is None or last is None or last < since or first > until:
                    continue
                pair = inp.pairs.setdefault((dom, a.asn), PairEvidence(decided=True))
                pair.counts = Counts(
                    measurement_count=a.total + a.failures,
                    ok_count=max(0, a.total - a.blocked),
                    anomaly_count=max(0, a.blocked - a.confirmed),
                    confirmed_count=a.confirmed,
                    failure_count=a.failures,
                )
                pair.see(max(first, since))
                pair.see(min(last, until))
                pair.methods.update({m: 1 for m in {method_name(x) for x in a.methods or ev.methods} if m})
                if a.name:
                    inp.asn_names[a.asn] = a.name
            links = inp.site_links.setdefault(dom, [])
            links.extend(x for x in ev.explorer_links if x not in links)
    if bad and not read:
        raise SourceError(
            f"none of the {bad} input lines could be read as an event (measurements? --source measurements)"
        )
    if bad:
        inp.notes.append(f"{bad} event log lines could not be read as events and were skipped.")
    return inp


def _day(value: datetime | None) -> date | None:
    return value.date() if value is not None else None


# ---- aggregation API -----------------------------------------------------------------------------


def allowed_time_grains(since: date, until_exclusive: date) -> list[str]:
    """The grains the API accepts for a span (<=7 d hour/day; <=30 d day/week; <=365 d +month; +year)."""
    days = (until_exclusive - since).days
    if days <= 7:
        return ["hour", "day"]
    if days <= 30:
        return ["day", "week"]
    if days <= 365:
        return ["day", "week", "month"]
    return ["day", "week", "month", "year"]


class AggregationSource:
    """Builds a ``ReportInput`` from ``/api/v1/aggregation`` with a handful of two-axis queries.

    ``get_json(path, params)`` is ``OoniClient.get_json`` in production (back-off, quota) and anything
    equivalent in tests. ``since``/``until`` are inclusive dates; the API's ``until`` is exclusive, so it gets
    the next day.
    """

    def __init__(
        self,
        get_json: GetJson,
        cc: str | None,
        since: date,
        until: date,
        *,
        test_name: str = WEB_TEST,
        category: str | None = None,
    ) -> None:
        if category is not None and not _CATEGORY.match(category):
            raise SourceError(f"category_code must be upper-case letters, got {category!r}")
        if until < since:
            raise SourceError(f"--until {until} is before --since {since}")
        self.get_json = get_json
        self.cc = cc
        self.since = since
        self.until = until
        self.test_name = test_name
        self.category = category
        self.requests = 0

    def params(self, axis_x: str | None, axis_y: str | None = None, **extra: str) -> dict[str, str]:
        until_exclusive = self.until + timedelta(days=1)
        params: dict[str, str] = {
            "test_name": self.test_name,
            "since": self.since.isoformat(),
            "until": until_exclusive.isoformat(),
        }
        if self.cc:
            params["probe_cc"] = self.cc
        if self.category:
            params["category_code"] = self.category
        if axis_x:
            params["axis_x"] = axis_x
        if axis_y:
            params["axis_y"] = axis_y
        if "measurement_start_day" in (axis_x, axis_y):
            grain = extra.pop("time_grain", "day")
            if grain not in allowed_time_grains(self.since, until_exclusive):
                raise SourceError(f"time_grain {grain} is not allowed for this period by the API")
            params["time_grain"] = grain
        params.update(extra)
        return params

    def query(self, axis_x: str | None, axis_y: str | None = None, **extra: str) -> list[dict[str, Any]]:
        """One aggregation request; the result rows (a single object is returned as one row)."""
        params = self.params(axis_x, axis_y, **extra)
        self.requests += 1
        data = self.get_json(AGGREGATION_PATH, params)
        if not isinstance(data, dict) or "result" not in data:
            raise SourceError(f"aggregation answer has no 'result' ({_brief(data)})")
        result = data["result"]
        if isinstance(result, dict):
            result = [result]
        if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
            raise SourceError("aggregation 'result' is not a list of objects")
        return result

    def daily_totals(self) -> list[tuple[date, Counts]]:
        """Per-day counters for the whole country (no axis but the day): a cross-check of the domain query."""
        return sorted(
            (_parse_day(r["measurement_start_day"]), Counts.from_row(r)) for r in self.query("measurement_start_day")
        )

    def fetch(self, refs: References | None = None, rule: Rule | None = None) -> ReportInput:
        rule = rule or Rule()
        refs = refs or References()
        inp = ReportInput(cc=self.cc or "", since=self.since, until=self.until, source="OONI aggregation API")
        for r in self.query("measurement_start_day", "domain"):
            dom = self._domain(r, inp)
            if dom:
                inp.day_domain.setdefault((_parse_day(r["measurement_start_day"]), dom), Counts()).add(
                    Counts.from_row(r)
                )
        best: dict[str, tuple[int, str]] = {}
        for r in self.query("input", "category_code"):
            url = str(r.get("input") or "")
            dom = domain_of(url)
            if not dom:
                continue
            n = Counts.from_row(r).measurement_count
            inp.domain_urls.setdefault(dom, Counter())[url] += n
            code = str(r.get("category_code") or "")
            if code and n > best.get(dom, (-1, ""))[0]:
                best[dom] = (n, code)
        inp.domain_category = {d: code for d, (_, code) in best.items()}
        for r in self.query("domain", "probe_asn"):
            dom = self._domain(r, inp)
            asn = _asn(r.get("probe_asn"))
            if dom and asn:
                inp.pairs.setdefault((dom, asn), PairEvidence()).counts.add(Counts.from_row(r))
        candidates = sorted({d for (d, _), ev in inp.pairs.items() if rule.blocked(ev.counts) and _watched(d, refs)})
        if len(candidates) > MAX_DETAIL_DOMAINS:
            inp.notes.append(
                f"{len(candidates)} websites look blocked; methods and periods were fetched for the first "
                f"{MAX_DETAIL_DOMAINS} only (API quota)."
            )
            candidates = candidates[:MAX_DETAIL_DOMAINS]
        for dom in candidates:
            for raw in inp.domain_spellings.get(dom, [dom]):  # the API filters on its own spelling
                for r in self.query("probe_asn", "blocking_type", domain=raw):
                    ev = inp.pairs.get((dom, _asn(r.get("probe_asn"))))
                    method = method_name(str(r.get("blocking_type") or ""))
                    n = Counts.from_row(r).blocked
                    if ev is not None and method and n:
                        ev.methods[method] += n
                for r in self.query("measurement_start_day", "probe_asn", domain=raw):
                    ev = inp.pairs.get((dom, _asn(r.get("probe_asn"))))
                    if ev is not None and Counts.from_row(r).blocked:
                        ev.see(_parse_day(r["measurement_start_day"]))
        return inp

    @staticmethod
    def _domain(row: Mapping[str, Any], inp: ReportInput) -> str:
        """The row's ``domain`` as a key (lower case, no port), remembering the API's spelling for queries.

        The API's ``domain`` is the URL's netloc as measured (``www.mmpeaceMonitor.org``, ``example.org:8080``);
        the test lists and the other sources key on the lower-cased hostname.
        """
        raw = str(row.get("domain") or "").strip()
        key = domain_key(raw)
        if key:
            spellings = inp.domain_spellings.setdefault(key, [])
            if raw not in spellings:
                spellings.append(raw)
        return key


def domain_key(netloc: str) -> str:
    """``Host:port`` as the lower-cased hostname the lists key on (``domain_of`` for a bare netloc)."""
    return domain_of(f"//{netloc}") or netloc.strip().lower()


def _watched(domain: str, refs: References) -> bool:
    return refs.watch_domains is None or domain in refs.watch_domains


def _asn(value: Any) -> int:
    text = str(value or "").upper().removeprefix("AS")
    return int(text) if text.isdigit() else 0


def _parse_day(value: Any) -> date:
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        raise SourceError(f"measurement_start_day is not a date: {str(value)[:30]!r}") from None


def _brief(data: Any) -> str:
    text = orjson.dumps(data).decode() if not isinstance(data, bytes) else data.decode("utf-8", "replace")
    return text[:120]
