"""OONI list item -> ``Measurement``: the one place that knows the API's wire formats.

Accepts the ``/api/v1/measurements`` list item (``probe_asn`` "AS123", booleans, ISO times with ``Z``) and the
fastpath row it is formatted from (``'t'``/``'f'`` flags, ``msm_failure``, ``"YYYY-MM-DD HH:MM:SS"`` times, ASN as a
number), so recorded data of either kind replays. Anything else raises ``NormaliseError`` with a reason that a
person can act on; the caller dead-letters the item and goes on.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from censorwatch.models import Measurement

MAX_INPUT_LENGTH = 2048  # longer inputs are not URLs anyone tests; refuse rather than carry them everywhere
MAX_ID_LENGTH = 200
WEB_TESTS = frozenset({"web_connectivity"})
_ASN = re.compile(r"^(?:AS)?(\d{1,10})$", re.IGNORECASE)
_TEST = re.compile(r"^[a-z0-9_]{1,64}$")
_CC = re.compile(r"^[A-Z]{2}$")
_ID = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces or controls
_HOST = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?$")
_TIME_FORMATS = ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")


class NormaliseError(ValueError):
    """A list item that cannot become a Measurement; ``str(exc)`` says why."""


def parse_time(value: Any) -> datetime:
    """OONI start times: with or without microseconds, ``Z``, ``T`` or a space; always returned in UTC."""
    if not isinstance(value, str):
        raise NormaliseError(f"measurement_start_time must be a string, got {type(value).__name__}")
    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    try:
        parsed = datetime.fromisoformat(value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # not ISO, or an offset that leaves the calendar (year 1 / 9999)
        raise NormaliseError(f"measurement_start_time is not a timestamp: {value[:60]!r}") from None


def _shown(value: Any, limit: int = 40) -> str:
    """A value in a reason: numbers past what orjson reads (``1e309`` is ``inf`` to the lenient page parser,
    a 400-digit integer stays exact) are named as such instead of printed whole."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"a non-finite number ({value})"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"a {len(str(abs(value)))}-digit number"
    return repr(str(value)[:limit])


def parse_asn(value: Any) -> int:
    if isinstance(value, bool):
        raise NormaliseError("probe_asn must be 'AS<number>' or a number, got a boolean")
    if isinstance(value, int):
        asn = value
    elif isinstance(value, str) and (m := _ASN.match(value.strip())):
        asn = int(m.group(1))
    else:
        raise NormaliseError(f"probe_asn must be 'AS<number>' or a number, got {_shown(value)}")
    if not 0 < asn < 2**32:
        raise NormaliseError(f"probe_asn out of range: {_shown(asn, 20)}")
    return asn


def _utf8(name: str, value: str) -> str:
    """Text that cannot be encoded (lone surrogates from undecodable bytes) would fail later, on the topic."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise NormaliseError(f"{name} is not valid UTF-8 text: {value[:60]!r}") from None
    return value


def _flag(item: dict[str, Any], *names: str) -> bool:
    for name in names:
        if name in item and item[name] is not None:
            value = item[name]
            if isinstance(value, bool):
                return value
            if value in ("t", "true", "True", 1):
                return True
            if value in ("f", "false", "False", 0, ""):
                return False
            raise NormaliseError(f"{name} must be a boolean, got {_shown(value, 20)}")
    return False


def _text(item: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = item.get(name)
    if value is None or value == "":
        if required:
            raise NormaliseError(f"missing {name}")
        return ""
    if not isinstance(value, str):
        raise NormaliseError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_ID_LENGTH or not _ID.match(value):
        raise NormaliseError(f"{name} is not a printable identifier: {value[:60]!r}")
    return value


def web_target(url: str) -> str:
    """The domain OONI keys web measurements on: the URL's host, lower-cased, IDN as punycode."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise NormaliseError(f"input is not a URL ({exc}): {url[:80]!r}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise NormaliseError(f"input is not an http(s) URL: {url[:80]!r}")
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise NormaliseError(f"input host is not a valid domain name: {host[:80]!r}") from None
    if not _HOST.match(host):
        raise NormaliseError(f"input host is not a valid domain name: {host[:80]!r}")
    return host


def _scores(item: dict[str, Any]) -> dict[str, Any]:
    scores = item.get("scores")
    if isinstance(scores, str):  # measurement_meta returns scores as a JSON string
        try:
            scores = orjson.loads(scores)
        except orjson.JSONDecodeError as exc:
            try:  # as lenient as the page parser: escaped lone surrogates, numbers past a double
                scores = json.loads(scores)
            except (ValueError, RecursionError):
                raise NormaliseError(f"scores is not valid JSON ({exc.msg})") from None
    if scores is None:
        return {}
    if not isinstance(scores, dict):
        raise NormaliseError(f"scores must be an object, got {type(scores).__name__}")
    return scores


def normalise(item: Any, *, fetched_at: datetime | None = None) -> Measurement:
    """Turn one API list item (or fastpath row) into a Measurement, or raise ``NormaliseError``."""
    if not isinstance(item, dict):
        raise NormaliseError(f"item must be a JSON object, got {type(item).__name__}")
    uid = _text(item, "measurement_uid")
    test_name = item.get("test_name")
    if not isinstance(test_name, str) or not _TEST.match(test_name):
        raise NormaliseError(f"test_name is not an OONI test name: {str(test_name)[:40]!r}")
    cc = item.get("probe_cc")
    if not isinstance(cc, str) or not _CC.match(cc):
        raise NormaliseError(f"probe_cc is not a two-letter country code: {str(cc)[:10]!r}")
    raw_input = item.get("input")
    if raw_input is not None and not isinstance(raw_input, str):
        raise NormaliseError(f"input must be a string or null, got {type(raw_input).__name__}")
    if raw_input is not None:
        _utf8("input", raw_input)
    if raw_input is not None and len(raw_input) > MAX_INPUT_LENGTH:
        raise NormaliseError(f"input is {len(raw_input)} characters long (limit {MAX_INPUT_LENGTH})")
    if raw_input is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw_input):
        raise NormaliseError(f"input contains control characters: {raw_input[:80]!r}")
    input_ = raw_input or None
    if test_name in WEB_TESTS:
        if input_ is None:
            raise NormaliseError("web_connectivity item has no input URL")
        target = web_target(input_)
    else:
        target = test_name
    scores = _scores(item)
    analysis = scores.get("analysis")
    blocking_type = analysis.get("blocking_type") if isinstance(analysis, dict) else None
    if not blocking_type and isinstance(item.get("blocking_type"), str):
        blocking_type = item["blocking_type"]  # fastpath row column
    if blocking_type is not None and (not isinstance(blocking_type, str) or len(blocking_type) > 40):
        raise NormaliseError(f"scores.analysis.blocking_type is not a method name: {str(blocking_type)[:40]!r}")
    if blocking_type is not None:
        _utf8("scores.analysis.blocking_type", blocking_type)
    return Measurement(
        uid=uid,
        report_id=_text(item, "report_id", required=False),
        cc=cc,
        asn=parse_asn(item.get("probe_asn")),
        test_name=test_name,
        start_time=parse_time(item.get("measurement_start_time")),
        input=input_,
        target=target,
        anomaly=_flag(item, "anomaly"),
        confirmed=_flag(item, "confirmed"),
        failure=_flag(item, "failure", "msm_failure"),
        blocking_type=blocking_type or None,
        fetched_at=fetched_at,
    )
