"""Routing: which receivers get an event, in which language, with which grouping timers. Pure functions.

Receivers are strings so a config file stays readable: ``console``, ``slack:#channel``, ``email:<list>`` (a
name in ``alerts.email_lists``, or ``default`` for ``email.recipients``) or ``email:<address>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from alerts.render import blocked_networks
from censorwatch.config import AlertMatch, AlertRoute, Settings
from censorwatch.models import Event, EventAction


@dataclass(frozen=True)
class Receiver:
    id: str  # as written in the config, e.g. "slack:#kh-alerts"
    sink: str  # console | slack | email
    target: str  # channel, list name or address ("" for console)

    @classmethod
    def parse(cls, text: str) -> Receiver:
        sink, _, target = text.partition(":")
        return cls(text, sink, target.strip())


@dataclass(frozen=True)
class Plan:
    """One receiver for one event, with the timers of the route that chose it."""

    receiver: Receiver
    language: str
    group_wait: float
    group_interval: float
    repeat_interval: float


def matches(m: AlertMatch, event: Event) -> bool:
    """Every listed field must match; empty lists match anything. Country and target ignore case."""
    state = "resolved" if event.action is EventAction.RESOLVED else "open"
    asns = {a.asn for a in blocked_networks(event)} | ({event.asn} if event.asn is not None else set())
    checks = [
        not m.cc or event.cc.upper() in {c.upper() for c in m.cc},
        not m.kind or event.kind.value in m.kind,
        not m.action or event.action.value in m.action,
        not m.state or state in m.state,
        not m.category or (event.category or "") in m.category,
        not m.watch or (event.watch or "") in m.watch,
        not m.severity or event.severity in m.severity,
        not m.target or any(fnmatchcase(event.target.lower(), p.lower()) for p in m.target),
        not m.asn or bool(asns & set(m.asn)),
        m.simulated is None or event.simulated == m.simulated,
    ]
    return all(checks)


def default_receivers(settings: Settings) -> list[str]:
    """Without routes, every enabled sink gets every event (the issue-2 behaviour)."""
    out = ["console"] if settings.console else []
    if settings.slack.enabled:
        out.append(f"slack:{settings.slack.channel}")
    if settings.email.enabled:
        out.append("email:default")
    return out


def route(settings: Settings, event: Event) -> list[Plan]:
    """The receivers for ``event``: first matching route (or more with ``continue``), else the defaults."""
    a = settings.alerts
    chosen: dict[str, Plan] = {}

    matched = False
    for r in a.routes:
        if not matches(r.match, event):
            continue
        matched = True
        for receiver in r.receivers:
            chosen.setdefault(receiver, _plan(settings, receiver, r))
        if not r.continue_matching:
            break
    if not matched:
        for receiver in default_receivers(settings):
            chosen.setdefault(receiver, _plan(settings, receiver, None))
    return list(chosen.values())


def _plan(settings: Settings, receiver: str, r: AlertRoute | None) -> Plan:
    """A receiver's plan under route ``r`` (its language and timers where set), else the defaults."""
    a = settings.alerts
    return Plan(
        Receiver.parse(receiver),
        (r.language if r else None) or a.language,
        a.group_wait_seconds if r is None or r.group_wait_seconds is None else r.group_wait_seconds,
        a.group_interval_seconds if r is None or r.group_interval_seconds is None else r.group_interval_seconds,
        a.repeat_interval_seconds if r is None or r.repeat_interval_seconds is None else r.repeat_interval_seconds,
    )


def follow_up(settings: Settings, receiver: str) -> Plan:
    """The plan for a receiver already told about an event that this version no longer routes to (labels such as
    ``watch`` or ``severity`` change between versions: a block opened in a watch window can clear after it). The
    first route naming the receiver gives its language and timers; else the defaults."""
    return _plan(settings, receiver, next((r for r in settings.alerts.routes if receiver in r.receivers), None))


def addresses(settings: Settings, receiver: Receiver) -> list[str]:
    """The mail addresses behind an email receiver."""
    if receiver.target == "default":
        return list(settings.email.recipients)
    if receiver.target in settings.alerts.email_lists:
        return list(settings.alerts.email_lists[receiver.target])
    return [receiver.target] if "@" in receiver.target else []


def all_receivers(settings: Settings) -> list[Receiver]:
    seen = dict.fromkeys(
        [r for route_ in settings.alerts.routes for r in route_.receivers]
        + default_receivers(settings)
        + settings.alerts.heartbeat_receivers
        + settings.alerts.digest.receivers
    )
    return [Receiver.parse(r) for r in seen]


def problems(settings: Settings) -> list[str]:
    """Receivers that cannot work with these settings (a sink off, an unknown list), one line each."""
    out = []
    for r in all_receivers(settings):
        if r.sink == "slack" and not settings.slack.enabled:
            out.append(f"alerts: receiver {r.id} needs slack.enabled (and a token)")
        if r.sink == "email":
            if not settings.email.enabled:
                out.append(f"alerts: receiver {r.id} needs email.enabled")
            if not addresses(settings, r):
                out.append(f"alerts: receiver {r.id}: no such email list and not an address")
            if any(c in r.target for c in "\r\n<>,;"):
                out.append(f"alerts: receiver {r.id}: not a plain list name or address")
    return out
