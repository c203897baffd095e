"""``censorwatch worker``: run the Faust detection app until SIGTERM/SIGINT (Faust flushes and commits)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from censorwatch.bus import ensure_topics
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
    return 0
