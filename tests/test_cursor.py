"""The poll cursor's record: round trip, its size for a busy country, and records written by the previous version."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import orjson

from services.cursor import CountryCursor

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
LOOKBACK = timedelta(hours=6)
KAFKA_DEFAULT_MAX_MESSAGE = 1_048_588


def _busy(n: int, seed: int = 1) -> tuple[CountryCursor, list[str]]:
    """n measurements in the six-hour overlap, with OONI-shaped uids and whole-second start times."""
    rng = random.Random(seed)
    cursor = CountryCursor(cc="RU", floor=NOW - timedelta(days=1))
    uids = []
    for i in range(n):
        start = NOW - timedelta(seconds=rng.randrange(int(LOOKBACK.total_seconds())))
        uid = f"{start + timedelta(minutes=3):%Y%m%d%H%M%S}.{rng.randrange(10**6):06d}_RU_webconnectivity_{i:016x}"
        cursor.record(uid, start, NOW)
        uids.append(uid)
    return cursor, uids


def test_round_trip_keeps_every_uid_start_and_mark() -> None:
    cursor, uids = _busy(5_000)
    cursor.remember("sha256:0123abcd", NOW - timedelta(hours=1, microseconds=250))  # a dead letter's key
    cursor.swept = NOW - timedelta(minutes=50)
    cursor.remember_late("20261126115500.123456_RU_webconnectivity_late", NOW - timedelta(minutes=5))
    back = CountryCursor.from_bytes(cursor.to_bytes())
    assert (back.cc, back.floor, back.since, back.swept) == (cursor.cc, cursor.floor, cursor.since, cursor.swept)
    assert back.seen == cursor.seen and back.late == cursor.late
    assert back.knows_late("20261126115500.123456_RU_webconnectivity_late") and not back.knows_late(uids[0])
    assert all(back.knows(uid) for uid in uids) and back.knows("sha256:0123abcd")
    assert not back.knows(uids[0] + "x") and not back.knows("20261126000000.000000_RU_webconnectivity_other")


def test_a_busy_country_fits_in_one_kafka_message() -> None:
    # 40,000 uids in six hours is 160,000 measurements a day from one country, several times the busiest day of
    # Cambodia's election year; the previous format ({uid: ISO start}) needed about 90 bytes per uid.
    cursor, uids = _busy(40_000)
    data = cursor.to_bytes()
    assert len(data) < KAFKA_DEFAULT_MAX_MESSAGE
    previous = orjson.dumps({uid: (NOW - timedelta(hours=1)).isoformat() for uid in uids})
    assert len(data) * 3 < len(previous)


def test_a_record_of_the_previous_version_is_taken_over() -> None:
    start = NOW - timedelta(hours=2)
    v1 = orjson.dumps(
        {
            "version": 1,
            "cc": "KH",
            "floor": (NOW - timedelta(days=1)).isoformat(),
            "since": NOW.isoformat(),
            "seen": {"20261126100000.000001_KH_webconnectivity_aa": start.isoformat(), "old": "2026-11-26T01:00:00"},
        }
    )
    cursor = CountryCursor.from_bytes(v1)
    assert cursor.since == NOW and cursor.knows("20261126100000.000001_KH_webconnectivity_aa")
    assert cursor.prune(LOOKBACK) == 1  # "old" (naive = UTC) is before the next request's since
    assert cursor.knows("20261126100000.000001_KH_webconnectivity_aa") and not cursor.knows("old")
    again = CountryCursor.from_bytes(cursor.to_bytes())
    assert orjson.loads(cursor.to_bytes())["version"] == 2
    assert again.seen == cursor.seen
