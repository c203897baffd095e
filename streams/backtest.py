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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from censorwatch.config import DetectionSettings, Settings, load_settings
from censorwatch.models import DeadLetter, Event, EventAction, EventKind, Measurement
from services.replay import read_measurements
from streams.detection import DetectionContext, Engine, run_offline

PROGRESS_EVERY = 5000
TRUE_EVENT = "true_event"
MUST_NOT_FIRE = ("quiet", "false_positive")  # any alert in such a row is a false alert
KINDS = (TRUE_EVENT, *MUST_NOT_FIRE)  # every kind ../shared/data/events/README.md documents
OUTSIDE = "outside_labels"  # the case holding a series' false alerts that fall in no labelled row
LABEL_COLUMNS = ("dataset", "probe_cc", "probe_asn", "target", "kind", "onset_earliest")
SIMULATED_BANNER = "**SIMULATED input**: these figures describe a simulation, not real measurements.\n\n"


class LabelError(ValueError):
    """The labels cannot be used (a bad row, named by its line, or none for the data run): a scorecard that
    silently skipped them would report figures for cases nobody checked."""


@dataclass(frozen=True)
class Label:
    """One parsed label row; times are UTC-aware so they compare with alert times."""

    line: int
    dataset: str
    cc: str
    asn: int
    target: str
    kind: str
    onset_earliest: datetime
    onset_latest: datetime
    end_earliest: datetime | None
    end_latest: datetime | None
    onset_text: str
    end_text: str


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
    simulated: bool = False  # decided from the input, so a run that alerted nothing is still labelled

    @property
    def true_cases(self) -> list[Case]:
        return [c for c in self.cases if c.kind == TRUE_EVENT]

    @property
    def quiet_cases(self) -> list[Case]:
        """Must-not-fire rows (``quiet``, ``false_positive``): their spans are the quiet series-weeks."""
        return [c for c in self.cases if c.kind in MUST_NOT_FIRE]

    def summary(self) -> dict[str, Any]:
        true, quiet = self.true_cases, self.quiet_cases
        detected = [c for c in true if c.alerts]
        latencies = [c.latency_hours for c in detected if c.latency_hours is not None]
        weeks = sum(c.weeks for c in quiet)
        false_alerts = sum(c.alerts for c in self.cases if c.kind != TRUE_EVENT)
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
            "false_alerts": false_alerts,
            "false_alerts_per_quiet_series_week": round(false_alerts / weeks, 4) if weeks else None,
            "alerts_per_true_event": round(sum(c.alerts for c in detected) / len(detected), 2) if detected else None,
            "max_alerts_per_true_event": max((c.alerts for c in true), default=0),
            "failed_cases": sum(1 for c in self.cases if not c.passed),
        }


def dataset_name(path: Path) -> str:
    """The name labels use for a file: ``ke-telegram-2023.jsonl.gz`` is dataset ``ke-telegram-2023``."""
    name = path.name.removesuffix(".gz")
    return name.removesuffix(".jsonl").removesuffix(".json")


def load_measurements(
    paths: list[Path], *, progress: bool = False, spans: dict[str, tuple[datetime, datetime]] | None = None
) -> tuple[list[Measurement], int]:
    """Normalised measurements of all files, sorted by start time (as the poller would deliver them).

    Reads through ``services.replay`` so the backtest takes exactly what ``replay`` takes (gzip, saved pages,
    JSONL); anything it would dead-letter is counted as unreadable. ``spans`` receives each dataset's first and
    last start time.
    """
    out: list[Measurement] = []
    bad = 0
    i = 0
    for path in paths:
        for _, result in read_measurements(path):
            i += 1
            if isinstance(result, DeadLetter):
                bad += 1
            else:
                out.append(result)
                if spans is not None:
                    name = dataset_name(path)
                    first, last = spans.get(name, (result.start_time, result.start_time))
                    spans[name] = (min(first, result.start_time), max(last, result.start_time))
            if progress and i % PROGRESS_EVERY == 0:
                print(f"\rbacktest: read {i} measurements", end="", file=sys.stderr, flush=True)
    if progress and i:
        print(f"\rbacktest: read {i} measurements", file=sys.stderr, flush=True)
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


def _time(text: str, column: str, where: str) -> datetime | None:
    """A label time as UTC: a date alone is 00:00 UTC, a time without a zone is UTC."""
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LabelError(f"{where}: {column} {text!r} is not an ISO date or time") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def parse_label(row: Mapping[str | None, Any], line: int, source: str = "labels") -> Label:
    """One CSV row as a ``Label``, or a ``LabelError`` naming the row and what is wrong with it."""
    where = f"{source} line {line}"
    v = {k: (val or "").strip() if isinstance(val, str) or val is None else "" for k, val in row.items() if k}
    for column in LABEL_COLUMNS:
        if not v.get(column):
            raise LabelError(f"{where}: {column} is empty")
    kind = v["kind"].lower()
    if kind not in KINDS:
        raise LabelError(f"{where}: unknown kind {v['kind']!r} (expected one of {', '.join(KINDS)})")
    cc = v["probe_cc"].upper()
    if len(cc) != 2 or not cc.isascii() or not cc.isalpha():
        raise LabelError(f"{where}: probe_cc {v['probe_cc']!r} is not a two-letter country code")
    asn_text = v["probe_asn"].upper().removeprefix("AS")
    if not asn_text.isdigit():
        raise LabelError(f"{where}: probe_asn {v['probe_asn']!r} is not an ASN (AS12345 or 12345)")
    onset_earliest = _time(v["onset_earliest"], "onset_earliest", where)
    assert onset_earliest is not None  # checked non-empty above
    onset_latest = _time(v.get("onset_latest", ""), "onset_latest", where) or onset_earliest
    end_earliest = _time(v.get("end_earliest", ""), "end_earliest", where)
    end_latest = _time(v.get("end_latest", ""), "end_latest", where)
    if onset_latest < onset_earliest:
        raise LabelError(f"{where}: onset_latest is before onset_earliest")
    if end_latest is not None and end_earliest is None:
        raise LabelError(f"{where}: end_latest is set but end_earliest is empty")
    if end_earliest is not None and end_latest is not None and end_latest < end_earliest:
        raise LabelError(f"{where}: end_latest is before end_earliest")
    if (end_earliest or end_latest or onset_latest) < onset_latest:
        raise LabelError(f"{where}: the end bracket starts before onset_latest")
    return Label(
        line,
        v["dataset"],
        cc,
        int(asn_text),
        v["target"],
        kind,
        onset_earliest,
        onset_latest,
        end_earliest,
        end_latest,
        v["onset_earliest"],
        v.get("end_latest") or "(end of data)",
    )


def load_labels(path: Path) -> list[Label]:
    """Every row of a labels CSV, all checked: a bad row stops the run instead of dropping out of the scores."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise LabelError(f"{path}: missing column(s) {', '.join(missing)}")
        return [parse_label(row, reader.line_num, str(path)) for row in reader]


def _true_window(label: Label, at: datetime) -> bool:
    """A hit lies between onset_earliest and end_earliest; an empty end_latest (blocking outlasted the data)
    leaves it open. An alert inside the end bracket is not counted as finding the event: it may be after it."""
    if at < label.onset_earliest:
        return False
    return label.end_latest is None or label.end_earliest is None or at <= label.end_earliest


def _quiet_window(label: Label, at: datetime, data_end: datetime | None) -> bool:
    end = label.end_latest or data_end
    return label.onset_earliest <= at and (end is None or at <= end)


def score(
    events: list[Event],
    labels: Sequence[Label | Mapping[str | None, Any]],
    datasets: set[str] | Mapping[str, tuple[datetime, datetime]],
    data_end: datetime | None,
) -> list[Case]:
    """Compare alerts with each label row of the datasets that were run.

    Every alert on a labelled series counts once: as the detection of the true event whose window holds it,
    otherwise as a false alert (in the must-not-fire row holding it, or in the series' ``outside_labels`` case),
    so an alert can neither count twice nor slip between rows. Raw CSV rows are parsed (and checked) here.
    ``datasets`` may give each dataset's time span (first and last measurement): a dataset's rows then see only
    the alerts inside its span, so two datasets labelling one series at different times do not count each
    other's alerts as false.
    """
    spans: Mapping[str, tuple[datetime, datetime]] = datasets if isinstance(datasets, Mapping) else {}
    alerts = sorted(asn_alerts(events), key=lambda a: a.at)
    parsed = [lb if isinstance(lb, Label) else parse_label(lb, i) for i, lb in enumerate(labels, start=2)]
    rows = [lb for lb in parsed if lb.dataset in datasets]
    cases: dict[Label, Case] = {}
    firsts: dict[Label, datetime] = {}
    series: dict[tuple[str, str, int, str], list[Label]] = {}
    for lb in rows:
        cases[lb] = Case(lb.dataset, lb.cc, lb.asn, lb.target, lb.kind, lb.onset_text, lb.end_text)
        series.setdefault((lb.dataset, lb.cc, lb.asn, lb.target), []).append(lb)
    out: list[Case] = list(cases.values())
    for (dataset, cc, asn, target), group in series.items():
        stray: list[Alert] = []
        span = spans.get(dataset)
        for a in alerts:
            if (a.cc, a.asn, a.target) != (cc, asn, target):
                continue
            if span is not None and not span[0] <= a.at <= span[1]:
                continue
            hit = next((lb for lb in group if lb.kind == TRUE_EVENT and _true_window(lb, a.at)), None)
            if hit is None:
                hit = next((lb for lb in group if lb.kind in MUST_NOT_FIRE and _quiet_window(lb, a.at, data_end)), None)
            if hit is None:
                stray.append(a)
                continue
            case = cases[hit]
            case.alerts += 1
            case.opened_notices += int(a.action == "opened")
            if hit not in firsts:
                firsts[hit] = a.at
                case.first_alert = a.at.isoformat()
        if stray:
            out.append(
                Case(
                    dataset,
                    cc,
                    asn,
                    target,
                    OUTSIDE,
                    stray[0].at.isoformat(),
                    stray[-1].at.isoformat(),
                    alerts=len(stray),
                    first_alert=stray[0].at.isoformat(),
                    opened_notices=sum(a.action == "opened" for a in stray),
                    passed=False,
                )
            )
    for lb, case in cases.items():
        if lb.kind == TRUE_EVENT:
            if lb in firsts:  # an alert inside the onset bracket has latency 0: the block may already be on
                hours = (firsts[lb] - lb.onset_latest).total_seconds() / 3600
                case.latency_hours = round(max(hours, 0.0), 1)
            case.passed = case.alerts == 1
        else:
            end = lb.end_latest or data_end or lb.onset_earliest
            case.weeks = max((end - lb.onset_earliest).total_seconds(), 0.0) / (7 * 86400)
            case.passed = case.alerts == 0
    return out


def backtest(
    paths: list[Path],
    labels_path: Path | None,
    settings: DetectionSettings | None = None,
    context: DetectionContext | None = None,
    *,
    progress: bool = False,
    tick_every: timedelta | None = None,
) -> tuple[Scorecard, list[Event]]:
    """Run the engine over the files and score it; returns the scorecard and every notice.

    Raises ``LabelError`` when a label row is unusable or none is for the files run (nothing would be scored).
    """
    spans: dict[str, tuple[datetime, datetime]] = {}
    measurements, bad = load_measurements(paths, progress=progress, spans=spans)
    engine = Engine(settings or DetectionSettings(), context)
    _, events, counters = run_offline(engine, measurements, tick_every=tick_every)
    card = Scorecard(
        measurements=len(measurements),
        unreadable=bad,
        counters=counters,
        simulated=any(m.simulated for m in measurements),
    )
    card.events = len({e.event_id for e in events})
    card.notices = Counter(f"{e.kind.value}:{e.action.value}" for e in events)
    if labels_path is not None:
        labels = load_labels(labels_path)
        datasets = {dataset_name(p) for p in paths}
        if not any(lb.dataset in datasets for lb in labels):
            raise LabelError(f"{labels_path}: no label row is for the data run ({', '.join(sorted(datasets))})")
        data_end = measurements[-1].start_time if measurements else None
        never = (datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC))  # a dataset with nothing read
        card.cases = score(events, labels, {d: spans.get(d, never) for d in datasets}, data_end)
    return card, events


def render_markdown(card: Scorecard) -> str:
    s = card.summary()
    lines = [
        *([SIMULATED_BANNER.rstrip("\n"), ""] if card.simulated else []),
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
    doc = {"simulated": card.simulated, "summary": card.summary(), "cases": [asdict(c) for c in card.cases]}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"


def build_parser(sub: Any) -> None:
    """Register ``backtest`` on the censorwatch CLI."""
    p = sub.add_parser("backtest", help="score the detection engine on recorded, labelled measurements")
    p.add_argument("data", nargs="+", type=Path, metavar="DATA", help="list-item JSONL (or .gz) or saved pages")
    p.add_argument("--labels", type=Path, help="labels CSV (events/labels.csv format)")
    p.add_argument("--format", choices=["md", "json"], default="md")
    p.add_argument("--out", type=Path, help="write the scorecard here (default: stdout)")
    p.set_defaults(func=cmd_backtest)


def cmd_backtest(args: argparse.Namespace) -> int:
    settings: Settings = load_settings(**({"config_file": args.config} if args.config else {}))
    try:
        card, _ = backtest(
            args.data,
            args.labels,
            settings.detection,
            DetectionContext.from_settings(settings),
            progress=True,
            tick_every=timedelta(hours=1),
        )
    except (LabelError, OSError) as exc:
        print(f"censorwatch backtest: {exc}", file=sys.stderr)
        return 2
    text = render_json(card) if args.format == "json" else render_markdown(card)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0 if card.summary()["failed_cases"] == 0 else 1
