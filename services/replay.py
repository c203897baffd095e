"""``censorwatch replay FILE...``: push recorded measurements onto the measurement topic, so the pipeline runs
offline on real data exactly as it would live.

Reads JSONL of list items (``../shared/data/events/*.jsonl``, optionally gzipped), saved API pages
(``{"metadata", "results"}``) or the recorded wrapper (``{"_recorded_status", "body": {...}}``). Items are
normalised like the poller does (``fetched_at`` = now), produced keyed by country code in file order, and
anything unreadable is dead-lettered with ``file:line``. ``iter_items`` and ``read_measurements`` are the
reusable readers (the backtest reads the same files).
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from kafka.errors import KafkaError

from censorwatch import bus
from censorwatch.config import Settings

# not services.metrics: every censorwatch process imports this module (the backtest's reader), and the poller's
# metrics would be exported by the worker and the dispatcher too
from censorwatch.metrics_common import DEADLETTER_TOTAL
from censorwatch.models import DeadLetter, Measurement, utcnow
from services.normalise import NormaliseError, normalise

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a line longer than 1 MiB is not a measurement list item


@dataclass(frozen=True)
class RawItem:
    """One item read from a file: the parsed JSON (or the reason it could not be parsed) and where it was."""

    source: str  # "file:line" for JSONL, "file:results[i]" for pages
    item: Any  # the parsed value; None when ``error`` is set
    text: str  # the original text (truncated), for a dead letter
    error: str | None = None


class Unreadable(ValueError):
    """The file's content cannot be read at all (e.g. gzip that is truncated or corrupt)."""


def _open_text(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise Unreadable(f"not a readable gzip file ({type(exc).__name__}: {exc})") from None


def _page_results(data: Any) -> list[Any] | None:
    """The ``results`` of a saved page or of the recorded wrapper; None when ``data`` is not a page."""
    if not isinstance(data, dict):
        return None
    body = data.get("body") if "results" not in data else data
    if isinstance(body, dict) and isinstance(body.get("results"), list):
        return list(body["results"])
    return None


def iter_items(path: Path | str) -> Iterator[RawItem]:
    """Every list item in a JSONL file, a saved API page or a JSON array, in file order.

    Never raises for bad content: an unreadable line comes back with ``error`` set, so callers can
    dead-letter it and go on. A missing file raises ``OSError``.
    """
    path = Path(path)
    name = path.name
    try:
        data = _open_text(path)
    except Unreadable as exc:  # one dead letter for the whole file: there are no lines to tell apart
        head = path.read_bytes()[:256].decode("utf-8", errors="backslashreplace")
        yield RawItem(name, None, head, str(exc))
        return
    stripped = data.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            whole = orjson.loads(data)
        except orjson.JSONDecodeError:
            whole = None  # several lines: JSONL
        else:
            results = _page_results(whole)
            if results is None and isinstance(whole, list):
                results = whole
            if results is not None:
                for i, item in enumerate(results):
                    yield RawItem(f"{name}:results[{i}]", item, orjson.dumps(item).decode()[:65536])
                return
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        source = f"{name}:{lineno}"
        text = raw[:65536].decode("utf-8", errors="backslashreplace")
        if len(raw) > MAX_LINE:
            yield RawItem(source, None, text, f"line is {len(raw)} bytes long (limit {MAX_LINE})")
            continue
        try:
            yield RawItem(source, orjson.loads(raw), text)
        except orjson.JSONDecodeError as exc:
            yield RawItem(source, None, text, f"not valid JSON ({exc.msg})")


def read_measurements(
    path: Path | str, *, fetched_at: Any = None
) -> Iterator[tuple[RawItem, Measurement | DeadLetter]]:
    """``iter_items`` normalised: each item with its ``Measurement`` or the ``DeadLetter`` saying why not."""
    for raw in iter_items(path):
        if raw.error is not None:
            yield raw, DeadLetter.of("normalise", raw.error, raw.text, source=raw.source)
            continue
        try:
            yield raw, normalise(raw.item, fetched_at=fetched_at)
        except NormaliseError as exc:
            yield raw, DeadLetter.of("normalise", str(exc), raw.text, source=raw.source)


@dataclass
class ReplaySummary:
    produced: int = 0
    deadlettered: int = 0
    files: int = 0
    missing: int = 0


def replay(settings: Settings, files: Iterable[Path | str], *, batch: int = 500) -> ReplaySummary:
    """Produce every file's measurements (keyed by cc, in order) and dead letters; wait for all acks."""
    summary = ReplaySummary()
    producer = bus.producer(settings)
    topics = settings.topics
    try:
        for path in files:
            path = Path(path)
            try:
                rows = list(read_measurements(path, fetched_at=utcnow()))
            except OSError as exc:
                log.error("cannot read %s: %s", path, exc.strerror or exc)
                summary.missing += 1
                continue
            summary.files += 1
            good = [(r.cc.encode(), r.to_bytes()) for _, r in rows if isinstance(r, Measurement)]
            bad = [(None, r.to_bytes()) for _, r in rows if isinstance(r, DeadLetter)]
            for start in range(0, len(good), batch):
                summary.produced += bus.send_all(producer, topics.measurements, good[start : start + batch], 60)
            if bad:
                summary.deadlettered += bus.send_all(producer, topics.deadletter, bad, 60)
                DEADLETTER_TOTAL.labels(stage="normalise").inc(len(bad))
                for _, r in rows:
                    if isinstance(r, DeadLetter):
                        log.warning("%s: dead-lettered: %s", r.source, r.reason)
            log.info("%s: %d measurements, %d dead-lettered", path.name, len(good), len(bad))
    finally:
        producer.close(timeout=10)
    return summary


def run(settings: Settings, files: list[Path]) -> int:
    """The CLI entry: replay, print the summary; non-zero when a file was missing or Kafka failed."""
    try:
        summary = replay(settings, files)
    except (KafkaError, TimeoutError) as exc:
        print(f"censorwatch replay: Kafka at {settings.bootstrap()} failed: {exc}")
        return 1
    print(
        f"replayed {summary.files} file(s) to {settings.topics.measurements}: "
        f"{summary.produced} produced, {summary.deadlettered} dead-lettered"
        + (f", {summary.missing} file(s) unreadable" if summary.missing else "")
    )
    return 1 if summary.missing else 0
