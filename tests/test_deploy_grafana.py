"""deploy/grafana: provisioning, dashboards, and every panel query run against a real Prometheus.

The Prometheus server (Debian's package) is started on loopback and scrapes three loopback endpoints
that serve sample metrics of the documented names, split like the real processes (poller, worker,
dispatcher). Each panel query, with its template variables replaced by a real value, must parse and
return at least one series.
The end-to-end variant (a running pipeline fed with recorded data instead of sample metrics) reuses
tests/promserver.py and ``panel_queries()``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tests.promserver import DOCUMENTED_METRICS, PromServer, metric_names_in, running_prometheus, wait_for

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

# Grafana's built-in and our own template variables, replaced by real values before querying.
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "cc": "KH",
}


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    values = {**VARIABLES, **(values or {})}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def panel_queries(values: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL with variables substituted) for every panel target."""
    out = []
    for path in DASHBOARDS:
        board = load(path)
        for panel in panels(board):
            for target in panel.get("targets", []):
                out.append((board["uid"], panel["title"], substitute(target["expr"], values)))
    return out


# ---------------------------------------------------------------------------------------------- static checks


def test_three_dashboards_with_unique_uids() -> None:
    uids = {load(p)["uid"] for p in DASHBOARDS}
    assert uids == {"censorwatch-overview", "censorwatch-country", "censorwatch-pipeline"}


def test_provisioning_points_at_the_dashboards_and_prometheus() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "provider.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    for path in DASHBOARDS:
        for panel in panels(load(path)):
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "prometheus", panel["title"]
                assert panel.get("description"), f"{panel['title']}: describe what the panel shows"
                assert panel["targets"], panel["title"]


def test_panel_ids_and_layout() -> None:
    for path in DASHBOARDS:
        board = load(path)
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for p in panels(board):
            pos = p["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, f"{path.name}: {p['title']} overflows"


def test_country_dashboard_has_cc_variable_and_heat_map() -> None:
    board = load(GRAFANA / "dashboards" / "country.json")
    (var,) = [v for v in board["templating"]["list"] if v["name"] == "cc"]
    assert var["type"] == "query"
    titles = {p["title"]: p for p in panels(board)}
    heat = titles["Anomaly share heat map: ASN \u00d7 target"]
    assert "censorwatch_series_anomaly_share" in heat["targets"][0]["expr"]
    assert heat["transformations"][0]["id"] == "groupingToMatrix"
    assert any(p["type"] == "state-timeline" and "event" in p["title"].lower() for p in titles.values())
    for _uid, _title, expr in panel_queries():
        assert "$" not in expr


def test_dashboards_use_only_documented_metrics() -> None:
    for uid, title, expr in panel_queries():
        unknown = metric_names_in(expr) - set(DOCUMENTED_METRICS)
        assert not unknown, f"{uid} / {title}: undocumented metrics {unknown}"


def test_every_panel_is_described_in_the_operations_doc() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text()
    for path in DASHBOARDS:
        for panel in panels(load(path)):
            if panel["type"] != "row":
                assert panel["title"] in ops, f"docs/operations.md does not describe panel {panel['title']!r}"


# ---------------------------------------------------------------------------------------- against Prometheus


def _poller_registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    fetched = Counter("censorwatch_poller_measurements_fetched", "", ["cc"], registry=reg)
    produced = Counter("censorwatch_poller_measurements_produced", "", ["cc"], registry=reg)
    errors = Counter("censorwatch_poller_errors", "", ["kind"], registry=reg)
    Counter("censorwatch_poller_late_uploads", "", ["cc"], registry=reg).labels("KH").inc(4)
    last = Gauge("censorwatch_poller_last_success_timestamp_seconds", "", ["cc"], registry=reg)
    quota = Gauge("censorwatch_poller_api_quota_remaining", "", registry=reg)
    duration = Histogram("censorwatch_poller_request_duration_seconds", "", registry=reg)
    dead = Counter("censorwatch_deadletter", "", ["stage"], registry=reg)
    for cc, n in (("KH", 120), ("MM", 80)):
        fetched.labels(cc).inc(n)
        produced.labels(cc).inc(n - 3)
        last.labels(cc).set_to_current_time()
    errors.labels("rate_limited").inc(2)
    errors.labels("server_error").inc(1)
    quota.set(850)
    for seconds in (0.2, 0.4, 1.5):
        duration.observe(seconds)
    dead.labels("poller").inc(1)
    return reg


def _worker_registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    processed = Counter("censorwatch_worker_measurements_processed", "", ["cc", "outcome"], registry=reg)
    dups = Counter("censorwatch_worker_duplicates", "", registry=reg)
    gaps = Counter("censorwatch_worker_input_gaps", "", registry=reg)
    expired = Counter("censorwatch_worker_input_expired", "", registry=reg)
    late = Counter("censorwatch_worker_late_measurements", "", ["kind"], registry=reg)
    emitted = Counter("censorwatch_worker_events_emitted", "", ["kind", "action"], registry=reg)
    open_ = Gauge("censorwatch_worker_events_open", "", ["kind", "cc"], registry=reg)
    Gauge("censorwatch_worker_assigned_partitions", "", registry=reg).set(3)
    latency = Histogram("censorwatch_worker_processing_latency_seconds", "", registry=reg)
    share = Gauge("censorwatch_series_anomaly_share", "", ["cc", "asn", "target"], registry=reg)
    count = Gauge("censorwatch_series_measurements", "", ["cc", "asn", "target"], registry=reg)
    lag = Gauge("censorwatch_consumer_lag", "", ["group", "topic"], registry=reg)
    dead = Counter("censorwatch_deadletter", "", ["stage"], registry=reg)
    for outcome, n in (("ok", 90), ("anomaly", 20), ("confirmed", 2), ("failure", 5)):
        processed.labels("KH", outcome).inc(n)
    processed.labels("MM", "ok").inc(77)
    dups.inc(3)
    gaps.inc(1)
    expired.inc(2)
    late.labels("revised").inc(1)
    emitted.labels("blocking", "opened").inc(1)
    open_.labels("blocking", "KH").set(1)
    open_.labels("outage", "KH").set(0)
    latency.observe(4.0)
    for asn, target, s, n in (
        ("38623", "www.rfa.org", 0.9, 30),
        ("38623", "signal", 0.0, 12),
        ("24560", "www.rfa.org", 0.1, 20),
    ):
        share.labels("KH", asn, target).set(s)
        count.labels("KH", asn, target).set(n)
    lag.labels("censorwatch-worker", "censorwatch.measurements").set(4)
    dead.labels("worker").inc(0)
    return reg


def _dispatcher_registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    notes = Counter("censorwatch_notifications", "", ["sink", "outcome"], registry=reg)
    duration = Histogram("censorwatch_notification_duration_seconds", "", ["sink"], registry=reg)
    heartbeat = Gauge("censorwatch_dispatcher_heartbeat_timestamp_seconds", "", registry=reg)
    last = Gauge("censorwatch_dispatcher_last_delivery_timestamp_seconds", "", ["sink"], registry=reg)
    lag = Gauge("censorwatch_consumer_lag", "", ["group", "topic"], registry=reg)
    Counter("censorwatch_deadletter", "", ["stage"], registry=reg).labels("dispatcher").inc(0)
    for sink in ("console", "slack", "email"):
        notes.labels(sink, "sent").inc(1)
        duration.labels(sink).observe(0.3)
    for sink in ("console", "slack"):
        last.labels(sink).set_to_current_time()
    last.labels("email").set(0)  # a sink never used (or disabled): the gauge's initial 0, not a date in 1970
    notes.labels("slack", "failed").inc(1)
    heartbeat.set_to_current_time()
    lag.labels("censorwatch-dispatcher", "censorwatch.events").set(0)
    return reg


def _serve(registry: CollectorRegistry) -> tuple[str, Any]:
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    return f"127.0.0.1:{server.server_port}", server


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromServer]:
    servers = []
    targets: dict[str, list[str]] = {}
    try:
        for job, registry in (
            ("censorwatch-poller", _poller_registry()),
            ("censorwatch-worker", _worker_registry()),
            ("censorwatch-dispatcher", _dispatcher_registry()),
        ):
            addr, server = _serve(registry)
            servers.append(server)
            targets[job] = [addr]
        with running_prometheus(tmp_path_factory.mktemp("prometheus"), targets) as server:
            server.wait_for_targets(timeout=30)
            # rate() needs two samples of a counter in its window
            server.wait_for_series("rate(censorwatch_notifications_total[1m])", timeout=30)
            yield server
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


@pytest.mark.prometheus
def test_sample_metrics_cover_the_contract(prom: PromServer) -> None:
    exposed = {r["metric"]["__name__"] for r in prom.query('{__name__=~"censorwatch_.+"}')}
    for name in DOCUMENTED_METRICS:
        assert name in exposed or f"{name}_count" in exposed, f"sample registry lacks {name}"


@pytest.mark.prometheus
def test_every_panel_query_parses_and_returns_series(prom: PromServer) -> None:
    queries = panel_queries()
    assert len(queries) >= 25
    # (a) every query parses (a PromQL error raises at once, naming the query)
    for _uid, _title, expr in queries:
        prom.query(expr)
    # (b) every query returns series once the samples are in
    empty: list[str] = []

    def all_return_series() -> bool:
        empty[:] = [f"{uid} / {title}: {expr}" for uid, title, expr in queries if not prom.query(expr)]
        return not empty

    try:
        wait_for("every panel query to return series", all_return_series, timeout=30, interval=0.5)
    except AssertionError:
        pytest.fail("panel queries without series:\n" + "\n".join(empty))


@pytest.mark.prometheus
def test_template_variable_query_finds_values(prom: PromServer) -> None:
    board = load(GRAFANA / "dashboards" / "country.json")
    for var in board["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert m, var["query"]
        selector, label = m.groups()
        data = prom._get(f"/api/v1/label/{label}/values", {"match[]": selector})
        assert VARIABLES[var["name"]] in data, f"${var['name']} would offer {data}"


@pytest.mark.prometheus
def test_recording_rules_evaluate_on_live_data(prom: PromServer) -> None:
    for expr in (
        "cc_asn:censorwatch_series_anomaly_share:weighted",
        "sink:censorwatch_notifications_failure:ratio_rate10m",
        "cc:censorwatch_poller_last_success:age_seconds",
        "censorwatch:series_exposed:count",
    ):
        prom.wait_for_series(expr, timeout=30)
    (weighted,) = prom.query('cc_asn:censorwatch_series_anomaly_share:weighted{asn="38623"}')
    assert float(weighted["value"][1]) == pytest.approx(0.9 * 30 / 42)


@pytest.mark.prometheus
def test_time_since_last_delivery_ignores_sinks_never_used(prom: PromServer) -> None:
    """A sink that never delivered exports 0: the panels must not show it as ~56 years ago."""
    queries = [q for q in panel_queries() if q[1] == "Time since last delivery per sink"]
    assert len(queries) == 2
    prom.wait_for_series('censorwatch_dispatcher_last_delivery_timestamp_seconds{sink="email"}', timeout=30)
    for uid, _title, expr in queries:
        result = prom.query(expr)
        sinks = {r["metric"].get("sink") for r in result}
        assert sinks == {"console", "slack"}, f"{uid}: {expr} shows {sinks}"
        assert all(float(r["value"][1]) < 3600 for r in result), f"{uid}: {result}"
