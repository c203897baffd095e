"""Worker faults on the real broker: SIGKILL mid-stream and restart, and the dead-letter ratio cap.

Each test runs a Faust worker of its own (``censorwatch worker`` subprocess, own topic prefix), so killing or
tripping it never disturbs the session's worker. The reference for "no duplicate, no missing notice" is
``run_offline`` over the same input: a notice is ``(event_id, version)``, which is what the dispatcher's
notification log de-duplicates on.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from censorwatch import bus
from censorwatch.config import Settings, load_settings
from censorwatch.models import DeadLetter, Event, Measurement
from services.replay import read_measurements
from streams.app import Committed, marker_key, tick_record
from streams.detection import DetectionContext, Engine, run_offline
from tests.conftest import free_port
from tests.kafka_read import BrokerView, read_topic
from tests.services import Service, metric_value, scrape, wait_until

pytestmark = pytest.mark.kafka

CORPUS = "events/ke-telegram-2023.jsonl"


def _worker_settings(broker_bootstrap: str, tmp_path: Path, **kw: object) -> Settings:
    defaults: dict[str, object] = {"topic_partitions": 1, "countries": ["KE"]}
    s = load_settings(
        kafka_bootstrap=broker_bootstrap,
        broker_kind="tansu",
        topic_prefix=f"w{uuid.uuid4().hex[:10]}",
        kafka_session_timeout_seconds=6.0,
        state_dir=tmp_path / "state",
        metrics={"poller_port": 0, "worker_port": free_port(), "dispatcher_port": 0},
        **(defaults | kw),
    )
    bus.ensure_topics(s)
    return s


def _start(settings: Settings, workdir: Path, name: str) -> Service:
    service = Service(["worker"], settings, workdir, name=name).start()
    wait_until(lambda: service.check() and scrape(settings.metrics.worker_port) is not None, 60, f"{name}'s metrics")
    return service


def _processed(settings: Settings, cc: str) -> float:
    return metric_value(settings.metrics.worker_port, f'censorwatch_worker_measurements_processed_total{{cc="{cc}"')


def _notice(e: Event) -> tuple[object, ...]:
    return (e.event_id, e.version, e.action, e.target, [(a.asn, a.blocked, a.total) for a in e.asns], e.methods)


def _sentinel(cc: str) -> Measurement:
    """A measurement of another country: with one partition, once it is processed, everything before it is."""
    return Measurement(
        uid=f"20231015000000.000000_{cc}_telegram_sentinel{uuid.uuid4().hex[:8]}",
        report_id=f"20231015T000000Z_telegram_{cc}_1_n1_sentinel",
        cc=cc,
        asn=1,
        test_name="telegram",
        start_time="2023-10-15T00:00:00Z",  # type: ignore[arg-type]
        target="telegram",
    )


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        if s.running():
            s.kill()


def test_sigkill_mid_stream_then_restart_recovers_state_without_duplicate_or_missing_notices(
    broker: object, shared_data: Path, tmp_path: Path, services: list[Service]
) -> None:
    settings = _worker_settings(broker.bootstrap, tmp_path)  # type: ignore[attr-defined]
    measurements = [m for _, m in read_measurements(shared_data / CORPUS) if isinstance(m, Measurement)]
    offline_state, expected, _ = run_offline(
        Engine(settings.detection, DetectionContext.from_settings(settings)), measurements
    )
    assert len(expected) >= 2, "the corpus must produce several notices offline"
    half = len(measurements) // 2
    first, second = measurements[:half], measurements[half:]

    producer = bus.producer(settings)
    topic = settings.topics.measurements
    try:
        services.append(_start(settings, tmp_path / "w1", "worker-1"))
        bus.send_all(producer, topic, [(m.cc.encode(), m.to_bytes()) for m in first], 60)
        wait_until(lambda: services[0].check() and _processed(settings, "KE") >= len(first), 90, "the first half")
        bus.send_all(producer, topic, [(m.cc.encode(), m.to_bytes()) for m in second], 60)
        # Kill as soon as the second half is being processed: state and offsets are mid-flight.
        wait_until(lambda: _processed(settings, "KE") > len(first), 60, "the second half to start", interval=0.01)
        services[0].kill()
        killed_at = len(read_topic(settings, settings.topics.events))
        services.append(_start(settings, tmp_path / "w2", "worker-2"))
        bus.send_all(producer, topic, [(b"XB", _sentinel("XB").to_bytes())], 30)
        wait_until(
            lambda: services[1].check() and _processed(settings, "XB") == 1, 120, "the restarted worker to catch up"
        )
    finally:
        producer.close()
    live = [Event.from_bytes(r.value) for r in read_topic(settings, settings.topics.events)]
    counts = Counter(e.notice_key for e in live)
    duplicates = {k: n for k, n in counts.items() if n > 1}
    firsts: dict[str, Event] = {}
    for e in live:
        firsts.setdefault(e.notice_key, e)
    assert sum(duplicates.values()) <= 2 * len(expected), f"more repeats than one batch can explain: {duplicates}"
    # No notice lost; at-least-once repeats are the very same notices (same event, version and evidence), which the
    # dispatcher's notification log then sends once; the notices equal the offline run's.
    missing = [e.notice_key for e in expected if e.notice_key not in firsts]
    assert not missing, f"notices lost across the SIGKILL (events before the kill: {killed_at}): {missing}"
    differing = [e.notice_key for e in live if _notice(e) != _notice(firsts[e.notice_key])]
    assert not differing, f"a repeated notice differs from its first delivery: {differing}"
    assert [_notice(e) for e in firsts.values()] == [_notice(e) for e in expected]
    # The recovered state holds every measurement exactly once. Faust drops records fetched around the group's
    # rebalance after the restart (the killed member is still in the group); the worker notices the jump in offsets
    # and restarts itself from the first missing one (streams/app.py, Continuity).
    wait_until(lambda: _state_marker(settings) >= _end_offset(settings) - 1, 30, "the last batch's state")
    live_state = _committed_state(settings)
    for key in sorted(k for k in offline_state if k.startswith("s|KE|")):
        live_uids = [o[4] for o in live_state.get(key, {}).get("o", [])]
        assert live_uids == [o[4] for o in offline_state[key]["o"]], f"{key}: the recovered series differs"


def test_two_workers_share_the_partitions_and_the_survivor_takes_over_a_killed_one(
    broker: object, shared_data: Path, tmp_path: Path, services: list[Service]
) -> None:
    """Scale-out as in production: two workers in one group split the partitions (here Kenya and Uganda fall on
    different ones); one is SIGKILLed mid-stream, the other takes its partitions over, recovers their state from
    the changelog and goes on; the killed one then rejoins. Each country's notices and recovered series equal its
    offline run: none lost, repeats identical."""
    base = _worker_settings(
        broker.bootstrap,  # type: ignore[attr-defined]
        tmp_path,
        topic_partitions=5,  # Kenya on 2, Uganda on 3: Faust's assignor deals partitions out in turn
        countries=["KE", "UG"],
    )
    workers = {
        name: base.model_copy(update={"metrics": base.metrics.model_copy(update={"worker_port": free_port()})})
        for name in ("a", "b")
    }
    corpora = {"KE": CORPUS, "UG": "events/ug-twitter.jsonl"}
    series = {
        cc: [m for _, m in read_measurements(shared_data / path) if isinstance(m, Measurement) and m.cc == cc]
        for cc, path in corpora.items()
    }
    partition = {cc: _partition_of(base, cc) for cc in series}
    assert partition["KE"] != partition["UG"], "the two countries must fall on different partitions"
    expected: dict[str, list[Event]] = {}
    offline_state: dict[str, Any] = {}
    for cc, ms in series.items():
        state, expected[cc], _ = run_offline(Engine(base.detection, DetectionContext.from_settings(base)), ms)
        offline_state.update(state)
    assert all(len(e) >= 2 for e in expected.values()), "each corpus must produce several notices offline"

    running: dict[str, Service] = {}

    def processed(cc: str) -> float:
        return sum(_processed(s, cc) for name, s in workers.items() if running[name].running())

    producer = bus.producer(base)
    topic = base.topics.measurements
    try:
        for name, s in workers.items():
            running[name] = _start(s, tmp_path / name, f"worker-{name}")
            services.append(running[name])
        wait_until(
            lambda: all(w.check() for w in running.values()) and all(_assigned(s) for s in workers.values()),
            60,
            "both workers to own partitions",
        )
        halves = {cc: len(ms) // 2 for cc, ms in series.items()}
        for cc, ms in series.items():
            bus.send_all(producer, topic, [(cc.encode(), m.to_bytes()) for m in ms[: halves[cc]]], 60)
        wait_until(
            lambda: all(w.check() for w in running.values()) and all(processed(cc) >= halves[cc] for cc in series),
            120,
            "the first halves",
        )
        owner = {cc: next(n for n, s in workers.items() if _processed(s, cc) > 0) for cc in series}
        assert owner["KE"] != owner["UG"], f"both countries went to one worker: the partitions were not shared {owner}"
        victim, survivor = owner["KE"], owner["UG"]
        for cc, ms in series.items():
            bus.send_all(producer, topic, [(cc.encode(), m.to_bytes()) for m in ms[halves[cc] :]], 60)
        wait_until(lambda: _processed(workers[victim], "KE") > halves["KE"], 60, "Kenya's second half", 0.01)
        running[victim].kill()
        # The survivor notices the missing member (session timeout), takes Kenya's partition and finishes it.
        wait_until(
            lambda: running[survivor].check() and _caught_up(base, partition.values()),
            120,
            "the survivor to take over and finish every partition",
        )
        assert _processed(workers[survivor], "KE") > 0, "Kenya's partition was not taken over"
        # The killed worker rejoins: the partitions are split again, and new input is handled wherever it lands.
        running[victim] = _start(workers[victim], tmp_path / f"{victim}-2", f"worker-{victim}-2")
        services.append(running[victim])
        for p in partition.values():  # another country's record on each partition: the corpora stay as offline
            cc = _country_on(base, p)
            bus.send_all(producer, topic, [(cc.encode(), _sentinel(cc).to_bytes())], 30)
        wait_until(
            lambda: all(w.check() for w in running.values()) and _caught_up(base, partition.values()),
            120,
            "both workers to handle the input sent after the rejoin",
        )
    finally:
        producer.close()
    live = [Event.from_bytes(r.value) for r in read_topic(base, base.topics.events)]
    live_state = _committed_state(base)
    for cc in series:
        mine = [e for e in live if e.cc == cc]
        firsts: dict[str, Event] = {}
        for e in mine:
            firsts.setdefault(e.notice_key, e)
        missing = [e.notice_key for e in expected[cc] if e.notice_key not in firsts]
        assert not missing, f"{cc}: notices lost across the failover: {missing}"
        differing = [e.notice_key for e in mine if _notice(e) != _notice(firsts[e.notice_key])]
        assert not differing, f"{cc}: a repeated notice differs from its first delivery: {differing}"
        assert [_notice(e) for e in firsts.values()] == [_notice(e) for e in expected[cc]]
        for key in sorted(k for k in offline_state if k.startswith(f"s|{cc}|")):
            live_uids = [o[4] for o in live_state.get(key, {}).get("o", [])]
            assert live_uids == [o[4] for o in offline_state[key]["o"]], f"{key}: the recovered series differs"


def test_ticks_read_again_after_a_restart_do_not_act_twice(
    broker: object, tmp_path: Path, services: list[Service]
) -> None:
    """Found in review: measurements read again are recognised by uid, ticks were not. A tick that opened a
    coverage gap, read again after the group moved back (a crash before the commit), opened it again. A tick at or
    below its partition's marker has acted already and is skipped."""
    window = {
        "name": "vote",
        "start": "2023-07-01T00:00:00Z",
        "end": "2023-07-03T00:00:00Z",
        "countries": ["XT"],
        "asns": [64999],  # named by the window, never heard from
    }
    settings = _worker_settings(
        broker.bootstrap,  # type: ignore[attr-defined]
        tmp_path,
        countries=["XT"],
        watch={"windows": [window]},
    )
    topic = settings.topics.measurements
    ticks = [tick_record(datetime(2023, 7, 1, 13, tzinfo=UTC)), tick_record(datetime(2023, 7, 4, tzinfo=UTC))]

    def gap_notices() -> list[tuple[str, int]]:
        events = [Event.from_bytes(r.value) for r in read_topic(settings, settings.topics.events)]
        return [(e.action.value, e.version) for e in events if e.kind.value == "coverage_gap" and e.asn == 64999]

    producer = bus.producer(settings)
    try:
        services.append(_start(settings, tmp_path / "w1", "worker-1"))
        bus.send_all(producer, topic, [(b"XT", tick) for tick in ticks], 30)
        wait_until(lambda: services[0].check() and len(gap_notices()) >= 2, 60, "the gap opened and resolved")
        assert services[0].stop() == 0
        # As after a crash before the offsets were committed: the group moves back over both ticks.
        assert bus.rewind_group(settings, settings.topics.worker_group, topic, {0: 0}, join=True) == {0: 0}
        bus.send_all(producer, topic, [(b"XT", _sentinel("XT").to_bytes())], 30)
        services.append(_start(settings, tmp_path / "w2", "worker-2"))
        wait_until(lambda: services[1].check() and _processed(settings, "XT") == 1, 60, "the record after them")
        # committed only once that batch's notices, state and marker are on the broker: a replayed tick's notice
        # would be on the topic by then
        wait_until(lambda: services[1].check() and _caught_up(settings, [0]), 60, "the restarted worker's commit")
    finally:
        producer.close()
    assert gap_notices() == [("opened", 1), ("resolved", 2)]


def _assigned(settings: Settings) -> float:
    return metric_value(settings.metrics.worker_port, "censorwatch_worker_assigned_partitions")


def _partition_of(settings: Settings, cc: str) -> int:
    """Where the producers put a country's records (kafka-python's default partitioner, keyed by country)."""
    from kafka.partitioner.default import murmur2

    return int((murmur2(cc.encode()) & 0x7FFFFFFF) % settings.topic_partitions)


def _country_on(settings: Settings, partition: int) -> str:
    return next(
        cc for cc in (f"X{chr(c)}" for c in range(ord("A"), ord("Z") + 1)) if _partition_of(settings, cc) == partition
    )


def _caught_up(settings: Settings, partitions: Iterable[int]) -> bool:
    """Every record now on these partitions was handled: the group's committed offset is at each one's end (a
    worker commits a batch only after its notices and state are on the broker)."""
    view = _view(settings)
    committed = view.committed()
    return all(committed.get(p, -1) >= view.end_offset(p) for p in partitions)


def _changelog(settings: Settings) -> dict[str, object]:
    latest = bus.read_compacted(settings, settings.topics.worker_state_changelog)
    return {orjson.loads(k): orjson.loads(v) if v is not None else None for k, v in latest.items()}


def _state_marker(settings: Settings, partition: int = 0) -> int:
    marker = _changelog(settings).get(marker_key(partition))
    return int(marker) if isinstance(marker, int) else -1


def _end_offset(settings: Settings, partition: int = 0) -> int:
    return _view(settings).end_offset(partition)


def _committed_state(settings: Settings) -> dict[str, Any]:
    """The worker's state as its ``Committed`` view reads it, rebuilt from the changelog."""
    return dict(Committed(_changelog(settings)))


def _committed(settings: Settings) -> int:
    return max(_view(settings).committed().values(), default=0)


_VIEWS: dict[str, BrokerView] = {}  # per test's topic prefix; closed after each test


def _view(settings: Settings) -> BrokerView:
    view = _VIEWS.get(settings.topic_prefix)
    if view is None:
        view = _VIEWS[settings.topic_prefix] = BrokerView(settings)
    return view


@pytest.fixture(autouse=True)
def _close_views() -> Iterator[None]:
    yield
    while _VIEWS:
        _VIEWS.popitem()[1].close()


def test_dead_letter_ratio_cap_stops_the_worker_without_discarding_the_rest(
    broker: object, tmp_path: Path, services: list[Service]
) -> None:
    settings = _worker_settings(broker.bootstrap, tmp_path, deadletter_max_ratio=0.5)  # type: ignore[attr-defined]
    services.append(_start(settings, tmp_path / "w", "worker"))
    producer = bus.producer(settings)
    poison = [(b"XC", orjson.dumps({"uid": f"bad-{i}"})) for i in range(80)]
    good = [_sentinel("XC") for _ in range(20)]
    try:
        bus.send_all(producer, settings.topics.measurements, poison, 30)
        bus.send_all(producer, settings.topics.measurements, [(b"XC", m.to_bytes()) for m in good], 30)
    finally:
        producer.close()
    worker = services[0]
    wait_until(lambda: "DeadLetterRatioExceeded" in worker.log() or not worker.running(), 60, "the ratio cap to trip")

    def handled() -> int:
        letters = [DeadLetter.from_bytes(r.value) for r in read_topic(settings, settings.topics.deadletter)]
        return len(letters) + int(_processed(settings, "XC") if worker.running() else 0)

    # Either it stopped (right), or it acknowledged records it neither processed nor dead-lettered (wrong).
    wait_until(lambda: not worker.running() or _committed(settings) > handled(), 30, "the worker to stop")
    assert _committed(settings) <= handled(), "records after the trip were acknowledged without being handled"
    assert not worker.running(), "the cap must stop the worker (non-zero exit), not leave it idle"
    assert worker.stop() == 3  # EXIT_DEADLETTER_CAP
    assert handled() < len(poison) + len(good), "it stopped before dead-lettering everything"

    # After the "fix" (here: a higher cap) the held records are consumed again: every one is handled exactly once.
    fixed = settings.model_copy(update={"deadletter_max_ratio": 1.0})
    services.append(_start(fixed, tmp_path / "w2", "worker-2"))
    wait_until(lambda: _processed(fixed, "XC") >= len(good), 60, "the held good records to be processed")
    letters = [DeadLetter.from_bytes(r.value) for r in read_topic(fixed, fixed.topics.deadletter)]
    assert sorted(orjson.loads(d.payload)["uid"] for d in letters) == sorted(f"bad-{i}" for i in range(80))
    assert _processed(fixed, "XC") == len(good)


def test_records_produced_while_the_worker_is_down_are_each_processed_once(
    broker: object, tmp_path: Path, services: list[Service]
) -> None:
    """Clean stop (commit), records arrive while it is down, restart: none skipped, none counted twice."""
    settings = _worker_settings(broker.bootstrap, tmp_path)  # type: ignore[attr-defined]
    producer = bus.producer(settings)
    topic = settings.topics.measurements
    try:
        services.append(_start(settings, tmp_path / "w1", "worker-1"))
        bus.send_all(producer, topic, [(b"XD", _sentinel("XD").to_bytes()) for _ in range(5)], 30)
        wait_until(lambda: services[0].check() and _processed(settings, "XD") == 5, 60, "the first five")
        assert services[0].stop() == 0
        assert _committed(settings) == 5, "the clean stop commits the next offset to read"
        bus.send_all(producer, topic, [(b"XD", _sentinel("XD").to_bytes()) for _ in range(3)], 30)
        services.append(_start(settings, tmp_path / "w2", "worker-2"))
        wait_until(lambda: services[1].check() and _processed(settings, "XD") >= 3, 60, "the three sent while down")
        bus.send_all(producer, topic, [(b"XE", _sentinel("XE").to_bytes())], 30)
        wait_until(lambda: _processed(settings, "XE") == 1, 60, "a later record")
    finally:
        producer.close()
    # Exactly the three: none skipped at the restart, and any record redelivered by the group's rebalances (the
    # restarted worker joins while the old member is still known) is recognised as a duplicate, not counted.
    assert _processed(settings, "XD") == 3
    wait_until(lambda: _committed(settings) == 9, 30, "the restarted worker to commit past every record")


def test_rewind_group_moves_committed_offsets_back_never_forward(broker: object, tmp_path: Path) -> None:
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    settings = _worker_settings(broker.bootstrap, tmp_path)  # type: ignore[attr-defined]
    topic, group = settings.topics.measurements, settings.topics.worker_group
    producer = bus.producer(settings)
    try:
        bus.send_all(producer, topic, [(b"XF", _sentinel("XF").to_bytes()) for _ in range(12)], 30)
    finally:
        producer.close()
    c = bus.consumer(settings, group_id=group)
    try:
        c.assign([TopicPartition(topic, 0)])
        c.commit({TopicPartition(topic, 0): OffsetAndMetadata(10, "", -1)})
    finally:
        c.close()
    assert bus.rewind_group(settings, group, topic, {0: 5}) == {0: 5}
    assert _committed(settings) == 5
    assert bus.rewind_group(settings, group, topic, {0: 8}) == {0: 5}  # never forward
    assert _committed(settings) == 5
