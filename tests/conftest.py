"""Shared fixtures: one real Tansu broker per test session (loopback), settings pointing at it, data paths."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from censorwatch import bus
from censorwatch.broker import EmbeddedBroker
from censorwatch.config import Settings, load_settings
from tests.services import Service, scrape, wait_until

# CI runs the property tests on a fixed seed (a new counterexample must not block a landing; found ones become
# plain tests); locally they search anew each run. Said here rather than left to hypothesis' own CI detection.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
hypothesis_settings.register_profile("dev", deadline=None)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a developer's CENSORWATCH_* environment."""
    for key in list(os.environ):
        if key.startswith("CENSORWATCH_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared data folder missing: {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One real Kafka-protocol broker (Tansu, memory storage) for the whole session."""
    log_file = tmp_path_factory.mktemp("broker") / "broker.log"
    b = EmbeddedBroker(free_port(), log_file).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def kafka_settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings on the session broker with a topic prefix of their own, so tests never see each other's data."""
    return load_settings(
        kafka_bootstrap=broker.bootstrap,
        broker_kind="tansu",  # what the embedded default runs: exact watermarks (see censorwatch/bus.py)
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        topic_partitions=2,
        kafka_session_timeout_seconds=6.0,
        state_dir=tmp_path / "state",
        metrics={"poller_port": 0, "worker_port": 0, "dispatcher_port": 0},
    )


@pytest.fixture(scope="session")
def pipeline_settings(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of the session's pipeline: the one Faust worker consumes these topics (one partition on Tansu)."""
    return load_settings(
        kafka_bootstrap=broker.bootstrap,
        broker_kind="tansu",
        topic_prefix="pipeline",
        topic_partitions=1,
        kafka_session_timeout_seconds=6.0,
        countries=["KH", "KE"],
        state_dir=tmp_path_factory.mktemp("pipeline-state"),
        metrics={"poller_port": free_port(), "worker_port": free_port(), "dispatcher_port": free_port()},
    )


@pytest.fixture(scope="session")
def worker(pipeline_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One Faust worker (``censorwatch worker`` subprocess) for the whole session: group joins on Tansu are slow."""
    bus.ensure_topics(pipeline_settings)
    service = Service(["worker"], pipeline_settings, tmp_path_factory.mktemp("worker"), name="worker").start()
    try:
        wait_until(
            lambda: service.check() and scrape(pipeline_settings.metrics.worker_port) is not None,
            60,
            "the worker's metrics endpoint",
        )
        yield service
    finally:
        code = service.stop()
        assert code == 0, f"worker exited with {code} on SIGTERM:\n{service.log()[-3000:]}"
