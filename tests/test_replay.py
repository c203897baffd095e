"""``censorwatch replay`` on the real broker, and the reusable readers on every recorded format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from censorwatch import bus
from censorwatch.config import Settings
from censorwatch.models import DeadLetter, Measurement
from services.replay import iter_items, read_measurements, run
from tests.kafka_read import read_topic

SEARCH = "ooni/api-responses/search"


def test_iter_items_reads_jsonl_pages_wrappers_and_gzip(shared_data: Path, tmp_path: Path) -> None:
    jsonl = shared_data / "events/ug-twitter.jsonl"
    items = list(iter_items(jsonl))
    assert len(items) == 470 and all(i.error is None for i in items)
    assert items[0].source == "ug-twitter.jsonl:1"
    wrapped = next((shared_data / SEARCH).glob("*.json"))
    page = list(iter_items(wrapped))
    assert len(page) == 50 and page[3].source.endswith(":results[3]")
    bare = tmp_path / "page.json"
    bare.write_text(json.dumps(json.loads(wrapped.read_text())["body"]))
    assert [i.item for i in iter_items(bare)] == [i.item for i in page]
    gz = tmp_path / "ug.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert len(list(iter_items(gz))) == 470


def test_read_measurements_over_the_global_sample(shared_data: Path) -> None:
    rows = list(read_measurements(shared_data / "events/global-fastpath-sample.jsonl"))
    good = [m for _, m in rows if isinstance(m, Measurement)]
    assert len(rows) == 1080 and len(good) >= 1000


def test_replay_produces_in_order_and_dead_letters_bad_lines(
    kafka_settings: Settings, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bus.ensure_topics(kafka_settings)
    lines = (shared_data / "events/ke-webconnectivity-telegram-2023.jsonl").read_text().splitlines()[:200]
    bad_json = '{"measurement_uid": "x", truncated'
    bad_item = json.dumps({**json.loads(lines[0]), "probe_cc": "Kenya", "measurement_uid": "bad-cc"})
    path = tmp_path / "ke.jsonl"
    path.write_text("\n".join([*lines[:100], bad_json, *lines[100:], bad_item]) + "\n")
    assert run(kafka_settings, [path]) == 0
    assert "200 produced, 2 dead-lettered" in capsys.readouterr().out
    records = read_topic(kafka_settings, kafka_settings.topics.measurements)
    got = [Measurement.from_bytes(r.value) for r in records]
    assert len(got) == 200 and {r.key for r in records} == {b"KE"}
    # One key -> one partition -> file order kept.
    order = [json.loads(line)["measurement_uid"] for line in lines]
    by_offset = sorted(records, key=lambda r: r.offset)
    assert [Measurement.from_bytes(r.value).uid for r in by_offset] == order
    assert all(m.fetched_at is not None for m in got)
    letters = [DeadLetter.from_bytes(r.value) for r in read_topic(kafka_settings, kafka_settings.topics.deadletter)]
    assert sorted(d.source or "" for d in letters) == ["ke.jsonl:101", "ke.jsonl:202"]
    assert any("not valid JSON" in d.reason for d in letters)
    assert any("probe_cc" in d.reason for d in letters)


def test_replay_of_a_missing_file_fails(kafka_settings: Settings, tmp_path: Path) -> None:
    bus.ensure_topics(kafka_settings)
    assert run(kafka_settings, [tmp_path / "nope.jsonl"]) == 1
