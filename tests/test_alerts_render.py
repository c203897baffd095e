"""Rendering is pure: headlines, evidence, links, languages, and escaping of hostile text in every format."""

from __future__ import annotations

import email.policy
import re
from email import message_from_bytes
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts import escape
from alerts.render import Renderer, TemplateError, chart_url
from alerts.sinks import EmailSink
from censorwatch.config import EmailSettings
from censorwatch.models import Change, EventAction, EventKind
from tests.fakes.events import asn, event, life

HOSTILE = [
    "<!channel>",
    "<!here|here>",
    "<http://evil.example|click>",
    "<script>alert(1)</script>",
    "a\r\nBcc: victim@example.org",
    "x\nSubject: hi",
    "&amp; & <@U123>",
    "\u202eevil\u202c",
]


@pytest.fixture(scope="module")
def en() -> Renderer:
    return Renderer("en")


def test_headline_names_site_country_isps_and_method(en: Renderer) -> None:
    e = event(1, EventAction.OPENED, [asn(n) for n in (38901, 17976, 24416, 1, 2, 3, 4, 5, 6)])
    assert en.headline(e) == "www.rfa.org blocked in Cambodia on 9 ISPs — DNS"
    one = event(1, EventAction.OPENED, [asn(38901)])
    assert en.headline(one) == "www.rfa.org blocked in Cambodia on 1 ISP — DNS"


def test_unblocked_is_a_headline_of_its_own(en: Renderer) -> None:
    resolved = life()[-1]
    assert en.headline(resolved) == "www.rfa.org unblocked in Cambodia"
    assert en.slack(resolved).reply.text.startswith("Unblocked: www.rfa.org unblocked in Cambodia")


def test_evidence_and_links(en: Renderer) -> None:
    e = life()[1]
    msg = en.slack(e)
    body = msg.root.blocks[1]["text"]["text"]
    assert "15 of 18 measurements" in body and "9 probes" in body
    assert "AS17976 Cambodia Telecom" in body and "first seen 2024-07-20 06:00 UTC" in body.replace("*", "")
    links = msg.root.blocks[2]["elements"][0]["text"]
    assert "<https://explorer.ooni.org/m/20240720060000.000000_KH_webconnectivity_abc|measurement 1>" in links
    url = chart_url(e)
    assert url.startswith("https://explorer.ooni.org/chart/mat?probe_cc=KH&test_name=web_connectivity")
    assert "domain=www.rfa.org" in url and "since=2024-07-07" in url and "until=2024-07-21" in url
    assert "axis_x=measurement_start_day&axis_y=probe_asn" in url


def test_every_country_has_a_name_and_unspecified_methods_say_nothing(en: Renderer) -> None:
    e = event(1, EventAction.OPENED, [asn(37061, methods=("unspecified",))], cc="KE", methods=["unspecified"])
    assert en.headline(e) == "www.rfa.org blocked in Kenya on 1 ISP"  # not "in KE on 1 ISP — unspecified"
    assert "Methods: method unknown" in en.email(e).text
    mixed = event(1, EventAction.OPENED, [asn(1, methods=("dns", "unspecified"))], methods=["dns", "unspecified"])
    assert en.headline(mixed).endswith("on 1 ISP — DNS")


def test_simulated_measurements_are_not_linked(en: Renderer) -> None:
    sim = "https://explorer.ooni.org/m/20230706191259.000000_KH_webconnectivity_sim015cfddccada"
    real = "https://explorer.ooni.org/m/20230706191259.000000_KH_webconnectivity_abc"
    e = event(1, EventAction.OPENED, [asn(1)], simulated=True, explorer_links=[sim, real])
    for text in (en.email(e).text, en.email(e).html, str(en.slack(e).root.blocks)):
        assert "_sim015" not in text and "20230706191259.000000_KH_webconnectivity_abc" in text
        assert "explorer.ooni.org/chart/mat" in text  # the chart of real measurements stays


def test_a_network_without_a_known_name_is_its_number(en: Renderer) -> None:
    e = event(1, EventAction.OPENED, [asn(20294, name=""), asn(17976, methods=("dns", "tcp_ip"))])
    text = en.email(e).text
    assert "- AS20294: 5 of 6 measurements" in text and "?" not in text.split("Networks")[1].split("\n\n")[0]
    assert "- AS17976 Cambodia Telecom: 5 of 6 measurements, 3 probes, DNS, TCP/IP," in text
    assert "AS20294៖ 5/6" in Renderer("km").email(e).text


def test_already_blocked_and_simulated_are_said(en: Renderer) -> None:
    e = event(1, EventAction.OPENED, [asn(38901)], already_blocked=True, simulated=True)
    slack = en.slack(e)
    mail = en.email(e)
    assert slack.root.text.startswith("[SIMULATED]")
    assert "Already blocked when monitoring began" in slack.root.blocks[1]["text"]["text"]
    assert mail.subject.startswith("[censorwatch] New: [SIMULATED]")
    assert "SIMULATED DATA" in mail.text and "SIMULATED DATA" in mail.html
    assert "Already blocked when monitoring began" in mail.text


def test_what_changed_is_said_in_the_readers_language(en: Renderer) -> None:
    change = Change(what="joined", asn=17976, isps=3)
    e = event(2, EventAction.UPDATED, [asn(38901), asn(17976), asn(24416)], summary="English", change=change)
    assert en.summary(e) == "AS17976 Cambodia Telecom joined: www.rfa.org now blocked on 3 ISPs"
    km = Renderer("km")
    assert km.summary(e) == "AS17976 Cambodia Telecom ក៏បិទដែរ៖ ឥឡូវ www.rfa.org ត្រូវបានបិទលើ ក្រុមហ៊ុនអ៊ីនធឺណិត 3"
    assert "ក៏បិទដែរ" in km.email(e).text and "English" not in km.email(e).text
    assert en.summary(e.model_copy(update={"change": None})) == "English"  # older events: the engine's words
    already = Change(what="opened", asn=38901, isps=1, since="2023-07-01")
    first = event(1, EventAction.OPENED, [asn(38901)], change=already, simulated=True)
    assert en.summary(first) == (
        "[SIMULATED] www.rfa.org already blocked when monitoring began (first measured 2023-07-01) in Cambodia on "
        "AS38901 EZECOM"
    )


def test_a_bad_phrase_of_what_changed_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "strings.yaml").write_text('change_cleared: "$network cleared on $nowhere"\n')
    with pytest.raises(TemplateError, match="change_cleared"):
        Renderer("en", templates_dir=tmp_path)


def test_outage_and_coverage_gap_headlines(en: Renderer) -> None:
    outage = event(1, EventAction.OPENED, [asn(38901)], kind=EventKind.NETWORK_OUTAGE, asn=38901, target="")
    assert en.headline(outage) == "Network outage on AS38901 EZECOM in Cambodia"
    gap = outage.model_copy(update={"kind": EventKind.COVERAGE_GAP, "action": EventAction.RESOLVED})
    assert en.headline(gap) == "Measurements from AS38901 EZECOM in Cambodia again"


def test_khmer_templates_render(en: Renderer) -> None:
    km = Renderer("km")
    e = life(simulated=True)[0]
    assert "កម្ពុជា" in km.headline(e) and "SIMULATED" in km.headline(e)
    assert "SIMULATED" in km.email(e).text


def test_edited_templates_override_and_bad_ones_fail_at_start(tmp_path: Path) -> None:
    (tmp_path / "strings.yaml").write_text('headline_blocked: "BLOCKED: $target ($country)"\n', encoding="utf-8")
    r = Renderer("en", tmp_path)
    assert r.headline(life()[0]) == "BLOCKED: www.rfa.org (Cambodia)"
    (tmp_path / "slack_root.txt").write_text("$no_such_value\n", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"slack_root\.txt"):
        Renderer("en", tmp_path)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)


def _slack_texts(blocks: list[dict[str, object]]) -> list[str]:
    out = []
    for b in blocks:
        if "text" in b:
            out.append(b["text"]["text"])  # type: ignore[index]
        for e in b.get("elements", []):  # type: ignore[attr-defined]
            out.append(e["text"])
    return out


def _assert_safe_slack(text: str) -> None:
    """The only ``<...>`` left are our own links to OONI Explorer; no mention, no foreign link."""
    for token in re.findall(r"<([^>]*)>", text):
        assert token.startswith("https://explorer.ooni.org/"), token
        assert "\n" not in token


def _hostile_event(text: str) -> object:
    return event(
        2,
        EventAction.UPDATED,
        [asn(38901, name=text), asn(17976)],
        target=text,
        summary=text,
        change=Change(what="joined", asn=38901, isps=2),  # the hostile name and target through a phrase too
        explorer_links=[f"https://explorer.ooni.org/m/{text}", text],
    )


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_is_inert_everywhere(en: Renderer, text: str) -> None:
    e = _hostile_event(text)
    s = en.slack(e)  # type: ignore[arg-type]
    for part in [s.root.text, s.reply.text, *_slack_texts(s.root.blocks), *_slack_texts(s.reply.blocks)]:
        _assert_safe_slack(part)
    assert "<!channel>" not in s.root.text and "&lt;!channel&gt;" in en.slack(_hostile_event("<!channel>")).root.text  # type: ignore[arg-type]
    mail = en.email(e)  # type: ignore[arg-type]
    parser = _Tags()
    parser.feed(mail.html)
    assert "script" not in parser.tags
    assert set(parser.tags) <= {
        "html",
        "head",
        "meta",
        "title",
        "body",
        "p",
        "h2",
        "h3",
        "ul",
        "li",
        "a",
        "br",
        "strong",
    }
    msg = EmailSink(EmailSettings(recipients=["team@example.org"])).build(["team@example.org"], mail, "k", "e")
    raw = msg.as_bytes()
    parsed = message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert "\n" not in str(parsed["Subject"]) and "\r" not in str(parsed["Subject"])
    assert sorted(parsed.keys()) == sorted(msg.keys())


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_slack_escape_leaves_no_markup(text: str) -> None:
    out = escape.slack(text)
    assert "<" not in out and ">" not in out
    assert re.sub(r"&(amp|lt|gt);", "", out).count("&") == 0
    assert out.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_header_and_one_line_have_no_controls(text: str) -> None:
    for out in (escape.header(text), escape.one_line(text)):
        assert not any(c in out for c in "\r\n\x00\x0b\x0c\x85\u2028\u2029")


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text())
def test_links_never_break_out(url: str, label: str) -> None:
    _assert_safe_slack(escape.slack_link("https://explorer.ooni.org/m/" + url, label))
    _assert_safe_slack(escape.slack_link(url, label))
    parser = _Tags()
    parser.feed(escape.html_link(url, label))
    assert parser.tags in ([], ["a"])


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=80), st.text(max_size=80))
def test_renderers_keep_hostile_names_inert(target: str, name: str) -> None:
    r = _RENDERER
    change = Change(what="opened", asn=38901, isps=1)
    e = event(1, EventAction.OPENED, [asn(38901, name=name)], target=target, summary=target, change=change)
    s = r.slack(e)
    for part in [s.root.text, s.reply.text, *_slack_texts(s.root.blocks), *_slack_texts(s.reply.blocks)]:
        _assert_safe_slack(part)
    mail = r.email(e)
    assert "\n" not in mail.subject and "\r" not in mail.subject
    parser = _Tags()
    parser.feed(mail.html)
    assert "script" not in parser.tags


_RENDERER = Renderer("en")
