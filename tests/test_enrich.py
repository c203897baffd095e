"""Confirmation from raw bodies: the pure matcher on real raw measurements, the budget, the poller step."""

from __future__ import annotations

import copy
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from censorwatch import bus
from censorwatch.config import Settings, load_settings
from censorwatch.models import Measurement
from services.enrich import (
    MAX_RESPONSES,
    Enrichment,
    FingerprintDB,
    confirmation,
    control_addrs,
    dns_answers,
    http_responses,
    load_local_indicators,
    load_ooni_fingerprints,
    match_raw,
    packaged_db,
)
from services.normalise import normalise
from services.ooni_client import OoniClient
from services.poller import Poller
from tests.fakes.ooni_api import RAW as RAW_PATH
from tests.fakes.ooni_api import FakeOoniApi, Fault, make_item
from tests.kafka_read import read_topic

RAW = "ooni/raw-measurements"
WC05 = "ooni/wc05-synthetic"


def raw(shared_data: Path, rel: str) -> dict[str, Any]:
    return dict(json.loads((shared_data / rel).read_text()))


@pytest.fixture(scope="module")
def shared_db() -> FingerprintDB:
    """Built from the originals in ../shared (the packaged copy must agree with it)."""
    base = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    ooni = load_ooni_fingerprints(
        base / "ooni/fingerprints/fingerprints_dns.json", base / "ooni/fingerprints/fingerprints_http.json"
    )
    local = {"KH": load_local_indicators(base / "kh/kh_dns_blocking_indicators.csv", "KH")}
    return FingerprintDB.from_data(ooni, local)


def with_answers(body: dict[str, Any], cc: str, answer: str) -> dict[str, Any]:
    """A real body moved to another country with its (blocked) DNS answers replaced."""
    out = copy.deepcopy(body)
    out["probe_cc"] = cc
    for query in out["test_keys"]["queries"]:
        for a in query.get("answers") or []:
            if a.get("answer_type") == "A" or "ipv4" in a:
                a["ipv4"] = answer
    return out


def test_local_indicators_keep_only_blocking_rows(shared_data: Path) -> None:
    kh = load_local_indicators(shared_data / "kh/kh_dns_blocking_indicators.csv", "KH")
    assert {"36.37.242.94", "10.10.10.1", "203.190.164.182", "127.0.0.1"} <= set(kh)
    assert "146.112.197.80" not in kh  # false_positive
    assert "146.112.197.76" not in kh  # suspicious, unclassified


@pytest.mark.parametrize("db_name", ["packaged", "shared"])
def test_ooni_confirmed_cases_match_like_the_fastpath(
    shared_data: Path, shared_db: FingerprintDB, db_name: str
) -> None:
    db = packaged_db() if db_name == "packaged" else shared_db
    # Iran: DNS answer 10.10.34.36, scope nat -> confirmed
    # (fastpath test_score_web_connectivity_dns_ir_fingerprint)
    assert confirmation(raw(shared_data, f"{RAW}/web_connectivity_ir_fp.json"), db) == "ooni:ooni.ir_10dot10_ipv4_1"
    # Indonesia: Kominfo block page (fastpath test_match_id_fingerprint)
    id_file = f"{RAW}/20250527233111.802678_ID_webconnectivity_5a37ec909dbf14e3.json"
    assert confirmation(raw(shared_data, id_file), db) == "ooni:ooni.id_lamanlabuh_kominfo"


def test_false_positive_scopes_never_confirm(shared_data: Path, shared_db: FingerprintDB) -> None:
    # A localhost answer matches OONI's generic 'br' fingerprint but that never confirms outside KH.
    body = raw(shared_data, f"{WC05}/dnsHijackingToLocalhostWithHTTP.json")
    assert [m.label for m in match_raw(body, shared_db)] == ["ooni:cl.dns_br_localhost"]
    assert confirmation(body, shared_db) is None
    for name in ("successWithHTTP", "httpDiffWithConsistentDNS", "cloudflareCAPTCHAWithHTTP"):
        assert confirmation(raw(shared_data, f"{WC05}/{name}.json"), shared_db) is None, name


def test_every_raw_measurement_parses_without_error(shared_data: Path) -> None:
    db = packaged_db()
    files = sorted((shared_data / RAW).glob("*.json")) + sorted((shared_data / WC05).glob("*.json"))
    assert len(files) >= 90
    confirmed = {f.name for f in files if confirmation(json.loads(f.read_text()), db)}
    # Not dnsBlockingBOGON.json: its 10.10.34.35 is Iran's fingerprint ooni.ir_5, and the probe is in Italy.
    assert confirmed == {
        "20250527233111.802678_ID_webconnectivity_5a37ec909dbf14e3.json",
        "bug_352.json",
        "web_connectivity_ir_fp.json",
    }


def test_cambodian_block_answers_confirm_only_in_cambodia(shared_data: Path) -> None:
    db = packaged_db()
    body = raw(shared_data, f"{WC05}/dnsBlockingBOGON.json")
    kh = with_answers(body, "KH", "36.37.242.94")
    assert "36.37.242.94" in dns_answers(kh)
    assert confirmation(kh, db, "KH") == "dns:36.37.242.94"
    assert confirmation(with_answers(body, "TH", "36.37.242.94"), db, "TH") is None
    assert confirmation(with_answers(body, "KH", "146.112.197.80"), db, "KH") is None  # a false positive
    localhost = raw(shared_data, f"{WC05}/dnsHijackingToLocalhostWithHTTP.json")
    assert control_addrs(localhost) == ["93.184.216.34"]  # public, and not 127.0.0.1
    assert confirmation(localhost, db, "KH") == "dns:127.0.0.1"


def dns_body(*answers: str, cc: str = "KH", control: list[str] | None = None) -> dict[str, Any]:
    """A web_connectivity body with these A answers and, when given, the control resolver's addresses."""
    tk: dict[str, Any] = {
        "queries": [{"hostname": "www.rfa.org", "query_type": "A", "answers": [{"ipv4": a} for a in answers]}]
    }
    if control is not None:
        tk["control"] = {"dns": {"failure": None, "addrs": control}}
    return {"probe_cc": cc, "test_keys": tk}


@pytest.mark.parametrize("answer", ["127.0.0.1", "10.10.10.1"])
def test_bogon_answers_confirm_only_against_a_public_control(answer: str) -> None:
    db = packaged_db()
    assert answer in db.local_dns["KH"]
    assert confirmation(dns_body(answer, control=["104.18.28.12", "2606:4700::6812:1c0c"]), db) == f"dns:{answer}"
    assert confirmation(dns_body(answer), db) is None  # no control: maybe a split-horizon name
    assert confirmation(dns_body(answer, control=[]), db) is None  # control failed
    assert confirmation(dns_body(answer, control=["10.1.2.3", "www.rfa.org.cdn"]), db) is None  # no public one
    assert confirmation(dns_body(answer, control=["104.18.28.12", answer]), db) is None  # control agrees
    # the match is still reported, only not as confirming
    [match] = match_raw(dns_body(answer), db)
    assert match.label == f"dns:{answer}" and not match.confirmed


def test_an_answer_the_control_also_got_never_confirms() -> None:
    db = packaged_db()
    assert confirmation(dns_body("36.37.242.94"), db) == "dns:36.37.242.94"  # public block answer, no control
    assert confirmation(dns_body("36.37.242.94", control=["104.18.28.12"]), db) == "dns:36.37.242.94"
    assert confirmation(dns_body("36.37.242.94", control=["36.37.242.94"]), db) is None
    assert confirmation(dns_body("104.18.1.1", "36.37.242.94", control=["104.18.1.1", "36.37.242.94"]), db) is None


def test_another_countrys_fingerprint_does_not_confirm(shared_data: Path) -> None:
    db = packaged_db()
    public = ["93.184.216.34"]
    # ooni.ir_5 (10.10.34.35) is Iran's, scope nat: a block in Iran, a private address anywhere else
    assert confirmation(dns_body("10.10.34.35", cc="IR", control=public), db) == "ooni:ooni.ir_5"
    assert confirmation(dns_body("10.10.34.35", cc="KH", control=public), db) is None
    assert confirmation(dns_body("10.10.34.35", cc="KH", control=public), db, "KH") is None
    assert [m.label for m in match_raw(dns_body("10.10.34.35", cc="KH", control=public), db)] == ["ooni:ooni.ir_5"]
    # a global fingerprint (no expected_countries, scope nat) still confirms in any country
    [fp] = [fp for fp in db.http if fp.name == "cp.e_unk_warn"]
    assert not fp.expected_countries and fp.scope == "nat"
    page = {"probe_cc": "KH", "test_keys": {"requests": [{"response": {"body": f"<html>{fp.pattern}</html>"}}]}}
    assert confirmation(page, db) == "ooni:cp.e_unk_warn"
    # Indonesia's block page redirect confirms in Indonesia only
    id_body = raw(shared_data, f"{RAW}/20250527233111.802678_ID_webconnectivity_5a37ec909dbf14e3.json")
    assert confirmation(id_body, db, "ID") == "ooni:ooni.id_lamanlabuh_kominfo"
    assert confirmation(id_body, db, "KH") is None


def test_hostile_bodies_are_bounded_and_probe_cc_may_be_anything() -> None:
    db = packaged_db()
    [fp] = [fp for fp in db.http if fp.name == "cp.e_unk_warn"]
    page = {"response": {"body": fp.pattern}}
    filler = {"response": {"body": "x", "headers": {"Server": "nginx"}}}
    early = {"probe_cc": "KH", "test_keys": {"requests": [filler] * (MAX_RESPONSES - 1) + [page]}}
    late = {"probe_cc": "KH", "test_keys": {"requests": [filler] * MAX_RESPONSES + [page]}}
    assert confirmation(early, db) == "ooni:cp.e_unk_warn"
    assert confirmation(late, db) is None  # past the cap: never examined
    assert len(list(http_responses({"test_keys": {"requests": [filler] * 10_000}}))) == MAX_RESPONSES
    # past the total body budget: a huge first body leaves the rest unread
    big = {"response": {"body": "ក" * (1 << 20)}}
    assert confirmation({"test_keys": {"requests": [big] * 4 + [page]}}, db, "KH") is None
    # DNS: answers past the cap are not looked at either
    many = dns_body(*[f"104.18.{i // 250}.{i % 250}" for i in range(MAX_RESPONSES)], "36.37.242.94")
    assert confirmation(many, db) is None
    for probe_cc in (5, None, ["KH"], {"cc": "KH"}):
        body = dns_body("36.37.242.94", control=["104.18.28.12"])
        body["probe_cc"] = probe_cc
        assert confirmation(body, db) is None  # no country: the KH list does not apply
        assert match_raw(body, db) == []


def anomaly(seq: int, start: datetime) -> dict[str, Any]:
    return make_item(start=start, anomaly=True, blocking_type="dns", seq=seq)


def test_budget_per_round_and_outcomes(shared_data: Path) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    blocked = with_answers(raw(shared_data, f"{WC05}/dnsBlockingBOGON.json"), "KH", "36.37.242.94")
    clean = raw(shared_data, f"{WC05}/successWithHTTP.json")
    items = [anomaly(i, start) for i in range(4)]
    items.append(make_item(start=start, seq=9))  # ok: never fetched
    with FakeOoniApi(
        raw_measurements={items[0]["measurement_uid"]: blocked, items[1]["measurement_uid"]: clean}
    ) as api:
        settings = load_settings(ooni_api_url=api.base_url, enrich={"max_fetches_per_round": 3})
        step = Enrichment(settings, OoniClient(settings, max_attempts=1))
        before = {
            o: REGISTRY.get_sample_value("censorwatch_poller_enrichments_total", {"outcome": o}) or 0
            for o in ("confirmed", "unconfirmed", "failed", "skipped_budget")
        }
        step.begin_round()
        out = [step(normalise(i)) for i in items]
        assert [m.confirmed for m in out] == [True, False, False, False, False]
        assert out[0].confirmed_by == "dns:36.37.242.94" and out[0].anomaly
        assert len(api.requests_to("/api/v1/raw_measurement")) == 3  # the budget
        after = {
            o: REGISTRY.get_sample_value("censorwatch_poller_enrichments_total", {"outcome": o}) or 0 for o in before
        }
        assert {o: after[o] - before[o] for o in before} == {
            "confirmed": 1,
            "unconfirmed": 1,
            "failed": 1,
            "skipped_budget": 1,
        }
        step.begin_round()  # a new round has a new budget
        assert step(normalise(items[3])).confirmed is False
        assert len(api.requests_to("/api/v1/raw_measurement")) == 4


@pytest.mark.parametrize("fault", ["503", "hang"])
def test_an_unavailable_raw_endpoint_costs_one_request_per_round(fault: str) -> None:
    """A raw body is a bonus: a failing endpoint must not hold the round (it used to retry each of 20 fetches
    5 times with back-off: ~54 minutes with 30 s timeouts)."""
    start = datetime.now(UTC) - timedelta(hours=1)
    items = [anomaly(i, start) for i in range(25)]
    with FakeOoniApi(items) as api:
        if fault == "503":
            api.push(*[Fault.server_error(503, path=RAW_PATH) for _ in range(100)])
        else:
            api.push(*[Fault(200, delay=60, path=RAW_PATH) for _ in range(100)])  # the fake wakes it on exit
        settings = load_settings(ooni_api_url=api.base_url, http_timeout_seconds=0.5)
        assert settings.enrich.max_fetches_per_round == 20
        slept: list[float] = []
        step = Enrichment(settings, OoniClient(settings, sleep=slept.append))  # the poller's client: 5 attempts
        assert step.raw_client.max_attempts == 1 and step.raw_client.timeout == 0.5
        assert Enrichment(load_settings(), OoniClient(load_settings())).raw_client.timeout == 10.0
        step.begin_round()
        measurements = [normalise(i) for i in items]
        out = [step(m) for m in measurements]
        assert out == measurements  # all of them, passed on unconfirmed
        assert 100 - api.pending_faults == 1 and slept == []  # (a hanging request is recorded only when answered)
        assert not step.client.in_request
        step.begin_round()  # the next round tries again, once
        assert [step(m) for m in measurements] == measurements
        assert 100 - api.pending_faults == 2 and slept == []


@pytest.mark.kafka
def test_poller_produces_the_confirmed_measurement(kafka_settings: Settings, shared_data: Path) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    item = anomaly(1, start)
    body = with_answers(raw(shared_data, f"{WC05}/dnsBlockingBOGON.json"), "KH", "36.37.242.94")
    with FakeOoniApi([item], {item["measurement_uid"]: body}) as api:
        settings = kafka_settings.model_copy(update={"ooni_api_url": api.base_url, "countries": ["KH"]})
        bus.ensure_topics(settings)
        stop = threading.Event()
        client = OoniClient(settings, stop=stop)
        poller = Poller(settings, client=client, stop=stop, enricher=Enrichment(settings, client))
        try:
            assert poller.poll_once()[0].produced == 1
        finally:
            poller.close()
    [record] = read_topic(settings, settings.topics.measurements)
    m = Measurement.from_bytes(record.value)
    assert m.confirmed and m.confirmed_by == "dns:36.37.242.94" and m.outcome == "confirmed"


@pytest.mark.kafka
def test_poller_produces_everything_when_raw_bodies_fail(kafka_settings: Settings) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    items = [anomaly(i, start) for i in range(5)]
    with FakeOoniApi(items) as api:
        api.push(*[Fault.server_error(503, path=RAW_PATH) for _ in range(20)])
        settings = kafka_settings.model_copy(update={"ooni_api_url": api.base_url, "countries": ["KH"]})
        bus.ensure_topics(settings)
        stop = threading.Event()
        client = OoniClient(settings, stop=stop, sleep=lambda _: None)
        poller = Poller(settings, client=client, stop=stop, enricher=Enrichment(settings, client))
        try:
            assert poller.poll_once()[0].produced == 5
        finally:
            poller.close()
        assert len(api.requests_to(RAW_PATH)) == 1
    records = read_topic(settings, settings.topics.measurements)
    assert sorted(Measurement.from_bytes(r.value).uid for r in records) == sorted(i["measurement_uid"] for i in items)
    assert not any(Measurement.from_bytes(r.value).confirmed for r in records)


def test_addresses_match_whatever_their_spelling() -> None:
    """Found in review: an IPv6 answer spelt in upper case (or not compressed) missed its indicator."""
    db = FingerprintDB.from_data({"dns": [], "http": []}, {"KH": {"D0::11": "blocking"}})
    raw = {
        "probe_cc": "KH",
        "test_keys": {
            "queries": [{"answers": [{"answer_type": "AAAA", "ipv6": "d0:0::11"}]}],
            "control": {"dns": {"addrs": ["2001:db8::1", "93.184.216.34"]}},
        },
    }
    assert confirmation(raw, db, "KH") == "dns:d0:0::11"
