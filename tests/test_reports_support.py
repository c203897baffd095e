"""Test support for the report tests (no tests here): a loopback fake of ``GET /api/v1/aggregation``.

The shared fake OONI API (tests/fakes/ooni_api.py) serves the list endpoints; this one answers aggregation
queries the way the service does (../shared/docs/ooni-api.md section 2): filters ``probe_cc``, ``test_name``,
``domain``, ``probe_asn``, ``category_code``, ``since`` (>=) and ``until`` (<) on dates,
``axis_x``/``axis_y``, ``time_grain`` checked against the span (HTTP 400 otherwise), the five counters
summed per group, ``probe_asn`` as an int, and the ``{"v", "dimension_count", "db_stats", "result"}``
envelope. It groups rows of any granularity:
one row per measurement (recorded JSONL) or pre-aggregated rows (Sinar/iMAP). Recorded answers can be served
verbatim for their exact query.
"""

from __future__ import annotations

import csv
import json
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

AGGREGATION = "/api/v1/aggregation"
COUNTERS = ("anomaly_count", "confirmed_count", "failure_count", "ok_count", "measurement_count")
AXES = (
    "measurement_start_day",
    "domain",
    "input",
    "probe_cc",
    "probe_asn",
    "test_name",
    "category_code",
    "blocking_type",
)


def grains_for(days: int) -> list[str]:
    if days <= 7:
        return ["hour", "day"]
    if days <= 30:
        return ["day", "week"]
    if days <= 365:
        return ["day", "week", "month"]
    return ["day", "week", "month", "year"]


def bucket(day: date, grain: str) -> str:
    if grain == "week":
        day = day - timedelta(days=day.weekday())
    elif grain == "month":
        day = day.replace(day=1)
    elif grain == "year":
        day = day.replace(month=1, day=1)
    return day.isoformat()


class FakeAggregationApi:
    """``/api/v1/aggregation`` on 127.0.0.1:<free port>. ``rows``: dicts with the axis fields + counters."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], recorded: Mapping[frozenset[tuple[str, str]], Any] = {}):
        self.rows = [dict(r) for r in rows]
        self.recorded = dict(recorded)
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeAggregationApi:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def answer(self, params: dict[str, str]) -> tuple[int, Any]:
        key = frozenset(params.items())
        if key in self.recorded:
            return 200, self.recorded[key]
        try:
            since = date.fromisoformat(params["since"])
            until = date.fromisoformat(params["until"])
        except (KeyError, ValueError) as exc:
            return 422, {"detail": f"since/until must be dates: {exc}"}
        axes = [a for a in (params.get("axis_x"), params.get("axis_y")) if a]
        if any(a not in AXES for a in axes):
            return 422, {"detail": "invalid axis"}
        grain = params.get("time_grain", "auto")
        allowed = grains_for((until - since).days)
        grain = allowed[0] if grain == "auto" else grain
        if grain not in allowed:
            return 400, {"detail": f"Invalid time_grain {grain} for this range; allowed: {allowed}"}
        if grain == "hour":
            return 400, {"detail": "this fake has no hourly data"}
        filters: dict[str, set[str]] = {}
        for name in ("probe_cc", "test_name", "domain", "category_code"):
            if params.get(name):
                filters[name] = {v.strip() for v in params[name].split(",")}
        if params.get("probe_asn"):
            filters["probe_asn"] = {v.strip().upper().removeprefix("AS") for v in params["probe_asn"].split(",")}
        groups: dict[tuple[Any, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
        for row in self.rows:
            day = date.fromisoformat(str(row["measurement_start_day"]))
            if not since <= day < until:
                continue
            if any(str(row.get(k, "")) not in allowed_values for k, allowed_values in filters.items()):
                continue
            key = tuple(bucket(day, grain) if a == "measurement_start_day" else row.get(a) for a in axes)
            for c in COUNTERS:
                groups[key][c] += int(row.get(c, 0))
        result: Any
        if not axes:
            total = dict.fromkeys(COUNTERS, 0)
            for g in groups.values():
                for c in COUNTERS:
                    total[c] += g[c]
            result = total
        else:
            result = [
                dict(counters, **dict(zip(axes, key, strict=True)))
                for key, counters in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0]))
            ]
        n = sum(int(r.get("measurement_count", 0)) for r in self.rows)
        return 200, {
            "v": 0,
            "dimension_count": len(axes),
            "db_stats": {"row_count": n, "bytes": 0, "total_row_count": n, "elapsed_seconds": 0.001},
            "result": result,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                with api._lock:
                    api.requests.append(params)
                if parts.path != AGGREGATION:
                    status, payload = 404, {"detail": "Not Found"}
                else:
                    status, payload = api.answer(params)
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


# ---- row builders --------------------------------------------------------------------------------


def rows_from_measurements(path: Path, url_category: Mapping[str, str]) -> list[dict[str, Any]]:
    """One aggregation row per list item, with the fastpath's disjoint class and the citizenlab URL join."""
    from urllib.parse import urlsplit as split

    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if item.get("test_name") != "web_connectivity":
            continue
        cls = (
            "failure_count"
            if item["failure"]
            else "confirmed_count"
            if item["confirmed"]
            else "anomaly_count"
            if item["anomaly"]
            else "ok_count"
        )
        analysis = (item.get("scores") or {}).get("analysis") or {}
        row: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
        row.update(
            measurement_start_day=item["measurement_start_time"][:10],
            probe_cc=item["probe_cc"],
            probe_asn=int(item["probe_asn"][2:]),
            test_name=item["test_name"],
            input=item["input"],
            domain=(split(item["input"]).hostname or "").lower(),
            category_code=url_category.get(item["input"], ""),
            blocking_type=analysis.get("blocking_type", ""),
        )
        row[cls] = 1
        row["measurement_count"] = 1
        rows.append(row)
    return rows


QUARTER_START = {
    "2023Q3": "2023-07-01",
    "2023Q4": "2023-10-01",
    "2024Q1": "2024-01-01",
    "2024Q2": "2024-04-01",
}
# The seed's yearly Cambodian distinct counts (Sinar notebook: unique domains / ASNs of the year's
# day x domain and day x probe_asn answers). Our copy of the yearly totals CSV has its header only, so these
# come from its description in ../shared/data/SOURCES.md and the seed; the quarterly file has per-quarter
# distinct counts only.
KH_YEAR_DOMAINS = 1940
KH_YEAR_ASNS = 31


def rows_from_sinar_quarters(path: Path, cc: str, year_domains: int, year_asns: int) -> list[dict[str, Any]]:
    """Aggregation rows with the Sinar per-quarter totals, one row per (quarter, placeholder site).

    Counters per quarter, and distinct domains/ASNs per quarter, are the real iMAP values; which placeholder
    site or ASN carries which count is synthetic (no per-domain KH data is public). Sites are windows over
    ``year_domains`` names and ASNs over ``year_asns`` private-range numbers so the year's union is exactly
    those counts while each quarter has its own smaller count: a report that added or maxed quarters
    would fail.
    """
    sites = [f"site-{i:04d}.placeholder.invalid" for i in range(year_domains)]
    asns = [64512 + i for i in range(year_asns)]
    quarters = [r for r in csv.DictReader(path.open(encoding="utf-8")) if r["probe_cc"] == cc]
    rows: list[dict[str, Any]] = []
    for qi, q in enumerate(sorted(quarters, key=lambda r: r["quarter"])):
        nd, na = int(q["domain_count"]), int(q["asn_count"])
        q_sites = sites[:nd] if qi % 2 == 0 else sites[-nd:]
        q_asns = asns[:na] if qi % 2 == 0 else asns[-na:]
        for i, site in enumerate(q_sites):
            row: dict[str, Any] = {
                "measurement_start_day": QUARTER_START[q["quarter"]],
                "probe_cc": cc,
                "probe_asn": q_asns[i % na],
                "test_name": "web_connectivity",
                "domain": site,
                "input": f"https://{site}/",
                "category_code": "",
                "blocking_type": "",
            }
            for c in ("ok_count", "anomaly_count", "confirmed_count", "failure_count"):
                base, extra = divmod(int(q[c]), nd)
                row[c] = base + (1 if i < extra else 0)
            row["measurement_count"] = sum(
                row[c] for c in ("ok_count", "anomaly_count", "confirmed_count", "failure_count")
            )
            rows.append(row)
    return rows


def rows_from_sinar_daily(path: Path) -> list[dict[str, Any]]:
    """The iMAP IM/circumvention daily file as aggregation rows (per day x country x test; no domain/ASN)."""
    rows = []
    for r in csv.DictReader(path.open(encoding="utf-8")):
        row: dict[str, Any] = {k: int(r[k]) for k in COUNTERS}
        row.update(measurement_start_day=r["measurement_start_day"], probe_cc=r["probe_cc"], test_name=r["test_name"])
        rows.append(row)
    return rows


def recorded_answer(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))["body"]
