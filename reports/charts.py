"""PNG charts for the HTML report (matplotlib, Agg backend: no display, safe in servers and tests)."""

from __future__ import annotations

import io
from datetime import date

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from reports.model import Report

MAX_CATEGORY_LINES = 8
MAX_MATRIX_ROWS = 40
MAX_MATRIX_COLS = 30


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _title(report: Report, what: str) -> str:
    prefix = "SIMULATED — " if report.simulated else ""
    return f"{prefix}{what}, {report.cc} {report.since}..{report.until}"


def measurements_per_day(report: Report) -> bytes | None:
    """Stacked bars of the four disjoint classes per day: volume and blocking at a glance."""
    if not report.daily:
        return None
    days = [d for d, _ in report.daily]
    layers = [
        ("ok", "ok_count", "#7fbf7f"),
        ("anomaly", "anomaly_count", "#f0a030"),
        ("confirmed", "confirmed_count", "#d03030"),
        ("failure", "failure_count", "#a0a0a0"),
    ]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    bottom = [0] * len(days)
    for label, attr, color in layers:
        values = [getattr(c, attr) for _, c in report.daily]
        ax.bar(mdates.date2num(days), values, bottom=bottom, color=color, label=label, width=0.9)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("measurements")
    ax.set_title(_title(report, "Web measurements per day"))
    ax.legend(loc="upper left", fontsize=8, ncols=4)
    _date_axis(ax, days)
    return _png(fig)


def category_share(report: Report) -> bytes | None:
    """Anomaly + confirmed share per category over time, for the most measured categories."""
    if not report.category_series:
        return None
    top = [r.code for r in report.categories[:MAX_CATEGORY_LINES]]
    names = {r.code: r.name for r in report.categories}
    fig, ax = plt.subplots(figsize=(10, 3.8))
    all_days: list[date] = []
    for code in top:
        points = [
            (d, c.blocked / c.measurement_count) for d, c in report.category_series.get(code, []) if c.measurement_count
        ]
        if not points:
            continue
        days = [d for d, _ in points]
        all_days.extend(days)
        ax.plot(
            mdates.date2num(days),
            [100 * s for _, s in points],
            marker=".",
            label=f"{code} {names.get(code, '')}"[:40],
        )
    ax.set_ylabel("blocked or likely blocked (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(_title(report, f"Anomaly share per category (per {report.series_grain})"))
    ax.legend(loc="upper left", fontsize=7, ncols=2)
    if all_days:
        _date_axis(ax, all_days)
    return _png(fig)


def blocking_matrix(report: Report) -> bytes | None:
    """Sites x ISPs: blocked measurements where the pair counts as blocked, blank elsewhere."""
    if not report.matrix:
        return None
    sites = [s.domain for s in report.blocked][:MAX_MATRIX_ROWS]
    isps = [r.isp for r in report.isps][:MAX_MATRIX_COLS]
    grid = [[report.matrix.get((d, i.asn), 0) for i in isps] for d in sites]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(isps) + 3), max(2.5, 0.35 * len(sites) + 1.5)))
    masked = [[v if v else float("nan") for v in row] for row in grid]
    top = max((v for row in grid for v in row), default=1)
    image = ax.imshow(masked, cmap="Reds", aspect="auto", vmin=0)
    ax.set_xticks(range(len(isps)), [i.label for i in isps], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(sites)), sites, fontsize=8)
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if v:
                dark = v > 0.6 * top
                ax.text(x, y, str(v), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="blocked measurements")
    ax.set_title(_title(report, "Blocking by site and ISP"), fontsize=10)
    return _png(fig)


def _date_axis(ax: Axes, days: list[date]) -> None:
    span = (max(days) - min(days)).days
    locator = mdates.AutoDateLocator(minticks=4, maxticks=10)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d" if span < 400 else "%Y-%m"))
    ax.tick_params(axis="x", labelrotation=30)


def all_charts(report: Report) -> dict[str, bytes]:
    """Name -> PNG for the charts that have data."""
    out = {}
    for name, make in (
        ("measurements_per_day", measurements_per_day),
        ("category_share", category_share),
        ("blocking_matrix", blocking_matrix),
    ):
        png = make(report)
        if png is not None:
            out[name] = png
    return out
