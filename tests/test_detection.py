"""Unit tests of the pure detection engine: the contract, the evidence rules, events, outages, late data, gaps."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from censorwatch.config import DetectionSettings, WatchWindow
from censorwatch.models import Event, EventAction, EventKind, Measurement
from streams.detection import DetectionContext, Engine, StepResult, Window, apply_changes, run_offline, wilson
from streams.detection.core import ANOMALY, CONFIRMED, FAILURE, OK
from streams.detection.stats import cusum_up

T0 = datetime(2023, 7, 1, tzinfo=UTC)
_seq = iter(range(10**9))


def msm(
    hours: float,
    *,
    asn: int = 38623,
    target: str = "www.rfa.org",
    anomaly: bool = False,
    confirmed: bool = False,
    failure: bool = False,
    method: str | None = "dns",
    report: str | None = None,
    cc: str = "KH",
    uid_tail: str | None = None,
    start: datetime | None = None,
) -> Measurement:
    t = start or T0 + timedelta(hours=hours)
    n = next(_seq)
    recv = T0 + timedelta(hours=hours, seconds=30)
    uid = f"{recv:%Y%m%d%H%M%S.%f}_{cc}_webconnectivity_{uid_tail or f'{n:016x}'}"
    return Measurement(
        uid=uid,
        report_id=report if report is not None else f"r{n}",
        cc=cc,
        asn=asn,
        test_name="web_connectivity",
        start_time=t,
        input=f"https://{target}/",
        target=target,
        anomaly=anomaly,
        confirmed=confirmed,
        failure=failure,
        blocking_type=method if (anomaly or confirmed) else None,
    )


def run(
    ms: list[Measurement], settings: DetectionSettings | None = None, ctx: DetectionContext | None = None
) -> tuple[dict[str, Any], list[Event], Counter[str]]:
    return run_offline(Engine(settings or DetectionSettings(), ctx), ms)


def clean(hours: range, **kw: Any) -> list[Measurement]:
    return [msm(h, **kw) for h in hours]


def test_wilson_and_cusum() -> None:
    low, high = wilson(0, 0, 1.64)
    assert (low, high) == (0.0, 1.0)
    low, high = wilson(9, 10, 1.64)
    assert 0.6 < low < 0.9 < high <= 1.0
    s, start = cusum_up([False, True, False, False, False, False], 0.05, 0.5)
    assert s == 0 and start == 6  # a lone anomaly decays back to zero
    s, _ = cusum_up([True, True, True], 0.05, 0.5)
    assert s > 6


def test_contract_is_pure_and_json() -> None:
    engine = Engine(DetectionSettings())
    state: dict[str, Any] = {}
    m = msm(1)
    assert set(engine.keys_for(m)) >= {"c|KH", "s|KH|38623|www.rfa.org", "e|KH|t|www.rfa.org"}
    result = engine.step(state, m)
    assert isinstance(result, StepResult) and state == {}  # step never mutates what it reads
    json.dumps(result.changes)  # table values are JSON
    assert all(key.split("|")[1] == "KH" for key in result.changes)


def test_floor_insufficient_then_ok() -> None:
    state, events, _ = run([msm(1, report="a")])
    assert state["s|KH|38623|www.rfa.org"]["st"] == "insufficient" and not events
    state, events, _ = run(clean(range(1, 6)))
    assert state["s|KH|38623|www.rfa.org"]["st"] == "ok" and not events


def test_one_chatty_probe_cannot_open() -> None:
    ms = clean(range(0, 50)) + [msm(60 + i, anomaly=True, report="same-probe") for i in range(6)]
    _, events, _ = run(ms)
    assert not events


def test_block_opens_once_with_evidence_and_resolves_after_hysteresis() -> None:
    ms = clean(range(0, 100, 4)) + [msm(100 + 2 * i, anomaly=True) for i in range(10)]
    ms += clean(range(120, 300, 3))
    _, events, _ = run(ms)
    opened = [e for e in events if e.action == EventAction.OPENED]
    assert len(opened) == 1
    ev = opened[0]
    assert ev.event_id.startswith("KH|target|www.rfa.org|2023-07-05T04:00") and ev.version == 1
    assert ev.asns[0].asn == 38623 and ev.asns[0].blocked >= 3 and ev.asns[0].probes >= 2
    assert ev.methods == ["dns"] and ev.explorer_links and not ev.already_blocked
    assert 0 < ev.share_low < ev.share_high <= 1
    resolved = [e for e in events if e.action == EventAction.RESOLVED]
    assert len(resolved) == 1 and resolved[0].version == 2
    assert (resolved[0].emitted_at - ev.emitted_at) >= timedelta(hours=72)  # hysteresis in time


def test_confirmed_opens_at_once() -> None:
    _, events, _ = run([*clean(range(0, 20)), msm(30, confirmed=True)])
    assert [e.action for e in events] == [EventAction.OPENED]


def test_failures_are_not_evidence() -> None:
    ms = clean(range(0, 20)) + [msm(30 + i, failure=True) for i in range(20)]
    _, events, _ = run(ms)
    assert not events


def test_event_grows_across_asns_and_method_switch_is_same_event() -> None:
    ms = clean(range(0, 100, 5), asn=1) + clean(range(0, 100, 5), asn=2)
    ms += [msm(100 + i, asn=1, anomaly=True) for i in range(4)]
    ms += [msm(110 + i, asn=2, anomaly=True, method="tcp_ip") for i in range(4)]
    ms.sort(key=lambda m: m.start_time)
    _, events, _ = run(ms)
    ids = {e.event_id for e in events}
    assert len(ids) == 1
    assert [e.action for e in events][:2] == [EventAction.OPENED, EventAction.UPDATED]
    assert [a.asn for a in events[-1].asns] == [1, 2] and events[-1].methods == ["dns", "tcp_ip"]
    assert [e.version for e in events] == list(range(1, len(events) + 1))


def test_each_notice_says_what_changed_as_data() -> None:
    ms = clean(range(0, 100, 5), asn=1) + clean(range(0, 100, 5), asn=2)
    ms += [msm(100 + i, asn=1, anomaly=True) for i in range(4)]
    ms += [msm(110 + i, asn=2, anomaly=True) for i in range(4)]
    ms += [msm(120 + i, asn=1, anomaly=True, method="tcp_ip") for i in range(4)]
    ms += clean(range(130, 400, 3), asn=1) + clean(range(130, 400, 3), asn=2)
    ms.sort(key=lambda m: m.start_time)
    _, events, _ = run(ms)
    changes = [e.change for e in events]
    assert all(c is not None for c in changes)
    assert [c.what for c in changes if c] == ["opened", "joined", "methods", "cleared", "resolved"]
    opened, joined, _, cleared, resolved = [c for c in changes if c]
    assert (opened.asn, opened.isps, opened.since) == (1, 1, "")
    assert (joined.asn, joined.isps) == (2, 2) and cleared.isps == 1 and resolved.asn in (1, 2)


def test_a_method_switch_is_said_in_words() -> None:
    ms = clean(range(0, 100, 5)) + [msm(100 + i, anomaly=True) for i in range(4)]
    ms += [msm(110 + i, anomaly=True, method="tcp_ip") for i in range(4)]
    _, events, _ = run(ms)
    assert [e.action for e in events] == [EventAction.OPENED, EventAction.UPDATED]
    assert events[1].summary == "blocking method now DNS, TCP/IP (same event)"  # not the codes dns, tcp_ip


def test_an_anomaly_without_a_method_sends_no_update() -> None:
    ms = clean(range(0, 100, 5)) + [msm(100 + i, anomaly=True) for i in range(4)]
    ms += [msm(110 + i, anomaly=True, method=None) for i in range(4)]  # no blocking type: nothing new to say
    ms += [msm(120 + i, anomaly=True, method="tcp_ip") for i in range(4)]
    _, events, _ = run(ms)
    assert [(e.action, e.methods) for e in events] == [
        (EventAction.OPENED, ["dns"]),
        (EventAction.UPDATED, ["dns", "tcp_ip", "unspecified"]),
    ]
    assert events[1].summary == "blocking method now DNS, TCP/IP (same event)"


def test_warmup_already_blocked() -> None:
    _, events, _ = run([msm(i, anomaly=True) for i in range(5)])
    assert events[0].action == EventAction.OPENED and events[0].already_blocked
    assert "already blocked" in events[0].summary and events[0].severity == "info"


def test_duplicates_late_revisions_and_too_late() -> None:
    engine = Engine(DetectionSettings())
    ms = clean(range(0, 40, 4)) + [msm(40 + i, anomaly=True) for i in range(4)]
    state, events, _ = run_offline(engine, ms)
    assert events and events[0].action == EventAction.OPENED
    dup = engine.step(state, ms[-1])
    assert dup.counters == {"duplicate": 1} and not dup.changes
    apply_changes(state, engine.step(state, msm(100, anomaly=True)).changes)  # watermark moves on
    late = engine.step(state, msm(41.5, anomaly=True))
    assert late.counters.get("late_revised") == 1 and late.events[0].action == EventAction.REVISED
    too_late = engine.step(state, msm(100 - 80, anomaly=True))
    assert too_late.counters == {"too_late": 1} and not too_late.events


def test_a_late_upload_revises_the_evidence_with_one_notice_an_hour() -> None:
    """A probe that was offline uploads a dozen measurements at once: the team gets one "revised" notice, not a
    dozen; the evidence keeps every one of them, and the next revised notice (an hour of watermark later) says so."""
    engine = Engine(DetectionSettings())
    state, events, _ = run_offline(engine, clean(range(0, 40, 4)) + [msm(40 + i, anomaly=True) for i in range(4)])
    assert [e.action for e in events] == [EventAction.OPENED]
    apply_changes(state, engine.step(state, msm(60, anomaly=True)).changes)  # the watermark moves on

    def feed(ms: list[Measurement]) -> tuple[list[Event], Counter[str]]:
        notices: list[Event] = []
        counters: Counter[str] = Counter()
        for m in ms:
            result = engine.step(state, m)
            apply_changes(state, result.changes)
            notices += result.events
            counters.update(result.counters)
        return notices, counters

    upload, counters = feed([msm(44.5 + i, anomaly=True) for i in range(12)])
    assert counters["late_revised"] == 12
    assert [(e.action, e.version) for e in upload] == [(EventAction.REVISED, 2)]
    assert upload[0].asns[0].blocked == 4 + 1 + 1  # the first late one, with what was known before
    # Still the same watermark hour: absorbed without a notice.
    quiet, _ = feed([msm(56.5, anomaly=True)])
    assert not quiet
    # An hour of watermark later, the next late measurement gives one notice with everything since.
    feed([msm(61.5, anomaly=True)])
    later, _ = feed([msm(57.5, anomaly=True)])
    assert [(e.action, e.version) for e in later] == [(EventAction.REVISED, 3)]
    assert later[0].asns[0].blocked == 4 + 1 + 12 + 1 + 1 + 1


def test_future_timestamps_are_clamped_to_receive_time() -> None:
    engine = Engine(DetectionSettings())
    m = msm(1, start=T0 + timedelta(days=30))
    assert engine.event_time(m) == pytest.approx((T0 + timedelta(hours=1, seconds=30)).timestamp())


def test_outage_inhibits_target_alerts() -> None:
    targets = [f"site{i}.example" for i in range(8)]
    ms = [msm(h, target=t) for h in range(0, 20, 2) for t in targets]
    ms += [msm(h + 0.01 * i, target=t, failure=True) for h in range(20, 30) for i, t in enumerate(targets)]
    _, events, _ = run(ms)
    kinds = Counter((e.kind, e.action) for e in events)
    assert kinds[(EventKind.NETWORK_OUTAGE, EventAction.OPENED)] == 1
    assert kinds[(EventKind.TARGET_BLOCKED, EventAction.OPENED)] == 0


def test_coverage_gap_during_watch_window() -> None:
    window = Window.of(
        WatchWindow(name="election", start=T0, end=T0 + timedelta(days=30), countries=["KH"], route="kh-election")
    )
    ctx = DetectionContext(windows=[window])
    ms = clean(range(0, 30), asn=1) + clean(range(0, 60), asn=2)
    ms.sort(key=lambda m: m.start_time)
    engine = Engine(DetectionSettings(coverage_gap_hours=12, coverage_min_measurements=10), ctx)
    _, events, _ = run_offline(engine, ms, tick_every=timedelta(hours=1))
    gaps = [e for e in events if e.kind == EventKind.COVERAGE_GAP]
    assert [(e.asn, e.action) for e in gaps] == [(1, EventAction.OPENED)]
    _state, events, _ = run_offline(engine, [*ms, msm(70, asn=1)], tick_every=timedelta(hours=1))
    assert [e.action for e in events if e.kind == EventKind.COVERAGE_GAP] == [EventAction.OPENED, EventAction.RESOLVED]


def test_a_redelivery_older_than_a_busy_series_keeps_is_not_counted_again() -> None:
    """Found in review: a series keeps at most 240 observations; a second delivery of an older one was not
    recognised (its uid was gone) and counted again as late data."""
    ms = [msm(i / 4) for i in range(4 * 72)]  # four an hour for three days: 288, more than a series keeps
    engine = Engine(DetectionSettings())
    state, _, _ = run_offline(engine, ms)
    again = engine.step(state, ms[4])  # one hour in, inside the revision window, no longer in the series
    assert again.counters == {"too_late": 1} and not again.changes and not again.events


@pytest.mark.parametrize("per_day", [1, 2, 3])
def test_a_sparse_series_clears_on_its_clean_run(per_day: int) -> None:
    """Found in review: clearing asked for ~11 clean measurements inside 72 h, which a series tested a few times a
    day (most of Cambodia's) never has: its events stayed open for good. It now also clears on the clean run since
    its last anomaly, once that anomaly is older than the span and the run meets the same bound."""
    step = 24 / per_day
    ms = [msm(i * step) for i in range(10 * per_day)]  # ten clean days
    ms += [msm(240 + i * step, anomaly=True) for i in range(6)]  # blocked
    last_bad = 240 + 5 * step
    ms += [msm(last_bad + (i + 1) * step) for i in range(30 * per_day)]  # then clean for a month
    state, events, _ = run(ms)
    assert [e.action for e in events] == [EventAction.OPENED, EventAction.RESOLVED]
    cleared_at = (events[1].emitted_at - T0).total_seconds() / 3600
    clean_before = sum(1 for m in ms[-30 * per_day :] if (m.start_time - T0).total_seconds() / 3600 <= cleared_at)
    assert cleared_at - last_bad >= 72 and clean_before >= 11  # the span, and the bound: 11 clean at z = 1.64
    assert state["s|KH|38623|www.rfa.org"]["st"] == "ok" and "cr" not in state["s|KH|38623|www.rfa.org"]


def test_an_anomaly_inside_the_clean_run_starts_it_again() -> None:
    ms = [msm(i * 12.0) for i in range(20)]
    ms += [msm(240 + i * 12.0, anomaly=True) for i in range(6)]
    ms += [msm(312 + i * 12.0) for i in range(1, 9)]  # eight clean
    ms += [msm(420, anomaly=True)]  # a stray anomaly: the run starts again
    ms += [msm(420 + i * 12.0) for i in range(1, 11)]  # ten clean: not yet
    _, events, _ = run(ms)
    assert [e.action for e in events] == [EventAction.OPENED]
    _, events, _ = run([*ms, msm(552)])  # the eleventh, more than 72 h after the stray one
    assert [e.action for e in events] == [EventAction.OPENED, EventAction.RESOLVED]


def test_a_late_upload_from_a_silent_network_does_not_end_its_coverage_gap() -> None:
    """Found in review: a measurement from the silent time ended the gap, and the next tick re-opened it."""
    window = Window.of(WatchWindow(name="vote", start=T0, end=T0 + timedelta(days=30), countries=["KH"], asns=[2]))
    engine = Engine(DetectionSettings(), DetectionContext(windows=[window]))
    state: dict[str, Any] = {}
    notices: list[Event] = []

    def keep(result: StepResult) -> None:
        apply_changes(state, result.changes)
        notices.extend(e for e in result.events if e.kind == EventKind.COVERAGE_GAP)

    for m in sorted([msm(h, asn=1) for h in range(40)] + [msm(1, asn=2)], key=lambda m: m.start_time):
        keep(engine.step(state, m))
    keep(engine.tick(state, "KH", T0 + timedelta(hours=40)))  # AS2 silent for 39 h: a gap
    keep(engine.step(state, msm(10, asn=2)))  # uploaded now, measured 30 h ago: still silent since then
    keep(engine.tick(state, "KH", T0 + timedelta(hours=40, minutes=1)))
    assert [(e.action, e.version) for e in notices] == [(EventAction.OPENED, 1)]
    keep(engine.step(state, msm(40.5, asn=2)))  # heard from now
    assert [(e.action, e.version) for e in notices] == [(EventAction.OPENED, 1), (EventAction.RESOLVED, 2)]


def test_a_gap_on_a_named_network_never_measured_ends_with_its_window() -> None:
    """Found in review: the tick only looked at ASNs seen or named by an active window, so such a gap stayed open."""
    window = Window.of(WatchWindow(name="vote", start=T0, end=T0 + timedelta(days=2), countries=["KH"], asns=[2]))
    engine = Engine(DetectionSettings(), DetectionContext(windows=[window]))
    state: dict[str, Any] = {}
    notices: list[Event] = []
    for m in [msm(h, asn=1) for h in range(30)]:
        apply_changes(state, engine.step(state, m).changes)
    for hours in (20, 60):  # silent for 20 h inside the window; then the window has ended
        result = engine.tick(state, "KH", T0 + timedelta(hours=hours))
        apply_changes(state, result.changes)
        notices += [e for e in result.events if e.asn == 2]
    assert [(e.action, e.version) for e in notices] == [(EventAction.OPENED, 1), (EventAction.RESOLVED, 2)]


def test_a_block_after_the_series_cleared_is_news_even_if_warm_up_saw_one() -> None:
    """Found in review: "already blocked when monitoring began" stuck to the series, so a new block months later
    was reported at severity info."""
    ms = [msm(h, anomaly=True) for h in range(0, 80, 3)]  # blocked through the warm-up: already blocked
    ms += [msm(h) for h in range(80, 1500, 4)]  # then clean for two months: resolved
    ms += [msm(1500 + 2 * i, anomaly=True) for i in range(6)]  # a new block
    _, events, _ = run(ms)
    seen = [(e.action, e.already_blocked, e.severity) for e in events if e.kind == EventKind.TARGET_BLOCKED]
    assert seen == [
        (EventAction.OPENED, True, "info"),
        (EventAction.RESOLVED, True, "info"),
        (EventAction.OPENED, False, "warning"),
    ]


def test_watch_window_labels_and_sensitivity() -> None:
    window = Window.of(
        WatchWindow(
            name="election",
            start=T0,
            end=T0 + timedelta(days=30),
            countries=["KH"],
            categories=["NEWS"],
            route="kh-election",
            sensitivity=2.0,
        )
    )
    ctx = DetectionContext(categories={("KH", "www.rfa.org"): "NEWS"}, windows=[window])
    ms = clean(range(0, 40, 4)) + [msm(40 + i, anomaly=True) for i in range(2)]
    _, events, _ = run(ms, ctx=ctx)
    assert events and events[0].watch == "kh-election" and events[0].category == "NEWS"
    assert events[0].severity == "critical"


def test_alert_cap_is_recorded() -> None:
    targets = [f"s{i}.example" for i in range(5)]
    ms = [msm(h, asn=a, target=t) for h in range(0, 10, 2) for a in (1, 2) for t in targets]
    engine = Engine(
        DetectionSettings(max_alerts_per_run=1),
        DetectionContext(windows=[Window.of(WatchWindow(name="w", start=T0, end=T0 + timedelta(days=9)))]),
    )
    state, _, _ = run_offline(engine, ms)
    result = engine.tick(state, "KH", T0 + timedelta(days=3))
    assert len(result.events) == 1 and result.counters == {"capped": 1}


def test_simulated_marker() -> None:
    ms = [msm(i, anomaly=True, uid_tail=f"sim{i:012x}") for i in range(4)]
    _, events, _ = run(ms)
    assert events and events[0].simulated and events[0].summary.startswith("[SIMULATED]")


def test_step_by_step_equals_offline_and_is_deterministic() -> None:
    ms = clean(range(0, 100, 3)) + [msm(100 + i, anomaly=True, asn=a) for i in range(6) for a in (1, 2)]
    ms += clean(range(110, 200, 2), asn=1)
    _, offline, _ = run(ms)
    engine = Engine(DetectionSettings())
    state: dict[str, Any] = {}
    live: list[Event] = []
    for m in ms:  # what the Faust agent does: read, step, write back (through JSON like a table)
        result = engine.step(state, m)
        for key, value in result.changes.items():
            state[key] = json.loads(json.dumps(value)) if value is not None else None
        state = {k: v for k, v in state.items() if v is not None}
        live += result.events
    assert [e.to_bytes() for e in live] == [e.to_bytes() for e in offline]
    _, again, _ = run(ms)
    assert [e.to_bytes() for e in again] == [e.to_bytes() for e in offline]


def _reference_evidence(cfg: DetectionSettings, obs: list[list[Any]], latest: float, after: float) -> dict[str, Any]:
    """The evidence rules written plainly (separate passes, ``stats.cusum_up``): the engine's one-pass version
    must agree with it on every input."""
    window = [o for o in obs if o[0] >= latest - cfg.window_hours * 3600 and o[0] > after]
    valid = [o for o in window if o[1] != FAILURE]
    bad = [o for o in valid if o[1] in (ANOMALY, CONFIRMED)]
    low, high = wilson(len(bad), len(valid), cfg.confidence_z)
    s, start = cusum_up((o[1] in (ANOMALY, CONFIRMED) for o in valid), cfg.cusum_p0, cfg.cusum_p1)
    return {
        "k": len(bad),
        "n": len(valid),
        "c": sum(1 for o in valid if o[1] == CONFIRMED),
        "f": len(window) - len(valid),
        "p": len({o[2] for o in valid}),
        "lo": round(low, 4),
        "hi": round(high, 4),
        "s": round(s, 3),
        "rp": len({o[2] for o in valid[start:] if o[1] in (ANOMALY, CONFIRMED)}),
        "m": sorted({o[3] for o in bad if o[3]}),
        "fs": float(bad[0][0]) if bad else None,
        "ls": latest,
        "u": [o[4] for o in bad[-3:] if not o[4].startswith("#")],
    }


_obs_entry = st.tuples(
    st.integers(0, 400),  # hours
    st.sampled_from([OK, ANOMALY, CONFIRMED, FAILURE]),
    st.sampled_from(["p1", "p2", "p3"]),
    st.sampled_from(["", "dns", "tcp_ip"]),
    st.sampled_from(["uid1", "uid2", "#ab", "uid3"]),
)


@settings(max_examples=400, deadline=None)
@given(
    entries=st.lists(_obs_entry, max_size=40),
    after_h=st.one_of(st.just(0), st.integers(0, 400)),
    p0=st.floats(0.01, 0.3),
    p1=st.floats(0.35, 0.9),
)
def test_one_pass_evidence_equals_the_plain_rules(
    entries: list[tuple[int, int, str, str, str]], after_h: int, p0: float, p1: float
) -> None:
    cfg = DetectionSettings(cusum_p0=p0, cusum_p1=p1)
    rows = [[h * 3600.0, c, p, m if c in (ANOMALY, CONFIRMED) else "", u] for h, c, p, m, u in entries]
    obs = sorted(rows, key=lambda o: (o[0], o[4]))
    latest = obs[-1][0] if obs else 0.0
    after = after_h * 3600.0
    assert Engine(cfg)._evidence(obs, latest, after) == _reference_evidence(cfg, obs, latest, after)


def _network_entries(state: dict[str, Any], cc: str, asn: int) -> dict[str, list[Any]]:
    prefix = f"n|{cc}|{asn}|"
    return {t: v for k, shard in state.items() if k.startswith(prefix) for t, v in shard["t"].items()}


def test_network_entries_are_sharded_counted_and_pruned() -> None:
    """An ASN's per-target entries are spread over shard keys; the summary's counts always equal the entries."""
    targets = [f"site{i}.example" for i in range(60)]
    ms = [msm(h + 0.001 * i, target=t, failure=i % 3 == 0) for h in range(0, 48, 6) for i, t in enumerate(targets)]
    state, _, _ = run(ms)
    summary = state["n|KH|38623"]
    entries = _network_entries(state, "KH", 38623)
    assert len([k for k in state if k.startswith("n|KH|38623|")]) > 10  # spread, not one big value
    assert set(entries) == set(targets)
    assert sum(summary["n"]) == len(entries)
    assert sum(summary["b"]) == sum(v[1] for v in entries.values()) == 20  # every third target keeps failing
    # A week and more later only one target is still measured: the others leave the window.
    state, _, _ = run([*ms, *clean(range(48 + 24 * 8, 48 + 24 * 9), target="site1.example")])
    entries = _network_entries(state, "KH", 38623)
    assert set(entries) == {"site1.example"}
    assert state["n|KH|38623"]["n"].count(0) == len(state["n|KH|38623"]["n"]) - 1
    assert sum(state["n|KH|38623"]["b"]) == 0


def test_network_state_of_the_unsharded_layout_is_taken_over() -> None:
    """State written before the shards (one ``n|CC|ASN`` value with every entry) continues as if sharded."""
    targets = [f"site{i}.example" for i in range(8)]
    before = [msm(h, target=t) for h in range(0, 20, 2) for t in targets]
    after = [msm(h + 0.01 * i, target=t, failure=True) for h in range(20, 30) for i, t in enumerate(targets)]
    engine = Engine(DetectionSettings())
    state, _, _ = run(before)
    legacy = {k: v for k, v in state.items() if not k.startswith("n|KH|38623")}
    entries = _network_entries(state, "KH", 38623)
    legacy["n|KH|38623"] = {"t": entries, "bad": sum(v[1] for v in entries.values()), "pr": 0.0}
    events: dict[str, list[Event]] = {"sharded": [], "legacy": []}
    for name, st_ in (("sharded", state), ("legacy", legacy)):
        for m in after:
            result = engine.step(st_, m)
            apply_changes(st_, result.changes)
            events[name] += result.events
    assert [e.to_bytes() for e in events["legacy"]] == [e.to_bytes() for e in events["sharded"]]
    assert any(e.kind == EventKind.NETWORK_OUTAGE for e in events["legacy"])
    assert _network_entries(legacy, "KH", 38623) == _network_entries(state, "KH", 38623)
    assert "t" not in legacy["n|KH|38623"]
