"""The OONI API client against the loopback fake: paging, back-off, Retry-After, bad answers, timeouts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from censorwatch.config import Settings, load_settings
from services.ooni_client import (
    MAX_RETRY_AFTER,
    ApiUnavailable,
    ClientError,
    MalformedPage,
    OoniClient,
    parse_retry_after,
)
from tests.fakes.ooni_api import MEASUREMENTS, FakeOoniApi, Fault, load_recorded_items

SEARCH = "ooni/api-responses/search"


def recorded_items(shared_data: Path) -> list[dict[str, Any]]:
    items: dict[str, dict[str, Any]] = {}
    for path in sorted((shared_data / SEARCH).glob("*.json")):
        for item in load_recorded_items(path):
            items[item["measurement_uid"]] = item
    return list(items.values())


@pytest.fixture
def items(shared_data: Path) -> list[dict[str, Any]]:
    return recorded_items(shared_data)


@pytest.fixture
def api(items: list[dict[str, Any]]) -> Iterator[FakeOoniApi]:
    with FakeOoniApi(items) as fake:
        yield fake


def settings_for(api: FakeOoniApi, **kw: Any) -> Settings:
    return load_settings(ooni_api_url=api.base_url, **kw)


class Sleeps:
    """An injected sleep that records what the client asked for and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def errors(kind: str) -> float:
    return REGISTRY.get_sample_value("censorwatch_poller_errors_total", {"kind": kind}) or 0.0


WINDOW = {"since": "2026-06-11", "until": "2026-07-12", "order": "asc", "order_by": "measurement_start_time"}


def test_follows_next_url_over_every_page(api: FakeOoniApi, items: list[dict[str, Any]]) -> None:
    client = OoniClient(settings_for(api), sleep=Sleeps())
    pages = list(client.iter_measurement_pages({**WINDOW, "limit": 40}))
    uids = [i["measurement_uid"] for p in pages for i in p.results]
    assert len(pages) == -(-len(items) // 40) + (1 if len(items) % 40 == 0 else 0)
    assert sorted(uids) == sorted(i["measurement_uid"] for i in items)
    assert len(set(uids)) == len(uids)
    assert pages[-1].metadata["next_url"] is None
    offsets = [int(r.params["offset"]) for r in api.requests_to()[1:]]
    assert offsets == [40 * n for n in range(1, len(pages))]
    # The User-Agent is ours, never an okhttp one (the API answers okhttp with a dummy).
    assert all(r.headers["User-Agent"].startswith("censorwatch/") for r in api.requests)


def test_next_url_of_the_public_host_is_rebased_onto_the_configured_one(api: FakeOoniApi) -> None:
    client = OoniClient(settings_for(api))
    public = "https://api.ooni.io/api/v1/measurements?since=2026-06-11&limit=50&offset=50"
    assert client.rebase(public) == f"{api.base_url}/api/v1/measurements?since=2026-06-11&limit=50&offset=50"


def test_429_waits_at_least_retry_after_then_succeeds(api: FakeOoniApi) -> None:
    api.push(Fault.rate_limited(retry_after=7))
    sleeps = Sleeps()
    before = errors("rate_limited")
    client = OoniClient(settings_for(api), sleep=sleeps, jitter=lambda: 0.0)
    data = client.get_json(MEASUREMENTS, {**WINDOW, "limit": 5})
    assert len(data["results"]) == 5
    assert sleeps.calls == [7.0]  # Retry-After beats the 0.5 s first step
    assert errors("rate_limited") == before + 1
    assert REGISTRY.get_sample_value("censorwatch_poller_api_quota_remaining") is not None


def test_429_retry_after_really_waited_with_the_default_sleep(api: FakeOoniApi) -> None:
    api.push(Fault.rate_limited(retry_after=0.3))
    client = OoniClient(settings_for(api), backoff_base=0.01)
    client.get_json(MEASUREMENTS, {**WINDOW, "limit": 1})
    first, second = api.requests_to()
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 0.3


def test_a_retry_after_beyond_the_back_off_cap_is_honoured_across_calls(api: FakeOoniApi) -> None:
    """Found in review: a Retry-After longer than the cap was cut to the cap, and the next country and round asked
    again at once. Now no request is made until that time."""
    settings = settings_for(api)
    api.push(Fault.rate_limited(retry_after=10 * MAX_RETRY_AFTER))  # beyond the cap, and beyond what is honoured
    sleeps = Sleeps()
    client = OoniClient(settings, sleep=sleeps)
    with pytest.raises(ApiUnavailable, match="Retry-After"):
        client.get_json(MEASUREMENTS, {**WINDOW, "limit": 1})
    with pytest.raises(ApiUnavailable, match="wait"):
        client.get_json(MEASUREMENTS, {**WINDOW, "limit": 1})
    assert len(api.requests_to()) == 1 and sleeps.calls == []
    assert (
        client.not_before is not None
        and MAX_RETRY_AFTER - 60 <= client.not_before - time.monotonic() <= MAX_RETRY_AFTER
    )
    client.not_before = time.monotonic() - 1  # the time has come
    assert client.get_json(MEASUREMENTS, {**WINDOW, "limit": 1})["results"]
    assert len(api.requests_to()) == 2


def test_quota_remaining_is_read_from_every_answer(api: FakeOoniApi) -> None:
    api.quota = 123
    OoniClient(settings_for(api)).get_json(MEASUREMENTS, {**WINDOW, "limit": 1})
    assert REGISTRY.get_sample_value("censorwatch_poller_api_quota_remaining") == 122


def test_500_then_success_backs_off_exponentially_capped(api: FakeOoniApi) -> None:
    api.push(Fault.server_error(), Fault.server_error(502), Fault.server_error(503))
    sleeps = Sleeps()
    before = errors("server_error")
    settings = settings_for(api, http_max_backoff_seconds=3.0)
    client = OoniClient(settings, sleep=sleeps, jitter=lambda: 1.0, backoff_base=1.0)
    data = client.get_json(MEASUREMENTS, {**WINDOW, "limit": 2})
    assert len(data["results"]) == 2
    assert sleeps.calls == [1.0, 2.0, 3.0]  # 1, 2, 4 -> capped at 3
    assert errors("server_error") == before + 3


def test_retries_exhausted_raise_api_unavailable(api: FakeOoniApi, caplog: pytest.LogCaptureFixture) -> None:
    api.push(*[Fault.server_error()] * 3)
    client = OoniClient(settings_for(api), sleep=Sleeps(), max_attempts=3)
    with pytest.raises(ApiUnavailable):
        client.get_json(MEASUREMENTS, {**WINDOW, "limit": 2})
    lines = [r for r in caplog.records if r.name == "services.ooni_client"]
    assert len(lines) == 3 and all(r.exc_info is None for r in lines)  # one line each, no tracebacks


def test_truncated_json_is_a_malformed_page(api: FakeOoniApi) -> None:
    api.push(Fault.truncated())
    before = errors("malformed_page")
    with pytest.raises(MalformedPage, match="not valid JSON") as info:
        OoniClient(settings_for(api), sleep=Sleeps()).get_json(MEASUREMENTS, {**WINDOW, "limit": 3})
    assert info.value.body  # kept for the dead letter
    assert errors("malformed_page") == before + 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[1, 2]", "not an object"),
        (b'{"metadata": {}}', "no 'results' list"),
        (b'{"results": []}', "no 'metadata' object"),
        (b'{"results": [], "metadata": {"next_url": 5}}', "next_url is not an API URL"),
    ],
)
def test_wrong_shape_is_a_malformed_page(api: FakeOoniApi, body: bytes, reason: str) -> None:
    api.push(Fault.raw(200, body))
    with pytest.raises(MalformedPage, match=reason):
        list(OoniClient(settings_for(api)).iter_measurement_pages({**WINDOW, "limit": 3}))


def test_a_page_orjson_refuses_but_json_reads_is_usable(api: FakeOoniApi) -> None:
    """One item with an escaped lone surrogate or a number past a double must not make the page malformed: the
    page would be asked again every round and the country would stall on it."""
    body = (
        b'{"metadata": {"next_url": null}, "results": [{"input": "https://x.org/\\udcff"}, {"probe_asn": 1e309},'
        b' {"probe_asn": 123456789012345678901234567890123456789012345678901234567890}]}'
    )
    api.push(Fault.raw(200, body), Fault.raw(200, body))
    before = errors("malformed_page")
    [page] = list(OoniClient(settings_for(api)).iter_measurement_pages({**WINDOW, "limit": 3}))
    assert page.results[0]["input"] == "https://x.org/\udcff" and page.results[1]["probe_asn"] == float("inf")
    assert page.body == body and errors("malformed_page") == before
    with pytest.raises(MalformedPage, match="not valid JSON"):  # other answers keep the strict parser
        OoniClient(settings_for(api)).get_json(MEASUREMENTS, {**WINDOW, "limit": 3})


@pytest.mark.parametrize("body", [b'{"metadata": {}, "results": [}', b'{"results": [], "metadata": {}} x', b"\xff{}"])
def test_a_body_neither_parser_reads_is_still_a_malformed_page(api: FakeOoniApi, body: bytes) -> None:
    api.push(Fault.raw(200, body))
    with pytest.raises(MalformedPage, match="not valid JSON") as info:
        list(OoniClient(settings_for(api)).iter_measurement_pages({**WINDOW, "limit": 3}))
    assert info.value.body == body


def test_a_client_error_is_not_retried(api: FakeOoniApi) -> None:
    sleeps = Sleeps()
    with pytest.raises(ClientError) as info:
        OoniClient(settings_for(api), sleep=sleeps).get_json(MEASUREMENTS, {"order_by": "input"})
    assert info.value.status == 422 and sleeps.calls == []


def test_timeout_is_retried(api: FakeOoniApi) -> None:
    api.push(Fault.slow(5.0))
    sleeps = Sleeps()
    before = errors("timeout")
    client = OoniClient(settings_for(api, http_timeout_seconds=1.0), sleep=sleeps)  # the healthy retry has 1 s
    data = client.get_json(MEASUREMENTS, {**WINDOW, "limit": 1})
    assert len(data["results"]) == 1 and len(sleeps.calls) >= 1
    assert errors("timeout") >= before + 1


def test_connection_refused_is_one_line_per_attempt(caplog: pytest.LogCaptureFixture) -> None:
    with FakeOoniApi() as api:
        url = api.base_url  # a port nothing listens on once it stops
    client = OoniClient(load_settings(ooni_api_url=url), sleep=Sleeps(), max_attempts=2)
    before = errors("connection")
    with pytest.raises(ApiUnavailable, match="cannot connect"):
        client.get_json(MEASUREMENTS)
    assert errors("connection") == before + 2
    assert all(r.exc_info is None for r in caplog.records)


def test_raw_measurement(api: FakeOoniApi) -> None:
    api.add_raw("u1", {"test_keys": {"queries": []}})
    client = OoniClient(settings_for(api))
    assert client.raw_measurement("u1") == {"test_keys": {"queries": []}}
    with pytest.raises(ClientError):
        client.raw_measurement("missing")


def test_fake_filters_like_the_api(api: FakeOoniApi, items: list[dict[str, Any]]) -> None:
    client = OoniClient(settings_for(api))
    web = client.get_json(MEASUREMENTS, {**WINDOW, "test_name": "web_connectivity,tor", "limit": 1000})
    assert {r["test_name"] for r in web["results"]} <= {"web_connectivity", "tor"}
    cc = items[0]["probe_cc"]
    one = client.get_json(MEASUREMENTS, {**WINDOW, "probe_cc": cc, "limit": 1000})["results"]
    assert one and {r["probe_cc"] for r in one} == {cc}
    desc = client.get_json(MEASUREMENTS, {**WINDOW, "order": "desc", "limit": 1000})["results"]
    times = [r["measurement_start_time"] for r in desc]
    assert times == sorted(times, reverse=True)
    t = times[len(times) // 2]
    later = client.get_json(MEASUREMENTS, {"since": t, "until": "2026-07-12", "limit": 1000})["results"]
    assert all(r["measurement_start_time"] > t for r in later)  # since is strict


def test_retry_after_parsing() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
