"""Pure rendering: an ``Event`` becomes Slack Block Kit messages and an email (text + HTML); no I/O.

Why one module for every format: the *facts* of an event (headline, evidence, networks, links) are worked
out once as raw text, and only then escaped for the format they land in, exactly once. Templates are files
a team edits (``alerts/templates/<language>/``, ``string.Template`` syntax); every ``$value`` they get is
already escaped and on one line, so a template cannot forget to escape, and untrusted text (a target name,
an ASN name) can never become a Slack mention, an HTML element or a mail header.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from string import Template
from typing import Any, get_args
from urllib.parse import urlencode

import yaml

from alerts import escape
from alerts.countries import country_name
from censorwatch.models import (
    EXPLORER,
    SIM_MARK,
    AsnEvidence,
    Change,
    ChangeKind,
    Event,
    EventAction,
    EventKind,
    method_names,
)

SHIPPED = Path(__file__).resolve().parent / "templates"
LANGUAGES = ("en", "km")
FILES = (
    "slack_root.txt",
    "slack_reply.txt",
    "email.txt",
    "email.html",
    "digest.txt",
    "digest.html",
    "heartbeat.txt",
)
EVENT_FIELDS = (
    "headline",
    "action",
    "summary",
    "evidence",
    "probes",
    "networks",
    "cleared",
    "already_blocked",
    "methods",
    "first_seen",
    "last_seen",
    "measurements",
    "chart",
    "simulated_note",
    "footer",
    "country",
    "target",
    "event_id",
    "version",
    "severity",
    "category",
    "watch",
)
DIGEST_FIELDS = ("date", "recipient", "opened", "changed", "resolved", "gaps", "silenced", "silences")
HEARTBEAT_FIELDS = ("now", "delivered", "failed", "pending")
SLACK_SECTION_LIMIT = 3000
CHART_DAYS = 14


class TemplateError(Exception):
    """A template that does not render (unknown ``$name``, bad ``$``): raised at start, naming the file."""


class Fmt(enum.Enum):
    SLACK = "slack"
    HTML = "html"
    TEXT = "text"


@dataclass(frozen=True)
class SlackMessage:
    text: str  # notification / fallback text (mrkdwn, escaped)
    blocks: list[dict[str, Any]]


@dataclass(frozen=True)
class SlackRender:
    root: SlackMessage  # the event's current status: posted once, then edited in place
    reply: SlackMessage  # what this version changed: posted in the root's thread


@dataclass(frozen=True)
class EmailRender:
    subject: str  # one line, controls removed: safe for a header
    text: str
    html: str


@dataclass(frozen=True)
class DigestItem:
    """One line of a daily digest (raw text; escaped when rendered)."""

    section: str  # opened | changed | resolved | gaps | silenced
    headline: str
    at: datetime | None = None
    link: str | None = None


@dataclass
class Templates:
    """The templates of one language: shipped files, overridden per file by ``override_dir`` when given."""

    language: str = "en"
    override_dir: Path | None = None
    strings: dict[str, str] = field(default_factory=dict)
    files: dict[str, Template] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise TemplateError(f"no templates for language {self.language!r} (have {', '.join(LANGUAGES)})")
        for base in self._dirs():
            path = base / "strings.yaml"
            if path.is_file():
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                if not isinstance(data, dict):
                    raise TemplateError(f"{path}: expected a mapping of name: text")
                self.strings.update({str(k): str(v) for k, v in data.items()})
        for name in FILES:
            for base in reversed(self._dirs()):
                path = base / name
                if path.is_file():
                    self.files[name] = Template(path.read_text(encoding="utf-8"))
                    break
            else:
                raise TemplateError(f"template {name} missing for language {self.language}")

    def _dirs(self) -> list[Path]:
        dirs = [SHIPPED / "en", SHIPPED / self.language]  # English fills any phrase a translation lacks
        if self.override_dir is not None:
            dirs += [self.override_dir, self.override_dir / self.language]
        return dirs

    def phrase(self, key: str, **values: object) -> str:
        try:
            return Template(self.strings[key]).substitute({k: str(v) for k, v in values.items()})
        except (KeyError, ValueError) as exc:
            raise TemplateError(f"strings.yaml {key!r} ({self.language}): {exc!r}") from None

    def fill(self, name: str, values: Mapping[str, str]) -> str:
        try:
            return self.files[name].substitute(values)
        except (KeyError, ValueError) as exc:
            raise TemplateError(f"{name} ({self.language}): unknown or bad placeholder {exc}") from None


def _when(value: datetime | None, never: str) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else never


def _network_label(event: Event, asn: int | None, name: str | None = None) -> str:
    """ "AS38901 EZECOM", or the number alone where the network's name is unknown (raw, one line)."""
    if asn is None:
        return "?"
    if name is None:
        name = next((a.name for a in event.asns if a.asn == asn), "")
    return escape.one_line(f"AS{asn} {name}".strip())


def _simulated_link(url: str) -> bool:
    """A link to a simulated measurement (its uid's last part starts with the mark): no such page on Explorer."""
    return url.startswith(f"{EXPLORER}/m/") and url.startswith(SIM_MARK, url.rfind("_") + 1)


def _pct(x: float) -> str:
    return f"{round(max(0.0, min(1.0, x)) * 100):d}%"


def _fit(text: str, limit: int = SLACK_SECTION_LIMIT) -> str:
    """Slack rejects long sections: cut on a line boundary, never inside an ``&amp;`` entity."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if "\n" in cut[limit // 2 :]:
        cut = cut[: cut.rfind("\n")]
    return re.sub(r"&[a-z]{0,4}$", "", cut) + "…"


def _tidy(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def chart_url(event: Event, days: int = CHART_DAYS) -> str:
    """The Explorer MAT chart for this target (or network) and country, over the last ``days`` days."""
    end = (event.last_seen or event.emitted_at).astimezone(UTC).date() + timedelta(days=1)
    params = {"probe_cc": event.cc, "test_name": event.test_name or "web_connectivity"}
    if event.target and params["test_name"] == "web_connectivity":
        params["domain"] = event.target
    if event.kind is not EventKind.TARGET_BLOCKED and event.asn is not None:
        params["probe_asn"] = f"AS{event.asn}"
    params |= {
        "since": (end - timedelta(days=days)).isoformat(),
        "until": end.isoformat(),
        "axis_x": "measurement_start_day",
        "axis_y": "probe_asn",
    }
    return f"{EXPLORER}/chart/mat?{urlencode(params)}"


def blocked_networks(event: Event) -> list[AsnEvidence]:
    return [a for a in event.asns if a.state in ("blocked", "down")]


class Renderer:
    """Renders events, digests and heartbeats in one language. Checks every template at construction."""

    def __init__(self, language: str = "en", templates_dir: Path | None = None) -> None:
        self.t = Templates(language, templates_dir)
        self.language = language
        self._self_check()

    # ----- facts (raw text) -------------------------------------------------------------------------------
    def headline(self, event: Event) -> str:
        """The one line a reader sees first, e.g. "www.rfa.org blocked in Cambodia on 9 ISPs — DNS" (raw)."""
        t = self.t
        country = country_name(event.cc, self.language)
        target = escape.one_line(event.target)
        resolved = event.action is EventAction.RESOLVED
        if event.kind is EventKind.TARGET_BLOCKED:
            if resolved:
                text = t.phrase("headline_unblocked", target=target, country=country)
            else:
                n = len(blocked_networks(event)) or len(event.asns)
                isps = t.phrase("isps_one") if n == 1 else t.phrase("isps_many", n=n)
                methods = method_names(event.methods)
                key = "headline_blocked" if methods else "headline_blocked_no_method"
                text = t.phrase(key, target=target, country=country, isps=isps, methods=methods)
        else:
            prefix = "headline_outage" if event.kind is EventKind.NETWORK_OUTAGE else "headline_gap"
            text = t.phrase(
                prefix + ("_resolved" if resolved else ""), network=_network_label(event, event.asn), country=country
            )
        if event.simulated:
            text = f"[{t.phrase('simulated')}] {text}"
        return escape.one_line(text)

    def summary(self, event: Event) -> str:
        """What this version says happened, in this language (raw): from ``event.change`` where the strings have
        a phrase for it, else the engine's English ``summary`` (older events, or a phrase missing)."""
        t, c = self.t, event.change
        key = f"change_{c.what}{'_already' if c.since else ''}" if c is not None else ""
        if c is None or key not in t.strings:
            return event.summary
        text = t.phrase(
            key,
            target=escape.one_line(event.target),
            country=country_name(event.cc, self.language),
            network=_network_label(event, c.asn),
            isps=t.phrase("isps_one") if c.isps == 1 else t.phrase("isps_many", n=c.isps),
            methods=method_names(event.methods) or t.phrase("no_method"),
            blocked=c.blocked,
            total=c.total,
            hours=c.hours,
            since=c.since,
        )
        return f"[{t.phrase('simulated')}] {text}" if event.simulated else text

    def _action(self, event: Event, reminder: bool) -> str:
        return self.t.phrase("action_reminder" if reminder else f"action_{event.action.value}")

    def _values(self, event: Event, fmt: Fmt, reminder: bool = False) -> dict[str, str]:
        """Every ``EVENT_FIELDS`` value, escaped for ``fmt``."""
        t = self.t
        escapers: dict[Fmt, Callable[[str], str]] = {
            Fmt.SLACK: escape.slack,
            Fmt.HTML: escape.html_text,
            Fmt.TEXT: str,
        }
        esc = escapers[fmt]

        def line(raw: str) -> str:
            return esc(escape.one_line(raw))

        def block(raw: str, slack: str = "{}", html: str = "<p>{}</p>") -> str:
            if not raw:
                return ""
            pattern = {Fmt.SLACK: slack, Fmt.HTML: html, Fmt.TEXT: "{}"}[fmt]
            return pattern.format(line(raw)) + "\n"

        never = t.phrase("never")
        networks = []
        for a in sorted(blocked_networks(event), key=lambda a: (-a.blocked, a.asn)):
            raw = t.phrase(
                "asn_line",
                asn=a.asn,
                name=escape.one_line(a.name) or "?",
                network=_network_label(event, a.asn, a.name),
                blocked=a.blocked,
                total=a.total,
                probes=a.probes,
                methods=method_names(a.methods) or t.phrase("no_method"),
                first_seen=_when(a.first_seen, never),
            )
            networks.append({Fmt.SLACK: "• {}", Fmt.HTML: "<li>{}</li>", Fmt.TEXT: "- {}"}[fmt].format(line(raw)))
        cleared = ", ".join(f"AS{n}" for n in event.cleared_asns)
        real = [u for u in event.explorer_links if not _simulated_link(u)]  # those would be Explorer's "not found"
        links = [(u, t.phrase("measurement", n=i)) for i, u in enumerate(real[:5], start=1)]
        chart = (chart_url(event), t.phrase("chart"))
        if fmt is Fmt.SLACK:
            measurements = ", ".join(escape.slack_link(u, label) for u, label in links)
            chart_text = escape.slack_link(*chart)
        elif fmt is Fmt.HTML:
            measurements = ", ".join(escape.html_link(u, label) for u, label in links)
            chart_text = escape.html_link(*chart)
        else:
            measurements = "\n".join(f"{label}: {escape.safe_url(u)}" for u, label in links if escape.safe_url(u))
            chart_text = f"{chart[1]}: {escape.safe_url(chart[0])}"
        return {
            "headline": line(self.headline(event)),
            "action": line(self._action(event, reminder)),
            "summary": block(self.summary(event)),
            "evidence": line(
                t.phrase(
                    "evidence",
                    blocked=event.blocked,
                    total=event.total,
                    interval=f"{_pct(event.share_low)}\u2013{_pct(event.share_high)}",
                )
            ),
            "probes": line(t.phrase("probes", probes=event.probes)),
            "networks": "\n".join(networks) or line(never),
            "cleared": block(t.phrase("cleared", asns=cleared) if cleared else ""),
            "already_blocked": block(t.phrase("already_blocked") if event.already_blocked else "", slack="_{}_"),
            "methods": line(method_names(event.methods) or t.phrase("no_method")),
            "first_seen": line(_when(event.first_seen, never)),
            "last_seen": line(_when(event.last_seen, never)),
            "measurements": measurements,
            "chart": chart_text,
            "simulated_note": block(
                t.phrase("simulated_note") if event.simulated else "",
                slack=":warning: *{}*",
                html='<p style="color: #b00000"><strong>{}</strong></p>',
            )
            if fmt is not Fmt.TEXT
            else (f"*** {t.phrase('simulated_note')} ***\n" if event.simulated else ""),
            "footer": line(f"event {event.event_id} · version {event.version} · censorwatch"),
            "country": line(country_name(event.cc, self.language)),
            "target": line(event.target),
            "event_id": line(event.event_id),
            "version": str(event.version),
            "severity": line(event.severity),
            "category": line(event.category or ""),
            "watch": line(event.watch or ""),
        }

    # ----- formats ----------
    def slack(self, event: Event, reminder: bool = False) -> SlackRender:
        """Root (current status, edited in place) and the thread reply for this version."""
        v = self._values(event, Fmt.SLACK, reminder)
        links = ", ".join(x for x in (v["measurements"], v["chart"]) if x)
        root_blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": _fit(f"*{v['headline']}*")}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _fit(_tidy(self.t.fill("slack_root.txt", v)))},
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _fit(links)}]},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _fit(v["footer"])}]},
        ]
        reply_blocks: list[dict[str, Any]] = [
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _fit(_tidy(self.t.fill("slack_reply.txt", v)))},
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _fit(links)}]},
        ]
        return SlackRender(
            root=SlackMessage(text=_fit(v["headline"]), blocks=root_blocks),
            reply=SlackMessage(text=_fit(f"{v['action']}: {v['headline']}"), blocks=reply_blocks),
        )

    def email(self, event: Event, reminder: bool = False) -> EmailRender:
        subject = f"{self.t.phrase('subject_prefix')} {self._action(event, reminder)}: {self.headline(event)}"
        return EmailRender(
            subject=escape.header(subject),
            text=_tidy(self.t.fill("email.txt", self._values(event, Fmt.TEXT, reminder))),
            html=self.t.fill("email.html", self._values(event, Fmt.HTML, reminder)),
        )

    def console(self, event: Event) -> str:
        """One log line: no escaping for a format, but controls removed so one event is one line."""
        return escape.one_line(f"{self._action(event, False)}: {self.headline(event)} [{event.notice_key}]")

    def digest(self, date: str, recipient: str, items: Iterable[DigestItem], silences: Iterable[str]) -> EmailRender:
        """The daily digest for one recipient: what opened, changed, resolved, went quiet or was silenced."""
        items = list(items)
        none = self.t.phrase("digest_none")

        def values(fmt: Fmt) -> dict[str, str]:
            esc: Callable[[str], str] = escape.html_text if fmt is Fmt.HTML else str

            def lines(raws: list[tuple[str, str | None]]) -> str:
                out = []
                for raw, link in raws or [(none, None)]:
                    text = esc(escape.one_line(raw)) or "—"  # an empty entry still shows as one
                    if fmt is Fmt.HTML:
                        tail = f" ({escape.html_link(link, 'Explorer')})" if link and escape.safe_url(link) else ""
                        out.append(f"<li>{text}{tail}</li>")
                    else:
                        url = escape.safe_url(link) if link else None
                        out.append(f"- {text}" + (f" <{url}>" if url else ""))
                return "\n".join(out)

            def section(name: str) -> str:
                return lines([(f"{_when(i.at, '')} {i.headline}".strip(), i.link) for i in items if i.section == name])

            return {
                "date": esc(escape.one_line(date)),
                "recipient": esc(escape.one_line(recipient)),
                **{name: section(name) for name in ("opened", "changed", "resolved", "gaps", "silenced")},
                "silences": lines([(s, None) for s in silences]),
            }

        return EmailRender(
            subject=escape.header(self.t.phrase("digest_subject", date=escape.one_line(date))),
            text=_tidy(self.t.fill("digest.txt", values(Fmt.TEXT))),
            html=self.t.fill("digest.html", values(Fmt.HTML)),
        )

    def heartbeat(self, now: datetime, delivered: int, failed: int, pending: int) -> str:
        """Raw one-line heartbeat notice (the sink escapes it)."""
        values = {
            "now": _when(now, ""),
            "delivered": str(delivered),
            "failed": str(failed),
            "pending": str(pending),
        }
        return escape.one_line(self.t.fill("heartbeat.txt", values))

    def heartbeat_subject(self) -> str:
        return escape.header(self.t.phrase("heartbeat_subject"))

    def _self_check(self) -> None:
        sample = Event(
            event_id="sample",
            version=1,
            kind=EventKind.TARGET_BLOCKED,
            action=EventAction.OPENED,
            cc="KH",
            target="example.org",
            asns=[AsnEvidence(asn=1, name="x", blocked=1, total=1)],
            methods=["dns"],
            explorer_links=[f"{EXPLORER}/m/x"],
            simulated=True,
            already_blocked=True,
            summary="s",
            cleared_asns=[2],
        )
        for kind in EventKind:
            for action in EventAction:
                e = sample.model_copy(update={"kind": kind, "action": action, "asn": 1})
                self.slack(e)
                self.email(e)
        for what in get_args(ChangeKind):  # every phrase of what changed, with and without "already blocked"
            for since in ("", "2024-01-01"):
                self.summary(sample.model_copy(update={"change": Change(what=what, asn=1, isps=2, since=since)}))
        self.digest("2024-01-01", "a@b.c", [DigestItem("opened", "x")], ["s"])
        self.heartbeat(datetime.now(UTC), 0, 0, 0)
