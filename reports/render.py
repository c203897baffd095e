"""Markdown, HTML and CSV from a ``Report``. All print the same ``tables``, so they never drift."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reports.model import Report

SIMULATED_BANNER = (
    "SIMULATED DATA — this report was built from simulated input, not from real measurements. "
    "Do not cite its numbers as evidence."
)
ATTRIBUTION = (
    "Data: OONI (Open Observatory of Network Interference), CC BY-NC-SA 4.0. "
    "Test lists and categories: Citizen Lab, CC BY-NC-SA 4.0."
)
Cell = str | int


@dataclass(frozen=True)
class Table:
    name: str  # file stem for CSV
    title: str
    headers: tuple[str, ...]
    rows: list[tuple[Cell, ...]]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _opt(x: int | None) -> Cell:
    return "n/a" if x is None else x


def tables(report: Report) -> list[Table]:
    s = report.summary
    summary = Table(
        "summary",
        "Summary",
        ("item", "value"),
        [
            ("data", "SIMULATED" if report.simulated else "real measurements"),
            ("country", report.cc),
            ("period", f"{report.since} to {report.until} (inclusive, UTC)"),
            ("source", report.source),
            ("measurements", _opt(s.measurements)),
            ("websites tested", _opt(s.websites)),
            ("ISPs (ASNs) tested", _opt(s.isps)),
            ("websites blocked or likely blocked", s.blocked_websites),
            ("ISPs that blocked at least one website", s.blocking_isps),
        ],
    )
    categories = Table(
        "categories",
        "Websites by category",
        ("category_code", "category", "websites", "measurements", "blocked_or_likely_blocked", "share"),
        [(r.code, r.name, r.websites, r.measurements, r.blocked, _pct(r.share)) for r in report.categories],
    )
    months = Table(
        "months",
        "Measurements per month",
        ("month", "measurement_count", "ok_count", "anomaly_count", "confirmed_count", "failure_count"),
        [
            (
                m.month,
                m.counts.measurement_count,
                m.counts.ok_count,
                m.counts.anomaly_count,
                m.counts.confirmed_count,
                m.counts.failure_count,
            )
            for m in report.months
        ],
    )
    blocked = Table(
        "blocked_websites",
        "Blocked websites",
        (
            "url",
            "domain",
            "category",
            "isps",
            "methods",
            "first_evidence",
            "last_evidence",
            "measurements",
            "blocked_measurements",
            "explorer_links",
        ),
        [
            (
                b.url,
                b.domain,
                b.category,
                "; ".join(i.label for i in b.isps),
                ", ".join(b.methods) or "unknown",
                str(b.first or ""),
                str(b.last or ""),
                b.measurements,
                b.blocked_measurements,
                " ".join(b.links),
            )
            for b in report.blocked
        ],
    )
    isps = Table(
        "isps",
        "Blocking per ISP",
        ("isp", "asn", "websites_blocked", "by_method"),
        [
            (
                r.isp.name or "(unknown name)",
                f"AS{r.isp.asn}",
                r.websites_blocked,
                ", ".join(f"{m}: {n}" for m, n in r.by_method),
            )
            for r in report.isps
        ],
    )
    out = [summary, categories, months, blocked, isps]
    if report.simulated:
        out = [Table(t.name, f"{t.title} (SIMULATED)", t.headers, t.rows) for t in out]
    return out


def _empty(report: Report, t: Table) -> str:
    """An empty table: "n/a" where the source cannot know (an event log has no totals), else "(none)"."""
    return "n/a" if not report.has_totals and t.name in ("categories", "months") else "(none)"


def _method_text(report: Report) -> list[str]:
    r = report.rule
    return [
        "Counters are OONI's disjoint classes (aggregation API): failure, else confirmed, else anomaly, "
        "else ok; "
        "'blocked or likely blocked' = anomaly + confirmed.",
        "A website counts as blocked on an ISP when the detection engine said so (event log), or, from "
        f"counts, when at least {r.min_blocked} measurements there were anomalous or confirmed and they were "
        "at least "
        f"{_pct(r.min_share)} of the non-failed ones. Anomalies are not "
        "proof; follow the Explorer links.",
    ]


# ---- markdown ------------------------------------------------------------------------------------


def _md_cell(v: Cell) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _is_web_link(url: str) -> bool:
    """Only http(s) becomes a link: an event's ``explorer_links`` could hold ``javascript:`` or ``data:``."""
    return url.lower().startswith(("https://", "http://"))


def _md_links(text: str) -> str:
    return " ".join(
        f"[{i + 1}]({u})" if _is_web_link(u) else f"`{u.replace('`', '')}`" for i, u in enumerate(text.split())
    )


def to_markdown(report: Report) -> str:
    lines = [f"# Internet censorship report: {report.cc}, {report.since} to {report.until}", ""]
    if report.simulated:
        lines += [f"> **{SIMULATED_BANNER}**", ""]
    for t in tables(report):
        lines += [f"## {t.title}", ""]
        if not t.rows:
            lines += [_empty(report, t), ""]
            continue
        lines.append("| " + " | ".join(t.headers) + " |")
        lines.append("|" + "---|" * len(t.headers))
        for row in t.rows:
            cells = [
                _md_links(str(v)) if h == "explorer_links" else _md_cell(v) for h, v in zip(t.headers, row, strict=True)
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Method", ""] + [f"- {x}" for x in _method_text(report) + report.notes] + ["", ATTRIBUTION, ""]
    return "\n".join(lines)


# ---- HTML ----------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.n{text-align:right}
.sim{background:#fde2e2;border:2px solid #c00;padding:0.8em;font-weight:bold;color:#900}
img{max-width:100%;display:block;margin:0.5em 0 1.5em}
"""


def _html_cell(header: str, v: Cell) -> str:
    if header == "explorer_links":
        links = (
            f'<a href="{html.escape(u)}">{i + 1}</a>' if _is_web_link(u) else html.escape(u)
            for i, u in enumerate(str(v).split())
        )
        return "<td>" + " ".join(links) + "</td>"
    cls = ' class="n"' if isinstance(v, int) else ""
    return f"<td{cls}>{html.escape(str(v))}</td>"


def to_html(report: Report, charts: dict[str, bytes] | None = None) -> str:
    """A single self-contained page: charts are embedded as base64 PNGs so it can be mailed or printed."""
    title = f"Internet censorship report: {report.cc}, {report.since} to {report.until}"
    if report.simulated:
        title = "SIMULATED — " + title
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if report.simulated:
        out.append(f'<p class="sim">{html.escape(SIMULATED_BANNER)}</p>')
    for t in tables(report):
        out.append(f"<h2>{html.escape(t.title)}</h2>")
        if not t.rows:
            out.append(f"<p>{_empty(report, t)}</p>")
            continue
        out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.headers) + "</tr></thead>")
        out.append("<tbody>")
        for row in t.rows:
            out.append("<tr>" + "".join(_html_cell(h, v) for h, v in zip(t.headers, row, strict=True)) + "</tr>")
        out.append("</tbody></table>")
    captions = {
        "measurements_per_day": "Measurements per day",
        "category_share": "Anomaly share per category over time",
        "blocking_matrix": "Blocking by site and ISP",
    }
    if charts:
        out.append("<h2>Charts</h2>")
        for name, png in charts.items():
            data = base64.b64encode(png).decode("ascii")
            alt = captions.get(name, name) + (" (SIMULATED)" if report.simulated else "")
            out.append(f"<h3>{html.escape(alt)}</h3>")
            out.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
    out.append("<h2>Method</h2><ul>")
    out += [f"<li>{html.escape(x)}</li>" for x in _method_text(report) + report.notes]
    out.append(f"</ul><p><small>{html.escape(ATTRIBUTION)}</small></p></body></html>")
    return "\n".join(out)


# ---- CSV -----------------------------------------------------------------------------------------


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(v: Cell) -> Cell:
    """A text cell a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, CR) gets a leading ``'``.

    Targets, categories and ISP names come from measurements and events anyone can submit.
    """
    return "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v


def _csv_text(t: Table, simulated: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    headers: Sequence[str] = ("data", *t.headers) if simulated else t.headers
    w.writerow(headers)
    for row in t.rows:
        cells = [_csv_cell(v) for v in row]
        w.writerow(("SIMULATED", *cells) if simulated else cells)
    return buf.getvalue()


def to_csv_files(report: Report, directory: Path) -> list[Path]:
    """One CSV per table (``summary.csv``, ``categories.csv``, ...); simulated: a ``data`` column."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in tables(report):
        path = directory / f"{t.name}.csv"
        path.write_text(_csv_text(t, report.simulated), encoding="utf-8")
        paths.append(path)
    return paths


def to_csv_stream(report: Report) -> str:
    """All tables in one text (for stdout): each after a ``# <name>`` line, then a blank line."""
    return "\n".join(f"# {t.name}\n{_csv_text(t, report.simulated)}" for t in tables(report))
