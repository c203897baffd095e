"""The Faust application: a thin shell around the pure detection engine.

The agent only decodes, loads state from the table, calls ``Engine.step``, stores the returned changes, and sends
the returned events. Anything that fails for one record is dead-lettered with its reason (a Faust agent that
raises would ack the record silently); if too much of the input fails, the worker stops non-zero and leaves the
rest unacknowledged. Time-driven evaluation (coverage gaps, time hysteresis) arrives as *tick* records on the
measurement topic, sent by the leader's timer keyed by country, so ticks are processed in order with the
measurements of their partition — the same order ``run_offline`` sees.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import faust
import orjson
from faust.streams import _current_event  # private: see process_partition_batch
from faust.types import TP

from censorwatch.bus import one_record_per_batch
from censorwatch.config import Settings
from censorwatch.models import DeadLetter, Event, Measurement, utcnow
from censorwatch.topics import WORKER_STATE_TABLE
from streams import metrics
from streams.detection import DetectionContext, Engine, StepResult

log = logging.getLogger(__name__)

TICK_FIELD = "__tick__"
TICK_PREFIX = b'{"' + TICK_FIELD.encode()  # how a tick record starts (checked for every record)


def tick_record(now: datetime) -> bytes:
    """A control record asking the engine to evaluate time-driven rules for the key's country."""
    return orjson.dumps({TICK_FIELD: now.isoformat()})


class DeadLetterRatioExceeded(RuntimeError):
    """Too much of the recent input is failing: stop loudly instead of dead-lettering everything."""


class BatchFailed(RuntimeError):
    """A batch failed past the per-record guard (the broker refusing a write, a bug): kept for the next start.

    Faust acknowledges a whole ``take_events`` batch when the agent raises, and restarts the agent: the records
    would be lost without a trace. The agent holds them instead and stops the worker non-zero.
    """


MARKER = "x|committed|"  # + partition: the last source offset whose batch of state writes is complete


def marker_key(partition: int) -> str:
    return f"{MARKER}{partition}"


class Committed(Mapping[str, Any]):
    """The table as of the last complete batch of each partition.

    A batch's state writes are several changelog records; a crash can persist some and not others, and the
    batch is then processed again on a state that already holds part of it (a torn write: wrong notices).
    So every value is written as an envelope ``{"~s": batch, "~q": partition, "~v": value, "~p": previous}``
    and, after all of them, the partition's marker; a value whose batch is past its partition's marker is read
    as its previous value. Effects are ordered: events are delivered first, then the state, then the marker.
    """

    def __init__(self, table: Any) -> None:
        self.table = table

    def resolve(self, raw: Any) -> Any:
        if not (isinstance(raw, dict) and "~s" in raw):
            return raw
        done = self.table.get(marker_key(int(raw["~q"])))
        return raw["~v"] if done is not None and int(raw["~s"]) <= int(done) else raw["~p"]

    def __getitem__(self, key: str) -> Any:
        value = self.resolve(self.table.get(key))
        if value is None or key.startswith(MARKER):
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __iter__(self) -> Iterator[str]:
        for key in list(self.table.keys()):
            if not key.startswith(MARKER) and self.resolve(self.table.get(key)) is not None:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Overlay(Mapping[str, Any]):
    """Reads through pending in-batch changes to the table, so a batch sees its own writes.

    Table reads are cached for the batch (the table does not change until the batch's writes): the country,
    network and event entries are read by most measurements of a batch, and each table read resolves an envelope.
    """

    def __init__(self, table: Mapping[str, Any]) -> None:
        self.table = table
        self.pending: dict[str, Any | None] = {}
        self.cache: dict[str, Any | None] = {}

    def base(self, key: str) -> Any | None:
        """The table's value (None when absent), ignoring this batch's pending changes."""
        try:
            return self.cache[key]
        except KeyError:
            value = self.cache[key] = self.table.get(key)
            return value

    def _read(self, key: str) -> Any | None:
        if key in self.pending:
            return self.pending[key]
        return self.base(key)

    def __getitem__(self, key: str) -> Any:
        value = self._read(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self._read(key)
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._read(key) is not None

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for key, value in self.pending.items():
            seen.add(key)
            if value is not None:
                yield key
        for key in self.table:
            if key not in seen:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def apply(self, changes: Mapping[str, Any | None]) -> None:
        self.pending.update(changes)


class DeadLetterGuard:
    """Tracks the dead-letter share of the last ``window`` records and trips above ``max_ratio``.

    ``record`` only says whether the cap is exceeded; the agent then stops at that record, keeps the rest of the
    batch unacknowledged (so it is redelivered after the fix is deployed) and shuts the worker down non-zero.
    """

    def __init__(self, max_ratio: float, window: int = 200, minimum: int = 50) -> None:
        self.max_ratio = max_ratio
        self.minimum = minimum
        self.recent: deque[bool] = deque(maxlen=window)

    def record(self, dead: bool) -> DeadLetterRatioExceeded | None:
        self.recent.append(dead)
        if len(self.recent) >= self.minimum:
            ratio = sum(self.recent) / len(self.recent)
            if ratio > self.max_ratio:
                return DeadLetterRatioExceeded(
                    f"{ratio:.0%} of the last {len(self.recent)} records were dead-lettered "
                    f"(limit {self.max_ratio:.0%}): stopping instead of discarding the stream"
                )
        return None


class Continuity:
    """Notices records of the measurement topic that never reached the agent.

    The topic's offsets are contiguous (not compacted, no transactions), so a jump within one process means records
    went missing upstream of the agent: Faust can drop records fetched just before a consumer-group rebalance and
    then commit past them (seen on restarts, while the old member is still in the group), and a seek back is undone
    by records already in its queues. Each assignment's committed offset starts the expectation (``seeked``).
    ``check`` says ``ok`` (an offset at or below the expected one is a redelivery, which the engine de-duplicates)
    or ``gap``; on a gap the agent acknowledges nothing from there on and the worker restarts itself, resuming from
    the committed offset, which is before the gap, unless retention already deleted the missing records (``expire``).
    """

    def __init__(self) -> None:
        self.expected: dict[int, int] = {}

    def seeked(self, partition: int, committed: int | None) -> None:
        """The consumer was positioned at the group's committed offset (at every assignment).

        The next record must then be at or before it: without this, records dropped before a process's first one
        went unnoticed (Faust's own check lets the first missing offset of an assignment through). An expectation
        already past it stays (records this process handled, not yet committed); nothing committed yet (None or
        0) leaves the start to the offset-reset policy.
        """
        if not committed or committed < 0:
            return
        current = self.expected.get(partition)
        self.expected[partition] = committed if current is None else max(current, committed)

    def check(self, partition: int, offset: int) -> str:
        expected = self.expected.get(partition)
        if expected is not None and offset > expected:
            return "gap"
        self.expected[partition] = offset + 1
        return "ok"

    def expire(self, partition: int, offset: int, log_start: int | None) -> int:
        """After a gap before ``offset``: if the log now starts at or after it, the missing records were deleted
        (retention) and reading again cannot bring them back. Take the record and return how many were lost;
        otherwise (0) the gap stands and the worker reads them again."""
        expected = self.expected.get(partition)
        if expected is None or offset <= expected or log_start is None or log_start < offset:
            return 0
        self.expected[partition] = offset + 1
        return offset - expected


async def flush_producer(producer: Any, patience: float = 10.0) -> None:
    """Flush Faust's producer for real: everything sent or written to a table so far is with the broker after it.

    ``Producer.flush`` can return with table writes still queued: its buffer's flush gives up after 0.1 s without
    progress (a busy loop, a full client buffer), and a write just taken from the buffer may still be on its way
    to the Kafka client. So wait until the buffer is empty and its one sender is idle again (waiting on the
    queue), then flush the client. Needs the default unthreaded producer; a stuck sender is logged after
    ``patience`` seconds, and the flush then goes on (order is kept either way; only batch boundaries differ).
    """
    buffer = producer.buffer
    pending: Any = buffer.pending  # an asyncio.Queue; ``_getters`` non-empty = its sender waits for more
    deadline = asyncio.get_running_loop().time() + patience
    while pending.qsize() or not pending._getters:
        if asyncio.get_running_loop().time() > deadline:
            log.warning("the producer's buffer did not drain in %.0f s (%d queued)", patience, pending.qsize())
            break
        await buffer.flush()
        if not pending.qsize():
            await asyncio.sleep(0.001)
    await producer.flush()


def hold(events: list[Any]) -> None:
    """Keep events out of the commit: ``take_events`` acks its whole batch when the agent leaves it, and an
    already-acked message is skipped, so its offset is never marked safe to commit and it is consumed again."""
    for event in events:
        event.message.acked = True


def publish_series(result: StepResult) -> None:
    """Mirror changed series into the bounded per-series collector (watched or anomalous series only)."""
    for key, value in result.changes.items():
        if not key.startswith("s|"):
            continue
        try:
            _, cc, asn, target = key.split("|", 3)
        except ValueError:
            continue
        sample = value.get("metric") if isinstance(value, dict) else None
        if value is None or not sample:
            metrics.SERIES.withdraw(cc, int(asn), target)
            continue
        metrics.SERIES.publish(metrics.SeriesSample(cc, int(asn), target, float(sample["share"]), int(sample["n"])))


EVENT_KINDS = {"t": "target_blocked", "n": "network_outage", "g": "coverage_gap"}


class OpenEvents:
    """Open events per (kind, cc) for the ``events_open`` gauge, from the engine's event state entries."""

    def __init__(self, countries: list[str]) -> None:
        self.open: dict[str, tuple[str, str]] = {}
        self.seen: set[tuple[str, str]] = {(kind, cc) for cc in countries for kind in EVENT_KINDS.values()}
        self.publish()

    def track(self, key: str, value: Any) -> None:
        parts = key.split("|")
        if len(parts) < 4 or parts[0] != "e" or parts[2] not in EVENT_KINDS:
            return
        if isinstance(value, dict) and value.get("open"):
            self.open[key] = (EVENT_KINDS[parts[2]], parts[1])
        else:
            self.open.pop(key, None)

    def rescan(self, table: Mapping[str, Any]) -> None:
        """Rebuild from the table: after recovery from the changelog the incremental view starts empty."""
        self.open.clear()
        for key in list(table.keys()):
            if key.startswith("e|"):
                self.track(key, table.get(key))
        self.publish()

    def publish(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for kind_cc in self.open.values():
            counts[kind_cc] = counts.get(kind_cc, 0) + 1
        self.seen |= set(counts)
        for kind, cc in self.seen:
            metrics.EVENTS_OPEN.labels(kind=kind, cc=cc).set(counts.get((kind, cc), 0))


class WorkerApp(faust.App):
    """A Faust app that reports where its consumer was positioned at each assignment (see ``Continuity.seeked``).

    Faust seeks every assigned partition to the group's committed offset after each rebalance and keeps the
    offsets to itself; ``on_seek`` receives them (topic-partition -> committed offset, None when nothing is).
    """

    on_seek: Callable[[Mapping[Any, int | None]], None] | None = None

    def _new_consumer(self) -> Any:
        consumer: Any = super()._new_consumer()
        seek = consumer.seek_to_committed

        async def seek_to_committed() -> Mapping[Any, int | None]:
            committed: Mapping[Any, int | None] = await seek()
            if self.on_seek is not None:
                self.on_seek(committed)
            return committed

        consumer.seek_to_committed = seek_to_committed
        return consumer


def create_app(settings: Settings, engine: Engine | None = None) -> faust.App:
    """Build the Faust app for these settings (one app per process)."""
    topics = settings.topics
    engine = engine or Engine(settings.detection, DetectionContext.from_settings(settings))
    session = int(settings.kafka_session_timeout_seconds)
    app = WorkerApp(
        topics.worker_group,
        broker=[f"kafka://{host.strip()}" for host in settings.bootstrap().split(",")],
        store="memory://",
        processing_guarantee="at_least_once",
        broker_session_timeout=session,
        broker_heartbeat_interval=max(1, session // 5),
        broker_commit_every=500,
        broker_commit_interval=1.0,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        table_standby_replicas=0,
        stream_wait_empty=False,
        datadir=str(settings.state_dir / "faust"),
        # State is written once per batch (~2-3 records per measurement): let them travel in large batches.
        # On Tansu, ``settle`` ends each batch a reader must see whole (see there).
        producer_max_batch_size=512 * 1024,
        producer_linger_ms=5,
    )
    exact_watermarks = one_record_per_batch(settings)

    async def settle() -> None:
        """On Tansu, end what was sent so far as a produced batch of its own.

        Tansu reports a partition's high watermark as its last batch's base offset + 1, and readers (the
        dispatcher, table recovery, this agent reading ticks) stop there. So a notice, a dead letter or a tick
        is flushed alone, and a batch's state writes are flushed before the marker, which is then flushed
        alone: the watermark is exact where it matters and the state still travels in large batches.
        """
        if exact_watermarks:
            await flush_producer(app.producer)

    measurements_topic = app.topic(
        topics.measurements,
        key_type=bytes,
        value_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.topic_partitions,
    )
    events_topic = app.topic(topics.events, key_serializer="raw", value_serializer="raw")
    deadletter_topic = app.topic(topics.deadletter, key_serializer="raw", value_serializer="raw")
    state = app.Table(
        WORKER_STATE_TABLE,
        default=None,
        key_type=str,
        value_type=None,  # not dict: recovery calls value_type.from_data(); None keeps plain JSON values
        partitions=settings.topic_partitions,
    )
    committed = Committed(state)
    guard = DeadLetterGuard(settings.deadletter_max_ratio)
    fatal: list[Exception] = []  # the cap tripped or a batch failed: the worker then exits non-zero
    restart: list[tuple[int, int, int]] = []  # (partition, first missing, first seen after): see Continuity
    open_events = OpenEvents(settings.countries)
    continuity = Continuity()

    def on_seek(committed: Mapping[Any, int | None]) -> None:
        for tp, offset in committed.items():
            if tp.topic == topics.measurements:
                continuity.seeked(tp.partition, offset)

    app.on_seek = on_seek

    async def on_assigned(sender: Any, assigned: set[TP], **kwargs: Any) -> None:
        """Faust sends the whole new assignment after each rebalance."""
        metrics.ASSIGNED_PARTITIONS.set(sum(1 for tp in assigned if tp.topic == topics.measurements))

    app.on_partitions_assigned.connect(cast(Any, on_assigned))  # its stubs want a ``signal`` keyword spelled out

    metrics.DEADLETTER_TOTAL.labels(stage="worker")  # exported at 0 from the start, as are the late kinds
    for kind in ("revised", "too_late"):
        metrics.LATE_MEASUREMENTS.labels(kind=kind)

    async def dead_letter(reason: str, raw: bytes, key: bytes | None, source: str) -> None:
        letter = DeadLetter.of(
            "worker", reason, raw, key=key.decode("utf-8", "replace") if key else None, source=source
        )
        await deadletter_topic.send(key=key, value=letter.to_bytes())
        await settle()
        metrics.DEADLETTER_TOTAL.labels(stage="worker").inc()
        log.warning("dead-lettered %s: %s", source, reason)

    async def log_start(topic: str, partition: int) -> int | None:
        """The partition's first offset that still exists (None if it cannot be read now: the gap then stands)."""
        tp = TP(topic, partition)
        try:
            return (await app.consumer.earliest_offsets(tp)).get(tp)
        except Exception:  # best effort: a restart reads them again if they still exist
            log.warning("could not read where %s/%d starts", topic, partition, exc_info=True)
            return None

    def handle(view: Overlay, raw: bytes, key: bytes | None) -> tuple[StepResult, Measurement | None]:
        doc = orjson.loads(raw)
        if isinstance(doc, dict) and TICK_FIELD in doc:
            now = datetime.fromisoformat(doc[TICK_FIELD])
            return engine.tick(view, (key or b"").decode(), now), None  # a tick's country is its key
        m = Measurement.model_validate(doc)
        return engine.step(view, m), m

    @app.agent(measurements_topic)
    async def detect(stream: Any) -> None:
        async for batch in stream.take_events(500, within=0.5):
            # A batch can mix partitions; each partition's state must go to its own changelog partition, which
            # Faust takes from the "current event" (not set by take_events: we set the private contextvar).
            by_partition: dict[int, list[Any]] = {}
            for event in batch:
                by_partition.setdefault(event.message.partition, []).append(event)
            unhandled: list[Any] = []
            for events in by_partition.values():
                if unhandled or restart or fatal:
                    unhandled += events
                    continue
                try:
                    unhandled = await process_partition_batch(events)
                except Exception as exc:  # never let Faust acknowledge a batch that was not handled
                    log.exception("a batch of %d record(s) failed", len(events))
                    fatal.append(
                        BatchFailed(f"a batch failed ({type(exc).__name__}: {exc}); it is kept for the next start")
                    )
                    unhandled = list(events)
            _current_event.set(None)
            if fatal or restart:
                hold(unhandled)
                why = fatal[0] if fatal else f"input went missing {restart}; restarting to read it again"
                log.critical("%s; %d record(s) left unacknowledged for the next start", why, len(unhandled))
                os.kill(os.getpid(), signal.SIGTERM)  # Faust's clean stop: flush, commit what was handled
                await asyncio.Event().wait()  # take no further batch; cancelled by the stop

    async def process_partition_batch(batch: list[Any]) -> list[Any]:
        """Handle the records in order, deliver their events, then store their state (see ``Committed``); return
        the records it did not handle because the dead-letter cap tripped or input went missing (see
        ``Continuity``), empty otherwise."""
        view = Overlay(committed)
        outgoing: list[tuple[Event, Measurement | None]] = []
        unhandled: list[Any] = []
        handled = len(batch)
        done = state.get(marker_key(batch[0].message.partition))  # records up to here are fully applied
        for i, event in enumerate(batch):
            value = event.value
            raw: bytes = value if isinstance(value, bytes) else b""
            msg = event.message
            source = f"{msg.topic}/{msg.partition}@{msg.offset}"
            if continuity.check(msg.partition, msg.offset) == "gap":
                first = continuity.expected[msg.partition]
                lost = continuity.expire(msg.partition, msg.offset, await log_start(msg.topic, msg.partition))
                if lost:
                    log.error(
                        "records %s/%d@%d..%d were deleted before the worker read them; their evidence is lost",
                        msg.topic,
                        msg.partition,
                        first,
                        msg.offset - 1,
                    )
                    metrics.INPUT_EXPIRED.inc(lost)
                else:
                    restart.append((msg.partition, first, msg.offset))
                    metrics.INPUT_GAPS.inc()
                    unhandled = batch[i:]
                    handled = i
                    break
            is_tick = raw.startswith(TICK_PREFIX)
            if is_tick and done is not None and msg.offset <= int(done):
                continue  # a tick read again after a restart: it acted already (measurements are recognised by uid)
            try:
                if value is None:
                    raise ValueError("the record has no value")
                result, m = handle(view, raw, event.key)
            except Exception as exc:  # whatever fails for one record is dead-lettered, never acknowledged silently
                await dead_letter(f"{type(exc).__name__}: {exc}", raw, event.key, source)
                tripped = guard.record(True)
                if tripped is not None:
                    fatal.append(tripped)
                    unhandled = batch[i + 1 :]
                    handled = i + 1
                    break
                continue
            guard.record(False)
            view.apply(result.changes)
            publish_series(result)
            _count(result, m)
            outgoing += [(e, m) for e in result.events]
        delivered = []
        for ev, m in outgoing:
            delivered.append(await events_topic.send(key=ev.event_id.encode(), value=ev.to_bytes()))
            await settle()
            metrics.EVENTS_EMITTED.labels(kind=ev.kind.value, action=ev.action.value).inc()
            if m is not None and m.fetched_at is not None:
                metrics.PROCESSING_LATENCY.observe(max(0.0, (utcnow() - m.fetched_at).total_seconds()))
        for fut in delivered:  # the notices are on the topic before the state says they were made
            await fut
        if view.pending:
            # The batch is named by its last handled offset: a crashed batch's records are all read again before
            # any later batch's marker can pass it (see ``Committed``).
            _current_event.set(weakref.ref(batch[handled - 1]))
            last = batch[handled - 1].message
            for key, value in view.pending.items():
                # assign back (in-place mutation never reaches the changelog), with the value it replaces
                state[key] = {"~s": last.offset, "~q": last.partition, "~v": value, "~p": view.base(key)}
                open_events.track(key, value)
            await settle()
            # Last: now this batch's values are the current ones. Never backwards: a batch replaying records that a
            # previous run already marked (restart before its offsets were committed) must not hide that run's values.
            done = state.get(marker_key(last.partition))
            state[marker_key(last.partition)] = max(last.offset, int(done) if done is not None else -1)
            await settle()
        open_events.publish()
        return unhandled

    @app.timer(interval=60.0, on_leader=True)
    async def tick() -> None:
        now = datetime.now(UTC)
        for cc in settings.countries:
            await measurements_topic.send(key=cc.encode(), value=tick_record(now))
            await settle()

    @app.timer(interval=30.0)
    async def recount_open_events() -> None:
        open_events.rescan(committed)

    @app.timer(interval=15.0)
    async def measure_lag() -> None:
        """How far behind the end of its measurement partitions this worker is (the backlog alert and panel):
        the end offset less the next offset the agent expects, over the partitions it owns."""
        tps = [tp for tp in app.consumer.assignment() if tp.topic == topics.measurements]
        try:
            ends = await app.consumer.highwaters(*tps) if tps else {}
        except Exception as exc:  # best effort: the next tick tries again
            log.debug("consumer lag not measured: %s", exc)
            return
        lag = sum(
            max(0, int(end) - continuity.expected[tp.partition])
            for tp, end in ends.items()
            if tp.partition in continuity.expected and end is not None
        )
        metrics.CONSUMER_LAG.labels(topics.worker_group, topics.measurements).set(lag)

    app.censorwatch_state = committed  # type: ignore[attr-defined]
    app.censorwatch_restart = restart  # type: ignore[attr-defined]
    app.censorwatch_fatal = fatal  # type: ignore[attr-defined]
    app.censorwatch_detect = detect  # type: ignore[attr-defined]
    return app


def _count(result: StepResult, m: Measurement | None) -> None:
    if m is not None and not result.counters.get("duplicate"):
        metrics.MEASUREMENTS_PROCESSED.labels(cc=m.cc, outcome=m.outcome.value).inc()
    for name, n in result.counters.items():
        if name == "duplicate":
            metrics.DUPLICATES.inc(n)
        elif name in ("late_revised", "revised"):
            metrics.LATE_MEASUREMENTS.labels(kind="revised").inc(n)
        elif name == "too_late":
            metrics.LATE_MEASUREMENTS.labels(kind="too_late").inc(n)
        elif name == "capped":
            metrics.ALERTS_CAPPED.inc(n)
