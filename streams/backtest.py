"""``censorwatch backtest DATA... --labels LABELS.csv``: score the engine on recorded, labelled measurements.

Runs the same pure engine the live worker runs (``run_offline``) over list-item JSONL and compares what it would
have alerted with the labels (``../shared/data/events/README.md``): event recall, median detection latency from
``onset_latest``, false alerts per quiet series-week, alerts per true event, and every must-not-fire case.

An *alert* on a network is the moment an ASN enters a target event: the ``opened`` notice (for every ASN in it)
or the ``updated`` notice in which it joined. That is what reaches a responder as "X is blocked on ISP Y".
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from censorwatch.config import DetectionSettings, Settings, load_settings
from censorwatch.models import Event, EventAction, EventKind, Measurement
from services.normalise import NormaliseError, normalise
from streams.detection import DetectionContext, Engine, run_offline

PROGRESS_EVERY = 5000


@dataclass(frozen=True)
class Alert:
    cc: str
    asn: int
    target: str
    at: datetime
    event_id: str
    action: str


@dataclass
class Case:
    """One label row and what the engine did in its time span."""

    dataset: str
    cc: str
    asn: int
    target: str
    kind: str
    start: str
    end: str
    alerts: int = 0
    first_alert: str | None = None
    latency_hours: float | None = None
    opened_notices: int = 0
    passed: bool = True
    weeks: float = 0.0


@dataclass
class Scorecard:
    measurements: int = 0
    unreadable: int = 0
    events: int = 0
    notices: Counter[str] = field(default_factory=Counter)
    counters: Counter[str] = field(default_factory=Counter)
    cases: list[Case] = field(default_factory=list)

    @property
    def true_cases(self) -> list[Case]:
        return [c for c in self.cases if c.kind == "true_event"]

    @property
    def quiet_cases(self) -> list[Case]:
        return [c for c in self.cases if c.kind == "quiet"]

    def summary(self) -> dict[str, Any]:
        true, quiet = self.true_cases, self.quiet_cases
        detected = [c for c in true if c.alerts]
        latencies = [c.latency_hours for c in detected if c.latency_hours is not None]
        weeks = sum(c.weeks for c in quiet)
        return {
            "measurements": self.measurements,
            "unreadable": self.unreadable,
            "notices": dict(self.notices),
            "counters": dict(self.counters),
            "true_events": len(true),
            "detected": len(detected),
            "recall": round(len(detected) / len(true), 3) if true else None,
            "median_latency_hours": round(statistics.median(latencies), 1) if latencies else None,
            "quiet_series_weeks": round(weeks, 1),
            "false_alerts": sum(c.alerts for c in quiet),
            "false_alerts_per_quiet_series_week": round(sum(c.alerts for c in quiet) / weeks, 4) if weeks else None,
            "alerts_per_true_event": round(sum(c.alerts for c in detected) / len(detected), 2) if detected else None,
            "max_alerts_per_true_event": max((c.alerts for c in true), default=0),
            "failed_cases": sum(1 for c in self.cases if not c.passed),
        }


def read_items(paths: Iterable[Path]) -> Iterator[tuple[str, Any]]:
    """(dataset name, JSON item or None if unreadable) for every line of every JSONL file, in file order."""
    for path in paths:
        with path.open("rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    yield path.name.removesuffix(".jsonl"), orjson.loads(line)
                except orjson.JSONDecodeError:
                    yield path.name.removesuffix(".jsonl"), None


def load_measurements(paths: list[Path], *, progress: bool = False) -> tuple[list[Measurement], int]:
    """Normalised measurements of all files, sorted by start time (as the poller would deliver them)."""
    out: list[Measurement] = []
    bad = 0
    for i, (_, item) in enumerate(read_items(paths), start=1):
        try:
            out.append(normalise(item))
        except NormaliseError:
            bad += 1
        if progress and i % PROGRESS_EVERY == 0:
            print(f"\rbacktest: read {i} measurements", end="", file=sys.stderr, flush=True)
    if progress and out:
        print(f"\rbacktest: read {len(out) + bad} measurements", file=sys.stderr, flush=True)
    out.sort(key=lambda m: (m.start_time, m.uid))
    return out, bad


def asn_alerts(events: Iterable[Event]) -> list[Alert]:
    """Every moment an ASN entered a target event (opened with it, or joined it in an update)."""
    members: dict[str, set[int]] = {}
    out: list[Alert] = []
    for ev in events:
        if ev.kind != EventKind.TARGET_BLOCKED:
            continue
        now = {a.asn for a in ev.asns} if ev.action != EventAction.RESOLVED else set()
        before = members.get(ev.event_id, set())
        if ev.action in (EventAction.OPENED, EventAction.UPDATED, EventAction.REVISED):
            for asn in sorted(now - before):
                out.append(Alert(ev.cc, asn, ev.target, ev.emitted_at, ev.event_id, ev.action.value))
        members[ev.event_id] = now
    return out


def _time(text: str) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def score(
    events: list[Event], labels: list[dict[str, str]], datasets: set[str], data_end: datetime | None
) -> list[Case]:
    """Compare alerts with each label row of the datasets that were run."""
    alerts = asn_alerts(events)
    cases: list[Case] = []
    for row in labels:
        if row["dataset"] not in datasets or row["kind"] not in ("true_event", "quiet"):
            continue
        asn = int(row["probe_asn"].upper().removeprefix("AS"))
        start = _time(row["onset_earliest"])
        end = _time(row["end_latest"]) or data_end
        assert start is not None
        case = Case(
            row["dataset"],
            row["probe_cc"],
            asn,
            row["target"],
            row["kind"],
            row["onset_earliest"],
            row["end_latest"] or "(end of data)",
        )
        hits = [
            a
            for a in alerts
            if (a.cc, a.asn, a.target) == (case.cc, asn, case.target) and a.at >= start and (end is None or a.at <= end)
        ]
        case.alerts = len(hits)
        case.opened_notices = len({a.event_id for a in hits if a.action == "opened"})
        if hits:
            case.first_alert = hits[0].at.isoformat()
        if case.kind == "true_event":
            onset = _time(row["onset_latest"]) or start
            if hits:
                case.latency_hours = round((hits[0].at - onset).total_seconds() / 3600, 1)
            case.passed = case.alerts == 1
        else:
            span = ((end or start) - start).total_seconds()
            case.weeks = max(span, 0.0) / (7 * 86400)
            case.passed = case.alerts == 0
        cases.append(case)
    return cases


def backtest(
    paths: list[Path],
    labels_path: Path | None,
    settings: DetectionSettings | None = None,
    context: DetectionContext | None = None,
    *,
    progress: bool = False,
    tick_every: timedelta | None = None,
) -> tuple[Scorecard, list[Event]]:
    """Run the engine over the files and score it; returns the scorecard and every notice."""
    measurements, bad = load_measurements(paths, progress=progress)
    engine = Engine(settings or DetectionSettings(), context)
    _, events, counters = run_offline(engine, measurements, tick_every=tick_every)
    card = Scorecard(measurements=len(measurements), unreadable=bad, counters=counters)
    card.events = len({e.event_id for e in events})
    card.notices = Counter(f"{e.kind.value}:{e.action.value}" for e in events)
    if labels_path is not None:
        with labels_path.open(newline="", encoding="utf-8") as fh:
            labels = list(csv.DictReader(fh))
        datasets = {p.name.removesuffix(".jsonl") for p in paths}
        data_end = measurements[-1].start_time if measurements else None
        card.cases = score(events, labels, datasets, data_end)
    return card, events


def render_markdown(card: Scorecard) -> str:
    s = card.summary()
    lines = [
        "# Detection backtest scorecard",
        "",
        f"{s['measurements']} measurements ({s['unreadable']} unreadable), notices: "
        + ", ".join(f"{k} {v}" for k, v in sorted(s["notices"].items())),
        "",
        "| metric | value |",
        "|---|---|",
        f"| event recall | {s['detected']}/{s['true_events']} ({s['recall']}) |",
        f"| median detection latency from onset_latest (h) | {s['median_latency_hours']} |",
        f"| false alerts per quiet series-week | {s['false_alerts_per_quiet_series_week']} "
        f"({s['false_alerts']} in {s['quiet_series_weeks']} series-weeks) |",
        f"| alerts per true event (mean / max) | {s['alerts_per_true_event']} / {s['max_alerts_per_true_event']} |",
        f"| counters | {', '.join(f'{k} {v}' for k, v in sorted(s['counters'].items())) or '-'} |",
        "",
        "| dataset | ASN | target | kind | span | alerts | first alert | latency h | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in card.cases:
        lines.append(
            f"| {c.dataset} | AS{c.asn} | {c.target} | {c.kind} | {c.start[:16]} .. {c.end[:16]} | {c.alerts} "
            f"| {(c.first_alert or '-')[:16]} | {c.latency_hours if c.latency_hours is not None else '-'} "
            f"| {'yes' if c.passed else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def render_json(card: Scorecard) -> str:
    doc = {"summary": card.summary(), "cases": [asdict(c) for c in card.cases]}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"


def build_parser(sub: Any) -> None:
    """Register ``backtest`` on the censorwatch CLI."""
    p = sub.add_parser("backtest", help="score the detection engine on recorded, labelled measurements")
    p.add_argument("data", nargs="+", type=Path, metavar="DATA", help="list-item JSONL files")
    p.add_argument("--labels", type=Path, help="labels CSV (events/labels.csv format)")
    p.add_argument("--format", choices=["md", "json"], default="md")
    p.add_argument("--out", type=Path, help="write the scorecard here (default: stdout)")
    p.set_defaults(func=cmd_backtest)


def cmd_backtest(args: argparse.Namespace) -> int:
    settings: Settings = load_settings(**({"config_file": args.config} if args.config else {}))
    card, events = backtest(
        args.data,
        args.labels,
        settings.detection,
        DetectionContext.from_settings(settings),
        progress=True,
        tick_every=timedelta(hours=1),
    )
    text = render_json(card) if args.format == "json" else render_markdown(card)
    if any(e.simulated for e in events):
        text = "**SIMULATED input**: these figures describe a simulation, not real measurements.\n\n" + text
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0 if card.summary()["failed_cases"] == 0 else 1
