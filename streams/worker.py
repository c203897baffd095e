"""``censorwatch worker``: run the Faust detection app until SIGTERM/SIGINT (Faust flushes and commits)."""

from __future__ import annotations

import logging
import os
import sys
import time

from kafka.errors import KafkaError
from prometheus_client import start_http_server

from censorwatch.bus import ensure_topics, rewind_group
from censorwatch.config import Settings

log = logging.getLogger(__name__)

EXIT_DEADLETTER_CAP = 3  # the dead-letter ratio cap tripped: fix the input or the code, then restart
EXIT_BATCH_FAILED = 4  # a batch failed past the per-record guard (see streams.app.BatchFailed); a restart retries it
REWIND_PATIENCE = 2.0  # session timeouts to wait for the group to let go of this process before moving it back


def run(settings: Settings) -> int:
    from faust.worker import Worker

    from streams import metrics
    from streams.app import DeadLetterRatioExceeded, create_app
    from streams.detection import COMPILED

    ensure_topics(settings)
    metrics.SERIES.cap = settings.metrics.series_cap
    if settings.metrics.worker_port:
        start_http_server(settings.metrics.worker_port, addr=settings.metrics.host)
        log.info("worker metrics on http://%s:%d/metrics", settings.metrics.host, settings.metrics.worker_port)
    log.info("detection engine: %s", "compiled (mypyc)" if COMPILED else "pure Python")
    settings.state_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last folder level
    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level.lower(), quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()  # blocks; Faust handles SIGTERM/SIGINT with a clean stop
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    fatal = app.censorwatch_fatal  # type: ignore[attr-defined]
    if fatal:
        log.critical("worker stopped: %s", fatal[0])
        return EXIT_DEADLETTER_CAP if isinstance(fatal[0], DeadLetterRatioExceeded) else EXIT_BATCH_FAILED
    restart = app.censorwatch_restart  # type: ignore[attr-defined]
    if restart:
        # Records never reached the agent (see streams.app.Continuity). Faust may have committed past them on the
        # way out, so the group is moved back to the first missing offset, and a fresh process (same PID for
        # supervisors: Faust's consumer cannot be restarted in place) reads them again from there.
        first: dict[int, int] = {}
        for partition, missing, _ in restart:
            first[partition] = min(missing, first.get(partition, missing))
        now = _rewind(settings, first)
        log.warning("restarting the worker to read missing input again: %s (group now at %s)", restart, now)
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 (our own command line)
    return 0


def _rewind(settings: Settings, first: dict[int, int]) -> object:
    """Move the group back to the first missing offsets, once the broker has let go of this process's membership.

    Right after Faust stops, the broker may still count this process in the group and refuse a commit from
    outside it; that refusal used to leave what Faust committed, which can be past the missing records. So try
    until about two session timeouts have passed. If the group still cannot be moved (other workers keep it
    busy), what Faust committed stays: it held back every record after the jump, so that is usually before it.
    """
    deadline = time.monotonic() + REWIND_PATIENCE * settings.kafka_session_timeout_seconds + 5.0
    while True:
        try:
            # On the embedded broker `censorwatch up` runs one worker: no live member to disturb by joining.
            group, topic = settings.topics.worker_group, settings.topics.measurements
            return rewind_group(settings, group, topic, first, join=settings.embedded)
        except (KafkaError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                log.critical("could not move the group back to %s (%r): records after it may not be read", first, exc)
                return f"unchanged: {exc!r}"
            time.sleep(0.5)
