"""A loopback TCP proxy that can drop, refuse, reject and delay connections: broker faults on demand.

Kafka clients connect to the address the broker *advertises* in its metadata, not to the bootstrap address, so
to put this proxy in the path, start a broker whose advertised listener is the proxy's port
(``EmbeddedBroker(port, advertised_port=proxy.port)``) and hand clients ``proxy.address`` as bootstrap.

    with TcpProxy(("127.0.0.1", broker_port), port=proxy_port) as proxy:
        proxy.cut()           # every open connection is reset now (clients reconnect)
        proxy.refuse()        # nothing listens: connects fail with ECONNREFUSED ...
        proxy.resume()        # ... until this, on the same port
        proxy.reject()        # connects are accepted and reset at once (counted in ``rejected``)
        proxy.delay = 0.05    # seconds added before each forwarded chunk, both directions
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from types import TracebackType

_BUF = 65536


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0), as a dropped connection looks to the peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            for s in (self.client, self.upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                _reset(s)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target`` with one pair of threads per connection."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port
        self.delay = 0.0
        self.accepted = 0
        self.rejected = 0
        self.cuts = 0
        self.bytes_forwarded = 0
        self._mode = "forward"  # forward | reject
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._closing = threading.Event()

    # -- life cycle ---------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._listen()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._unlisten()
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------------------------------------
    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for p in self._pairs if not p.closed.is_set())

    def cut(self) -> int:
        """Reset every open connection (both sides); returns how many were cut."""
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        live = [p for p in pairs if not p.closed.is_set()]
        for p in live:
            p.close()
        if live:
            self.cuts += 1
        return len(live)

    def refuse(self) -> None:
        """Stop listening and cut everything: the broker is unreachable (connection refused)."""
        self._unlisten()
        self.cut()

    def reject(self) -> None:
        """Listen, but reset each new connection at once (counted): unreachable, observably."""
        self._mode = "reject"
        self.cut()
        if self._listener is None:
            self._listen()

    def resume(self) -> None:
        """Forward again, listening on the same port if we had stopped."""
        self._mode = "forward"
        if self._listener is None:
            self._listen()

    # -- plumbing -----------------------------------------------------------------------------------------
    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    sock.close()
                    raise
                time.sleep(0.05)
        sock.listen(64)
        sock.settimeout(0.1)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True, name="proxy")
        self._accept_thread.start()

    def _unlisten(self) -> None:
        sock, self._listener = self._listener, None
        thread, self._accept_thread = self._accept_thread, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if thread is not None:
            thread.join(2)

    def _accept_loop(self, sock: socket.socket) -> None:
        while self._listener is sock and not self._closing.is_set():
            try:
                client, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._mode == "reject":
                self.rejected += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(pair, client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, upstream, client), daemon=True).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not pair.closed.is_set():
                data = src.recv(_BUF)
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                if pair.closed.is_set():
                    break
                dst.sendall(data)
                self.bytes_forwarded += len(data)
        except OSError:
            pass
        finally:
            pair.close()
