"""What the engine knows beyond the measurements: target categories, network names, watch windows.

Loaded once at start (files named in ``Settings.watch``); afterwards the engine only reads it, so it stays pure.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from censorwatch.config import Settings, WatchWindow
from censorwatch.data import ASN_NAMES

log = logging.getLogger(__name__)


def url_domain(url: str) -> str:
    """The domain OONI keys web measurements on (lower-cased host); a bare name (``telegram``) stays as is."""
    text = url.strip()
    if "://" not in text:
        return text.lower().rstrip("/")
    try:
        host = urlsplit(text).hostname or ""
    except ValueError:
        return ""
    return host.lower()


@dataclass(frozen=True)
class Window:
    """A watch window in engine form (epoch seconds, sets)."""

    name: str
    start: float
    end: float
    countries: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    targets: frozenset[str] = frozenset()
    asns: frozenset[int] = frozenset()
    sensitivity: float = 1.0
    route: str | None = None

    @classmethod
    def of(cls, w: WatchWindow) -> Window:
        return cls(
            name=w.name,
            start=_ts(w.start),
            end=_ts(w.end),
            countries=frozenset(c.upper() for c in w.countries),
            categories=frozenset(c.upper() for c in w.categories),
            targets=frozenset(d for d in (url_domain(u) for u in w.urls) if d),
            asns=frozenset(w.asns),
            sensitivity=w.sensitivity,
            route=w.route,
        )

    @property
    def label(self) -> str:
        return self.route or self.name

    def active(self, cc: str, t: float) -> bool:
        return self.start <= t < self.end and (not self.countries or cc in self.countries)

    def covers(self, cc: str, target: str, category: str | None, t: float) -> bool:
        if not self.active(cc, t):
            return False
        if not self.categories and not self.targets:
            return True
        return target in self.targets or (category is not None and category in self.categories)


def _ts(value: datetime) -> float:
    """Naive datetimes in the config file are UTC."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


@dataclass
class DetectionContext:
    """Categories per (cc, domain), ASN names and watch windows; empty by default (engine still works)."""

    asn_names: dict[int, str] = field(default_factory=dict)
    categories: dict[tuple[str, str], str] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> DetectionContext:
        watch = settings.watch
        ctx = cls(windows=[Window.of(w) for w in watch.windows])
        ctx.asn_names.update(load_asn_names(ASN_NAMES))  # shipped names of Cambodian networks; files may override
        for cc, path in watch.watchlists.items():
            ctx.categories.update(load_watchlist(cc, path))
        for path in watch.asn_names_files:
            ctx.asn_names.update(load_asn_names(path))
        ctx.asn_names.update(watch.asn_names)
        return ctx

    def category(self, cc: str, target: str) -> str | None:
        return self.categories.get((cc, target))

    def windows_for(self, cc: str, target: str, t: float) -> list[Window]:
        category = self.category(cc, target)
        return [w for w in self.windows if w.covers(cc, target, category, t)]

    def watched_asns(self, cc: str, t: float) -> tuple[bool, frozenset[int]]:
        """Whether any window is active for ``cc`` at ``t`` and the ASNs those windows name explicitly."""
        active = [w for w in self.windows if w.active(cc, t)]
        return bool(active), frozenset(a for w in active for a in w.asns)


def load_watchlist(cc: str, path: Path | str) -> dict[tuple[str, str], str]:
    """A Citizen Lab test list (url, category_code, ...) as {(cc, domain): category}."""
    out: dict[tuple[str, str], str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            domain = url_domain(row.get("url") or "")
            code = (row.get("category_code") or "").strip().upper()
            if domain and code:
                out.setdefault((cc.upper(), domain), code)
    return out


def load_asn_names(path: Path | str) -> dict[int, str]:
    """A CSV with ``asn`` and ``name`` columns (first name per ASN wins: files list the best evidence first)."""
    out: dict[int, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            raw = (row.get("asn") or "").strip().upper().removeprefix("AS")
            name = (row.get("name") or row.get("isp_name") or "").strip()
            if raw.isdigit() and name and not name.startswith("("):
                out.setdefault(int(raw), name)
    return out
