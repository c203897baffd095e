"""``censorwatch worker``: run the Faust detection app until SIGTERM/SIGINT (Faust flushes and commits)."""

from __future__ import annotations

import logging
import os
import sys

from kafka.errors import KafkaError
from prometheus_client import start_http_server

from censorwatch.bus import ensure_topics, rewind_group
from censorwatch.config import Settings

log = logging.getLogger(__name__)

EXIT_DEADLETTER_CAP = 3  # the dead-letter ratio cap tripped: fix the input or the code, then restart


def run(settings: Settings) -> int:
    from faust.worker import Worker

    from streams import metrics
    from streams.app import create_app

    ensure_topics(settings)
    metrics.SERIES.cap = settings.metrics.series_cap
    if settings.metrics.worker_port:
        start_http_server(settings.metrics.worker_port, addr=settings.metrics.host)
        log.info("worker metrics on http://%s:%d/metrics", settings.metrics.host, settings.metrics.worker_port)
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
        return EXIT_DEADLETTER_CAP
    restart = app.censorwatch_restart  # type: ignore[attr-defined]
    if restart:
        # Records never reached the agent (see streams.app.Continuity). Faust may have committed past them on the
        # way out, so the group is moved back to the first missing offset, and a fresh process (same PID for
        # supervisors: Faust's consumer cannot be restarted in place) reads them again from there.
        first: dict[int, int] = {}
        for partition, missing, _ in restart:
            first[partition] = min(missing, first.get(partition, missing))
        # If the group cannot be moved (e.g. other members keep it busy), what Faust committed stays: it held back
        # every record after the jump, so that is usually before it.
        try:
            now: object = rewind_group(settings, settings.topics.worker_group, settings.topics.measurements, first)
        except KafkaError as exc:
            now = f"unchanged: {exc!r}"
        log.warning("restarting the worker to read missing input again: %s (group now at %s)", restart, now)
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 (our own command line)
    return 0
