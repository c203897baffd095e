"""The pure detection engine: ``(state, measurement) -> (changes, events)``. No I/O, no clocks, no Kafka.

State is a flat mapping of small JSON values, all of one country (the measurement topic is keyed by country):

- ``c|CC``            country index: first and latest event time seen (watermark), last-seen time per ASN;
- ``s|CC|ASN|TARGET`` one series: recent observations (time, outcome, probe, method, uid) and its state;
- ``n|CC|ASN``        one network: how many targets on it were measured and are failing, per shard (outages);
- ``n|CC|ASN|SHARD``  those targets' entries (when last measured, failing or not), spread over 32 shards;
- ``e|CC|t|TARGET``   the target event (one per site or app, across ASNs);
- ``e|CC|n|ASN``      the network outage event; ``e|CC|g|ASN`` the coverage-gap event.

The Faust worker keeps it in a table and ``run_offline`` in a dict; both apply ``StepResult.changes`` the same way,
so live and offline runs give the same events for the same input order. Nothing here reads the wall clock: times
come from the measurements (clamped against their receive time) and the per-country watermark.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import itemgetter
from typing import Any, Literal

from censorwatch.config import DetectionSettings
from censorwatch.models import (
    AsnEvidence,
    Change,
    Event,
    EventAction,
    EventKind,
    Measurement,
    Outcome,
    explorer_measurement_url,
    method_names,
)
from streams.detection.context import DetectionContext
from streams.detection.stats import cusum_up, llr_weights, wilson

NETWORK_PRUNE_SECONDS = 3600.0  # how often an ASN's target list is pruned to the window (measurement time)
NETWORK_SHARDS = 32  # keys an ASN's per-target entries are spread over (~60 of ~1,900 targets each)
MAX_OBS = 240  # observations kept per series: bounds a table value whatever the window and volume
MAX_POOLED = 300  # observations kept per target across ASNs
OK, ANOMALY, CONFIRMED, FAILURE = 0, 1, 2, 3
CODE = {Outcome.OK: OK, Outcome.ANOMALY: ANOMALY, Outcome.CONFIRMED: CONFIRMED, Outcome.FAILURE: FAILURE}
BLOCKED, DOWN, STATE_OK, INSUFFICIENT = "blocked", "down", "ok", "insufficient"
LINKS_PER_ASN = 3
REVISED_NOTICE_EVERY = 3600.0  # at most one "revised" notice per event per hour of watermark (measurement) time
LINKS_PER_EVENT = 5


@dataclass(frozen=True)
class StepResult:
    """What one step wants done: state entries to set (None = delete), notices to send, counters to add."""

    changes: dict[str, Any | None]
    events: list[Event]
    counters: dict[str, int] = field(default_factory=dict)


def country_key(cc: str) -> str:
    return f"c|{cc}"


def series_state_key(cc: str, asn: int, target: str) -> str:
    return f"s|{cc}|{asn}|{target}"


def network_state_key(cc: str, asn: int) -> str:
    return f"n|{cc}|{asn}"


def network_shard_key(cc: str, asn: int, shard: int) -> str:
    return f"n|{cc}|{asn}|{shard}"


@lru_cache(maxsize=65536)
def network_shard(target: str) -> int:
    """The shard of a target's network entry: stable across processes (``hash()`` of a str is not)."""
    return zlib.crc32(target.encode()) % NETWORK_SHARDS


def pooled_state_key(cc: str, target: str) -> str:
    return f"p|{cc}|{target}"


def _short(uid: str) -> str:
    return "#" + hashlib.blake2b(uid.encode(), digest_size=5).hexdigest()


def event_state_key(cc: str, target: str) -> str:
    return f"e|{cc}|t|{target}"


def outage_state_key(cc: str, asn: int) -> str:
    return f"e|{cc}|n|{asn}"


def gap_state_key(cc: str, asn: int) -> str:
    return f"e|{cc}|g|{asn}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _probe(m: Measurement) -> str:
    """Probe-run identity, hashed short. An empty report_id (e.g. pipeline-v5 exports) counts the measurement
    as its own probe run: the probe floor then degrades to the measurement floor, which is the honest reading."""
    return _probe_id(m.report_id or f"uid:{m.uid}")


@lru_cache(maxsize=4096)
def _probe_id(ident: str) -> str:
    """Cached: a probe run's ~100 measurements arrive together."""
    return hashlib.blake2b(ident.encode(), digest_size=6).hexdigest()


def is_simulated(m: Measurement) -> bool:
    """Simulated input is marked in its uid (``..._sim<hex>``): events built on it say so."""
    return m.simulated


_obs_time = itemgetter(0)  # an observation's time (a C-level key for bisect and sort: called per probe)


@lru_cache(maxsize=4096)
def _hour_start(yyyymmddhh: str) -> float:
    """Epoch seconds of an hour: cached, as a stream's uids share a handful of hours (strptime per
    measurement was a tenth of the engine's time)."""
    return datetime(
        int(yyyymmddhh[0:4]), int(yyyymmddhh[4:6]), int(yyyymmddhh[6:8]), int(yyyymmddhh[8:10]), tzinfo=UTC
    ).timestamp()


def receive_time(m: Measurement) -> float | None:
    """When the collector received it: the uid's ``YYYYMMDDHHMMSS.ffffff_`` prefix, else the fetch time."""
    head = m.uid[:21]
    try:
        if len(head) != 21 or head[14] != "." or not (head[:14].isdigit() and head[15:].isdigit()):
            raise ValueError(head)
        minute, second = int(head[10:12]), int(head[12:14])
        if minute > 59 or second > 59:
            raise ValueError(head)
        return _hour_start(head[:10]) + minute * 60 + second + int(head[15:21]) / 1e6
    except ValueError:
        return m.fetched_at.timestamp() if m.fetched_at else None


class Engine:
    """Per-series evidence (CUSUM to open, Wilson to clear), grouped into per-target and per-network events."""

    def __init__(self, settings: DetectionSettings, context: DetectionContext | None = None) -> None:
        self.cfg = settings
        self.ctx = context or DetectionContext()
        self._prune_every = min(NETWORK_PRUNE_SECONDS, settings.window_hours * 3600)
        self._llr = llr_weights(settings.cusum_p0, settings.cusum_p1)

    # ----------------------------------------------------------------------------------------------- helpers
    def event_time(self, m: Measurement) -> float:
        """The probe's start time, clamped to the receive time when the probe clock runs ahead of it."""
        t = m.start_time.timestamp()
        recv = receive_time(m)
        if recv is not None and t > recv + self.cfg.future_skew_seconds:
            return recv
        return t

    def keys_for(self, m: Measurement) -> list[str]:
        """The state keys ``step`` reads for this measurement (lets the Faust agent prefetch). When evidence
        pooled across ISPs opens an event, ``step`` also reads the target's other series ``s|CC|*|TARGET``
        (the ASNs listed in ``p|CC|TARGET``); the worker's read-through view serves those from the table."""
        return [
            country_key(m.cc),
            series_state_key(m.cc, m.asn, m.target),
            pooled_state_key(m.cc, m.target),
            network_state_key(m.cc, m.asn),
            *(network_shard_key(m.cc, m.asn, i) for i in range(NETWORK_SHARDS)),  # all only when pruning
            event_state_key(m.cc, m.target),
            outage_state_key(m.cc, m.asn),
            gap_state_key(m.cc, m.asn),
        ]

    def _name(self, asn: int) -> str:
        return self.ctx.asn_names.get(asn, "")

    # ---------------------------------------------------------------------------------------------- step
    def step(self, state: Mapping[str, Any], m: Measurement) -> StepResult:
        """Fold one measurement into the state of its country; return the changes and any notices."""
        cfg = self.cfg
        cc, asn, target = m.cc, m.asn, m.target
        t = self.event_time(m)
        ckey = country_key(cc)
        country = dict(state.get(ckey) or {"t0": t, "wm": t, "asns": {}})
        wm = float(country["wm"])
        if t < wm - cfg.revision_window_hours * 3600:
            return StepResult({}, [], {"too_late": 1})
        skey = series_state_key(cc, asn, target)
        series = dict(state.get(skey) or {"o": [], "st": INSUFFICIENT, "f0": t})
        obs: list[list[Any]] = list(series["o"])
        uid, short_uid = m.uid, _short(m.uid)
        t_obs = round(t, 3)
        i = bisect_left(obs, t_obs, key=_obs_time)  # obs is in time order; a duplicate has the same time
        while i < len(obs) and obs[i][0] == t_obs:
            if obs[i][4] == uid or obs[i][4] == short_uid:
                return StepResult({}, [], {"duplicate": 1})
            i += 1
        if len(obs) >= MAX_OBS and t_obs < obs[0][0]:
            # Older than everything a busy series keeps: it could not count there, and a second delivery of it
            # could not be told from a first (its uid is no longer kept), so it would count twice elsewhere.
            return StepResult({}, [], {"too_late": 1})
        late = t < wm - cfg.late_after_seconds
        counters: dict[str, int] = {}
        changes: dict[str, Any | None] = {}
        events: list[Event] = []
        sim = is_simulated(m)

        # Country bookkeeping: watermark, first time, last-seen per ASN (coverage gaps).
        country["t0"] = min(float(country["t0"]), t)
        country["wm"] = max(wm, t)
        asns = dict(country["asns"])
        last, count = asns.get(str(asn), [t, 0])
        asns[str(asn)] = [max(float(last), t), min(int(count) + 1, 1_000_000)]
        country["asns"] = asns
        changes[ckey] = country

        gkey = gap_state_key(cc, asn)
        gap = state.get(gkey)
        # A coverage gap ends when the network is heard from again: by a measurement recent enough that the next
        # tick would not call the network silent. A late upload from the silent time does not end it (the tick
        # would re-open it at once: a resolved/opened pair for nothing).
        recent = (float(country["wm"]) - asns[str(asn)][0]) / 3600 < cfg.coverage_gap_hours
        if gap and gap.get("open") and recent:
            gap = {**gap, "open": False, "v": gap["v"] + 1}
            changes[gkey] = gap
            events.append(
                self._gap_event(
                    gap,
                    cc,
                    asn,
                    EventAction.RESOLVED,
                    t,
                    sim,
                    f"AS{asn} {self._name(asn)} is sending measurements again".strip(),
                    Change(what="gap_resolved", asn=asn),
                )
            )

        # Series: insert (late data lands in its place), prune, evaluate.
        outcome = CODE[m.outcome]
        bad = outcome in (ANOMALY, CONFIRMED)
        method = m.blocking_type or ("fingerprint" if m.confirmed_by else "unspecified")
        # ok measurements keep only a short hash of their uid (de-duplication); anomalies keep it whole (links)
        probe = _probe(m)
        entry = [t_obs, outcome, probe, method if bad else "", uid if bad else short_uid]
        in_order = not obs or (obs[-1][0], obs[-1][4]) <= (entry[0], entry[4])
        obs.append(entry)
        if not in_order:  # late data lands in its place
            obs.sort(key=lambda o: (o[0], o[4]))
        latest = float(obs[-1][0])
        keep = max(cfg.window_hours, cfg.revision_window_hours) * 3600
        if obs[0][0] < latest - keep or len(obs) > MAX_OBS:
            obs = obs[bisect_left(obs, latest - keep, key=_obs_time) :][-MAX_OBS:]
        series["o"] = obs
        series["f0"] = min(float(series.get("f0", t)), t)
        if outcome != FAILURE and t - float(country["t0"]) <= cfg.warmup_hours * 3600 and "clr" not in series:
            k_hist, n_hist = series.get("h", [0, 0])  # warm-up history, until the series first clears
            series["h"] = [k_hist + (1 if bad else 0), n_hist + 1]
        if sim:
            series["sim"] = True
        if series["st"] == BLOCKED and outcome != FAILURE:
            self._track_clean_run(series, obs, t_obs, bad, probe)
        evidence = self._evidence(obs, latest, float(series.get("clr", 0.0)))

        # Network: is this target failing on this ASN? Many failing at once = outage (inhibits target alerts).
        outage_changes, outage_events, outage_open = self._network(state, cc, asn, target, obs, latest, sim)
        changes.update(outage_changes)
        events += outage_events

        # Pooled evidence for the target across ASNs (sparse networks rarely reach a floor on their own).
        pkey = pooled_state_key(cc, target)
        pooled = dict(state.get(pkey) or {"o": [], "f0": t})
        pobs = list(pooled["o"])
        cutoff = latest - cfg.pooled_window_hours * 3600
        if pobs and pobs[0][0] < cutoff:
            pobs = pobs[bisect_left(pobs, cutoff, key=_obs_time) :]
        if outcome != FAILURE:
            in_order = not pobs or pobs[-1][0] <= t_obs
            pobs.append([t_obs, outcome, probe, asn])
            if not in_order:
                pobs.sort(key=_obs_time)
        pooled["o"] = pobs[-MAX_POOLED:]
        pooled["f0"] = min(float(pooled.get("f0", t)), t)
        changes[pkey] = pooled

        ekey = event_state_key(cc, target)
        ev = state.get(ekey)
        event_open = bool(ev and ev.get("open"))
        others = event_open and ev is not None and any(a != str(asn) for a in ev["a"])
        before = series["st"]
        after = self._decide(series, obs, evidence, cc, target, latest, event_open, others)
        if after == BLOCKED and before != BLOCKED and outage_open:
            after = DOWN  # explained by the network outage: no per-target alert on this ASN while it lasts
        self._set_state(series, before, after, evidence, latest, float(country["t0"]))
        changes[skey] = series

        # Target event: grows and shrinks with the ASNs whose series are blocked.
        if after == BLOCKED and before != BLOCKED:
            ev, notice = self._join(ev, m, series, self._asn_evidence(evidence, series), t, sim)
            changes[ekey] = ev
            events.append(notice)
        elif after == BLOCKED and ev and ev.get("open") and str(asn) in ev["a"]:
            asn_ev = self._asn_evidence(evidence, series)
            ev = dict(ev)
            old_methods = list(ev["m"])
            ev["a"] = {**ev["a"], str(asn): asn_ev}
            ev["m"] = sorted(set(ev["m"]) | set(asn_ev["m"]))
            if sim:
                ev["sim"] = True
            if late:
                # A probe that uploads a day late sends dozens of measurements at once: the evidence is kept
                # current with each, but the team hears of it once an hour (of watermark time) at most; the next
                # notice carries whatever came after.
                counters["late_revised"] = counters.get("late_revised", 0) + 1
                now_wm = float(country["wm"])
                if ev.get("rv") is None or now_wm >= float(ev["rv"]) + REVISED_NOTICE_EVERY:
                    ev["v"] += 1
                    ev["rv"] = now_wm
                    events.append(
                        self._target_event(
                            ev,
                            cc,
                            target,
                            EventAction.REVISED,
                            t,
                            f"late measurements revised the evidence on AS{asn} ({asn_ev['k']} of {asn_ev['n']})",
                            change=Change(what="revised", asn=asn, blocked=asn_ev["k"], total=asn_ev["n"]),
                        )
                    )
            elif ev["m"] != old_methods and method_names(ev["m"]) != method_names(old_methods):
                # (names only when the codes changed: this runs for every measurement of a blocked series;
                # "unspecified" joining says nothing new)
                ev["v"] += 1
                summary = f"blocking method now {method_names(ev['m']) or 'not specified'} (same event)"
                change = Change(what="methods", isps=len(ev["a"]))
                events.append(self._target_event(ev, cc, target, EventAction.UPDATED, t, summary, change=change))
            changes[ekey] = ev
        elif before == BLOCKED and after != BLOCKED and ev and ev.get("open") and str(asn) in ev["a"]:
            ev, notice = self._leave(ev, cc, target, asn, t)
            changes[ekey] = ev
            events.append(notice)
            if not ev["open"]:
                pooled["clr"] = latest  # the pooled evidence of the ended event is spent
        elif late and ev and str(asn) in ev.get("a", {}):
            counters["late"] = counters.get("late", 0) + 1
        elif not (ev and ev.get("open")) and bad and not outage_open:
            opened = self._pooled_open(state, changes, m, pooled, float(country["t0"]), latest, sim)
            if opened is not None:
                events.append(opened)

        if len(events) > cfg.max_alerts_per_run:
            counters["capped"] = counters.get("capped", 0) + len(events) - cfg.max_alerts_per_run
            events = events[: cfg.max_alerts_per_run]
        return StepResult(changes, events, counters)

    # ---------------------------------------------------------------------------------------------- tick
    def tick(self, state: Mapping[str, Any], cc: str, now: datetime) -> StepResult:
        """Time-driven rules for one country: coverage gaps of watched networks during watch windows."""
        country = state.get(country_key(cc))
        t = now.timestamp()
        active, named = self.ctx.watched_asns(cc, t)
        seen: dict[str, list[Any]] = dict(country["asns"]) if country else {}
        changes: dict[str, Any | None] = {}
        events: list[Event] = []
        starts = [w.start for w in self.ctx.windows if w.active(cc, t)]
        # Every ASN a window names, active or not: a gap opened on one never measured must still end with its window.
        ever_named = {str(a) for w in self.ctx.windows for a in w.asns}
        for asn_s in sorted(set(seen) | ever_named, key=int):
            asn = int(asn_s)
            last, count = seen.get(asn_s, [max(starts, default=t), 0])
            gkey = gap_state_key(cc, asn)
            gap = state.get(gkey)
            is_open = bool(gap and gap.get("open"))
            watched = active and (int(count) >= self.cfg.coverage_min_measurements or asn in named)
            silent_h = (t - float(last)) / 3600
            if watched and not is_open and silent_h >= self.cfg.coverage_gap_hours:
                version = (gap["v"] if gap else 0) + 1
                gap = {
                    "id": f"{cc}|coverage|AS{asn}|{_iso(float(last))}",
                    "v": version,
                    "open": True,
                    "last": float(last),
                }
                changes[gkey] = gap
                name = self._name(asn)
                events.append(
                    self._gap_event(
                        gap,
                        cc,
                        asn,
                        EventAction.OPENED,
                        t,
                        False,
                        f"AS{asn} {name} silent for {silent_h:.0f} h during a watch window"
                        " — ask volunteers to test".replace("  ", " "),
                        Change(what="gap_opened", asn=asn, hours=round(silent_h)),
                    )
                )
            elif is_open and gap is not None and not active:
                gap = {**gap, "open": False, "v": gap["v"] + 1}
                changes[gkey] = gap
                ended = Change(what="gap_window_ended", asn=asn)
                events.append(
                    self._gap_event(gap, cc, asn, EventAction.RESOLVED, t, False, "watch window ended", ended)
                )
        counters: dict[str, int] = {}
        if len(events) > self.cfg.max_alerts_per_run:
            counters["capped"] = len(events) - self.cfg.max_alerts_per_run
            events = events[: self.cfg.max_alerts_per_run]
        return StepResult(changes, events, counters)

    # ------------------------------------------------------------------------------------------ evidence
    def _sensitivity(self, cc: str, target: str, t: float) -> float:
        if not self.ctx.windows:
            return 1.0
        return max((w.sensitivity for w in self.ctx.windows_for(cc, target, t)), default=1.0)

    def _evidence(self, obs: list[list[Any]], latest: float, after: float = 0.0) -> dict[str, Any]:
        """k of n, probes, interval, CUSUM and methods over the series window (failures are not evidence).

        ``after``: the time the series last cleared; evidence spent on the previous event does not count again.
        """
        cfg = self.cfg
        since = max(latest - cfg.window_hours * 3600, math.nextafter(after, math.inf))
        up, down = self._llr
        # One pass, CUSUM inlined (``stats.cusum_up`` is the reference; a test keeps them equal): this runs for
        # every measurement and was a third of the engine's time as separate passes.
        k = n = failures = confirmed = 0
        s = 0.0
        probes: set[str] = set()
        run_probes: set[str] = set()  # probes of the anomalies since the CUSUM last reset to 0
        methods: set[str] = set()
        bad_uids: list[str] = []
        first_bad: float | None = None
        for o in obs[bisect_left(obs, since, key=_obs_time) :]:
            code = o[1]
            if code == FAILURE:
                failures += 1
                continue
            n += 1
            probes.add(o[2])
            is_bad = code in (ANOMALY, CONFIRMED)
            s += up if is_bad else down
            if s <= 0:
                s = 0.0
                run_probes.clear()
            elif is_bad:
                run_probes.add(o[2])
            if is_bad:
                k += 1
                confirmed += code == CONFIRMED
                if first_bad is None:
                    first_bad = float(o[0])
                if o[3]:
                    methods.add(o[3])
                bad_uids.append(o[4])
        low, high = wilson(k, n, cfg.confidence_z)
        return {
            "k": k,
            "n": n,
            "c": confirmed,
            "f": failures,
            "p": len(probes),
            "lo": round(low, 4),
            "hi": round(high, 4),
            "s": round(s, 3),
            "rp": len(run_probes),
            "m": sorted(methods),
            "fs": first_bad,
            "ls": latest,
            "u": [u for u in bad_uids[-LINKS_PER_ASN:] if not u.startswith("#")] if bad_uids else [],
        }

    def _decide(
        self,
        series: dict[str, Any],
        obs: list[list[Any]],
        e: dict[str, Any],
        cc: str,
        target: str,
        now: float,
        event_open: bool,
        others: bool = False,
    ) -> str:
        """Open on a confirmed measurement, a CUSUM crossing or a high Wilson lower bound (all above the floor),
        or join an event other ISPs already opened on a smaller majority; clear only when the last
        ``clear_after_hours`` are clean with enough evidence (hysteresis in value and in time)."""
        cfg = self.cfg
        if self.ctx.windows:
            sens = self._sensitivity(cc, target, now)
            min_n = max(1, math.ceil(cfg.min_measurements / sens))
        else:
            sens, min_n = 1.0, cfg.min_measurements
        floor = e["n"] >= min_n and e["p"] >= cfg.min_probes
        before = series["st"]
        if before == BLOCKED:
            # Leaving an event other ISPs still show is harder than ending it: correlated blocking (a national
            # order on an exam or election schedule) pauses at weekends without ending.
            span = cfg.clear_after_hours * 3600 * (2 if others else 1)
            if now - float(series.get("since", now)) < max(span, cfg.min_open_seconds):
                return BLOCKED
            recent = [o for o in obs if o[0] >= now - span and o[1] != FAILURE]
            k = sum(1 for o in recent if o[1] != OK)
            _, high = wilson(k, len(recent), cfg.confidence_z)
            probes = len({o[2] for o in recent})
            if len(recent) >= min_n and probes >= cfg.min_probes and high <= cfg.close_threshold:
                return STATE_OK
            # A sparse series (a few tests a week) never holds that many in the span: it clears on its clean run
            # instead, when its last anomaly is older than the span and the run since then meets the same bound.
            cr = series.get("cr")
            if cr is not None:
                last_bad, clean, clean_probes = cr
                if (
                    (last_bad is None or last_bad < now - span)
                    and clean >= min_n
                    and len(clean_probes) >= cfg.min_probes
                    and wilson(0, clean, cfg.confidence_z)[1] <= cfg.close_threshold
                ):
                    return STATE_OK
            return BLOCKED
        if cfg.confirmed_opens and e["c"]:
            return BLOCKED
        if e["s"] >= cfg.cusum_threshold / sens and e["n"] >= min_n and e["rp"] >= cfg.min_probes:
            return BLOCKED
        if floor and e["lo"] >= cfg.open_threshold:
            return BLOCKED
        if event_open and self._supports(e["k"], e["n"]):
            return BLOCKED
        return STATE_OK if floor else INSUFFICIENT

    def _track_clean_run(
        self, series: dict[str, Any], obs: list[list[Any]], t_obs: float, bad: bool, probe: str
    ) -> None:
        """Keep a blocked series' clean run current: ``cr`` = [time of its last anomaly (None: none kept), valid
        ok measurements since, their first ``min_probes`` distinct probes]. It outlives the observations kept
        (a week at most), which a series tested once a day needs to clear. ``obs`` already holds this one."""
        cr = series.get("cr")
        if cr is None or (bad and (cr[0] is None or t_obs >= cr[0])):
            series["cr"] = _clean_run(obs, self.cfg.min_probes)  # a new latest anomaly: the run restarts after it
        elif not bad and (cr[0] is None or t_obs > cr[0]):
            last_bad, clean, probes = cr
            if probe not in probes and len(probes) < self.cfg.min_probes:
                probes = [*probes, probe]
            series["cr"] = [last_bad, clean + 1, probes]

    def _supports(self, k: int, n: int) -> bool:
        """Enough for an ASN to join an event other ISPs opened: a few anomalies and a majority of its tests
        (scattered single anomalies on a quiet network never are)."""
        return k >= self.cfg.join_min_blocked and 2 * k > n

    def _set_state(
        self, series: dict[str, Any], before: str, after: str, e: dict[str, Any], now: float, t0: float
    ) -> None:
        if after != before:
            series["since"] = now
        if before == BLOCKED and after == STATE_OK:
            series["clr"] = now
            # The warm-up history says whether a block was there when monitoring began; once the series has
            # cleared, any later block is new (severity as usual), whatever the warm-up saw.
            series.pop("h", None)
        series["st"] = after
        if after == STATE_OK:
            series["ok"] = True
        if after != BLOCKED:
            series.pop("cr", None)
        elif before != BLOCKED:
            series["cr"] = _clean_run(series["o"], self.cfg.min_probes)
        if after == BLOCKED and before != BLOCKED:
            # Warm-up: a series first measured within warm-up whose history until now was mostly anomalous was
            # already blocked when monitoring began; a block that starts later (after clean history) is news.
            series["run"] = e["fs"] if e["fs"] is not None else now
            k_hist, n_hist = series.get("h", [0, 0])
            series["ab"] = n_hist > 0 and 2 * k_hist >= n_hist
        series["metric"] = (
            {"share": round(e["k"] / e["n"], 4), "n": e["n"]}
            if e["n"] and (e["k"] or after in (BLOCKED, DOWN))
            else None
        )

    def _pooled_open(
        self,
        state: Mapping[str, Any],
        changes: dict[str, Any | None],
        m: Measurement,
        pooled: dict[str, Any],
        t0: float,
        now: float,
        sim: bool,
    ) -> Event | None:
        """Open the target event on evidence pooled across ISPs: a CUSUM crossing over the pooled window, with
        the floor met and anomalies from at least two ASNs and ``min_probes`` probes. Every ASN whose own
        tests mostly failed joins at once (their series are marked blocked)."""
        cfg = self.cfg
        cc, target = m.cc, m.target
        pobs = [o for o in pooled["o"] if o[0] > float(pooled.get("clr", 0.0))]
        sens = self._sensitivity(cc, target, now)
        min_n = max(1, math.ceil(cfg.min_measurements / sens))
        s, start = cusum_up((o[1] != OK for o in pobs), cfg.cusum_p0, cfg.cusum_p1)
        run = [o for o in pobs[start:] if o[1] != OK]
        # Pooling many sparse series multiplies the chances of a chance cluster: ask 1.5x the evidence.
        if s < 1.5 * cfg.cusum_threshold / sens or len(pobs) < min_n or len({o[2] for o in run}) < cfg.min_probes:
            return None
        if len({o[3] for o in run}) < 2:
            return None
        per_asn: dict[int, list[int]] = {}
        for o in pobs:
            kn = per_asn.setdefault(int(o[3]), [0, 0])
            kn[0] += o[1] != OK
            kn[1] += 1
        members = sorted(a for a, (k, n) in per_asn.items() if self._supports(k, n))
        ev: Any = state.get(event_state_key(cc, target))
        version = (ev["v"] if ev else 0) + 1
        notice: Event | None = None
        for asn in members:
            if state.get(outage_state_key(cc, asn), {}).get("open"):
                continue
            skey = series_state_key(cc, asn, target)
            series = dict(changes.get(skey) or state.get(skey) or {})
            if not series or series.get("st") == BLOCKED:
                continue
            e = self._evidence(series["o"], float(series["o"][-1][0]), float(series.get("clr", 0.0)))
            before = series["st"]
            self._set_state(series, before, BLOCKED, e, now, t0)
            changes[skey] = series
            mm = m if asn == m.asn else m.model_copy(update={"asn": asn})
            ev, first = self._join(ev, mm, series, self._asn_evidence(e, series), now, sim)
            notice = notice or first
        if ev is None or notice is None:
            return None
        ev["v"] = version  # one notice for the whole opening, carrying every ASN that joined
        ev["ab"] = any(e.get("ab") for e in ev["a"].values())
        changes[event_state_key(cc, target)] = ev
        since = notice.change.since if notice.change else ""
        what = f"{target} already blocked when monitoring began (first measured {since}) in {cc}" if since else ""
        what = what or f"{target} blocked in {cc}"
        return self._target_event(
            ev,
            cc,
            target,
            EventAction.OPENED,
            now,
            f"{what} on {len(ev['a'])} ISPs (evidence pooled across ISPs)",
            change=Change(what="opened_pooled", isps=len(ev["a"]), since=since),
        )

    @staticmethod
    def _asn_evidence(e: dict[str, Any], series: dict[str, Any]) -> dict[str, Any]:
        return {
            "k": e["k"],
            "n": e["n"],
            "c": e["c"],
            "f": e["f"],
            "p": e["p"],
            "lo": e["lo"],
            "hi": e["hi"],
            "m": e["m"],
            "ls": e["ls"],
            "u": e["u"],
            "fs": series.get("run", e["fs"]),
            "ab": bool(series.get("ab")),
        }

    # ------------------------------------------------------------------------------------------- networks
    def _network(
        self,
        state: Mapping[str, Any],
        cc: str,
        asn: int,
        target: str,
        obs: list[list[Any]],
        now: float,
        sim: bool,
    ) -> tuple[dict[str, Any | None], list[Event], bool]:
        """Track failing targets per ASN; open one outage event when most of them fail at once.

        An ASN carries ~2,000 targets. Their entries (time, failing) are spread over ``NETWORK_SHARDS`` keys so a
        change copies (and writes to the changelog) one small shard, not the whole list; the per-ASN summary
        holds each shard's size and failing count. A target's entry is refreshed only when its flag changes or it
        is ``NETWORK_PRUNE_SECONDS`` old, and all shards are pruned to the window at most that often, so a target
        can count up to twice that long past the window. Counts live beside their entries' shard sizes and are
        recomputed from the entries at every prune; a step's writes are applied together (offline) or as one
        batch (the worker's ``Committed`` view), so replaying a measurement after a crash converges.
        """
        cfg = self.cfg
        nkey = network_state_key(cc, asn)
        horizon = now - cfg.window_hours * 3600
        # Failing: its last (up to 3) measurements in the window are all non-ok, and there are at least 2.
        # obs is in time order, so those in the window are a suffix (written out: this runs for every measurement).
        failing = 0
        if len(obs) >= 2 and obs[-2][0] >= horizon and obs[-1][1] != OK and obs[-2][1] != OK:
            failing = 0 if len(obs) >= 3 and obs[-3][0] >= horizon and obs[-3][1] == OK else 1
        every = self._prune_every
        summary = state.get(nkey)
        mine = network_shard(target)
        changes: dict[str, Any | None] = {}
        targets: dict[str, list[Any]] | None = None
        if summary is None or "t" in summary or not summary["pr"] <= now < summary["pr"] + every:
            # Due (hourly in measurement time): prune the shards holding entries older than the window (the
            # summary keeps each shard's oldest entry time) and recount them from their entries. A summary
            # holding "t" is the pre-shard layout: its entries are spread over the shards here.
            legacy: dict[str, list[Any]] = dict(summary.get("t") or {}) if summary else {}
            prior = summary if summary is not None and not legacy else None
            sizes = list(prior["n"]) if prior else [0] * NETWORK_SHARDS
            bad = list(prior["b"]) if prior else [0] * NETWORK_SHARDS
            oldest = list(prior["o"]) if prior else [0.0] * NETWORK_SHARDS
            for i in range(NETWORK_SHARDS):
                if prior and oldest[i] >= horizon:
                    continue
                skey = network_shard_key(cc, asn, i)
                old = state.get(skey)
                entries = {k: v for k, v in (old["t"] if old else {}).items() if v[0] >= horizon}
                for k, v in legacy.items():
                    if network_shard(k) == i and v[0] >= horizon:
                        entries.setdefault(k, v)
                if (old is not None and len(entries) != len(old["t"])) or (legacy and entries):
                    changes[skey] = {"t": entries} if entries else None
                sizes[i], bad[i] = len(entries), sum(v[1] for v in entries.values())
                oldest[i] = min(entries.values())[0] if entries else now
                if i == mine:
                    targets = entries
            summary = {"pr": now, "n": sizes, "b": bad, "o": oldest}
            changes[nkey] = summary
        if targets is None:
            shard = state.get(network_shard_key(cc, asn, mine))
            targets = shard["t"] if shard else {}
        previous = targets.get(target)
        if previous is None or previous[1] != failing or not previous[0] <= now < previous[0] + every:
            targets = dict(targets)  # copy-on-write (a C-level copy): the caller's state is never mutated
            targets[target] = [now, failing]
            sizes, bad, oldest = list(summary["n"]), list(summary["b"]), list(summary["o"])
            sizes[mine] = len(targets)
            bad[mine] += failing - (previous[1] if previous else 0)
            if previous is not None and previous[0] <= oldest[mine]:  # the oldest entry moved: find the next
                oldest[mine] = min(v[0] for v in targets.values())
            elif now < oldest[mine]:  # a lower bound is enough (it only decides whether a prune looks at it)
                oldest[mine] = now
            summary = {"pr": summary["pr"], "n": sizes, "b": bad, "o": oldest}
            changes[network_shard_key(cc, asn, mine)] = {"t": targets}
            changes[nkey] = summary
        n_recent, n_bad = sum(summary["n"]), sum(summary["b"])
        okey = outage_state_key(cc, asn)
        out = state.get(okey)
        is_open = bool(out and out.get("open"))
        events: list[Event] = []
        share = n_bad / n_recent if n_recent else 0.0
        if not is_open and n_bad >= cfg.outage_min_targets and share >= cfg.outage_share:
            version = (out["v"] if out else 0) + 1
            out = {
                "id": f"{cc}|network|AS{asn}|{_iso(now)}",
                "v": version,
                "open": True,
                "opened": now,
                "bad": n_bad,
                "of": n_recent,
                "sim": sim,
            }
            changes[okey] = out
            events.append(
                self._outage_event(
                    out,
                    cc,
                    asn,
                    EventAction.OPENED,
                    now,
                    f"{n_bad} of {n_recent} targets failing at once",
                    Change(what="outage_opened", asn=asn, blocked=n_bad, total=n_recent),
                )
            )
            is_open = True
        elif is_open and out is not None and (share < cfg.outage_share / 2 or n_bad < cfg.outage_min_targets / 2):
            out = {**out, "open": False, "v": out["v"] + 1, "bad": n_bad, "of": n_recent}
            changes[okey] = out
            events.append(
                self._outage_event(
                    out,
                    cc,
                    asn,
                    EventAction.RESOLVED,
                    now,
                    f"only {n_bad} of {n_recent} targets failing now",
                    Change(what="outage_resolved", asn=asn, blocked=n_bad, total=n_recent),
                )
            )
            is_open = False
        return changes, events, is_open

    # --------------------------------------------------------------------------------------------- events
    def _join(
        self, ev: Any, m: Measurement, series: dict[str, Any], asn_ev: dict[str, Any], t: float, sim: bool
    ) -> tuple[dict[str, Any], Event]:
        cc, asn, target = m.cc, m.asn, m.target
        name = self._name(asn)
        if not ev or not ev.get("open"):
            opened = float(asn_ev["fs"] if asn_ev["fs"] is not None else t)
            new = {
                "id": f"{cc}|target|{target}|{_iso(opened)}",
                "v": (ev["v"] if ev else 0) + 1,
                "open": True,
                "test": m.test_name,
                "a": {str(asn): asn_ev},
                "cl": [],
                "m": list(asn_ev["m"]),
                "ab": bool(asn_ev["ab"]),
                "sim": sim,
            }
            since = _iso(float(series["f0"]))[:10] if new["ab"] else ""
            what = f"already blocked when monitoring began (first measured {since})" if since else "blocked"
            summary = f"{target} {what} in {cc} on AS{asn} {name}".rstrip()
            change = Change(what="opened", asn=asn, isps=1, since=since)
            return new, self._target_event(new, cc, target, EventAction.OPENED, t, summary, change=change)
        ev = dict(ev)
        ev["a"] = {**ev["a"], str(asn): asn_ev}
        ev["cl"] = [a for a in ev["cl"] if a != asn]
        ev["m"] = sorted(set(ev["m"]) | set(asn_ev["m"]))
        ev["v"] += 1
        ev["sim"] = bool(ev.get("sim")) or sim
        summary = f"AS{asn} {name} joined: {target} now blocked on {len(ev['a'])} ISPs".replace("  ", " ")
        change = Change(what="joined", asn=asn, isps=len(ev["a"]))
        return ev, self._target_event(ev, cc, target, EventAction.UPDATED, t, summary, change=change)

    def _leave(self, ev: dict[str, Any], cc: str, target: str, asn: int, t: float) -> tuple[dict[str, Any], Event]:
        ev = dict(ev)
        members = dict(ev["a"])
        gone = members.pop(str(asn))
        ev["v"] += 1
        ev["cl"] = [*ev["cl"], asn][-50:]
        if members:
            ev["a"] = members
            summary = f"AS{asn} cleared: {target} still blocked on {len(members)} ISPs"
            change = Change(what="cleared", asn=asn, isps=len(members))
            return ev, self._target_event(ev, cc, target, EventAction.UPDATED, t, summary, change=change)
        ev["open"] = False
        ev["last"] = gone  # keep the final evidence for the resolved notice
        ev["a"] = {str(asn): {**gone, "ls": t}}
        notice = self._target_event(
            ev,
            cc,
            target,
            EventAction.RESOLVED,
            t,
            f"{target} no longer blocked in {cc}: the last ISP (AS{asn}) cleared",
            cleared=True,
            change=Change(what="resolved", asn=asn),
        )
        ev["a"] = {}
        return ev, notice

    def _severity(self, ev: dict[str, Any], watch: str | None) -> Literal["info", "warning", "critical"]:
        if ev.get("ab"):
            return "info"
        return "critical" if watch else "warning"

    def _target_event(
        self,
        ev: dict[str, Any],
        cc: str,
        target: str,
        action: EventAction,
        t: float,
        summary: str,
        *,
        change: Change,
        cleared: bool = False,
    ) -> Event:
        state = "ok" if cleared else "blocked"
        asns = [
            AsnEvidence(
                asn=int(a),
                name=self._name(int(a)),
                state=state,
                blocked=e["k"],
                total=e["n"],
                confirmed=e["c"],
                failures=e["f"],
                probes=e["p"],
                share_low=e["lo"],
                share_high=e["hi"],
                methods=e["m"],
                first_seen=_dt(e["fs"]) if e["fs"] is not None else None,
                last_seen=_dt(e["ls"]),
                already_blocked=e["ab"],
            )
            for a, e in sorted(ev["a"].items(), key=lambda kv: int(kv[0]))
        ]
        k = sum(a.blocked for a in asns)
        n = sum(a.total for a in asns)
        low, high = wilson(k, n, self.cfg.confidence_z)
        uids = [u for e in ev["a"].values() for u in e["u"]]
        windows = self.ctx.windows_for(cc, target, t)
        watch = windows[0].label if windows else None
        sim = bool(ev.get("sim"))
        return Event(
            event_id=ev["id"],
            version=ev["v"],
            kind=EventKind.TARGET_BLOCKED,
            action=action,
            cc=cc,
            target=target,
            test_name=ev["test"],
            category=self.ctx.category(cc, target),
            asns=asns,
            cleared_asns=list(ev["cl"]),
            methods=list(ev["m"]),
            blocked=k,
            total=n,
            probes=sum(a.probes for a in asns),
            share_low=round(low, 4),
            share_high=round(high, 4),
            first_seen=min((a.first_seen for a in asns if a.first_seen), default=None),
            last_seen=max((a.last_seen for a in asns if a.last_seen), default=None),
            already_blocked=bool(ev.get("ab")),
            severity=self._severity(ev, watch),
            watch=watch,
            summary=("[SIMULATED] " if sim else "") + summary,
            change=change,
            explorer_links=[explorer_measurement_url(u) for u in uids[-LINKS_PER_EVENT:]],
            simulated=sim,
            emitted_at=_dt(t),
        )

    def _outage_event(
        self, out: dict[str, Any], cc: str, asn: int, action: EventAction, t: float, summary: str, change: Change
    ) -> Event:
        name = self._name(asn)
        sim = bool(out.get("sim"))
        return Event(
            event_id=out["id"],
            version=out["v"],
            kind=EventKind.NETWORK_OUTAGE,
            action=action,
            cc=cc,
            asn=asn,
            asns=[AsnEvidence(asn=asn, name=name, state="down" if out["open"] else "ok")],
            first_seen=_dt(float(out["opened"])),
            last_seen=_dt(t),
            severity="critical",
            summary=("[SIMULATED] " if sim else "")
            + f"AS{asn} {name}: {summary} (outage or network-wide "
            "block; per-target alerts on this network are held back)".replace("  ", " "),
            change=change,
            simulated=sim,
            emitted_at=_dt(t),
        )

    def _gap_event(
        self,
        gap: dict[str, Any],
        cc: str,
        asn: int,
        action: EventAction,
        t: float,
        sim: bool,
        summary: str,
        change: Change,
    ) -> Event:
        return Event(
            event_id=gap["id"],
            version=gap["v"],
            kind=EventKind.COVERAGE_GAP,
            action=action,
            cc=cc,
            asn=asn,
            asns=[AsnEvidence(asn=asn, name=self._name(asn), state="insufficient")],
            last_seen=_dt(float(gap["last"])),
            severity="warning",
            summary=("[SIMULATED] " if sim else "") + summary,
            change=change,
            simulated=sim,
            emitted_at=_dt(t),
        )


def _clean_run(obs: list[list[Any]], min_probes: int) -> list[Any]:
    """A series' clean run from its observations: [time of the last anomaly (None if none is kept), valid ok
    measurements after it, their first ``min_probes`` distinct probes (counted from the newest)]."""
    clean = 0
    probes: list[str] = []
    for i in range(len(obs) - 1, -1, -1):  # not reversed(): mypyc cannot build that loop over list[list[Any]]
        o = obs[i]
        if o[1] == FAILURE:
            continue
        if o[1] != OK:
            return [o[0], clean, probes]
        clean += 1
        if len(probes) < min_probes and o[2] not in probes:
            probes.append(o[2])
    return [None, clean, probes]


def apply_changes(state: dict[str, Any], changes: Mapping[str, Any | None]) -> None:
    """Apply a step's changes to a plain dict exactly as the Faust agent applies them to its table."""
    if None not in changes.values():  # the common case, in one C-level call
        state.update(changes)
        return
    for key, value in changes.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


def run_offline(
    engine: Engine, measurements: Iterable[Measurement], *, tick_every: timedelta | None = None
) -> tuple[dict[str, Any], list[Event], Counter[str]]:
    """The live path's steps over a plain dict, in input order; ticks (if asked) in measurement time."""
    state: dict[str, Any] = {}
    events: list[Event] = []
    counters: Counter[str] = Counter()
    next_tick: dict[str, float] = {}
    every = tick_every.total_seconds() if tick_every else 0.0
    for m in measurements:
        if every > 0:
            t = engine.event_time(m)
            due = next_tick.setdefault(m.cc, t + every)
            while t >= due:
                result = engine.tick(state, m.cc, _dt(due))
                apply_changes(state, result.changes)
                events += result.events
                counters.update(result.counters)
                due += every
            next_tick[m.cc] = due
        result = engine.step(state, m)
        apply_changes(state, result.changes)
        events += result.events
        counters.update(result.counters)
    return state, events, counters
