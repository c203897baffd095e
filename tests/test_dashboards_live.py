"""Every Grafana panel query against a real Prometheus scraping a running pipeline fed with recorded data.

Grafana cannot be installed here, so this is how the dashboards are checked: the session's Faust worker, a poller
reading the loopback fake OONI API (recorded pages, a simulated blocking series, a malformed item, a 429) and a
dispatcher delivering to a loopback Slack are scraped by ``prometheus``; each panel's PromQL must return series.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from censorwatch.config import Settings
from tests.fakes.ooni_api import FakeOoniApi, Fault, make_item
from tests.fakes.slack_api import FakeSlackApi
from tests.promserver import running_prometheus, wait_for
from tests.services import Service, metric_value
from tests.test_deploy_grafana import panel_queries


@pytest.mark.prometheus
def test_every_panel_query_returns_series_from_the_running_pipeline(
    worker: Service, pipeline_settings: Settings, tmp_path: Path
) -> None:
    # Thailand, simulated: the other pipeline tests use Cambodia, Kenya and the recorded pages' countries, and the
    # session's topics (poller cursor included) are shared.
    now = datetime.now(UTC).replace(microsecond=0)
    url = "https://www.prachatai.com/"
    blocking = [
        make_item(cc="TH", asn=131445, start=now - timedelta(days=3, hours=i), input=url, seq=i) for i in range(6)
    ]
    blocking += [
        make_item(
            cc="TH",
            asn=131445,
            start=now - timedelta(hours=5) + timedelta(minutes=20 * i),
            input=url,
            anomaly=True,
            blocking_type="tcp_ip",
            seq=50 + i,
        )
        for i in range(10)
    ]
    malformed = {**make_item(cc="TH", start=now - timedelta(hours=2), input=url, seq=99), "probe_asn": "not-an-asn"}
    with FakeSlackApi() as slack, FakeOoniApi([*blocking, malformed]) as api:
        api.push(Fault.rate_limited(retry_after=1))
        settings = pipeline_settings.model_copy(
            update={
                "countries": ["TH"],
                "poll_start": now - timedelta(days=10),
                "poll_interval_seconds": 1.0,
                "ooni_api_url": api.base_url,
                "slack": pipeline_settings.slack.model_copy(
                    update={"enabled": True, "token": slack.token, "base_url": slack.base_url}
                ),
            }
        )
        work = tmp_path / "services"
        poller = Service(["poll"], settings, work, name="poll").start()
        dispatcher = Service(["dispatch"], settings, work, name="dispatch").start()
        try:
            m = settings.metrics
            wait_for(
                "the prachatai.com alert in Slack",
                lambda: (
                    poller.check()
                    and dispatcher.check()
                    and any("prachatai.com" in c.text for c in slack.calls_of("chat.postMessage"))
                ),
                timeout=90,
            )
            assert metric_value(m.poller_port, 'censorwatch_poller_errors_total{kind="rate_limited"}') >= 1
            targets = {
                "censorwatch-poller": [f"127.0.0.1:{m.poller_port}"],
                "censorwatch-worker": [f"127.0.0.1:{m.worker_port}"],
                "censorwatch-dispatcher": [f"127.0.0.1:{m.dispatcher_port}"],
            }
            with running_prometheus(tmp_path / "prometheus", targets) as prom:
                prom.wait_for_targets(timeout=30)
                queries = panel_queries({"cc": "TH"})
                for _uid, _title, expr in queries:
                    prom.query(expr)  # parses, or raises naming the query
                empty: list[str] = []

                def all_return_series() -> bool:
                    empty[:] = [f"{uid} / {title}: {expr}" for uid, title, expr in queries if not prom.query(expr)]
                    return not empty

                try:
                    wait_for("every panel query to return series", all_return_series, timeout=60, interval=1.0)
                except AssertionError:
                    pytest.fail("panel queries without series from the live pipeline:\n" + "\n".join(empty))
        finally:
            assert poller.stop() == 0, poller.log()[-3000:]
            assert dispatcher.stop() == 0, dispatcher.log()[-3000:]
