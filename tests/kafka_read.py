"""Read a topic back in tests: every record from the beginning to the end offsets at the time of the call."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from censorwatch import bus
from censorwatch.config import Settings


def read_topic(settings: Settings, topic: str, timeout: float = 20.0) -> list[ConsumerRecord]:
    """Every record now on the topic, from the beginning to the current end of each partition."""
    c = bus.consumer(settings, group_id=None, consumer_timeout_ms=500)
    try:
        deadline = time.monotonic() + timeout
        partitions: set[int] = set()
        while not partitions:
            partitions = c.partitions_for_topic(topic) or set()
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} does not exist")
            if not partitions:
                time.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        out: list[ConsumerRecord] = []
        while any(c.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} did not reach its end")
            for records in c.poll(timeout_ms=200).values():
                out.extend(records)
        return out
    finally:
        c.close()


class BrokerView:
    """Offsets for a test's wait loops, through one admin client and one consumer kept open.

    A check every 0.1 s that opened its own clients made a new connection (and metadata round) each time; these
    ask the broker afresh on every call over the same connections.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: KafkaAdminClient | None = None
        self._consumer: KafkaConsumer | None = None

    def end_offset(self, partition: int = 0, topic: str | None = None) -> int:
        """The partition's end offset now (the offset the next record will get)."""
        if self._consumer is None:
            self._consumer = bus.consumer(self.settings, group_id=None)
        tp = TopicPartition(topic or self.settings.topics.measurements, partition)
        return int(self._consumer.end_offsets([tp])[tp])

    def committed(self, group: str | None = None, topic: str | None = None) -> dict[int, int]:
        """The group's committed offset per partition of the topic (the worker's group and the measurements)."""
        if self._admin is None:
            self._admin = bus.admin(self.settings)
        group = group or self.settings.topics.worker_group
        topic = topic or self.settings.topics.measurements
        offsets = self._admin.list_group_offsets(group).get(group, {})
        return {tp.partition: o.offset for tp, o in offsets.items() if tp.topic == topic}

    def close(self) -> None:
        for client in (self._admin, self._consumer):
            if client is not None:
                client.close()
        self._admin = self._consumer = None
