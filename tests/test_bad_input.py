"""Hostile and broken input never crashes a stage: it is refused with a reason (``NormaliseError``, a dead letter)
or made inert (escaped), and what is accepted survives the wire.

Property-based (hypothesis). Extends, without repeating, tests/test_normalise.py (fixed refusals),
tests/test_replay.py and tests/test_alerts_render.py (escapers, hostile target/ASN names).
"""

from __future__ import annotations

import gzip
import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from censorwatch.models import DeadLetter, Measurement
from services.normalise import MAX_INPUT_LENGTH, NormaliseError, normalise, parse_time
from services.replay import iter_items, read_measurements

# ---------------------------------------------------------------------------------------------------------------
# strategies

# Text as it arrives from broken producers: any unicode, controls, bidi overrides, and bytes that were not UTF-8
# decoded with ``surrogateescape`` (lone surrogates, which JSON encoders refuse).
_surrogate_text = st.binary(max_size=40).map(lambda b: b.decode("utf-8", errors="surrogateescape"))
_hostile_text = st.one_of(
    st.text(max_size=60),
    _surrogate_text,
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\r\nb",
            "<!channel>",
            "<http://evil.example|click>",
            "<script>alert(1)</script>",
            "\u202eevil",
            "http://bücher.example/",
            "https://xn--bcher-kva.example/",
            "https://例え.テスト/パス",
            "http://[::1/",
            "http://a..b/",
            "http://" + "a" * 64 + ".com/",
            "https://www.rfa.org:99999/",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "AS0",
            "AS4294967296",
            "t",
            "f",
        ]
    ),
)
_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _hostile_text,
)
_json = st.recursive(
    _json_scalar,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(valid, valid, _json)


_times = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
        lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    ),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(["2023-07-17 00:00:00", "2023-07-17T00:00:00Z", "2023-07-17", "2023-13-01T00:00:00Z"]),
)
_urls = st.one_of(
    st.sampled_from(["https://www.rfa.org/english/", "http://BÜCHER.example/x", "https://ok.example:8443/?q=1"]),
    st.builds(lambda host, path: f"https://{host}/{path}", _hostile_text, _hostile_text),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80).map(lambda s: "http://" + s),
)
_items = st.fixed_dictionaries(
    {},
    optional={
        "measurement_uid": _field(
            st.from_regex(r"[0-9]{14}\.[0-9]{6}_[A-Z]{2}_[a-z]{4,12}_[0-9a-f]{16}", fullmatch=True)
        ),
        "report_id": _field(
            st.from_regex(r"[0-9]{8}T[0-9]{6}Z_[a-z]+_[A-Z]{2}_[0-9]+_n1_[A-Za-z0-9]{8}", fullmatch=True)
        ),
        "probe_cc": _field(st.sampled_from(["KH", "KE", "kh", "K", "KHM", "ÇA"])),
        "probe_asn": _field(st.one_of(st.integers(min_value=-1, max_value=2**33), st.from_regex(r"AS[0-9]{1,11}"))),
        "test_name": _field(st.sampled_from(["web_connectivity", "telegram", "signal", "Web Connectivity"])),
        "measurement_start_time": _field(_times),
        "input": _field(st.one_of(st.none(), _urls)),
        "anomaly": _field(st.sampled_from([True, False, "t", "f", 0, 1, "maybe"])),
        "confirmed": _field(st.booleans()),
        "failure": _field(st.booleans()),
        "msm_failure": _field(st.sampled_from(["t", "f"])),
        "blocking_type": _field(st.sampled_from(["dns", "tcp_ip", "http-failure"])),
        "scores": _field(
            st.one_of(
                st.fixed_dictionaries({"analysis": st.fixed_dictionaries({"blocking_type": _json})}),
                st.just('{"analysis": {"blocking_type": "dns"}}'),
                st.just("{not json"),
            )
        ),
    },
)

_HOST = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?$")


def _has_surrogates(m: Measurement) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for v in (m.input or "", m.blocking_type or "") for c in v)


def _check_outcome(item: Any) -> Measurement | None:
    """The contract: a Measurement that survives the wire, or NormaliseError with a reason."""
    try:
        m = normalise(item, fetched_at=datetime(2024, 1, 1, tzinfo=UTC))
    except NormaliseError as exc:
        assert str(exc).strip(), "a refusal must say why"
        return None
    assert not _has_surrogates(m), "undecodable text must be refused, it cannot be serialised"
    assert re.fullmatch(r"[A-Z]{2}", m.cc)
    assert 0 < m.asn < 2**32
    assert m.start_time.tzinfo is not None and m.start_time.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    if m.test_name == "web_connectivity":
        assert m.input and len(m.input) <= MAX_INPUT_LENGTH and _HOST.match(m.target) and m.target.isascii()
    else:
        assert m.target == m.test_name
    assert Measurement.from_bytes(m.to_bytes()) == m
    return m


# ---------------------------------------------------------------------------------------------------------------
# the normaliser


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_items)
def test_normalise_accepts_or_refuses_with_a_reason_and_accepted_ones_round_trip(item: dict[str, Any]) -> None:
    _check_outcome(item)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_normalise_of_any_json_value_is_a_reason_never_a_crash(value: Any) -> None:
    _check_outcome(value)


def _good_item(**patch: Any) -> dict[str, Any]:
    item = {
        "measurement_uid": "20230717000000.000000_KH_webconnectivity_0123456789abcdef",
        "report_id": "20230717T000000Z_webconnectivity_KH_38623_n1_abcdefghijklmnop",
        "probe_cc": "KH",
        "probe_asn": "AS38623",
        "test_name": "web_connectivity",
        "measurement_start_time": "2023-07-17T00:00:00.000000Z",
        "input": "https://www.rfa.org/english/",
        "anomaly": True,
        "scores": {"analysis": {"blocking_type": "dns"}},
    }
    item.update(patch)
    return item


@settings(max_examples=300, deadline=None)
@given(host=st.text(min_size=1, max_size=70), path=_hostile_text)
def test_unicode_and_idn_domains_become_ascii_hosts_or_are_refused(host: str, path: str) -> None:
    m = _check_outcome(_good_item(input=f"https://{host}/{path}"))
    if m is not None:
        assert m.target.isascii() and m.target == m.target.lower()


@pytest.mark.parametrize("size", [MAX_INPUT_LENGTH + 1, 1 << 20, 8 << 20])
def test_huge_input_is_refused_quickly_with_its_length(size: int) -> None:
    with pytest.raises(NormaliseError, match="characters long"):
        normalise(_good_item(input="https://a.example/" + "x" * size))


@pytest.mark.parametrize("control", ["\x00", "\t", "\n", "\r", "\x1b", "\x7f"])
def test_control_characters_in_input_are_refused(control: str) -> None:
    with pytest.raises(NormaliseError, match="control characters"):
        normalise(_good_item(input=f"https://www.rfa.org/{control}x"))


@pytest.mark.parametrize(
    "patch", [{"input": "https://www.rfa.org/\udcff"}, {"scores": {"analysis": {"blocking_type": "dns\udc80"}}}]
)
def test_undecodable_text_is_refused_not_carried_to_the_producer(patch: dict[str, Any]) -> None:
    with pytest.raises(NormaliseError, match="not valid UTF-8"):
        normalise(_good_item(**patch))


@pytest.mark.parametrize(
    "value",
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"],
)
def test_timestamps_at_the_ends_of_the_calendar_are_a_reason(value: str) -> None:
    with pytest.raises(NormaliseError, match="measurement_start_time"):
        parse_time(value)


# ---------------------------------------------------------------------------------------------------------------
# replay / iter_items over garbage files

_lines = st.lists(
    st.one_of(
        st.binary(max_size=80),
        st.sampled_from(
            [
                b'{"measurement_uid": "x", "probe_cc": "KH"',  # truncated JSON
                b'{"a": "\xff\xfe"}',  # not UTF-8 inside a string
                b"\xef\xbb\xbf{}",  # a BOM
                b"[" * 2000 + b"]" * 2000,  # deeper than any parser's recursion limit
                b'"\\udcff"',  # an escaped lone surrogate
                b"null",
                b"1e999",
                orjson.dumps(_good_item()),
            ]
        ),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=_lines, gzipped=st.booleans(), sep=st.sampled_from([b"\n", b"\r\n"]))
def test_iter_items_and_read_measurements_never_crash_on_garbage(
    tmp_path: Path, lines: list[bytes], gzipped: bool, sep: bytes
) -> None:
    data = sep.join(lines)
    path = tmp_path / ("garbage.jsonl.gz" if gzipped else "garbage.jsonl")
    path.write_bytes(gzip.compress(data) if gzipped else data)
    raws = list(iter_items(path))
    for raw in raws:
        assert (raw.error is None) or (raw.item is None and raw.error)
        raw.text.encode("utf-8")  # always printable as a dead letter payload
    rows = list(read_measurements(path))
    assert len(rows) == len(raws)
    for raw, result in rows:
        if isinstance(result, DeadLetter):
            assert result.reason and result.source == raw.source
            assert DeadLetter.from_bytes(result.to_bytes()).payload == result.payload
        else:
            assert Measurement.from_bytes(result.to_bytes()) == result


def test_a_huge_line_and_a_truncated_tail_are_dead_letters_and_the_rest_is_read(tmp_path: Path) -> None:
    good = orjson.dumps(_good_item())
    huge = orjson.dumps(_good_item(input="https://a.example/" + "x" * (2 << 20)))
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([good, b"\xff\xfe\x00garbage", huge, good, good[: len(good) // 2]]))
    rows = list(read_measurements(path))
    kinds = [type(r).__name__ for _, r in rows]
    assert kinds == ["Measurement", "DeadLetter", "DeadLetter", "Measurement", "DeadLetter"]
    reasons = [r.reason for _, r in rows if isinstance(r, DeadLetter)]
    assert "not valid JSON" in reasons[0] and "limit" in reasons[1] and "not valid JSON" in reasons[2]
    assert [raw.source for raw, _ in rows] == [f"mixed.jsonl:{n}" for n in range(1, 6)]


# ---------------------------------------------------------------------------------------------------------------
# renderers: fields test_alerts_render.py does not cover (methods come from the measurement's blocking_type,
# category/watch from configuration, digest lines, silences, network-outage headlines, the console line)

alerts_render = pytest.importorskip("alerts.render")
from alerts.render import DigestItem, Renderer  # noqa: E402
from censorwatch.models import EventAction, EventKind  # noqa: E402
from tests.fakes.events import asn, event  # noqa: E402

_RENDERER = Renderer("en")
_HOSTILE_FIXED = st.sampled_from(
    [
        "<!channel>",
        "<!here>",
        "<!subteam^S123|team>",
        "<http://evil.example|click>",
        "<mailto:a@b.c|mail>",
        "<@U123>",
        "<script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "a\r\nBcc: victim@example.org",
        "\u2028Subject: hi",
        "&lt;!channel&gt;",
        "*bold* _it_ ~s~ `code`",
    ]
)
_anything = st.one_of(_HOSTILE_FIXED, st.text(max_size=60))


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)


_ALLOWED_TAGS = {"html", "head", "meta", "title", "body", "p", "h2", "h3", "ul", "li", "a", "br", "strong"}


def _assert_inert_html(html: str) -> None:
    parser = _Tags()
    parser.feed(html)
    assert set(parser.tags) <= _ALLOWED_TAGS, parser.tags
    for name, value in parser.attrs:
        assert not name.startswith("on"), name
        if name == "href":
            assert value and re.match(r"^https?://", value), value


def _assert_inert_slack(text: str) -> None:
    for token in re.findall(r"<([^>]*)>", text):
        assert token.startswith("https://explorer.ooni.org/"), token
    assert "<!" not in text and "<@" not in text


def _slack_texts(blocks: list[dict[str, Any]]) -> list[str]:
    out = []
    for b in blocks:
        if "text" in b:
            out.append(b["text"]["text"])
        out.extend(e["text"] for e in b.get("elements", []))
    return out


@settings(max_examples=120, deadline=None)
@given(
    kind=st.sampled_from(list(EventKind)),
    action=st.sampled_from(list(EventAction)),
    method=_anything,
    category=_anything,
    watch=_anything,
    name=_anything,
    event_id=_anything,
    long_target=st.booleans(),
)
def test_every_event_field_is_inert_in_slack_email_and_console(
    kind: EventKind,
    action: EventAction,
    method: str,
    category: str,
    watch: str,
    name: str,
    event_id: str,
    long_target: bool,
) -> None:
    target = ("<!channel>" * 600) if long_target else "www.rfa.org"  # longer than a Slack section: cut by _fit
    networks = [asn(38901, methods=(method,), name=name), asn(17976, methods=("dns",))]
    e = event(
        2,
        action,
        networks,
        kind=kind,
        asn=38901 if kind is not EventKind.TARGET_BLOCKED else None,
        event_id=event_id or "x",
        target=target,
        category=category,
        watch=watch,
        methods=[method, "dns"],
        cleared_asns=[24416],
        explorer_links=[f"https://explorer.ooni.org/m/{method}", method],
    )
    s = _RENDERER.slack(e)
    for part in [s.root.text, s.reply.text, *_slack_texts(s.root.blocks), *_slack_texts(s.reply.blocks)]:
        _assert_inert_slack(part)
    mail = _RENDERER.email(e)
    assert "\r" not in mail.subject and "\n" not in mail.subject
    _assert_inert_html(mail.html)
    line = _RENDERER.console(e)
    assert "\n" not in line and "\r" not in line and "\u2028" not in line


@settings(max_examples=120, deadline=None)
@given(
    headlines=st.lists(
        st.tuples(
            st.sampled_from(["opened", "changed", "resolved", "gaps", "silenced"]),
            _anything,
            st.one_of(st.none(), _anything),
        ),
        max_size=6,
    ),
    silences=st.lists(_anything, max_size=3),
    date=_anything,
    recipient=_anything,
)
def test_digest_lines_links_and_silences_are_inert(
    headlines: list[tuple[str, str, str | None]], silences: list[str], date: str, recipient: str
) -> None:
    items = [DigestItem(section, text, None, link) for section, text, link in headlines]
    mail = _RENDERER.digest(date, recipient, items, silences)
    assert "\r" not in mail.subject and "\n" not in mail.subject
    _assert_inert_html(mail.html)
    # the plain-text part is one line per item: hostile CR/LF cannot forge lines
    lines = [ln for ln in mail.text.splitlines() if ln.startswith("- ")]
    assert len(lines) >= len(items) + len(silences)


def test_a_truncated_gzip_file_is_one_dead_letter_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(orjson.dumps(_good_item()) + b"\n")[:12])  # found by hypothesis: b"\x1f\x8b"
    rows = list(read_measurements(path))
    assert len(rows) == 1
    raw, letter = rows[0]
    assert isinstance(letter, DeadLetter) and "not a readable gzip file" in letter.reason
    assert letter.source == raw.source == "cut.jsonl.gz"


def test_an_empty_digest_entry_is_still_one_line() -> None:
    items = [DigestItem("opened", "", None, None)]
    mail = _RENDERER.digest("2023-07-23", "team", items, [""])  # found by hypothesis: an empty silence
    lines = [ln for ln in mail.text.splitlines() if ln.startswith("- ")]
    assert lines.count("- —") == 2 and "-" not in mail.text.splitlines()  # the other sections say "Nothing."


@pytest.mark.parametrize("cc", ["ke", "K1", "ÉÉ", "KEN", ""])
def test_a_measurement_from_any_producer_has_a_two_letter_country_code(cc: str) -> None:
    """The worker labels its counters with it: a free 2-character string would be an unbounded label set."""
    doc = {"uid": "u1", "cc": cc, "asn": 1, "test_name": "telegram", "start_time": "2023-10-15T00:00:00Z"}
    with pytest.raises(ValidationError, match="cc"):
        Measurement.model_validate({**doc, "target": "telegram"})
    assert Measurement.model_validate({**doc, "cc": "KE", "target": "telegram"}).cc == "KE"
