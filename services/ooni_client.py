"""HTTP to the OONI API: polite (back-off, ``Retry-After``, quota watching), bounded, and quiet when it fails.

The API meters each client IP by server time and answers 429 ``{"error":"quota exceeded"}`` when the budget is
spent (``../shared/docs/ooni-api.md`` section 1.3), so every retry backs off exponentially with jitter,
honours ``Retry-After`` and is capped by ``settings.http_max_backoff_seconds``. Each failed attempt logs one
line and counts in ``censorwatch_poller_errors_total{kind}``; no tracebacks in the retry loop.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
import requests

from censorwatch.config import Settings
from services import metrics

log = logging.getLogger(__name__)

MEASUREMENTS_PATH = "/api/v1/measurements"
RAW_MEASUREMENT_PATH = "/api/v1/raw_measurement"
MAX_PAGES = 10_000  # a next_url chain longer than this is a server bug, not data


class OoniError(Exception):
    """A request to the OONI API that did not give a usable answer; ``kind`` is the metric label."""

    kind = "server_error"


class MalformedPage(OoniError):
    """A 2xx answer whose body is not JSON or not the expected shape; ``reason`` says what was wrong."""

    kind = "malformed_page"

    def __init__(self, reason: str, url: str, body: bytes = b"") -> None:
        super().__init__(f"{reason} ({url})")
        self.reason = reason
        self.url = url
        self.body = body


class ClientError(OoniError):
    """A 4xx other than 429: our request is wrong, retrying it will not help."""

    kind = "client_error"

    def __init__(self, status: int, url: str, detail: str) -> None:
        super().__init__(f"HTTP {status} from {url}: {detail}")
        self.status = status


class ApiUnavailable(OoniError):
    """Retries exhausted (network down, quota spent, server failing); the caller tries again next round."""

    kind = "unavailable"


class Stopped(Exception):
    """The stop event was set while waiting to retry."""


class RequestAbandoned(BaseException):
    """Raised by a signal handler while a request is in flight: shutdown never waits for a slow answer."""


@dataclass(frozen=True)
class Page:
    """One page of ``/api/v1/measurements``: the URL asked, its metadata and its raw result items."""

    url: str
    metadata: dict[str, Any]
    results: list[Any]
    body: bytes


MAX_RETRY_AFTER = 3600.0  # a Retry-After honoured across calls waits at most this (a year-2100 date is not an order)


class OoniClient:
    """A ``requests.Session`` with the house rules for the OONI API.

    ``sleep`` waits between attempts (default: ``stop.wait``, so a shutdown interrupts the back-off); tests
    inject a recording function. ``max_attempts`` bounds one call; the poller tries again next round anyway.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        stop: threading.Event | None = None,
        sleep: Callable[[float], object] | None = None,
        max_attempts: int = 5,
        backoff_base: float = 1.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.base = urlsplit(settings.ooni_api_url.rstrip("/"))
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = settings.user_agent
        self.session.headers["Accept"] = "application/json"
        self.stop = stop or threading.Event()
        self._sleep = sleep or self.stop.wait
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.jitter = jitter
        self.timeout = settings.http_timeout_seconds
        self.in_request = False  # read by the poller's signal handler
        self.not_before: float | None = None  # monotonic time a Retry-After beyond our back-off cap asked us to wait

    def close(self) -> None:
        self.session.close()

    # -- URLs -----------------------------------------------------------------------------------------------
    def url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        return urlunsplit((self.base.scheme, self.base.netloc, self.base.path + path, query, ""))

    def rebase(self, next_url: str) -> str:
        """``next_url`` names the API's public host; keep its path and query but use ours (proxy, fake)."""
        parts = urlsplit(next_url)
        path = parts.path
        if self.base.path and not path.startswith(self.base.path + "/"):
            path = self.base.path + path
        return urlunsplit((self.base.scheme, self.base.netloc, path, parts.query, ""))

    # -- requests -------------------------------------------------------------------------------------------
    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential with full jitter in [0.5, 1] of the step, at least ``Retry-After``, capped."""
        cap = self.settings.http_max_backoff_seconds
        step = min(cap, self.backoff_base * 2 ** (attempt - 1))
        delay = step * (0.5 + 0.5 * self.jitter())
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, cap)

    def get_bytes(self, path_or_url: str, params: Mapping[str, Any] | None = None) -> tuple[str, bytes]:
        """GET with retries on 429, 5xx, timeouts and connection errors; returns (url, body) of a 2xx."""
        url = path_or_url if "://" in path_or_url else self.url(path_or_url, params)
        if self.not_before is not None:
            left = self.not_before - time.monotonic()
            if left > 0:  # no request at all: every country and round until then would only be refused again
                raise ApiUnavailable(f"rate-limited: the API asked us to wait {left:.0f} s more (Retry-After)")
            self.not_before = None
        for attempt in range(1, self.max_attempts + 1):
            if self.stop.is_set():
                raise Stopped
            retry_after: float | None = None
            started = time.monotonic()
            resp, kind, what = self._attempt(url)
            if resp is not None:
                self._watch_quota(resp)
                status = resp.status_code
                if 200 <= status < 300:
                    metrics.REQUEST_DURATION.observe(time.monotonic() - started)
                    return url, resp.content
                detail = _detail(resp.content)
                if status == 429:
                    kind, what = "rate_limited", f"HTTP 429 {detail}"
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                elif status >= 500:
                    kind, what = "server_error", f"HTTP {status} {detail}"
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                else:
                    metrics.REQUEST_DURATION.observe(time.monotonic() - started)
                    metrics.ERRORS.labels(kind="client_error").inc()
                    log.error("OONI API refused %s: HTTP %d %s", _redact(url), status, detail)
                    raise ClientError(status, _redact(url), detail)
            metrics.REQUEST_DURATION.observe(time.monotonic() - started)
            metrics.ERRORS.labels(kind=kind).inc()
            if attempt == self.max_attempts:
                log.warning("OONI API %s: %s (attempt %d/%d); giving up for now", _redact(url), what, attempt, attempt)
                raise ApiUnavailable(f"{what} after {attempt} attempts: {_redact(url)}")
            if retry_after is not None and retry_after > self.settings.http_max_backoff_seconds:
                # Longer than we wait inside a call: honour it across calls instead of asking again sooner.
                self.not_before = time.monotonic() + min(retry_after, MAX_RETRY_AFTER)
                log.warning(
                    "OONI API %s: %s; Retry-After %.0f s: no requests until then", _redact(url), what, retry_after
                )
                raise ApiUnavailable(f"{what}: Retry-After {retry_after:.0f} s, longer than the back-off cap")
            delay = self.backoff(attempt, retry_after)
            log.warning(
                "OONI API %s: %s (attempt %d/%d); retrying in %.1f s%s",
                _redact(url),
                what,
                attempt,
                self.max_attempts,
                delay,
                " as Retry-After asks" if retry_after is not None and delay >= retry_after else "",
            )
            self._sleep(delay)
        raise Stopped  # pragma: no cover - the loop always returns or raises

    def _attempt(self, url: str) -> tuple[requests.Response | None, str, str]:
        """One GET: the response (body read), or None with the error kind and a one-line reason."""
        self.in_request = True
        try:
            resp = self.session.get(url, timeout=self.timeout)
            _ = resp.content  # read the body inside the timeout, so a stalled body is a timeout too
            return resp, "", ""
        except requests.Timeout:
            return None, "timeout", f"no answer within {self.timeout:g} s"
        except requests.ConnectionError as exc:
            return None, "connection", f"cannot connect ({_short(exc)})"
        except requests.RequestException as exc:
            return None, "connection", f"request failed ({_short(exc)})"
        finally:
            self.in_request = False

    def get_json(self, path_or_url: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET and parse JSON; a 2xx that is not JSON raises ``MalformedPage`` (counted, not retried)."""
        url, body = self.get_bytes(path_or_url, params)
        return self._parse(url, body)

    def _parse(self, url: str, body: bytes, *, lenient: bool = False) -> Any:
        """``lenient`` (list pages): a body orjson refuses is tried with the standard ``json`` module, which also
        takes escaped lone surrogates (``"\\udcff"``) and numbers past a double (``1e309`` becomes ``inf``). A
        list page is asked again every round while it is inside the look-back, so one such item would otherwise
        make the whole page malformed for good; parsed leniently, the item alone is dead-lettered by ``normalise``.
        """
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            reason = f"body is not valid JSON ({exc.msg} at byte {exc.pos})"
        if lenient:
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):  # JSONDecodeError, bad encoding, an int past 4300 digits
                pass
            else:
                log.debug("OONI API %s: %s; read with the standard json module", _redact(url), reason)
                return data
        raise self._malformed(reason, url, body)

    def iter_measurement_pages(self, params: Mapping[str, Any]) -> Iterator[Page]:
        """Pages of ``/api/v1/measurements`` following ``metadata.next_url`` until it is null."""
        url = self.url(MEASUREMENTS_PATH, params)
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            seen.add(url)
            url, body = self.get_bytes(url)
            page = self._page(url, self._parse(url, body, lenient=True), body)
            yield page
            next_url = page.metadata.get("next_url")
            if next_url is None:
                return
            url = self.rebase(next_url)
            if url in seen:
                raise self._malformed("metadata.next_url points back to a page already read", url, page.body)
        raise self._malformed(f"more than {MAX_PAGES} pages", url, b"")

    def raw_measurement(self, uid: str) -> dict[str, Any]:
        """The full measurement body (``test_keys`` with DNS answers, HTTP bodies) for enrichment."""
        data = self.get_json(RAW_MEASUREMENT_PATH, {"measurement_uid": uid})
        if not isinstance(data, dict):
            raise self._malformed(f"raw measurement is a {type(data).__name__}, not an object", uid, b"")
        return data

    # -- helpers --------------------------------------------------------------------------------------------
    def _page(self, url: str, data: Any, body: bytes) -> Page:
        """``body`` as received: a leniently parsed page may hold what orjson cannot write back."""
        if not isinstance(data, dict):
            raise self._malformed(f"page is a JSON {type(data).__name__}, not an object", url, body)
        results = data.get("results")
        meta = data.get("metadata")
        if not isinstance(results, list):
            raise self._malformed("page has no 'results' list", url, body)
        if not isinstance(meta, dict):
            raise self._malformed("page has no 'metadata' object", url, body)
        next_url = meta.get("next_url")
        if next_url is not None and (not isinstance(next_url, str) or "/api/" not in next_url):
            raise self._malformed(f"metadata.next_url is not an API URL: {str(next_url)[:80]!r}", url, body)
        return Page(url=url, metadata=meta, results=results, body=body)

    def _malformed(self, reason: str, url: str, body: bytes) -> MalformedPage:
        metrics.ERRORS.labels(kind="malformed_page").inc()
        log.warning("OONI API %s: malformed answer: %s", _redact(url), reason)
        return MalformedPage(reason, _redact(url), body)

    def _watch_quota(self, resp: requests.Response) -> None:
        value = resp.headers.get("X-RateLimit-Remaining")
        if value is None:
            return
        try:
            metrics.QUOTA_REMAINING.set(float(value))
        except ValueError:
            log.debug("ignoring X-RateLimit-Remaining %r", value)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _detail(body: bytes) -> str:
    """A short, printable summary of an error body (``{"error":"quota exceeded"}`` -> ``quota exceeded``)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:120].decode("utf-8", "replace")
    else:
        if isinstance(data, dict):
            text = str(data.get("error") or data.get("detail") or data.get("msg") or data)[:120]
        else:
            text = str(data)[:120]
    return "".join(c if c.isprintable() else " " for c in text).strip()


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, without the nested repr noise."""
    inner: BaseException = exc
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    text = str(inner) or type(inner).__name__
    return text[:160]


def _redact(url: str) -> str:
    """URLs are logged as-is (no secrets in OONI queries) but kept to one readable line."""
    return url if len(url) <= 300 else url[:297] + "..."
