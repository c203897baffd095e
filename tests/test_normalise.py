"""The normaliser over every recorded item, and its refusals of bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from censorwatch.models import Outcome
from services.normalise import NormaliseError, normalise, web_target


def _search_items(shared: Path) -> list[dict]:
    items = []
    for page in sorted((shared / "ooni/api-responses/search").glob("*.json")):
        items += json.loads(page.read_text())["body"]["results"]
    return items


def test_every_recorded_api_item_normalises(shared_data: Path) -> None:
    items = _search_items(shared_data)
    assert len(items) == 150
    for item in items:
        m = normalise(item)
        assert m.uid == item["measurement_uid"]
        assert m.asn == int(item["probe_asn"].removeprefix("AS"))
        assert m.start_time.tzinfo is not None
        assert m.explorer_url == f"https://explorer.ooni.org/m/{item['measurement_uid']}"
        if item["test_name"] == "web_connectivity":
            assert m.target in item["input"].lower()
        else:
            assert m.target == item["test_name"]


def test_every_fastpath_row_normalises_with_disjoint_outcomes(shared_data: Path) -> None:
    counts = dict.fromkeys(Outcome, 0)
    rows = [json.loads(line) for line in (shared_data / "ooni/fastpath-rows.jsonl").open()]
    for row in rows:
        m = normalise(row)
        counts[m.outcome] += 1
        assert m.failure == (row["msm_failure"] == "t")
    assert sum(counts.values()) == len(rows) > 1000
    # OONI's disjoint definitions, recomputed independently from the raw flags
    assert counts[Outcome.FAILURE] == sum(r["msm_failure"] == "t" for r in rows)
    assert counts[Outcome.CONFIRMED] == sum(r["confirmed"] == "t" and r["msm_failure"] == "f" for r in rows)
    assert counts[Outcome.ANOMALY] == sum(
        r["anomaly"] == "t" and r["confirmed"] == "f" and r["msm_failure"] == "f" for r in rows
    )


def test_list_item_fields() -> None:
    item = {
        "anomaly": True,
        "confirmed": False,
        "failure": False,
        "input": "https://www.backtrack-linux.org/",
        "measurement_start_time": "2021-07-09T00:55:13Z",
        "measurement_uid": "20210709005529.664022_MY_webconnectivity_68e5bea1060d1874",
        "probe_asn": "AS4818",
        "probe_cc": "MY",
        "report_id": "20210709T004340Z_webconnectivity_MY_4818_n1_YCM7J9mGcEHds2K3",
        "scores": {"analysis": {"blocking_type": "http-failure"}, "blocking_general": 1.0},
        "test_name": "web_connectivity",
    }
    m = normalise(item)
    assert (m.cc, m.asn, m.target, m.blocking_type) == ("MY", 4818, "www.backtrack-linux.org", "http-failure")
    assert m.start_time == datetime(2021, 7, 9, 0, 55, 13, tzinfo=UTC)
    assert m.outcome is Outcome.ANOMALY
    assert m.series_key == "MY|4818|www.backtrack-linux.org"


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"measurement_uid": None}, "missing measurement_uid"),
        ({"probe_asn": "ASX"}, "probe_asn"),
        ({"probe_asn": True}, "probe_asn"),
        ({"probe_cc": "Cambodia"}, "probe_cc"),
        ({"measurement_start_time": "yesterday"}, "measurement_start_time"),
        ({"measurement_start_time": 1234}, "measurement_start_time"),
        ({"input": "x" * 1_000_000}, "characters long"),
        ({"input": "not a url"}, r"not an http\(s\) URL"),
        ({"input": "http://a\r\nb/"}, "control characters"),
        ({"input": None}, "no input URL"),
        ({"anomaly": "maybe"}, "anomaly must be a boolean"),
        ({"test_name": "Web Connectivity"}, "test_name"),
        ({"scores": "{not json"}, "scores is not valid JSON"),
        # what only the lenient page parser reads (json.loads): a clear reason, never a crash
        ({"input": "https://www.rfa.org/\udcff"}, "input is not valid UTF-8"),
        ({"scores": '{"analysis": {"blocking_type": "\\udcff"}}'}, "blocking_type is not valid UTF-8"),
        ({"probe_asn": float("inf")}, r"got a non-finite number \(inf\)"),
        ({"probe_asn": 10**400}, "out of range: a 401-digit number"),
        ({"anomaly": float("nan")}, r"anomaly must be a boolean, got a non-finite number \(nan\)"),
    ],
)
def test_bad_items_are_refused_with_a_reason(patch: dict, reason: str) -> None:
    item = {
        "measurement_uid": "20230717000000.000000_KH_webconnectivity_0123456789abcdef",
        "report_id": "20230717T000000Z_webconnectivity_KH_38623_n1_abcdefghijklmnop",
        "probe_cc": "KH",
        "probe_asn": "AS38623",
        "test_name": "web_connectivity",
        "measurement_start_time": "2023-07-17T00:00:00.000000Z",
        "input": "https://www.rfa.org/english/",
        "anomaly": True,
        "confirmed": False,
        "failure": False,
        "scores": {},
    }
    item.update(patch)
    with pytest.raises(NormaliseError, match=reason):
        normalise(item)


def test_idn_hosts_become_punycode() -> None:
    assert web_target("https://BÜCHER.example/") == "xn--bcher-kva.example"
    assert web_target("http://www.rfa.org:8080/khmer") == "www.rfa.org"
