"""Issue 4 on the real broker: routing, grouping, silences (via the CLI), inhibition, the daily digest."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from alerts.dispatcher import Dispatcher, digest_items
from alerts.render import Renderer
from alerts.routing import follow_up, route
from censorwatch.cli import main
from censorwatch.config import Settings
from censorwatch.models import EventAction, EventKind
from tests.conftest import free_port
from tests.fakes.events import asn, event, life
from tests.fakes.slack_api import FakeSlackApi
from tests.fakes.smtp_server import SmtpServer
from tests.test_dispatcher import TOKEN, email_cfg, make_settings, metric, produce, running, slack_cfg, wait_until

pytestmark = pytest.mark.kafka


def test_routes_pick_receivers_language_and_timers(kafka_settings: Settings) -> None:
    s = make_settings(
        kafka_settings,
        console=False,
        alerts={
            "email_lists": {"kh-team": ["kh@example.org"]},
            "routes": [
                {
                    "match": {"cc": ["KH"], "category": ["NEWS"]},
                    "receivers": ["email:kh-team"],
                    "language": "km",
                    "group_wait_seconds": 30,
                    "continue": True,
                },
                {"match": {"severity": ["critical"]}, "receivers": ["console"]},
            ],
        },
    )
    plans = route(s, life()[0])
    assert [(p.receiver.id, p.language, p.group_wait) for p in plans] == [("email:kh-team", "km", 30.0)]
    critical = life(severity="critical")[0]
    assert [p.receiver.id for p in route(s, critical)] == ["email:kh-team", "console"]
    other = life(cc="TH")[0]
    assert route(s, other) == []  # no defaults: console off, no sinks enabled
    # a receiver's digest, heartbeat and follow-up notices use the language of the route naming it
    assert (follow_up(s, "email:kh-team").language, follow_up(s, "console").language) == ("km", "en")


def test_a_receiver_told_of_an_event_hears_it_end_even_when_the_end_routes_elsewhere(kafka_settings: Settings) -> None:
    """Found in review: routes match each version on its own labels. A block opened in a watch window and cleared
    after it carries no watch label when it ends, so its "unblocked" went to the defaults (never told of it: the
    notice is skipped there) and not to the watch's channel, which never heard the end."""
    with FakeSlackApi(TOKEN) as api:
        s = make_settings(
            kafka_settings,
            console=False,
            slack=slack_cfg(api),
            alerts={
                "retry_initial_seconds": 0.1,
                "group_interval_seconds": 0,
                "routes": [{"match": {"watch": ["kh-election"]}, "receivers": ["slack:#kh-election"]}],
            },
        )
        versions = life(event_id="KH|watch", watch="kh-election")
        produce(s, [versions[0], versions[-1].model_copy(update={"watch": None})])
        with running(Dispatcher(s)):
            api.wait_for(lambda a: any("Unblocked" in c.text for c in a.calls_of("chat.postMessage")))
        posts = api.calls_of("chat.postMessage")
        assert {api.channel_id(str(p.params.get("channel"))) for p in posts} == {api.channel_id("#kh-election")}


def test_silence_inhibition_and_grouping(kafka_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeSlackApi(TOKEN) as api:
        s = make_settings(
            kafka_settings,
            console=False,
            slack=slack_cfg(api),
            alerts={"group_wait_seconds": 1.0, "retry_initial_seconds": 0.1},
        )
        env = {"CENSORWATCH_KAFKA_BOOTSTRAP": s.bootstrap(), "CENSORWATCH_TOPIC_PREFIX": s.topic_prefix}
        handlers, level = logging.getLogger().handlers[:], logging.getLogger().level
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            assert (
                main(
                    [
                        "silence",
                        "add",
                        "--target",
                        "*.voanews.com",
                        "--duration",
                        "2h",
                        "--reason",
                        "known, tracked in the report",
                        "--by",
                        "tester",
                    ]
                )
                == 0
            )
            assert main(["silence", "list"]) == 0
        logging.getLogger().handlers[:], _ = handlers, logging.getLogger().setLevel(level)  # main() set them
        assert "*.voanews.com" in capsys.readouterr().out

        silenced = life(event_id="KH|voa", target="www.voanews.com")[0]
        outage = event(
            1,
            EventAction.OPENED,
            [asn(17976)],
            event_id="KH|outage|17976",
            kind=EventKind.NETWORK_OUTAGE,
            asn=17976,
            target="",
        )
        explained = life(event_id="KH|bbc", target="www.bbc.com")[0].model_copy(update={"asns": [asn(17976)]})
        grouped = life(event_id="KH|rfa")[:3]  # three versions inside group_wait: one root, latest state
        before = {o: metric("slack", o) for o in ("silenced", "inhibited")}
        produce(s, [outage])
        produce(s, [silenced, explained, *grouped])
        with running(Dispatcher(s)):
            wait_until(lambda: metric("slack", "silenced") > before["silenced"], what="silenced")
            wait_until(lambda: metric("slack", "inhibited") > before["inhibited"], what="inhibited")
            api.wait_for(lambda a: len(a.calls_of("chat.postMessage")) == 2)
        posts = api.calls_of("chat.postMessage")
        texts = sorted(p.text for p in posts)
        assert any("Network outage on AS17976" in t for t in texts)
        rfa = next(p for p in posts if "www.rfa.org" in p.text)
        assert "on 3 ISPs — DNS, HTTP failure" in rfa.text and "thread_ts" not in rfa.params
        assert not any("voanews" in t or "bbc" in t for t in texts)


def test_daily_digest_per_recipient(kafka_settings: Settings) -> None:
    port = free_port()
    with SmtpServer(port) as smtp:
        s = make_settings(
            kafka_settings,
            console=False,
            email=email_cfg(port, recipients=["a@example.org", "b@example.org"]),
            alerts={"digest": {"enabled": True, "hour_utc": 0}},
        )
        produce(s, [*life()[:2], life(event_id="KH|x", target="x.org")[0]])
        d = Dispatcher(s)
        with running(d):
            smtp.wait_for(3)  # three notices to the list (one message with two recipients each)
            wait_until(lambda: len(smtp.messages) >= 5, what="the two digests")
        items = digest_items(d.log, "email:default", datetime.now(UTC) - timedelta(days=1), Renderer())
        assert [i.section for i in items].count("opened") == 2 and [i.section for i in items].count("changed") == 1
        digests = [(to, m) for to, m in smtp.messages if "daily digest" in str(m["Subject"])]
        assert sorted(to[0] for to, _ in digests) == ["a@example.org", "b@example.org"]
        body = digests[0][1].get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "www.rfa.org blocked in Cambodia" in body and "Opened:" in body
