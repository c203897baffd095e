"""``censorwatch simulate SCENARIO``: a SIMULATED measurement stream (canonical list-item JSONL) from a scenario.

No per-measurement Cambodian data is public, so drills and the election backtest run on a stream generated from
what the seed report documents: which sites were blocked, on which ISPs, from when, by which method, and how many
measurements each category got. Everything it writes is simulated and marked so: every ``measurement_uid`` ends
in ``_sim<hex>`` (the engine flags events built on it ``simulated=True``) and the summary says SIMULATED.

Model (documented in docs/detection.md): probe runs arrive per ISP at a rate proportional to an ISP weight; each
run tests each site with a probability calibrated so a site gets its category's measurements per day; a run is
one ``report_id`` (one probe) testing several sites, as OONI Probe does. Blocked (site, ISP) pairs answer
anomalous with ``blocked_share`` probability, with the ISP's method (DNS or TCP); everything else is anomalous at
the background rate. Only ISPs with a known ASN are simulated (unknown ones are left out, never invented).
Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import yaml

SIMULATED = "SIMULATED"
CATEGORY_CODES = {
    "news": ["NEWS"],
    "social media": ["GRP"],
    "social network": ["GRP"],
    "human rights issues": ["HUMR"],
    "government, election, or politician": ["GOVT", "POLR"],
}
# Relative share of probe runs per ISP. An assumption: the seed's monitoring was a campaign (OONI Run links sent
# to volunteers on each ISP), so every ISP tested regularly; the big mobile networks somewhat more. Unlisted = 0.09.
ISP_WEIGHTS = {38623: 0.16, 17976: 0.16, 45498: 0.16}
DEFAULT_WEIGHT = 0.09
# The campaign focused on the sites known to be blocked: they get this many times their category's average (the
# category totals stay close to the seed's, as the other sites of the category then get a little less).
BLOCKED_FOCUS = 2.0


@dataclass
class Site:
    url: str
    category: str
    per_day: float  # expected measurements per day across all ISPs
    blocked_asns: set[int] = field(default_factory=set)
    onset: datetime | None = None  # blocked from (None = never)
    only_day: datetime | None = None  # measured on this day only
    tested_from: datetime | None = None


@dataclass
class Scenario:
    cc: str
    start: datetime
    end: datetime
    asns: dict[int, str]
    sites: list[Site]
    background: float
    methods: list[str]


def _day(text: str) -> datetime:
    return datetime.strptime(text.strip()[:10], "%Y-%m-%d").replace(tzinfo=UTC)


def _domain(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def load_scenario(path: Path, test_lists: list[Path], seed: int) -> Scenario:
    """Read the scenario YAML; fill the unblocked sites of each category from Citizen Lab test lists."""
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    rng = random.Random(f"{seed}:sites")
    cc = str(doc["country"]).upper()
    mon = doc["monitoring"]
    start, end = _day(mon["start"]), _day(mon["end"]) + timedelta(days=1)
    days = (end - start).days
    isps: dict[str, int | None] = {name: (v or {}).get("asn") for name, v in doc.get("isps", {}).items()}
    asns = {int(a): name for name, a in reversed(list(isps.items())) if a}
    rates = {c["name"].lower(): c["measurements"] / max(1, c["sites"]) / days for c in doc.get("categories", [])}
    sites: list[Site] = []
    for b in doc.get("blocked", []):
        onset_text = str(b.get("onset", ""))
        only = None
        if "before monitoring" in onset_text:
            onset = start - timedelta(days=1)
        elif ".." in onset_text:
            onset = _day(onset_text.split("..")[1])  # the persistent anomalies OONI saw (latest of the bracket)
        elif "only" in onset_text:
            onset = only = _day(onset_text.split("on ", 1)[1])
        else:  # undocumented ("during the period"): the week before polling day, when the orders went out
            onset = _day(str(mon.get("polling_day", mon["start"]))) - timedelta(days=7)
        code = str(b.get("category", "NEWS")).upper()
        rate = rates.get("news", 2.0) if code == "NEWS" else rates.get("human rights issues", 1.5)
        rate *= BLOCKED_FOCUS
        note = str(b.get("note", ""))
        tested_from = _day(note.split("from about ")[1].split(" ")[0]) if "tested from about" in note else None
        blocked = {isps[i] for i in b.get("isps", []) if isps.get(i)}
        sites.append(Site(b["url"], code, rate, {int(a) for a in blocked if a}, onset, only, tested_from))
    taken = {_domain(s.url) for s in sites}
    pool: dict[str, list[str]] = {}
    for tl in test_lists:
        with open(tl, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                domain = _domain(row.get("url") or "")
                if domain and domain not in taken:
                    pool.setdefault((row.get("category_code") or "").upper(), []).append(row["url"])
    for c in doc.get("categories", []):
        name = c["name"].lower()
        codes = CATEGORY_CODES.get(name, [])
        have = sum(1 for s in sites if s.category in codes)
        candidates = sorted({u for code in codes for u in pool.get(code, [])})
        for url in rng.sample(candidates, k=min(len(candidates), max(0, int(c["sites"]) - have))):
            taken.add(_domain(url))
            sites.append(Site(url, codes[0], rates[name]))
    bg = doc.get("background", {})
    return Scenario(
        cc,
        start,
        end,
        asns,
        sites,
        float(bg.get("anomaly_share_unblocked_sites", 0.03)),
        [m for m in bg.get("blocking_methods_seen", ["dns", "tcp_ip"])],
    )


def generate(
    sc: Scenario, seed: int, *, runs_per_day: float = 10.0, blocked_share: float = 0.9, failure_share: float = 0.02
) -> Iterator[dict[str, Any]]:
    """List items in start-time order (OONI's list endpoint order)."""
    rng = random.Random(seed)
    weights = {asn: ISP_WEIGHTS.get(asn, DEFAULT_WEIGHT) for asn in sc.asns}
    total_w = sum(weights.values())
    method = {asn: sc.methods[i % len(sc.methods)] for i, asn in enumerate(sorted(sc.asns))}
    items: list[dict[str, Any]] = []
    day = sc.start
    while day < sc.end:
        for asn, w in sorted(weights.items()):
            n_runs = _poisson(rng, runs_per_day * w / total_w)
            if any(s.only_day == day and asn in s.blocked_asns for s in sc.sites):
                n_runs = max(n_runs, 5)  # a one-day campaign (OONI Run) on that network
            for _ in range(n_runs):
                t = day + timedelta(seconds=rng.randrange(86400))
                run = f"{rng.getrandbits(64):016x}"
                for i, site in enumerate(sc.sites):
                    if not _tested(site, day):
                        continue
                    p = site.per_day / runs_per_day
                    if site.only_day is not None:
                        p = 1.0 if asn in site.blocked_asns else 0.0
                    if rng.random() >= p:
                        continue
                    items.append(
                        _item(
                            sc,
                            site,
                            asn,
                            t + timedelta(seconds=7 * i),
                            run,
                            rng,
                            method[asn],
                            blocked_share,
                            failure_share,
                        )
                    )
        day += timedelta(days=1)
    items.sort(key=lambda it: (it["measurement_start_time"], it["measurement_uid"]))
    yield from items


def _tested(site: Site, day: datetime) -> bool:
    if site.only_day is not None:
        return day == site.only_day
    return site.tested_from is None or day >= site.tested_from


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: fine for the small rates here.
    limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _item(
    sc: Scenario,
    site: Site,
    asn: int,
    t: datetime,
    run: str,
    rng: random.Random,
    method: str,
    blocked_share: float,
    failure_share: float,
) -> dict[str, Any]:
    recv = t + timedelta(seconds=rng.randrange(5, 600))
    uid = f"{recv:%Y%m%d%H%M%S.%f}_{sc.cc}_webconnectivity_sim{rng.getrandbits(48):012x}"
    blocked = site.onset is not None and t >= site.onset and asn in site.blocked_asns
    failure = rng.random() < failure_share
    anomaly = not failure and rng.random() < (blocked_share if blocked else sc.background)
    btype = (method if blocked else rng.choice(["dns", "tcp_ip", "http-failure", "http-diff"])) if anomaly else None
    scores: dict[str, Any] = {
        "blocking_general": 1.0 if anomaly else 0.0,
        "blocking_global": 0.0,
        "blocking_country": 0.0,
        "blocking_isp": 0.0,
        "blocking_local": 0.0,
    }
    if btype:
        scores["analysis"] = {"blocking_type": btype}
    if failure:
        scores["accuracy"] = 0.0
    return {
        "measurement_uid": uid,
        "report_id": f"{t:%Y%m%dT%H%M%SZ}_webconnectivity_{sc.cc}_{asn}_n1_sim{run}",
        "probe_cc": sc.cc,
        "probe_asn": f"AS{asn}",
        "test_name": "web_connectivity",
        "measurement_start_time": f"{t:%Y-%m-%dT%H:%M:%S}.000000Z",
        "input": site.url,
        "anomaly": anomaly,
        "confirmed": False,
        "failure": failure,
        "scores": scores,
        "measurement_url": None,
    }


def simulate(scenario: Path, seed: int = 1, test_lists: list[Path] | None = None) -> list[dict[str, Any]]:
    """The whole SIMULATED stream for a scenario, as list items."""
    return list(generate(load_scenario(scenario, test_lists or [], seed), seed))


def build_parser(sub: Any) -> None:
    """Register ``simulate`` on the censorwatch CLI."""
    p = sub.add_parser("simulate", help="write a SIMULATED measurement stream (JSONL) from a scenario YAML")
    p.add_argument("scenario", type=Path, metavar="SCENARIO")
    p.add_argument("--out", type=Path, help="JSONL file to write (default: stdout)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--test-list",
        type=Path,
        action="append",
        default=[],
        help="Citizen Lab CSV to draw the unblocked sites of each category from (repeatable)",
    )
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    sc = load_scenario(args.scenario, args.test_list, args.seed)
    out = args.out.open("wb") if args.out else sys.stdout.buffer
    n = 0
    try:
        for item in generate(sc, args.seed):
            out.write(orjson.dumps(item) + b"\n")
            n += 1
    finally:
        if args.out:
            out.close()
    blocked = sum(1 for s in sc.sites if s.blocked_asns)
    print(
        f"{SIMULATED} data: {n} measurements, {len(sc.sites)} sites ({blocked} blocked), "
        f"{len(sc.asns)} ISPs with known ASNs, {sc.cc} {sc.start:%Y-%m-%d}..{sc.end:%Y-%m-%d}, seed {args.seed}"
        " — not real OONI measurements",
        file=sys.stderr,
    )
    return 0
