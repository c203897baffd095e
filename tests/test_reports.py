"""Reports: each number checked against a plain csv/json computation, and sources against each other.

Data: OONI, CC BY-NC-SA 4.0 (Kenya JSONL, recorded aggregation answers).
Test lists: Citizen Lab, CC BY-NC-SA 4.0.
Sinar Project / iMAP aggregates (2024 annual report data) for the Cambodian yearly totals.
"""

from __future__ import annotations

import base64
import csv
import json
from collections import Counter, defaultdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from censorwatch.cli import build_parser, main
from censorwatch.config import load_settings
from censorwatch.models import AsnEvidence, Event, EventAction, EventKind
from reports import render
from reports.charts import all_charts
from reports.cli import references
from reports.core import References, add_test_list, build_report, parse_test_list
from reports.model import Rule
from reports.sources import AggregationSource, SourceError, from_events, from_measurements, iter_json_items
from services.ooni_client import ClientError, OoniClient
from tests.test_reports_support import (
    KH_YEAR_ASNS,
    KH_YEAR_DOMAINS,
    FakeAggregationApi,
    recorded_answer,
    rows_from_measurements,
    rows_from_sinar_daily,
    rows_from_sinar_quarters,
)

KE = "events/ke-webconnectivity-telegram-2023.jsonl"
KE_SINCE, KE_UNTIL = date(2023, 10, 15), date(2023, 11, 29)


def client_for(api: FakeAggregationApi) -> OoniClient:
    return OoniClient(load_settings(ooni_api_url=api.base_url), max_attempts=1)


def refs_with(shared: Path, *lists: str) -> References:
    args = build_parser().parse_args(["report", "--country", "XX", "--since", "2020-01-01", "--until", "2020-01-02"])
    refs = references(args)
    for name in lists:
        add_test_list(refs, parse_test_list((shared / "test-lists" / name).read_text(encoding="utf-8")))
    return refs


def plain_kenya(shared: Path) -> dict[str, Any]:
    """The Kenya tables recomputed with json/csv only: OONI's disjoint classes and the report's pair rule."""
    items = [json.loads(x) for x in (shared / KE).read_text(encoding="utf-8").splitlines() if x.strip()]
    months: dict[str, Counter[str]] = defaultdict(Counter)
    pair: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    pair_days: dict[tuple[str, str], list[str]] = defaultdict(list)
    pair_methods: dict[tuple[str, str], set[str]] = defaultdict(set)
    domains, asns = set(), set()
    for it in items:
        cls = "failure" if it["failure"] else "confirmed" if it["confirmed"] else "anomaly" if it["anomaly"] else "ok"
        months[it["measurement_start_time"][:7]][cls] += 1
        months[it["measurement_start_time"][:7]]["all"] += 1
        dom = urlsplit(it["input"]).hostname
        domains.add(dom)
        asns.add(it["probe_asn"])
        key = (dom, it["probe_asn"])
        pair[key][cls] += 1
        if cls in ("anomaly", "confirmed"):
            pair_days[key].append(it["measurement_start_time"][:10])
            bt = (it["scores"].get("analysis") or {}).get("blocking_type")
            if bt:
                pair_methods[key].add({"dns": "DNS", "tcp_ip": "TCP"}.get(bt, "HTTP"))
    blocked = {}
    for key, c in pair.items():
        k, valid = c["anomaly"] + c["confirmed"], c["ok"] + c["anomaly"] + c["confirmed"]
        if k >= 3 and k / valid >= 0.2:
            blocked[key] = c
    return {
        "items": items,
        "months": months,
        "domains": domains,
        "asns": asns,
        "blocked": blocked,
        "pair_days": pair_days,
        "pair_methods": pair_methods,
    }


def test_measurements_source_matches_plain_computation(shared_data: Path) -> None:
    exp = plain_kenya(shared_data)
    inp = from_measurements(iter_json_items([shared_data / KE]), "KE", KE_SINCE, KE_UNTIL)
    report = build_report(inp, refs_with(shared_data, "global.csv"), Rule())
    assert report.summary.measurements == len(exp["items"]) == 1228
    assert report.summary.websites == len(exp["domains"])
    assert report.summary.isps == len(exp["asns"])
    assert [m.month for m in report.months] == sorted(exp["months"])
    for row in report.months:
        c = exp["months"][row.month]
        assert (
            row.counts.measurement_count,
            row.counts.ok_count,
            row.counts.anomaly_count,
            row.counts.confirmed_count,
            row.counts.failure_count,
        ) == (c["all"], c["ok"], c["anomaly"], c["confirmed"], c["failure"])
        assert (
            row.counts.ok_count + row.counts.anomaly_count + row.counts.confirmed_count + row.counts.failure_count
            == row.counts.measurement_count
        )
    # categories: the plain join of inputs to global.csv URLs (the domain when the exact URL is not listed)
    legend = {u: c for u, c, *_ in csv.reader((shared_data / "test-lists/global.csv").open(encoding="utf-8"))}
    by_dom = {urlsplit(u).hostname: c for u, c in legend.items() if u.startswith("http")}
    cat = Counter()
    cat_blocked = Counter()
    for it in exp["items"]:
        code = legend.get(it["input"]) or by_dom.get(urlsplit(it["input"]).hostname) or "UNCAT"
        cat[code] += 1
        cat_blocked[code] += (not it["failure"]) and (it["anomaly"] or it["confirmed"])
    assert {r.code: (r.measurements, r.blocked) for r in report.categories} == {
        k: (cat[k], cat_blocked[k]) for k in cat
    }
    # blocked websites and ISPs
    blocked_asns = sorted(int(a[2:]) for _, a in exp["blocked"])
    assert [b.domain for b in report.blocked] == sorted({d for d, _ in exp["blocked"]})
    site = report.blocked[0]
    assert sorted(i.asn for i in site.isps) == blocked_asns == [12455, 33771, 36926, 37061]
    assert site.measurements == sum(
        sum(c[k] for k in ("ok", "anomaly", "confirmed", "failure")) for c in exp["blocked"].values()
    )
    assert site.blocked_measurements == sum(c["anomaly"] + c["confirmed"] for c in exp["blocked"].values())
    days = [d for key in exp["blocked"] for d in exp["pair_days"][key]]
    assert (str(site.first), str(site.last)) == (min(days), max(days))
    assert set(site.methods) == set().union(*(exp["pair_methods"][k] for k in exp["blocked"]))
    assert {r.isp.asn: dict(r.by_method) for r in report.isps} == {
        int(a[2:]): dict.fromkeys(exp["pair_methods"][(d, a)], 1) for d, a in exp["blocked"]
    }
    assert site.links[0].startswith("https://explorer.ooni.org/chart/mat?probe_cc=KE")
    assert all(x.startswith("https://explorer.ooni.org/") for x in site.links)


def comparable(report: Any) -> list[Any]:
    """Every table cell except where the source legitimately differs (its name, measurement links)."""
    out = []
    for t in render.tables(report):
        for row in t.rows:
            cells = dict(zip(t.headers, row, strict=True))
            if cells.get("item") == "source":
                continue
            cells.pop("explorer_links", None)
            out.append((t.name, cells))
    return out


def test_api_source_gives_the_same_tables_as_measurements(shared_data: Path) -> None:
    """The same Kenya measurements, once read from the file and once aggregated by a loopback API."""
    refs = refs_with(shared_data, "global.csv")
    url_category = {u: c for u, c in parse_test_list((shared_data / "test-lists/global.csv").read_text())}
    from_files = build_report(from_measurements(iter_json_items([shared_data / KE]), "KE", KE_SINCE, KE_UNTIL), refs)
    with FakeAggregationApi(rows_from_measurements(shared_data / KE, url_category)) as api:
        client = client_for(api)
        source = AggregationSource(client.get_json, "KE", KE_SINCE, KE_UNTIL)
        from_api = build_report(source.fetch(refs), refs)
        daily = source.daily_totals()
    assert comparable(from_api) == comparable(from_files)
    assert from_api.source == "OONI aggregation API"
    # 3 table queries + 2 per blocked site, all on the two-axis, daily-grain, until-exclusive contract
    assert len(api.requests) == 3 + 2 * len(from_files.blocked) + 1
    assert all(r["until"] == "2023-11-30" and r["probe_cc"] == "KE" for r in api.requests)
    assert all(r.get("time_grain", "day") == "day" for r in api.requests)
    assert [(d, c.measurement_count) for d, c in daily] == [(d, c.measurement_count) for d, c in from_files.daily]


def test_sinar_yearly_cambodia_totals_through_the_api(shared_data: Path) -> None:
    """2,440,169 measurements, 1,940 domains, 31 ASNs (iMAP 2024, KH, 2023-07-01..2024-06-30)."""
    path = shared_data / "sinar-imap/imap2024_web_connectivity_by_quarter_by_cc.csv"
    quarters = {r["quarter"]: r for r in csv.DictReader(path.open()) if r["probe_cc"] == "KH"}
    totals_file = shared_data / "sinar-imap/imap2024_web_connectivity_totals_by_cc_2023-07_2024-06.csv"
    assert sum(1 for _ in csv.DictReader(totals_file.open())) == 0  # only a header in our copy: see module doc
    rows = rows_from_sinar_quarters(path, "KH", KH_YEAR_DOMAINS, KH_YEAR_ASNS)
    with FakeAggregationApi(rows) as api:
        source = AggregationSource(client_for(api).get_json, "KH", date(2023, 7, 1), date(2024, 6, 30))
        report = build_report(source.fetch(), References())
        for grain in ("month", "year"):  # 366 days: the API allows year, and both agree with the quarters
            assert source.params("measurement_start_day", time_grain=grain)["time_grain"] == grain
    assert report.summary.measurements == sum(int(q["measurement_count"]) for q in quarters.values()) == 2_440_169
    assert report.summary.websites == 1940 and report.summary.isps == 31
    assert max(int(q["domain_count"]) for q in quarters.values()) < 1940  # the union, not a quarter's count
    by_month = {m.month: m.counts for m in report.months}
    for q, r in quarters.items():
        c = by_month[{"2023Q3": "2023-07", "2023Q4": "2023-10", "2024Q1": "2024-01", "2024Q2": "2024-04"}[q]]
        assert (
            c.measurement_count,
            c.ok_count,
            c.anomaly_count,
            c.confirmed_count,
            c.failure_count,
        ) == tuple(
            int(r[k]) for k in ("measurement_count", "ok_count", "anomaly_count", "confirmed_count", "failure_count")
        )
    assert report.categories[0].measurements == 2_440_169  # placeholders are in no test list
    assert report.series_grain == "week" and not report.blocked  # evenly spread: ~3 % anomalies, no pair blocked


def test_sinar_daily_im_counts_and_time_grain_limits(shared_data: Path) -> None:
    path = shared_data / "sinar-imap/imap2024_im_circumvention_daily_by_cc_test_2023-07-01_2024-06-30.csv"
    expected = [
        (date.fromisoformat(r["measurement_start_day"]), int(r["measurement_count"]), int(r["failure_count"]))
        for r in csv.DictReader(path.open())
        if r["probe_cc"] == "KH"
        and r["test_name"] == "signal"
        and "2023-07-01" <= r["measurement_start_day"] <= "2023-08-15"
    ]
    with FakeAggregationApi(rows_from_sinar_daily(path)) as api:
        client = client_for(api)
        got = AggregationSource(
            client.get_json, "KH", date(2023, 7, 1), date(2023, 8, 15), test_name="signal"
        ).daily_totals()
        assert [(d, c.measurement_count, c.failure_count) for d, c in got] == expected
        assert len(got) == 46
        short = AggregationSource(client.get_json, "KH", date(2023, 7, 1), date(2023, 7, 20))
        with pytest.raises(SourceError, match="time_grain month"):
            short.params("measurement_start_day", time_grain="month")  # <= 30 days: day/week only
        with pytest.raises(ClientError, match="400"):  # and the API would refuse it too
            client.get_json(
                "/api/v1/aggregation",
                {
                    "probe_cc": "KH",
                    "test_name": "signal",
                    "since": "2023-07-01",
                    "until": "2023-07-21",
                    "axis_x": "measurement_start_day",
                    "time_grain": "month",
                },
            )
    with pytest.raises(SourceError, match="category_code"):
        AggregationSource(client.get_json, "KH", date(2023, 7, 1), date(2023, 7, 2), category="news")


def test_recorded_aggregation_answers(shared_data: Path) -> None:
    """The three recorded live answers, served for their exact queries, read back number for number."""
    folder = shared_data / "ooni/api-responses"
    wc = recorded_answer(next((folder / "aggregation").glob("*web_connectivity*")))
    q = frozenset(
        {
            "test_name": "web_connectivity",
            "since": "2022-03-01",
            "until": "2022-03-04",
            "axis_x": "measurement_start_day",
            "time_grain": "day",
        }.items()
    )
    with FakeAggregationApi([], {q: wc}) as api:
        got = AggregationSource(client_for(api).get_json, None, date(2022, 3, 1), date(2022, 3, 3)).daily_totals()
    assert [
        (d.isoformat(), c.measurement_count, c.ok_count, c.anomaly_count, c.confirmed_count, c.failure_count)
        for d, c in got
    ] == [
        (
            r["measurement_start_day"],
            r["measurement_count"],
            r["ok_count"],
            r["anomaly_count"],
            r["confirmed_count"],
            r["failure_count"],
        )
        for r in wc["result"]
    ]
    assert got[0][1].measurement_count == 1_113_357
    for path in sorted((folder / "thematic").glob("*.json")):
        body = recorded_answer(path)
        for r in body["result"]:  # the disjoint classes add up on every recorded row
            assert (
                r["ok_count"] + r["anomaly_count"] + r["confirmed_count"] + r["failure_count"] == r["measurement_count"]
            )


def _event(version: int, asns: list[AsnEvidence], **kw: Any) -> Event:
    base: dict[str, Any] = dict(
        event_id="KH|www.rfa.org",
        version=version,
        kind=EventKind.TARGET_BLOCKED,
        action=EventAction.OPENED if version == 1 else EventAction.UPDATED,
        cc="KH",
        target="www.rfa.org",
        test_name="web_connectivity",
        category="NEWS",
        asns=asns,
        simulated=True,
        explorer_links=[f"https://explorer.ooni.org/m/uid{version}"],
    )
    base.update(kw)
    return Event(**base)


def test_events_source_and_simulated_label(shared_data: Path, tmp_path: Path) -> None:
    t = datetime(2023, 7, 17, 3, tzinfo=UTC)
    ev1 = _event(
        1,
        [
            AsnEvidence(
                asn=38623,
                name="VIETTEL (CAMBODIA) PTE., LTD",
                blocked=6,
                total=6,
                methods=["dns"],
                first_seen=t,
                last_seen=t.replace(day=18),
            )
        ],
    )
    ev2 = _event(
        2,
        [
            AsnEvidence(
                asn=38623,
                name="VIETTEL (CAMBODIA) PTE., LTD",
                blocked=20,
                total=22,
                failures=1,
                methods=["dns"],
                first_seen=t,
                last_seen=t.replace(day=30),
            ),
            AsnEvidence(
                asn=17976,
                blocked=9,
                total=9,
                methods=["tcp_ip"],
                first_seen=t.replace(day=20),
                last_seen=t.replace(month=8, day=20),
            ),
        ],
    )
    other = _event(1, [AsnEvidence(asn=38623, blocked=3, total=3)], event_id="TH|x", cc="TH", target="x.example")
    log = tmp_path / "events.jsonl"
    log.write_text("\n".join(e.to_bytes().decode() for e in (ev1, ev2, other)) + "\nnot json\n")
    out = tmp_path / "r.md"
    assert (
        main(
            [
                "report",
                "--country",
                "KH",
                "--since",
                "2023-07-01",
                "--until",
                "2023-08-15",
                "--source",
                "events",
                str(log),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "SIMULATED DATA" in text and "(SIMULATED)" in text
    assert "| measurements | n/a |" in text
    from reports.sources import iter_events

    report = build_report(
        from_events(iter_events([log]), "KH", date(2023, 7, 1), date(2023, 8, 15)), refs_with(shared_data)
    )
    assert report.simulated and report.summary.measurements is None
    (site,) = report.blocked
    assert (site.domain, site.category) == ("www.rfa.org", "NEWS")
    assert [i.label for i in site.isps] == [
        "CAMGSM Company Ltd (AS17976)",
        "VIETTEL (CAMBODIA) PTE., LTD (AS38623)",
    ]
    assert site.methods == ("DNS", "TCP")
    assert (site.first, site.last) == (date(2023, 7, 17), date(2023, 8, 15))  # clipped to the period
    assert (site.measurements, site.blocked_measurements) == (22 + 1 + 9, 20 + 9)
    assert "https://explorer.ooni.org/m/uid2" in site.links
    assert any("1 event log lines" in n for n in report.notes)
    assert {r.isp.asn: r.by_method for r in report.isps} == {17976: (("TCP", 1),), 38623: (("DNS", 1),)}
    html_text = render.to_html(report, all_charts(report))
    assert html_text.count("SIMULATED") >= 3 and html_text.count("data:image/png;base64,") == 1  # matrix only
    files = render.to_csv_files(report, tmp_path / "csv")
    assert all(p.read_text().splitlines()[0].startswith("data,") for p in files)


def test_cli_html_and_csv_from_measurements(shared_data: Path, tmp_path: Path) -> None:
    args = [
        "report",
        "--country",
        "KE",
        "--since",
        "2023-10-15",
        "--until",
        "2023-11-29",
        "--source",
        "measurements",
        str(shared_data / KE),
        "--test-list",
        str(shared_data / "test-lists/global.csv"),
    ]
    html_out = tmp_path / "r.html"
    assert main([*args, "--format", "html", "--out", str(html_out)]) == 0
    text = html_out.read_text()
    assert "SIMULATED" not in text and "CC BY-NC-SA 4.0" in text
    pngs = [base64.b64decode(chunk.split('"', 1)[0]) for chunk in text.split("data:image/png;base64,")[1:]]
    assert len(pngs) == 3 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert main([*args, "--format", "csv", "--out", str(tmp_path / "csv")]) == 0
    months = list(csv.DictReader((tmp_path / "csv/months.csv").open()))
    exp = plain_kenya(shared_data)["months"]
    assert {m["month"]: int(m["anomaly_count"]) for m in months} == {k: v["anomaly"] for k, v in exp.items()}
    watch = tmp_path / "watch.csv"
    watch.write_text("url,category_code\nhttps://t.me/,GRP\n")
    assert main([*args, "--watchlist", str(watch), "--format", "csv", "--out", str(tmp_path / "w")]) == 0
    summary = dict(csv.reader((tmp_path / "w/summary.csv").open()))
    items = plain_kenya(shared_data)["items"]
    assert summary["measurements"] == str(sum(1 for i in items if urlsplit(i["input"]).hostname == "t.me"))
    assert summary["websites blocked or likely blocked"] == "0"
    assert (
        main(
            [
                "report",
                "--country",
                "KE",
                "--since",
                "2023-10-15",
                "--until",
                "2023-11-29",
                "--source",
                "events",
            ]
        )
        == 2
    )
