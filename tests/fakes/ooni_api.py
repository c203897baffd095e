"""A loopback HTTP server that behaves like the OONI API, for tests and offline demos.

It serves ``GET /api/v1/measurements`` from a list of list items with the real service's filtering and
paging (see ``../shared/docs/ooni-api.md`` section 1): ``probe_cc`` / ``test_name`` comma lists, ``since``
strict ``>``, ``until`` ``<=``, ``order``, ``offset``/``limit``, ``metadata.next_url`` as an absolute URL to
itself and ``count = -1`` while more pages exist. ``GET /api/v1/raw_measurement`` serves a dict of bodies.
Scripted faults: 429 with ``Retry-After`` and ``{"error":"quota exceeded"}``, 5xx, truncated JSON, slow
answers, a repeated page. Every request is recorded with its arrival time. Items can be added while it runs,
as new and late uploads appear on the real API.

    with FakeOoniApi(items) as api:
        api.push(Fault.rate_limited(retry_after=2))
        settings = load_settings(ooni_api_url=api.base_url, ...)
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

MEASUREMENTS = "/api/v1/measurements"
RAW = "/api/v1/raw_measurement"


@dataclass(frozen=True)
class Fault:
    """One scripted answer, used once for the next request whose path starts with ``path``."""

    status: int = 500
    body: bytes | None = None  # None: the normal answer's body (for truncate/delay/repeat)
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a timeout when longer than the client's)
    truncate: bool = False  # send only the first half of the normal body, status 200
    repeat_previous: bool = False  # the previous page's items again (rows shifted under the offset)
    path: str = MEASUREMENTS
    when: Mapping[str, str] = field(default_factory=dict)  # only for requests with these query values

    def matches(self, path: str, params: Mapping[str, str]) -> bool:
        return path.startswith(self.path) and all(params.get(k) == v for k, v in self.when.items())

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1, path: str = MEASUREMENTS) -> Fault:
        headers = {"X-RateLimit-Remaining": "0"}
        if retry_after is not None:
            headers["Retry-After"] = f"{retry_after:g}"
        return cls(429, b'{"error":"quota exceeded"}', headers, path=path)

    @classmethod
    def server_error(cls, status: int = 500, path: str = MEASUREMENTS) -> Fault:
        return cls(status, b'{"detail":"Internal Server Error"}', path=path)

    @classmethod
    def truncated(cls, path: str = MEASUREMENTS) -> Fault:
        return cls(200, truncate=True, path=path)

    @classmethod
    def slow(cls, delay: float, path: str = MEASUREMENTS) -> Fault:
        return cls(200, delay=delay, path=path)

    @classmethod
    def repeated_page(cls, when: Mapping[str, str] | None = None, path: str = MEASUREMENTS) -> Fault:
        """Items of the previous page again, with this page's metadata: what offset paging does when rows
        shift under it (e.g. ``when={"offset": "10"}``: page 3 repeats page 2's items and page 3's are skipped
        this time; a poller's look-back must recover them)."""
        return cls(200, repeat_previous=True, path=path, when=dict(when or {}))

    @classmethod
    def raw(cls, status: int, body: bytes, path: str = MEASUREMENTS) -> Fault:
        """Any status and body, e.g. a 200 with the wrong shape."""
        return cls(status, body, path=path)


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    params: dict[str, str]
    at: float  # time.monotonic() on arrival
    status: int
    headers: dict[str, str]


def parse_api_time(value: str) -> datetime:
    """The API's datetime parameters and item times: dates, ISO times with or without ``Z``/micros."""
    text = value.strip().replace(" ", "T")
    if text.endswith("Z"):
        text = text[:-1]
    parsed = datetime.fromisoformat(text)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def load_recorded_items(path: Path) -> list[dict[str, Any]]:
    """The ``results`` of a recorded page (the ``{"_recorded_status", "body"}`` wrapper or a bare page)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    body = data.get("body", data)
    return list(body["results"])


class FakeOoniApi:
    """The OONI API on 127.0.0.1:<free port>, in a background thread."""

    def __init__(
        self,
        items: Iterable[Mapping[str, Any]] = (),
        raw_measurements: Mapping[str, Any] | None = None,
        *,
        quota: int = 4000,
    ) -> None:
        self._lock = threading.Lock()
        self._items: list[dict[str, Any]] = [dict(i) for i in items]
        self._raw: dict[str, Any] = dict(raw_measurements or {})
        self._faults: list[Fault] = []
        self._previous_results: list[Any] | None = None
        self._closing = threading.Event()
        self.quota = quota
        self.requests: list[RecordedRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-ooni-api", daemon=True)

    # -- life cycle ---------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeOoniApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()  # wakes slow answers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeOoniApi:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- scripting ----------------------------------------------------------------------------------------
    def add_items(self, items: Iterable[Mapping[str, Any]]) -> None:
        """New or late uploads: visible to the next request."""
        with self._lock:
            self._items.extend(dict(i) for i in items)

    def add_raw(self, uid: str, body: Any) -> None:
        with self._lock:
            self._raw[uid] = body

    def push(self, *faults: Fault) -> None:
        """Queue faults; each is used once, in order, by the next request to its path."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def requests_to(self, path: str = MEASUREMENTS) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- behaviour ----------------------------------------------------------------------------------------
    def _take_fault(self, path: str, params: Mapping[str, str]) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.matches(path, params):
                    return self._faults.pop(i)
        return None

    def _measurements(self, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        try:
            limit = int(params.get("limit", "100"))
            offset = int(params.get("offset", "0"))
            until = parse_api_time(params["until"]) if params.get("until") else _tomorrow()
            since = parse_api_time(params["since"]) if params.get("since") else until - timedelta(days=30)
        except ValueError as exc:
            return 422, {"detail": f"invalid parameter: {exc}"}
        if limit < 1 or offset < 0:
            return 422, {"detail": "limit must be >= 1 and offset >= 0"}
        if params.get("order_by", "measurement_start_time") != "measurement_start_time":
            return 422, {"detail": "order_by must be measurement_start_time"}
        order = params.get("order", "desc").lower()
        if order not in ("asc", "desc"):
            return 422, {"detail": "order must be asc or desc"}
        if until - since > timedelta(days=180):
            days = (until - since).days
            return 400, {"detail": f"Time range must not exceed 6 months. Requested: {days} days (limit: 180 days)."}
        ccs = _csv(params.get("probe_cc"))
        tests = _csv(params.get("test_name"))
        with self._lock:
            items = list(self._items)
        chosen = []
        for item in items:
            try:
                start = parse_api_time(str(item.get("measurement_start_time")))
            except ValueError:
                start = since + timedelta(microseconds=1)  # malformed times still get served
            if ccs and item.get("probe_cc") not in ccs:
                continue
            if not ccs and item.get("probe_cc") == "ZZ":
                continue
            if tests and item.get("test_name") not in tests:
                continue
            if not since < start <= until:
                continue
            chosen.append((start, str(item.get("measurement_uid")), item))
        # ClickHouse orders by (start, report_id, input, uid); start then uid keeps paging deterministic here.
        chosen.sort(key=lambda t: (t[0], t[1]), reverse=order == "desc")
        page = [item for _, _, item in chosen[offset : offset + limit]]
        meta: dict[str, Any] = {
            "current_page": math.ceil(offset / limit) + 1,
            "limit": limit,
            "offset": offset,
            "query_time": 0.001,
        }
        if len(page) < limit:
            count = offset + len(page)
            meta.update(count=count, pages=math.ceil(count / limit), next_url=None)
        else:
            next_params = dict(params)
            next_params["offset"] = str(offset + limit)
            next_params["limit"] = str(limit)
            meta.update(count=-1, pages=-1, next_url=f"{self.base_url}{MEASUREMENTS}?{urlencode(next_params)}")
        return 200, {"metadata": meta, "results": page}

    def _raw_measurement(self, params: dict[str, str]) -> tuple[int, Any]:
        uid = params.get("measurement_uid", "")
        with self._lock:
            body = self._raw.get(uid)
        if body is None:
            return 404, {"detail": "Measurement not found"}
        return 200, body

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                fault = api._take_fault(parts.path, params)
                if parts.path == MEASUREMENTS:
                    status, payload = api._measurements(params)
                elif parts.path == RAW:
                    status, payload = api._raw_measurement(params)
                elif parts.path == "/health":
                    status, payload = 200, {"status": "ok"}
                else:
                    status, payload = 404, {"detail": "Not Found"}
                body = json.dumps(payload).encode()
                headers = {"Content-Type": "application/json", "Cache-Control": "max-age=60"}
                with api._lock:
                    api.quota = max(0, api.quota - 1)
                    headers["X-RateLimit-Remaining"] = str(api.quota)
                if fault is not None:
                    if fault.delay:
                        api._closing.wait(fault.delay)
                    if fault.repeat_previous and api._previous_results is not None:
                        body = json.dumps({**payload, "results": api._previous_results}).encode()
                    elif fault.truncate:
                        body = body[: max(1, len(body) // 2)]
                    elif fault.body is not None:
                        body = fault.body
                    status = fault.status
                    headers.update(fault.headers)
                if parts.path == MEASUREMENTS and status == 200 and isinstance(payload, dict):
                    api._previous_results = payload.get("results")
                with api._lock:
                    api.requests.append(
                        RecordedRequest(parts.path, params, time.monotonic(), status, dict(self.headers))
                    )
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout test)

        return Handler


def _csv(value: str | None) -> set[str]:
    return {v.strip() for v in value.split(",") if v.strip()} if value else set()


def _tomorrow() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


_TEST_COMPACT = {"web_connectivity": "webconnectivity", "facebook_messenger": "facebookmessenger"}


def make_item(
    *,
    cc: str = "KH",
    asn: int = 38623,
    test_name: str = "web_connectivity",
    start: datetime,
    input: str | None = "https://www.rfa.org/",
    anomaly: bool = False,
    confirmed: bool = False,
    failure: bool = False,
    blocking_type: str | None = None,
    received: datetime | None = None,
    seq: int = 0,
) -> dict[str, Any]:
    """A synthetic list item in the exact wire format of ``/api/v1/measurements`` (label it simulated)."""
    received = received or start + timedelta(seconds=30)
    compact = _TEST_COMPACT.get(test_name, test_name.replace("_", ""))
    digest = hashlib.sha256(repr((cc, asn, test_name, start, input, seq)).encode()).hexdigest()[:16]
    uid = f"{received:%Y%m%d%H%M%S.%f}_{cc}_{compact}_{digest}"
    scores: dict[str, Any] = {"blocking_general": 1.0 if anomaly or confirmed else 0.0}
    if blocking_type:
        scores["analysis"] = {"blocking_type": blocking_type}
    return {
        "measurement_uid": uid,
        "report_id": f"{start:%Y%m%dT%H%M%SZ}_{compact}_{cc}_{asn}_n1_{digest}",
        "probe_cc": cc,
        "probe_asn": f"AS{asn}",
        "test_name": test_name,
        "measurement_start_time": f"{start:%Y-%m-%dT%H:%M:%S}.000000Z",
        "input": input if test_name == "web_connectivity" else None,
        "anomaly": anomaly,
        "confirmed": confirmed,
        "failure": failure,
        "scores": scores,
        "measurement_url": f"https://api.ooni.io/api/v1/raw_measurement?measurement_uid={uid}",
    }
