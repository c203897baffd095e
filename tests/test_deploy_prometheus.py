"""deploy/prometheus, deploy/alertmanager: promtool and amtool checks; every alert tested both ways."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.promserver import DOCUMENTED_METRICS, metric_names_in, require_tool

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
ALERT_TESTS = sorted((PROM / "tests").glob("*.test.yml"))
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def rules() -> list[dict[str, Any]]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def alert_names() -> list[str]:
    return [r["alert"] for r in rules() if "alert" in r]


def test_rule_files_exist() -> None:
    assert RULE_FILES, "no rule files in deploy/prometheus/rules"
    assert ALERT_TESTS, "no promtool unit tests in deploy/prometheus/tests"
    assert len(alert_names()) >= 8
    assert any("record" in r for r in rules())


def test_promtool_check_config() -> None:
    promtool = require_tool("promtool")
    run([promtool, "check", "config", str(PROM / "prometheus.yml")])


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    out = run([promtool, "check", "rules", *map(str, RULE_FILES)]).stdout
    assert "SUCCESS" in out


def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool")
    out = run([promtool, "test", "rules", *map(str, ALERT_TESTS)], cwd=PROM).stdout
    assert "SUCCESS" in out


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in ALERT_TESTS:
        doc = yaml.safe_load(path.read_text())
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alert_names())
    assert not names - fires, f"alerts never tested firing: {sorted(names - fires)}"
    assert not names - quiet, f"alerts never tested not firing: {sorted(names - quiet)}"
    assert not (fires | quiet) - names, f"tests name unknown alerts: {sorted((fires | quiet) - names)}"


def test_alerts_are_documented_for_operators() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text()
    for rule in rules():
        if "alert" in rule:
            assert rule["alert"] in ops, f"{rule['alert']} has no runbook entry in docs/operations.md"
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"]


def test_rules_use_only_documented_metrics() -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        unknown = metric_names_in(rule["expr"]) - set(DOCUMENTED_METRICS) - recorded
        assert not unknown, f"{rule.get('alert') or rule.get('record')} reads undocumented metrics {unknown}"


def test_prometheus_scrapes_every_service() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job, port in (
        ("censorwatch-poller", 9464),
        ("censorwatch-worker", 9465),
        ("censorwatch-dispatcher", 9466),
    ):
        assert job in jobs, f"no scrape job {job}"
        assert str(port) in yaml.safe_dump(jobs[job]), f"{job} does not scrape port {port}"
    # workers are discovered per replica (scaled with --scale worker=N)
    assert jobs["censorwatch-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert config["rule_files"] == ["rules/*.yml"]


def test_amtool_check_config() -> None:
    amtool = require_tool("amtool")
    out = run([amtool, "check-config", str(ALERTMANAGER)]).stdout
    assert "SUCCESS" in out


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=CensorwatchPollerStalled", "severity=critical", "cc=KH"], "ops-critical"),
        (["alertname=CensorwatchConsumerLagHigh", "severity=warning"], "ops-email"),
        (["alertname=CensorwatchApiQuotaLow", "severity=info"], "ops-digest"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    amtool = require_tool("amtool")
    out = run([amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels]).stdout
    assert out.split() == [receiver]


def test_alertmanager_inhibitions_name_real_alerts() -> None:
    import re

    config = yaml.safe_load(ALERTMANAGER.read_text())
    names = alert_names()
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            m = re.fullmatch(r'alertname(=~?)"(.*)"', matcher)
            if m:
                pattern = m.group(2) if m.group(1) == "=~" else re.escape(m.group(2))
                assert any(re.fullmatch(pattern, n) for n in names), f"{matcher} matches no alert"


# ------------------------------------------------------------------- what the poller exports for the rules


def test_poller_exports_what_the_poller_alerts_need_from_start_up() -> None:
    """In a fresh process: quota NaN until an answer carried the header (0 would fire
    CensorwatchApiQuotaExhausted), and a last-success timestamp for every configured country at the start time
    (no series would keep CensorwatchPollerStalled silent for a country that never succeeds)."""
    import json
    import sys

    script = """
import json, math, time
from prometheus_client import REGISTRY
from censorwatch.config import Settings
from services.poller import Poller
before = time.time()
poller = Poller(Settings(countries=["KH", "MM"]))
after = time.time()
poller.client.close()
get = REGISTRY.get_sample_value
quota = get("censorwatch_poller_api_quota_remaining")
last = {cc: get("censorwatch_poller_last_success_timestamp_seconds", {"cc": cc}) for cc in ("KH", "MM")}
print(json.dumps({"quota_nan": quota is not None and math.isnan(quota), "last": last,
                  "before": before, "after": after}))
"""
    proc = run([sys.executable, "-c", script], cwd=ROOT)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["quota_nan"], "censorwatch_poller_api_quota_remaining must be NaN before any X-RateLimit-Remaining"
    for cc, value in out["last"].items():
        assert value is not None and out["before"] <= value <= out["after"], f"{cc}: last success {value}"


def test_series_cap_alert_is_per_worker(tmp_path: Path) -> None:
    """The cap is per worker: 3 workers x 700 series is far from it; one worker at 1,950 is close."""
    promtool = require_tool("promtool")

    def series(workers: dict[str, int]) -> list[dict[str, str]]:
        return [
            {
                "series": (
                    f'censorwatch_series_anomaly_share{{job="censorwatch-worker", instance="{w}:9465", cc="KH", '
                    f'asn="{i}", target="t"}}'
                ),
                "values": "0.6x40",
            }
            for w, n in workers.items()
            for i in range(n)
        ]

    def case(workers: dict[str, int], exp_alerts: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": series(workers),
            "alert_rule_test": [
                {"eval_time": "35m", "alertname": "CensorwatchSeriesCapReached", "exp_alerts": exp_alerts}
            ],
        }

    fires = {
        "exp_labels": {"severity": "info"},
        "exp_annotations": {
            "summary": "1950 per-series metrics exposed by one worker: close to its cap",
            "description": "New anomalous series beyond the cap are detected and alerted but not graphed.",
        },
    }
    doc = {
        "rule_files": [str(p) for p in RULE_FILES],
        "evaluation_interval": "1m",
        "tests": [
            case({"w0": 700, "w1": 700, "w2": 700}, []),
            case({"w0": 1950, "w1": 700, "w2": 10}, [fires]),
        ],
    }
    path = tmp_path / "series-cap.test.yml"
    path.write_text(yaml.safe_dump(doc))
    out = run([promtool, "test", "rules", str(path)], cwd=tmp_path).stdout
    assert "SUCCESS" in out
