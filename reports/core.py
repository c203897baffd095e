"""The pure part: ``ReportInput`` (+ reference lists) -> ``Report`` tables. No I/O, no HTTP, no plotting.

Kept apart from fetchers and renderers so that the three sources give the same tables by construction and the
numbers can be checked against an independent computation without a network or matplotlib.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from urllib.parse import urlencode, urlsplit

from censorwatch.models import EXPLORER
from reports.model import (
    BlockedSite,
    CategoryRow,
    Counts,
    Isp,
    IspRow,
    MonthRow,
    PairEvidence,
    Report,
    ReportInput,
    Rule,
    Summary,
)

UNCATEGORISED = "UNCAT"
MAX_LINKS = 6  # the Explorer chart + a few measurements: enough to check, short enough to print
WEEKLY_AFTER_DAYS = 62  # longer periods chart categories per week, or the lines become noise


@dataclass
class References:
    """Citizen Lab category names, URL -> category lists, an optional watchlist and ASN names."""

    category_names: dict[str, str] = field(default_factory=dict)
    url_category: dict[str, str] = field(default_factory=dict)
    domain_category: dict[str, str] = field(default_factory=dict)
    watch_domains: set[str] | None = None
    watch_urls: dict[str, str] = field(default_factory=dict)  # domain -> first watchlist URL
    asn_names: dict[int, str] = field(default_factory=dict)
    categories: set[str] | None = None  # only these category codes (``--category``)
    home_category: dict[str, str] = field(default_factory=dict)  # domain -> category of its listed home page

    def category_of(self, domain: str, urls: Mapping[str, int] | None = None) -> str | None:
        """One category per website: its most-measured URL's, so a listed sub-page cannot take over a site.

        Every table is per domain (the API's day and ISP axes know only the domain), so a website counts in one
        category. The most-measured URL (ties: the smallest URL) gives it: its own list entry if it is listed,
        else the domain's (see ``domain_default``). Input order of the lists does not matter.
        """
        if urls:
            top = min(urls.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            if top in self.url_category:
                return self.url_category[top]
        return self.domain_default(domain)

    def domain_default(self, domain: str) -> str | None:
        """The domain's category when no listed URL was measured: its home page's entry, else its first entry."""
        return self.home_category.get(domain) or self.domain_category.get(domain)


def domain_of(url: str) -> str:
    """The host OONI keys web measurements on (``urlparse(input).netloc`` lower-cased, without a port)."""
    try:
        host = urlsplit(url.strip()).hostname or ""
    except ValueError:
        return ""
    return host.lower()


def parse_legend(text: str) -> dict[str, str]:
    """``00-LEGEND-category_codes.csv`` (CategoryCode,CategoryName) or the new-codes legend."""
    names: dict[str, str] = {}
    for row in csv.DictReader(io.StringIO(text)):
        code = (row.get("CategoryCode") or row.get("New Code") or "").strip()
        name = (row.get("CategoryName") or row.get("Category Description") or "").strip()
        if code and name and code not in names:
            names[code] = name
    return names


def parse_test_list(text: str) -> list[tuple[str, str]]:
    """A Citizen Lab test list (url,category_code,...) as (url, category_code) pairs."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        url = (row.get("url") or "").strip()
        if url:
            rows.append((url, (row.get("category_code") or "").strip()))
    return rows


def parse_asn_names(text: str) -> dict[int, str]:
    """``asn,name`` or ``isp_name,asn`` CSV; the first name for an ASN wins (verified first)."""
    names: dict[int, str] = {}
    for row in csv.DictReader(io.StringIO(text)):
        raw = (row.get("asn") or "").strip().upper().removeprefix("AS")
        name = (row.get("name") or row.get("isp_name") or "").strip()
        if raw.isdigit() and name and int(raw) not in names:
            names[int(raw)] = name
    return names


def add_test_list(refs: References, rows: Iterable[tuple[str, str]], *, watch: bool = False) -> None:
    """Categories from a test list; with ``watch`` the list also limits the report to its websites."""
    if watch and refs.watch_domains is None:
        refs.watch_domains = set()
    for url, code in rows:
        dom = domain_of(url)
        if not dom:
            continue
        if code:
            refs.url_category.setdefault(url, code)
            refs.domain_category.setdefault(dom, code)
            if _is_home_page(url):
                refs.home_category.setdefault(dom, code)
        if watch and refs.watch_domains is not None:
            refs.watch_domains.add(dom)
            refs.watch_urls.setdefault(dom, url)


def _is_home_page(url: str) -> bool:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    return parts.path in ("", "/") and not parts.query


def explorer_chart_url(cc: str, domain: str, since: date, until: date) -> str:
    """OONI Explorer's chart of the site per ISP and day: the evidence a reader can open and check."""
    query = {
        "probe_cc": cc,
        "test_name": "web_connectivity",
        "domain": domain,
        "since": since.isoformat(),
        "until": (until + timedelta(days=1)).isoformat(),
        "axis_x": "measurement_start_day",
        "axis_y": "probe_asn",
    }
    return f"{EXPLORER}/chart/mat?{urlencode(query)}"


def month_of(day: date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


def week_of(day: date) -> date:
    """Start of the week (Monday) a day falls in: the bucket of the per-category chart for long periods."""
    return day - timedelta(days=day.weekday())


def build_report(inp: ReportInput, refs: References, rule: Rule | None = None) -> Report:
    """All tables for one country and period. Deterministic: rows are sorted, ties broken by name."""
    rule = rule or Rule()
    categories = _categories(inp, refs)

    def kept(domain: str) -> bool:
        if refs.watch_domains is not None and domain not in refs.watch_domains:
            return False
        return refs.categories is None or categories.get(domain, UNCATEGORISED) in refs.categories

    def in_period(day: date) -> bool:
        return inp.since <= day <= inp.until

    day_domain = {k: v for k, v in inp.day_domain.items() if kept(k[1]) and in_period(k[0])}
    pairs = {k: v for k, v in inp.pairs.items() if kept(k[0])}
    names = {**refs.asn_names, **{a: n for a, n in inp.asn_names.items() if n}}

    # totals, per day, per month
    daily: dict[date, Counts] = defaultdict(Counts)
    per_domain: dict[str, Counts] = defaultdict(Counts)
    for (day, dom), c in day_domain.items():
        daily[day].add(c)
        per_domain[dom].add(c)
    months: dict[str, Counts] = defaultdict(Counts)
    for day, c in daily.items():
        months[month_of(day)].add(c)
    total = Counts()
    for c in daily.values():
        total.add(c)

    # per category
    cat_counts: dict[str, Counts] = defaultdict(Counts)
    cat_sites: dict[str, set[str]] = defaultdict(set)
    for dom, c in per_domain.items():
        if c.measurement_count == 0:
            continue
        code = categories.get(dom, UNCATEGORISED)
        cat_counts[code].add(c)
        cat_sites[code].add(dom)
    category_rows = [
        CategoryRow(code, _category_name(code, refs), len(cat_sites[code]), c.measurement_count, c.blocked)
        for code, c in cat_counts.items()
    ]
    category_rows.sort(key=lambda r: (-r.measurements, r.code))

    # anomaly share per category over time
    span = (inp.until - inp.since).days + 1
    grain = "week" if span > WEEKLY_AFTER_DAYS else "day"
    series: dict[str, dict[date, Counts]] = defaultdict(lambda: defaultdict(Counts))
    for (day, dom), c in day_domain.items():
        bucket = week_of(day) if grain == "week" else day
        series[categories.get(dom, UNCATEGORISED)][bucket].add(c)

    # blocked websites and ISPs
    blocking: dict[tuple[str, int], PairEvidence] = {}
    for key, ev in pairs.items():
        decided = ev.decided if ev.decided is not None else rule.blocked(ev.counts)
        if decided:
            blocking[key] = ev
    by_site: dict[str, list[tuple[int, PairEvidence]]] = defaultdict(list)
    for (dom, asn), ev in blocking.items():
        by_site[dom].append((asn, ev))
    blocked_sites: list[BlockedSite] = []
    for dom, evs in by_site.items():
        evs.sort()
        methods: Counter[str] = Counter()
        firsts = [ev.first for _, ev in evs if ev.first is not None]
        lasts = [ev.last for _, ev in evs if ev.last is not None]
        links: list[str] = [
            explorer_chart_url(inp.cc, raw, inp.since, inp.until) for raw in inp.domain_spellings.get(dom, [dom])
        ]
        links.extend(x for x in inp.site_links.get(dom, []) if x not in links)
        for _, ev in evs:
            methods.update(ev.methods)
            links.extend(x for x in ev.links if x not in links)
        blocked_sites.append(
            BlockedSite(
                domain=dom,
                url=_site_url(dom, inp, refs),
                category=categories.get(dom, UNCATEGORISED),
                isps=tuple(Isp(asn, names.get(asn, "")) for asn, _ in evs),
                methods=tuple(m for m, _ in sorted(methods.items(), key=lambda kv: (-kv[1], kv[0]))),
                first=min(firsts) if firsts else None,
                last=max(lasts) if lasts else None,
                measurements=sum(ev.counts.measurement_count for _, ev in evs),
                blocked_measurements=sum(ev.counts.blocked for _, ev in evs),
                links=tuple(links[:MAX_LINKS]),
            )
        )
    blocked_sites.sort(key=lambda s: (-len(s.isps), -s.blocked_measurements, s.domain))

    isp_sites: dict[int, set[str]] = defaultdict(set)
    isp_methods: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for (dom, asn), ev in blocking.items():
        isp_sites[asn].add(dom)
        for m in ev.methods:
            isp_methods[asn][m].add(dom)
        if not ev.methods:
            isp_methods[asn]["unknown"].add(dom)
    isp_rows = [
        IspRow(
            Isp(asn, names.get(asn, "")),
            len(sites),
            tuple(sorted(((m, len(d)) for m, d in isp_methods[asn].items()), key=lambda kv: (-kv[1], kv[0]))),
        )
        for asn, sites in isp_sites.items()
    ]
    isp_rows.sort(key=lambda r: (-r.websites_blocked, r.isp.asn))

    tested_asns = {asn for (_, asn), ev in pairs.items() if ev.counts.measurement_count > 0}
    summary = Summary(
        measurements=total.measurement_count if inp.has_totals else None,
        websites=sum(1 for c in per_domain.values() if c.measurement_count > 0) if inp.has_totals else None,
        isps=len(tested_asns) if inp.has_totals else None,
        blocked_websites=len(blocked_sites),
        blocking_isps=len(isp_rows),
    )
    notes = list(inp.notes)
    if refs.watch_domains is not None:
        notes.append(f"Limited to the {len(refs.watch_domains)} websites of the watchlist.")
    return Report(
        cc=inp.cc,
        since=inp.since,
        until=inp.until,
        source=inp.source,
        simulated=inp.simulated,
        summary=summary,
        categories=category_rows if inp.has_totals else [],
        months=[MonthRow(m, months[m]) for m in sorted(months)] if inp.has_totals else [],
        blocked=blocked_sites,
        isps=isp_rows,
        daily=sorted(daily.items()),
        category_series={code: sorted(b.items()) for code, b in sorted(series.items())},
        series_grain=grain,
        matrix={k: ev.counts.blocked for k, ev in blocking.items()},
        rule=rule,
        notes=notes,
        has_totals=inp.has_totals,
    )


def _categories(inp: ReportInput, refs: References) -> dict[str, str]:
    """Category per website: reference lists first (they name the URL tested), then the source."""
    out: dict[str, str] = {}
    domains = {d for _, d in inp.day_domain} | {d for d, _ in inp.pairs} | set(inp.domain_category)
    for dom in domains:
        code = refs.category_of(dom, inp.domain_urls.get(dom)) or inp.domain_category.get(dom)
        out[dom] = code or UNCATEGORISED
    return out


def _category_name(code: str, refs: References) -> str:
    if code == UNCATEGORISED:
        return "Not in the test lists"
    return refs.category_names.get(code, code)


def _site_url(domain: str, inp: ReportInput, refs: References) -> str:
    if domain in refs.watch_urls:
        return refs.watch_urls[domain]
    urls = inp.domain_urls.get(domain)
    if urls:
        return sorted(urls.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return domain
