"""``censorwatch worker``: run the Faust detection app until SIGTERM/SIGINT (Faust flushes and commits)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from censorwatch.bus import ensure_topics
from censorwatch.config import Settings

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    from faust.worker import Worker

    from streams import metrics
    from streams.app import create_app

    ensure_topics(settings)
    metrics.SERIES.cap = settings.metrics.series_cap
    if settings.metrics.worker_port:
        start_http_server(settings.metrics.worker_port, addr=settings.metrics.host)
        log.info("worker metrics on http://%s:%d/metrics", settings.metrics.host, settings.metrics.worker_port)
    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level.lower(), quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()  # blocks; Faust handles SIGTERM/SIGINT with a clean stop
    return 0
