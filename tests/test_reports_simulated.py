"""The advocacy report over a simulated Cambodian election replay: labelled SIMULATED, numbers recomputed here."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from censorwatch.cli import main


@pytest.fixture(scope="module")
def election(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    out = tmp_path_factory.mktemp("sim") / "kh-election.jsonl"
    code = main(
        [
            "simulate",
            str(shared / "kh/kh-2023-election-scenario.yaml"),
            "--seed",
            "1",
            "--test-list",
            str(shared / "test-lists/kh.csv"),
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.stat().st_size > 0
    return out


def report(measurements: Path, fmt: str, *extra: str) -> int:
    """``censorwatch report`` for the monitoring period of the seed report, over recorded measurements."""
    period = ["--country", "KH", "--since", "2023-07-01", "--until", "2023-08-15"]
    return main(["report", *period, "--source", "measurements", str(measurements), "--format", fmt, *extra])


def _monthly(path: Path) -> dict[str, Counter[str]]:
    """OONI's disjoint counters per month, computed independently from the raw JSONL."""
    months: dict[str, Counter[str]] = {}
    for line in path.open():
        item = json.loads(line)
        day = item["measurement_start_time"][:10]
        if item["test_name"] != "web_connectivity" or not "2023-07-01" <= day <= "2023-08-15":
            continue
        c = months.setdefault(day[:7], Counter())
        c["measurement_count"] += 1
        if item["failure"]:
            c["failure_count"] += 1
        elif item["confirmed"]:
            c["confirmed_count"] += 1
        elif item["anomaly"]:
            c["anomaly_count"] += 1
        else:
            c["ok_count"] += 1
    return months


def test_report_on_simulated_election_is_labelled_and_adds_up(election: Path, tmp_path: Path) -> None:
    out = tmp_path / "csv"
    code = report(election, "csv", "--out", str(out))
    assert code == 0
    tables = {p.stem: list(csv.DictReader(p.open())) for p in out.glob("*.csv")}
    monthly = next(rows for name, rows in tables.items() if "month" in name)
    expected = _monthly(election)
    for row in monthly:
        for field in ("measurement_count", "ok_count", "anomaly_count", "confirmed_count", "failure_count"):
            assert int(row[field]) == expected[row["month"]][field], (row["month"], field)
    assert {r["month"] for r in monthly} == set(expected)
    # every table says it is simulated
    for name, rows in tables.items():
        assert rows and all("SIMULATED" in json.dumps(r) for r in rows), name

    scenario = yaml.safe_load(
        (Path(__file__).resolve().parent.parent.parent / "shared/data/kh/kh-2023-election-scenario.yaml").read_text()
    )
    blocked_rows = next(rows for name, rows in tables.items() if "blocked_websites" in name)
    reported = {r["domain"] for r in blocked_rows}
    for site in scenario["blocked"]:
        host = site["url"].split("/")[2]
        assert host in reported or any(host.endswith(d) or d.endswith(host) for d in reported), host


def test_markdown_report_on_simulated_input_says_so(election: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = report(election, "md")
    assert code == 0
    text = capsys.readouterr().out
    assert "SIMULATED" in text
    assert "| data | real measurements |" not in text
