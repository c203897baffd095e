"""Every Kafka topic name, in one place, so producers and consumers can never disagree."""

from __future__ import annotations

from dataclasses import dataclass

WORKER_STATE_TABLE = "detection-state"  # the Faust table of the detection engine's state


@dataclass(frozen=True)
class Topics:
    """Topic names, optionally behind a prefix (one cluster can host several deployments)."""

    prefix: str = "censorwatch"

    def _name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}" if self.prefix else suffix

    @property
    def measurements(self) -> str:
        """Normalised measurements, keyed ``cc|asn|target`` so tables are co-partitioned."""
        return self._name("measurements")

    @property
    def events(self) -> str:
        """Incident events (opened / updated / revised / resolved), keyed by event id."""
        return self._name("events")

    @property
    def deadletter(self) -> str:
        """Anything that could not be processed, with the reason, the stage and the original bytes."""
        return self._name("deadletter")

    @property
    def poller_cursor(self) -> str:
        """Compacted: one record per country with the poll cursor, so a restarted poller resumes."""
        return self._name("poller-cursor")

    @property
    def notification_log(self) -> str:
        """Compacted: one record per (event, version, receiver) delivered, so nothing is sent twice."""
        return self._name("notification-log")

    @property
    def silences(self) -> str:
        """Compacted: one record per alert silence (matchers, expiry, reason), shared by every dispatcher."""
        return self._name("silences")

    @property
    def worker_group(self) -> str:
        """The Faust worker's app id: its consumer group and the prefix of its tables' changelog topics."""
        return f"{self.prefix}-worker"

    @property
    def worker_state_changelog(self) -> str:
        """Compacted, created by Faust: the worker's detection state (envelopes and markers, see ``streams.app``)."""
        return f"{self.worker_group}-{WORKER_STATE_TABLE}-changelog"

    def all(self) -> dict[str, bool]:
        """Topic name -> whether it is compacted."""
        return {
            self.measurements: False,
            self.events: False,
            self.deadletter: False,
            self.poller_cursor: True,
            self.notification_log: True,
            self.silences: True,
        }
