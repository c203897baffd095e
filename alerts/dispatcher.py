"""The dispatcher: events -> routing, grouping, silences, inhibition -> sinks; at least once, never twice.

Why it is shaped like this:

- The consumer offset is committed only when every receiver of a record has been handled (sent, silenced,
  inhibited, dead-lettered), so a crash loses nothing. A notice is written to the notification log right after
  it is sent and before the commit, so the records a crash makes us see again are recognised and not re-sent.
- Grouping holds a notice back (``group_wait`` before an event's first notice, ``group_interval`` between its
  updates); newer versions arriving meanwhile replace it, and its offset stays uncommitted until it is sent.
- One retry policy for every sink: back off (``Retry-After`` when the far end gives one), dead-letter after
  the sink's ``max_retry_seconds``. A stop request interrupts the waiting, never a send in progress.

In-process use (tests, embedding)::

    d = Dispatcher(settings)
    t = d.start_thread()
    ...
    d.stop()
    t.join()
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import FrameType
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata
from prometheus_client import start_http_server

from alerts import metrics, routing
from alerts.notifylog import NotificationLog, notice_key
from alerts.render import DigestItem, EmailRender, Renderer, blocked_networks, chart_url
from alerts.routing import Plan, Receiver
from alerts.silences import SilenceStore
from alerts.sinks import ConsoleSink, DeliveryError, EmailSink, SlackSink, SlackThread
from censorwatch import bus
from censorwatch.config import ConfigError, Settings
from censorwatch.models import DeadLetter, Event, EventAction, EventKind

log = logging.getLogger(__name__)
GROUP = "censorwatch-dispatcher"
STAGE = "dispatcher"


class Stopping(Exception):
    """A stop was requested while waiting to retry: leave the record uncommitted for the next dispatcher."""


@dataclass
class Pending:
    """A notice held back by grouping; ``offsets`` stay uncommitted until it is handled."""

    event: Event
    plan: Plan
    due: float
    offsets: list[tuple[TopicPartition, int]] = field(default_factory=list)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, d: Dispatcher) -> None:
        self.d = d

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # No commit here (kafka-python runs this on its IO thread); we commit after every record anyway.
        self.d._forget(set(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.d.assigned.set()


class Dispatcher:
    """Consumes ``settings.topics.events`` and delivers each event to its receivers. ``run()`` blocks."""

    def __init__(
        self,
        settings: Settings,
        *,
        after_send: Callable[[str], None] | None = None,
        serve_metrics: bool = True,
    ) -> None:
        problems = routing.problems(settings)
        if problems:
            raise ConfigError(problems)
        self.settings = settings
        self.after_send = after_send  # test hook: called after a send is logged, before the commit
        self.serve_metrics = serve_metrics
        self.assigned = threading.Event()  # set when the consumer has partitions (tests wait on it)
        self.started = threading.Event()  # set when the log and silences are loaded
        self._stop = threading.Event()
        self.console = ConsoleSink()
        self.slack = SlackSink(settings.slack, sleep=self._sleep) if settings.slack.enabled else None
        self.email = EmailSink(settings.email) if settings.email.enabled else None
        self._renderers: dict[str, Renderer] = {}
        self.renderer(settings.alerts.language)  # check the templates before consuming anything
        self.log: NotificationLog = NotificationLog(settings)
        self.silences = SilenceStore(settings)
        self._pending: dict[tuple[str, str], Pending] = {}
        self._next: dict[TopicPartition, int] = {}
        self._held: dict[TopicPartition, Counter[int]] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._last_sent: dict[tuple[str, str], float] = {}
        self._outages: dict[str, tuple[str, int, bool]] = {}  # event_id -> (cc, asn, open)
        self._outage_versions: dict[str, int] = {}
        self._newest: dict[str, tuple[int, bool]] = {}  # event_id -> (newest version seen, resolved)
        self._read_up = False  # the events topic was read to its end once since the start (see _periodic)
        self._counts: Counter[str] = Counter()  # since the last heartbeat notice
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._timers: dict[str, float] = {}

    # ----- public control ----------
    def stop(self) -> None:
        """Ask the loop to finish the send in flight, commit and return. Safe from any thread or a signal."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="censorwatch-dispatcher", daemon=True)
        t.start()
        return t

    def renderer(self, language: str) -> Renderer:
        if language not in self._renderers:
            self._renderers[language] = Renderer(language, self.settings.alerts.templates_dir)
        return self._renderers[language]

    # ----- the loop ----------
    def run(self) -> int:
        s = self.settings
        bus.ensure_topics(s)
        self._producer = bus.producer(s, linger_ms=0)
        self.log = NotificationLog(s, self._producer)
        n = self.log.load()
        self.silences.load()
        self._rebuild_outages()
        if self.serve_metrics and s.metrics.dispatcher_port:
            start_http_server(s.metrics.dispatcher_port, addr=s.metrics.host)
        longest = max(s.slack.max_retry_seconds, s.email.max_retry_seconds)
        c = bus.consumer(s, group_id=GROUP, max_poll_records=50, max_poll_interval_ms=int((longest + 120) * 1000))
        c.subscribe([s.topics.events], listener=_Rebalance(self))
        self._consumer = c
        self.started.set()
        log.info("dispatcher started: %d notification log entries, %d silences", n, len(self.silences.silences))
        try:
            while not self.stopping:
                metrics.HEARTBEAT.set_to_current_time()
                batch = c.poll(timeout_ms=200)
                try:
                    for tp, records in batch.items():
                        for rec in records:
                            if self.stopping:
                                break
                            self._handle(tp, rec)
                            self._commit()
                    self._flush_due()
                    self._periodic()
                except Stopping:
                    break
                self._commit()
            self._commit()
            log.info("dispatcher stopped")
            return 0
        finally:
            c.close(autocommit=False)
            self._producer.close(timeout=10)

    # ----- offsets ----------
    def _hold(self, tp: TopicPartition, offset: int) -> None:
        self._held.setdefault(tp, Counter())[offset] += 1

    def _release(self, tp: TopicPartition, offset: int) -> None:
        held = self._held.get(tp)
        if held is not None:
            held[offset] -= 1
            if held[offset] <= 0:
                del held[offset]

    def _commit(self) -> None:
        """Commit, per partition, up to the oldest record not yet fully handled."""
        c = self._consumer
        if c is None:
            return
        offsets = {}
        for tp, nxt in self._next.items():
            held = self._held.get(tp)
            upto = min([nxt, *held.keys()]) if held else nxt
            if self._committed.get(tp) != upto:
                offsets[tp] = OffsetAndMetadata(upto, "", -1)
        if offsets:
            c.commit(offsets)
            for tp, om in offsets.items():
                self._committed[tp] = om.offset

    def _forget(self, revoked: set[TopicPartition]) -> None:
        """Partitions moved to another dispatcher: it re-reads what we held, so drop it here."""
        for key, p in list(self._pending.items()):
            if any(tp in revoked for tp, _ in p.offsets):
                del self._pending[key]
        for tp in revoked:
            self._next.pop(tp, None)
            self._held.pop(tp, None)
            self._committed.pop(tp, None)

    # ----- one record ----------
    def _handle(self, tp: TopicPartition, rec: ConsumerRecord) -> None:
        """Handle one record; the offset moves past it only when every receiver was handled.

        On ``Stopping`` (or a crash) ``_next`` stays put, so the record is not committed and the next start
        delivers it (receivers already done are recognised in the notification log).
        """
        self._hold(tp, rec.offset)
        try:
            self._handle_record(tp, rec)
        finally:
            self._release(tp, rec.offset)
        self._next[tp] = rec.offset + 1

    def _handle_record(self, tp: TopicPartition, rec: ConsumerRecord) -> None:
        try:
            event = Event.from_bytes(rec.value)
        except Exception as exc:  # any undecodable record: dead-letter it and go on
            self._deadletter(
                f"undecodable event: {type(exc).__name__}: {str(exc)[:500]}",
                rec.value or b"",
                rec.key.decode("utf-8", "replace") if rec.key else None,
                f"{rec.topic}/{rec.partition}/{rec.offset}",
            )
            return
        self._track_outage(event)
        self._track_newest(event)
        now = time.monotonic()
        plans = routing.route(self.settings, event)
        if event.action is not EventAction.OPENED:  # whoever was told of the event hears how it goes on and ends
            routed = {p.receiver.id for p in plans}
            plans += [routing.follow_up(self.settings, r) for r in self.log.told(event.event_id) if r not in routed]
        for plan in plans:
            rid = plan.receiver.id
            pair = (event.event_id, rid)
            if self.log.handled_version(*pair) >= event.version:
                metrics.NOTIFICATIONS.labels(plan.receiver.sink, "duplicate").inc()
                continue
            pending = self._pending.get(pair)
            if pending is not None:  # grouping: the newer version replaces the held one
                if event.version >= pending.event.version:
                    pending.event = event
                pending.offsets.append((tp, rec.offset))
                self._hold(tp, rec.offset)
                continue
            if pair in self._last_sent or self.log.notified(*pair):
                due = self._last_sent.get(pair, 0.0) + plan.group_interval
            else:
                due = now + plan.group_wait
            if due <= now:
                self._deliver(event, plan)
            else:
                self._pending[pair] = Pending(event, plan, due, [(tp, rec.offset)])
                self._hold(tp, rec.offset)

    def _flush_due(self) -> None:
        now = time.monotonic()
        for pair, p in sorted(self._pending.items(), key=lambda kv: kv[1].due):
            if p.due > now or self.stopping:
                continue
            self._deliver(p.event, p.plan)
            del self._pending[pair]
            for tp, offset in p.offsets:
                self._release(tp, offset)

    # ----- suppression ----------
    def _track_outage(self, event: Event) -> None:
        if event.kind is not EventKind.NETWORK_OUTAGE or event.asn is None:
            return
        if event.version >= self._outage_versions.get(event.event_id, 0):
            self._outage_versions[event.event_id] = event.version
            self._outages[event.event_id] = (event.cc, event.asn, event.action is not EventAction.RESOLVED)

    def _track_newest(self, event: Event) -> None:
        if event.version >= self._newest.get(event.event_id, (0, False))[0]:
            self._newest[event.event_id] = (event.version, event.action is EventAction.RESOLVED)

    def _closed(self, event_id: str, receiver: str) -> bool:
        """Resolved for this receiver or overall, whether or not the "resolved" notice was sent: no reminders."""
        latest = self.log.latest_handled(event_id, receiver)
        if latest is not None and latest.action is EventAction.RESOLVED:
            return True
        return self._newest.get(event_id, (0, False))[1]

    def _rebuild_outages(self) -> None:
        for value in self.log.entries.values():
            if value.get("type") == "notice" and "event" in value:
                event = Event.model_validate(value["event"])
                self._track_outage(event)
                self._track_newest(event)

    def _inhibited(self, event: Event) -> bool:
        """An open outage on (cc, ASN) explains a target blocked only on that ASN: don't page for both."""
        if event.kind is not EventKind.TARGET_BLOCKED or event.action is EventAction.RESOLVED:
            return False
        asns = {a.asn for a in blocked_networks(event)}
        if len(asns) != 1:
            return False
        (asn,) = asns
        return any(cc == event.cc and a == asn and is_open for cc, a, is_open in self._outages.values())

    # ----- delivery ----------
    def _record(
        self, event: Event, plan: Plan, status: str, *, reminder_at: datetime | None = None, **extra: Any
    ) -> None:
        """A notice's entry, or a reminder's (``reminder_at``) under its own key: never the notice's, whose "sent"
        status says the receiver was told."""
        key = notice_key(event, plan.receiver.id)
        if reminder_at is not None:
            key += f"#reminder#{reminder_at.isoformat()}"
        self.log.write(
            key,
            {
                "type": "notice" if reminder_at is None else "reminder",
                "event_id": event.event_id,
                "version": event.version,
                "receiver": plan.receiver.id,
                "sink": plan.receiver.sink,
                "status": status,
                "event": event.model_dump(mode="json"),
                **extra,
            },
        )

    def _deliver(self, event: Event, plan: Plan) -> None:
        """Deliver one notice to one receiver, or record why not. Raises ``Stopping`` only while waiting."""
        sink, rid = plan.receiver.sink, plan.receiver.id
        silence = self.silences.matching(event)
        if silence is not None:
            metrics.NOTIFICATIONS.labels(sink, "silenced").inc()
            self._record(event, plan, "silenced", silence=silence.id, reason=silence.reason)
            return
        if self._inhibited(event):
            metrics.NOTIFICATIONS.labels(sink, "inhibited").inc()
            self._record(event, plan, "inhibited")
            return
        if event.action is EventAction.RESOLVED and not self.log.notified(event.event_id, rid):
            self._record(event, plan, "skipped", reason="resolved before any notice reached this receiver")
            return
        extra = self._attempt(event, plan, lambda: self._send(event, plan))
        if extra is None:
            return
        self._record(event, plan, "sent", **extra)
        self._last_sent[(event.event_id, rid)] = time.monotonic()
        if self.after_send is not None:
            self.after_send(notice_key(event, rid))

    def _attempt(
        self, event: Event, plan: Plan, send: Callable[[], dict[str, Any]], reminder_at: datetime | None = None
    ) -> dict[str, Any] | None:
        """Try ``send`` until it works or the sink's time is up; None when the notice was dead-lettered.

        A reminder (``reminder_at``) is recorded under its own key, so its failure never hides the notice.
        """
        sink = plan.receiver.sink
        max_seconds = {
            "slack": self.settings.slack.max_retry_seconds,
            "email": self.settings.email.max_retry_seconds,
        }
        start = time.monotonic()
        deadline = start + max_seconds.get(sink, 60.0)
        delay = self.settings.alerts.retry_initial_seconds
        while True:
            try:
                try:
                    extra = send()
                except (DeliveryError, Stopping):
                    raise
                except Exception as bug:  # a rendering/encoding bug on odd input: dead-letter it, go on
                    log.exception("cannot deliver %s to %s", event.notice_key, plan.receiver.id)
                    raise DeliveryError(f"{type(bug).__name__}: {bug}", transient=False) from None
            except DeliveryError as exc:
                metrics.NOTIFICATIONS.labels(sink, "failed").inc()
                self._counts["failed"] += 1
                wait = exc.retry_after if exc.retry_after is not None else delay
                delay = min(delay * 2, self.settings.alerts.retry_max_backoff_seconds)
                if not exc.transient or time.monotonic() + wait > deadline:
                    why = "permanent error" if not exc.transient else f"gave up after {time.monotonic() - start:.0f} s"
                    log.error("%s to %s dead-lettered (%s): %s", event.notice_key, plan.receiver.id, why, exc)
                    self._deadletter(f"{plan.receiver.id}: {why}: {exc}", event.to_bytes(), event.notice_key, sink)
                    metrics.NOTIFICATIONS.labels(sink, "deadlettered").inc()
                    self._record(event, plan, "deadlettered", reminder_at=reminder_at, reason=str(exc)[:500])
                    return None
                log.warning("%s to %s failed (%s); retrying in %.1f s", event.notice_key, plan.receiver.id, exc, wait)
                if self._stop.wait(wait):
                    raise Stopping from None
                continue
            metrics.NOTIFICATIONS.labels(sink, "sent").inc()
            metrics.NOTIFICATION_DURATION.labels(sink).observe(time.monotonic() - start)
            metrics.LAST_DELIVERY.labels(sink).set_to_current_time()
            self._counts["delivered"] += 1
            return extra

    def _send(self, event: Event, plan: Plan, reminder_at: datetime | None = None) -> dict[str, Any]:
        r = plan.receiver
        reminder = reminder_at is not None
        renderer = self.renderer(plan.language)
        if r.sink == "console":
            self.console.deliver(event, renderer, reminder)
            return {}
        if r.sink == "slack":
            if self.slack is None:
                raise DeliveryError("slack is not enabled", transient=False)

            def keep_root(root: SlackThread) -> None:
                self.log.write(
                    f"{event.event_id}#root#{r.id}",
                    {
                        "type": "root",
                        "event_id": event.event_id,
                        "receiver": r.id,
                        "channel": root.channel,
                        "ts": root.ts,
                    },
                )

            root = self.slack.deliver(
                event, r.target, renderer, self.log.root(event.event_id, r.id), keep_root, reminder
            )
            return {"channel": root.channel, "ts": root.ts}
        if r.sink == "email":
            if self.email is None:
                raise DeliveryError("email is not enabled", transient=False)
            to = routing.addresses(self.settings, r)
            key = notice_key(event, r.id)
            if reminder_at is not None:  # each reminder its own Message-ID, or mail clients drop the repeats
                key += f"#reminder#{reminder_at.isoformat()}"
            self.email.send(to, renderer.email(event, reminder), key=key, thread=event.event_id)
            return {}
        raise DeliveryError(f"unknown sink {r.sink!r}", transient=False)

    def _deadletter(self, reason: str, payload: bytes, key: str | None, source: str) -> None:
        assert self._producer is not None
        dl = DeadLetter.of(STAGE, reason, payload, key=key, source=source)
        bus.send_all(
            self._producer,
            self.settings.topics.deadletter,
            [(key.encode() if key else None, dl.to_bytes())],
            timeout=30,
        )
        metrics.DEADLETTER_TOTAL.labels(STAGE).inc()

    def _sleep(self, seconds: float) -> None:
        """Pacing sleep that a stop request cuts short (the call that follows still completes)."""
        self._stop.wait(seconds)

    # ----- timers ----------
    def _due(self, name: str, every: float) -> bool:
        now = time.monotonic()
        if now >= self._timers.get(name, 0.0):
            self._timers[name] = now + every
            return True
        return False

    def _periodic(self) -> None:
        a = self.settings.alerts
        if self._due("silences", a.silences_refresh_seconds):
            try:
                self.silences.load()
            except Exception as exc:  # a broker blip must not stop delivery: keep the last known silences
                log.warning("could not refresh silences (%s); keeping %d known", exc, len(self.silences.silences))
        if self._due("lag", 15.0):
            self._lag()
        if a.heartbeat_receivers and self._due("heartbeat", a.heartbeat_interval_seconds):
            self._heartbeat()
        # Reminders only once the events topic was read to its end since the start: a "resolved" still on the topic
        # (held by grouping when the last process stopped) must be seen before an "ongoing" reminder can go out.
        self._read_up = self._read_up or self._caught_up()
        if self._read_up:
            self._reminders()
        if a.digest.enabled and self._due("digest", 5.0) and self._caught_up():
            self._digests(datetime.now(UTC))

    def _caught_up(self) -> bool:
        """True when every assigned partition is read to its end and nothing is held back by grouping."""
        c = self._consumer
        if c is None or not c.assignment() or self._pending:
            return False
        try:
            tps = list(c.assignment())
            end = c.end_offsets(tps)
            return all(c.position(tp) >= end[tp] for tp in tps)
        except Exception as exc:  # not knowing means not caught up
            log.debug("caught-up check failed: %s", exc)
            return False

    def _lag(self) -> None:
        c = self._consumer
        if c is None or not c.assignment():
            return
        try:
            tps = list(c.assignment())
            end = c.end_offsets(tps)
            lag = sum(max(0, end[tp] - c.position(tp)) for tp in tps)
            metrics.CONSUMER_LAG.labels(GROUP, self.settings.topics.events).set(lag)
        except Exception as exc:  # metrics are best effort
            log.debug("lag not measured: %s", exc)

    def _heartbeat(self) -> None:
        """'No alerts' vs 'no delivery': a short notice every interval to the heartbeat receivers."""
        now = datetime.now(UTC)
        pending = len(self._pending)
        for rid in self.settings.alerts.heartbeat_receivers:
            r = Receiver.parse(rid)
            renderer = self.renderer(routing.follow_up(self.settings, rid).language)  # the route's language
            text = renderer.heartbeat(now, self._counts["delivered"], self._counts["failed"], pending)
            try:
                if r.sink == "console":
                    self.console.send_text(text)
                elif r.sink == "slack" and self.slack is not None:
                    self.slack.send_text(r.target, text)
                elif r.sink == "email" and self.email is not None:
                    render = EmailRender(renderer.heartbeat_subject(), text + "\n", f"<p>{text}</p>")
                    self.email.send(routing.addresses(self.settings, r), render, key=f"heartbeat#{now.isoformat()}")
                metrics.LAST_DELIVERY.labels(r.sink).set_to_current_time()
            except DeliveryError as exc:
                log.warning("heartbeat to %s failed: %s", rid, exc)
        self._counts.clear()

    def _reminders(self) -> None:
        """Long blocks: remind each receiver every ``repeat_interval`` while the event stays open."""
        now = datetime.now(UTC)
        for event_id, rid, event, at in list(self.log.latest_sent()):
            if event.action is EventAction.RESOLVED or self._closed(event_id, rid) or (event_id, rid) in self._pending:
                continue
            plans = routing.route(self.settings, event)
            plan = next((p for p in plans if p.receiver.id == rid), None) or routing.follow_up(self.settings, rid)
            if plan is None or plan.repeat_interval <= 0 or now - at < timedelta(seconds=plan.repeat_interval):
                continue
            if self.silences.matching(event) is not None or self._inhibited(event):
                continue
            extra = self._attempt(event, plan, partial(self._send, event, plan, reminder_at=now), reminder_at=now)
            if extra is not None:
                self._record(event, plan, "sent", reminder_at=now, **extra)

    def _digests(self, now: datetime) -> None:
        """Once a day per recipient: what opened, changed, resolved, went quiet or was silenced."""
        d = self.settings.alerts.digest
        if self.email is None or now.hour < d.hour_utc:
            return
        date = now.date().isoformat()
        scope = d.receivers or [r.id for r in routing.all_receivers(self.settings) if r.sink == "email"]
        silences = [s.describe() for s in self.silences.active(now)]
        for rid in scope:
            r = Receiver.parse(rid)
            renderer = self.renderer(routing.follow_up(self.settings, rid).language)  # the route's language
            items = digest_items(self.log, rid, now - timedelta(days=1), renderer)
            for address in routing.addresses(self.settings, r):
                key = f"digest#{date}#{address}"
                if key in self.log.entries:
                    continue
                render = renderer.digest(date, address, items, silences)
                try:
                    self.email.send([address], render, key=key)
                except DeliveryError as exc:
                    log.warning("digest to %s failed (%s); will try again", address, exc)
                    continue
                self.log.write(key, {"type": "digest", "receiver": rid, "address": address, "date": date})


def digest_items(nlog: NotificationLog, receiver: str, start: datetime, renderer: Renderer) -> list[DigestItem]:
    """The digest's lines for one receiver since ``start``, from the notification log (survives restarts)."""
    items = []
    for value in sorted(nlog.since(start), key=lambda v: v["at"]):
        if value.get("receiver") != receiver or "event" not in value:
            continue
        event = Event.model_validate(value["event"])
        status = value.get("status")
        if status in ("silenced", "inhibited"):
            section = "silenced"
        elif status != "sent":
            continue
        elif event.kind is EventKind.COVERAGE_GAP:
            section = "gaps"
        elif event.action is EventAction.OPENED:
            section = "opened"
        elif event.action is EventAction.RESOLVED:
            section = "resolved"
        else:
            section = "changed"
        try:  # one odd event (dates out of range, ...) must not stop the digest or the dispatcher
            at = datetime.fromisoformat(value["at"])
            items.append(DigestItem(section, renderer.headline(event), at, chart_url(event)))
        except Exception as exc:
            log.warning("digest for %s: skipped %s (%s: %s)", receiver, event.notice_key, type(exc).__name__, exc)
    return items


def run(settings: Settings) -> int:
    """``censorwatch dispatch``: run until SIGTERM/SIGINT, then finish the send in flight, commit, exit 0."""
    d = Dispatcher(settings)

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the delivery in flight, then stopping", signum)
        d.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return d.run()
