"""The pure detection engine: ``(state, measurement) -> (changes, events)``. No I/O, no clocks, no Kafka.

State is a flat mapping of small JSON values, one key per series (``s|cc|asn|target``) and per event
(``e|cc|t|target``), so the Faust worker can keep it in a table and ``run_offline`` in a dict — the same code path.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from censorwatch.config import DetectionSettings, Settings
from censorwatch.models import (
    AsnEvidence,
    Event,
    EventAction,
    EventKind,
    Measurement,
    Outcome,
    explorer_measurement_url,
)

MAX_OBS = 400  # observations kept per series window: bounds state size whatever the window length
MAX_UIDS = 512  # recent uids kept per series for de-duplication
CODE = {Outcome.OK: 0, Outcome.ANOMALY: 1, Outcome.CONFIRMED: 2, Outcome.FAILURE: 3}


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials: honest at small n, unlike k/n ± normal error."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(frozen=True)
class StepResult:
    changes: dict[str, Any | None]
    events: list[Event]
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class DetectionContext:
    """What the engine knows beyond the measurements: network names and target categories."""

    asn_names: dict[int, str] = field(default_factory=dict)
    categories: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> DetectionContext:
        return cls()


class Engine:
    """Per-series evidence with a Wilson interval and hysteresis; one event per (cc, target) across ASNs."""

    def __init__(self, settings: DetectionSettings, context: DetectionContext | None = None) -> None:
        self.cfg = settings
        self.ctx = context or DetectionContext()

    def keys_for(self, m: Measurement) -> list[str]:
        return [series_state_key(m.cc, m.asn, m.target), event_state_key(m.cc, m.target)]

    def step(self, state: Mapping[str, Any], m: Measurement) -> StepResult:
        skey = series_state_key(m.cc, m.asn, m.target)
        series = dict(state.get(skey) or {"obs": [], "uids": [], "state": "insufficient"})
        if m.uid in series["uids"]:
            return StepResult({}, [], {"duplicate": 1})
        ts = m.start_time.timestamp()
        method = m.blocking_type or ("confirmed" if m.confirmed else "")
        obs = [*series["obs"], [ts, CODE[m.outcome], m.report_id or m.uid, method, m.uid]]
        obs.sort(key=lambda o: o[0])
        horizon = obs[-1][0] - self.cfg.window_hours * 3600
        obs = [o for o in obs if o[0] >= horizon][-MAX_OBS:]
        series["obs"] = obs
        series["uids"] = [*series["uids"], m.uid][-MAX_UIDS:]
        before = series["state"]
        after, evidence = self._decide(before, obs)
        series["state"] = after
        series["metric"] = (
            {"share": evidence["k"] / evidence["n"], "n": evidence["n"]} if evidence["n"] else None
        )
        if after != "blocked" and before != "blocked":
            series["metric"] = series["metric"] if evidence["k"] else None
        changes: dict[str, Any | None] = {skey: series}
        events: list[Event] = []
        if before != after and "blocked" in (before, after):
            ekey = event_state_key(m.cc, m.target)
            ev_state, event = self._group(state.get(ekey), m, after == "blocked", evidence)
            changes[ekey] = ev_state
            if event is not None:
                events.append(event)
        elif after == "blocked":
            ekey = event_state_key(m.cc, m.target)
            current = state.get(ekey)
            if current:
                current = dict(current)
                current["asns"] = {**current["asns"], str(m.asn): evidence}
                changes[ekey] = current
        return StepResult(changes, events, {})

    def tick(self, state: Mapping[str, Any], cc: str, now: datetime) -> StepResult:
        return StepResult({}, [], {})

    def _decide(self, before: str, obs: list[list[Any]]) -> tuple[str, dict[str, Any]]:
        valid = [o for o in obs if o[1] != CODE[Outcome.FAILURE]]
        k = sum(1 for o in valid if o[1] in (1, 2))
        confirmed = sum(1 for o in valid if o[1] == 2)
        n = len(valid)
        probes = len({o[2] for o in valid})
        low, high = wilson(k, n, self.cfg.confidence_z)
        methods = sorted({o[3] for o in valid if o[1] in (1, 2) and o[3]})
        evidence = {
            "k": k,
            "n": n,
            "confirmed": confirmed,
            "probes": probes,
            "low": round(low, 4),
            "high": round(high, 4),
            "methods": methods,
            "first": _iso(min((o[0] for o in valid if o[1] in (1, 2)), default=obs[-1][0])),
            "last": _iso(obs[-1][0]),
            "links": [explorer_measurement_url(o[4]) for o in valid if o[1] in (1, 2)][-3:],
        }
        floor = n >= self.cfg.min_measurements and probes >= self.cfg.min_probes
        if before == "blocked":
            state = "ok" if floor and high <= self.cfg.close_threshold else "blocked"
        elif (self.cfg.confirmed_opens and confirmed) or (floor and low >= self.cfg.open_threshold):
            state = "blocked"
        else:
            state = "ok" if floor else "insufficient"
        return state, evidence

    def _group(
        self, current: Any, m: Measurement, blocked: bool, evidence: dict[str, Any]
    ) -> tuple[Any, Event | None]:
        ev = dict(current) if current else None
        if blocked:
            if ev is None or not ev.get("open"):
                ev = {
                    "id": f"{m.cc}|target|{m.target}|{evidence['first']}",
                    "version": 0,
                    "open": True,
                    "asns": {},
                    "test": m.test_name,
                    "methods": [],
                }
                action = EventAction.OPENED
            else:
                action = EventAction.UPDATED
            ev["asns"] = {**ev["asns"], str(m.asn): evidence}
        else:
            if ev is None or not ev.get("open") or str(m.asn) not in ev["asns"]:
                return current, None
            asns = dict(ev["asns"])
            asns.pop(str(m.asn))
            ev["asns"] = asns
            ev["cleared"] = [*ev.get("cleared", []), m.asn]
            action = EventAction.UPDATED if asns else EventAction.RESOLVED
            ev["open"] = bool(asns)
        ev["methods"] = sorted(set(ev["methods"]) | set(evidence["methods"]))
        ev["version"] += 1
        return ev, self._event(ev, m, action)

    def _event(self, ev: dict[str, Any], m: Measurement, action: EventAction) -> Event:
        asns = [
            AsnEvidence(
                asn=int(asn),
                name=self.ctx.asn_names.get(int(asn), ""),
                state="blocked",
                blocked=e["k"],
                total=e["n"],
                confirmed=e["confirmed"],
                probes=e["probes"],
                share_low=e["low"],
                share_high=e["high"],
                methods=e["methods"],
                first_seen=e["first"],
                last_seen=e["last"],
            )
            for asn, e in sorted(ev["asns"].items(), key=lambda kv: int(kv[0]))
        ]
        k = sum(a.blocked for a in asns)
        n = sum(a.total for a in asns)
        low, high = wilson(k, n, self.cfg.confidence_z)
        links = [link for e in ev["asns"].values() for link in e["links"]][-5:]
        verb = {
            EventAction.OPENED: "blocked",
            EventAction.UPDATED: "still blocked",
            EventAction.RESOLVED: "unblocked",
            EventAction.REVISED: "revised",
        }[action]
        return Event(
            event_id=ev["id"],
            version=ev["version"],
            kind=EventKind.TARGET_BLOCKED,
            action=action,
            cc=m.cc,
            target=m.target,
            test_name=ev["test"],
            category=self.ctx.categories.get((m.cc, m.target)),
            asns=asns,
            cleared_asns=ev.get("cleared", []),
            methods=ev["methods"],
            blocked=k,
            total=n,
            probes=sum(a.probes for a in asns),
            share_low=round(low, 4),
            share_high=round(high, 4),
            first_seen=min((a.first_seen for a in asns if a.first_seen), default=None),
            last_seen=max((a.last_seen for a in asns if a.last_seen), default=None),
            summary=f"{m.target} {verb} in {m.cc} on {len(asns)} ISP(s)",
            explorer_links=links,
            emitted_at=m.start_time,
            source_time=m.fetched_at,
        )


def series_state_key(cc: str, asn: int, target: str) -> str:
    return f"s|{cc}|{asn}|{target}"


def event_state_key(cc: str, target: str) -> str:
    return f"e|{cc}|t|{target}"


def run_offline(
    engine: Engine, measurements: Iterable[Measurement], *, tick_every: timedelta | None = None
) -> tuple[dict[str, Any], list[Event], Counter[str]]:
    """The live path's steps over a plain dict, in input order."""
    state: dict[str, Any] = {}
    events: list[Event] = []
    counters: Counter[str] = Counter()
    for m in measurements:
        result = engine.step(state, m)
        for key, value in result.changes.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        events += result.events
        counters.update(result.counters)
    return state, events, counters
