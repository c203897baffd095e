"""Kafka plumbing shared by the services (kafka-python): topic creation, producers, compacted-topic reads."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError, TopicAlreadyExistsError

from censorwatch.config import Settings

log = logging.getLogger(__name__)


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.1)


def admin(settings: Settings, timeout: float = 30.0) -> KafkaAdminClient:
    """An admin client, retrying until the cluster answers (it may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return KafkaAdminClient(
                bootstrap_servers=settings.bootstrap(), client_id="censorwatch-admin", request_timeout_ms=10000
            )
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"Kafka at {settings.bootstrap()} is not reachable: {exc}") from None
            log.warning("Kafka at %s not reachable yet (%s); retrying", settings.bootstrap(), exc)
            time.sleep(1.0)


def ensure_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create every topic censorwatch uses, with its partitions and cleanup policy, if missing."""
    client = admin(settings, timeout)
    try:
        existing = set(client.list_topics())
        wanted = []
        for name, compacted in settings.topics.all().items():
            if name in existing:
                continue
            configs = {"cleanup.policy": "compact"} if compacted else {}
            partitions = 1 if compacted else settings.topic_partitions
            wanted.append(NewTopic(name, partitions, settings.topic_replication, topic_configs=configs))
        for topic in wanted:
            try:
                client.create_topics([topic])
                log.info("created topic %s (%d partitions)", topic.name, topic.num_partitions)
            except TopicAlreadyExistsError:
                pass
    finally:
        client.close()


def one_record_per_batch(settings: Settings) -> bool:
    """Whether the broker needs each record a reader must see to end a produced batch (kafka-python producers
    here send one record per batch; the worker flushes at those points, see ``streams.app``'s ``settle``).

    Tansu reports a partition's high watermark as its last record batch's base offset + 1: readers (kafka-python,
    Faust's table recovery) stop there, so the tail of a multi-record batch stays invisible until more arrives.
    Keeping the watermark exact costs throughput, and Kafka needs none of it.
    """
    return settings.broker_kind == "tansu"


def producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A durable producer: acks from all replicas, retries, idempotent keys chosen by the caller."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap(),
        "client_id": "censorwatch",
        "acks": "all",
        "retries": 10,
        "linger_ms": 20,
        "max_in_flight_requests_per_connection": 1,
        "request_timeout_ms": 30000,
        "max_block_ms": 60000,
    }
    if one_record_per_batch(settings):
        config |= {"batch_size": 1, "linger_ms": 0}
    config.update(overrides)
    return KafkaProducer(**config)


def consumer(settings: Settings, *topics: str, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer that never auto-commits: callers commit after their side effect succeeded."""
    session_ms = int(settings.kafka_session_timeout_seconds * 1000)
    config: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap(),
        "client_id": "censorwatch",
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": session_ms,
        "heartbeat_interval_ms": max(1000, session_ms // 5),
        "max_poll_interval_ms": 300000,
    }
    config.update(overrides)
    return KafkaConsumer(*topics, **config)


def rewind_group(
    settings: Settings, group: str, topic: str, offsets: dict[int, int], *, join: bool = False
) -> dict[int, int]:
    """Move a stopped group's committed offsets back to ``offsets`` where they are past them (never forward).

    Returns the offsets now committed for those partitions. Used by the worker before it restarts over records
    that never reached it, whatever its framework committed on the way out. A broker that still counts a stopped
    member in the group (Tansu keeps a Faust worker's membership) refuses a commit from outside it. With ``join``
    (only when no other member is live: it joins under their protocol without their metadata) this then joins
    the group, which makes the broker drop the stale member, and commits as its member.
    """
    from kafka.errors import CommitFailedError

    c = consumer(settings, group_id=group)
    try:
        tps = {p: TopicPartition(topic, p) for p in offsets}
        c.assign(list(tps.values()))
        return _move_back(c, tps, offsets)
    except CommitFailedError:
        if not join:
            raise
        log.info("group %s still holds a stopped member: joining it to move its offsets back", group)
    finally:
        c.close()
    c = consumer(settings, topic, group_id=group, partition_assignment_strategy=(_SameProtocol,))
    try:
        tps = {p: TopicPartition(topic, p) for p in offsets}
        deadline = time.monotonic() + 2 * settings.kafka_session_timeout_seconds + 10
        while not set(tps.values()) <= c.assignment():
            if time.monotonic() > deadline:
                raise TimeoutError(f"joining group {group} did not assign {sorted(offsets)} in time")
            c.poll(timeout_ms=200)
        return _move_back(c, tps, offsets)
    finally:
        c.close()


class _SameProtocol(RangePartitionAssignor):
    """Range assignment under the protocol name of the worker's Faust group: a member naming another protocol
    cannot join it (the stale member's protocol still stands), and a range over one member is every partition."""

    name = "faust"


def _move_back(c: KafkaConsumer, tps: dict[int, TopicPartition], offsets: dict[int, int]) -> dict[int, int]:
    from kafka.structs import OffsetAndMetadata

    now: dict[int, int] = {}
    rewind = {}
    for p, tp in tps.items():
        committed = c.committed(tp)
        if committed is None or committed > offsets[p]:
            rewind[tp] = OffsetAndMetadata(offsets[p], "", -1)
            now[p] = offsets[p]
        else:
            now[p] = committed
    if rewind:
        c.commit(rewind)
    return now


def read_compacted(settings: Settings, topic: str, timeout: float = 30.0) -> dict[bytes, bytes | None]:
    """Latest value per key of a (compacted) topic, read from the beginning to the current end."""
    c = consumer(settings, group_id=None, consumer_timeout_ms=1000)
    try:
        partitions = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return {}
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        latest: dict[bytes, bytes | None] = {}
        deadline = time.monotonic() + timeout
        while any(c.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} did not reach its end in {timeout:.0f} s")
            for records in c.poll(timeout_ms=500).values():
                for rec in records:
                    if rec.key is not None:
                        latest[rec.key] = rec.value
        return latest
    finally:
        c.close()


def send_all(p: KafkaProducer, topic: str, records: Iterable[tuple[bytes | None, bytes]], timeout: float) -> int:
    """Send and wait until every record is acknowledged; raises if any failed."""
    futures = [p.send(topic, key=k, value=v) for k, v in records]
    p.flush(timeout=timeout)
    for fut in futures:
        fut.get(timeout=timeout)
    return len(futures)
