"""A Faust agent that does nothing: the ceiling any Faust worker can reach on this machine and broker.

Run by ``bench/run.py`` (throughput part) as a subprocess, on the same topic and records as the real worker, with
the same consumer settings; it only counts what ``take_events`` hands it. Writes
``{"rate": measurements/s from the first record to the n-th}`` to OUT.

    python bench/faust_floor.py BOOTSTRAP TOPIC N OUT
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
import uuid

import faust
import orjson


def main(bootstrap: str, topic_name: str, n: int, out: str) -> int:
    logging.basicConfig(level=logging.WARNING)
    app = faust.App(
        f"floor-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        stream_wait_empty=False,
        topic_allow_declare=False,
        datadir=tempfile.mkdtemp(prefix="censorwatch-floor-"),
    )
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    seen = {"n": 0, "t0": 0.0}

    @app.agent(topic)
    async def count(stream: faust.StreamT) -> None:  # the same batching as streams/app.py's agent
        async for batch in stream.take_events(500, within=0.5):
            if not seen["n"]:
                seen["t0"] = time.perf_counter()
                seen["n"] = 1  # the first record starts the clock, as for the worker
                batch = batch[1:]
            seen["n"] += len(batch)
            if seen["n"] >= n:
                rate = (n - 1) / (time.perf_counter() - seen["t0"])
                with open(out, "wb") as f:
                    f.write(orjson.dumps({"rate": rate}))
                os.kill(os.getpid(), signal.SIGTERM)
                return

    from faust.worker import Worker

    try:
        Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
