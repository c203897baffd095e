"""Event builders for alert tests: one blocked site's whole life (opened, grows, method change, resolved)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from censorwatch.models import AsnEvidence, Event, EventAction, EventKind

T0 = datetime(2024, 7, 20, 6, 0, tzinfo=UTC)
NAMES = {38901: "EZECOM", 17976: "Cambodia Telecom", 24416: "Viettel Cambodia", 131178: "Opennet"}


def asn(n: int, methods: tuple[str, ...] = ("dns",), **kw: Any) -> AsnEvidence:
    base: dict[str, Any] = {
        "asn": n,
        "name": NAMES.get(n, f"Net {n}"),
        "blocked": 5,
        "total": 6,
        "probes": 3,
        "methods": list(methods),
        "first_seen": T0,
    }
    return AsnEvidence(**(base | kw))


def event(version: int, action: EventAction, asns: list[AsnEvidence], **kw: Any) -> Event:
    base: dict[str, Any] = {
        "event_id": "KH|web_connectivity|www.rfa.org",
        "version": version,
        "kind": EventKind.TARGET_BLOCKED,
        "action": action,
        "cc": "KH",
        "target": "www.rfa.org",
        "test_name": "web_connectivity",
        "category": "NEWS",
        "asns": asns,
        "methods": sorted({m for a in asns for m in a.methods}),
        "blocked": sum(a.blocked for a in asns),
        "total": sum(a.total for a in asns),
        "probes": sum(a.probes for a in asns),
        "share_low": 0.6,
        "share_high": 0.95,
        "first_seen": T0,
        "last_seen": T0 + timedelta(hours=version),
        "explorer_links": ["https://explorer.ooni.org/m/20240720060000.000000_KH_webconnectivity_abc"],
        "summary": f"version {version}",
        "emitted_at": T0 + timedelta(hours=version),
    }
    return Event(**(base | kw))


def life(event_id: str = "KH|web_connectivity|www.rfa.org", **kw: Any) -> list[Event]:
    """opened on 1 ISP -> 3 ISPs join -> method change (HTTP too) -> resolved."""
    one = [asn(38901)]
    three = [asn(38901), asn(17976), asn(24416)]
    changed = [asn(38901, ("dns", "http-failure")), asn(17976), asn(24416)]
    cleared = [asn(n, state="ok", blocked=0) for n in (38901, 17976, 24416)]
    return [
        event(1, EventAction.OPENED, one, event_id=event_id, summary="blocked on EZECOM", **kw),
        event(2, EventAction.UPDATED, three, event_id=event_id, summary="2 ISPs joined", **kw),
        event(3, EventAction.UPDATED, changed, event_id=event_id, summary="method changed: HTTP failure", **kw),
        event(
            4,
            EventAction.RESOLVED,
            cleared,
            event_id=event_id,
            summary="unblocked on all ISPs",
            cleared_asns=[38901, 17976, 24416],
            **kw,
        ),
    ]
