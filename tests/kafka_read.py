"""Read a topic back in tests: every record from the beginning to the end offsets at the time of the call."""

from __future__ import annotations

import time

from kafka import TopicPartition
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
