"""``censorwatch silence add|list|expire``: silences shared by every dispatcher through a compacted topic."""

from __future__ import annotations

import argparse
import getpass
import re
from datetime import timedelta
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``90m``, ``2h``, ``3d``, ``1w`` or a number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90m, 2h, 3d)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2) or "s"])


def add_parser(sub: Any) -> None:
    p = sub.add_parser("silence", help="add, list or expire alert silences")
    ssub = p.add_subparsers(dest="silence_command", required=True, metavar="ACTION")
    add = ssub.add_parser("add", help="silence matching events for a while, with a reason")
    for name in ("cc", "kind", "action", "category", "watch", "severity", "target"):
        add.add_argument(f"--{name}", action="append", default=[], help=f"match {name} (repeatable)")
    add.add_argument("--asn", action="append", type=int, default=[], help="match an ASN (repeatable)")
    add.add_argument("--duration", type=parse_duration, required=True, help="e.g. 2h, 3d")
    add.add_argument("--reason", required=True)
    add.add_argument("--by", default=None, help="who (default: the login name)")
    add.set_defaults(func=cmd_add)
    ls = ssub.add_parser("list", help="list active silences (--all: expired too)")
    ls.add_argument("--all", action="store_true")
    ls.set_defaults(func=cmd_list)
    ex = ssub.add_parser("expire", help="end a silence now")
    ex.add_argument("id")
    ex.set_defaults(func=cmd_expire)


def _store(args: argparse.Namespace) -> Any:
    from alerts.silences import SilenceStore
    from censorwatch.bus import ensure_topics
    from censorwatch.cli import _settings

    settings = _settings(args)
    ensure_topics(settings)
    return SilenceStore(settings)


def cmd_add(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from censorwatch.config import AlertMatch, ConfigError, describe_errors

    fields = ("cc", "kind", "action", "category", "watch", "severity", "target", "asn")
    try:
        match = AlertMatch(**{f: getattr(args, f) for f in fields if getattr(args, f)})
    except ValidationError as exc:  # e.g. --severity Critical: it would never match
        raise ConfigError([line.split("  [env")[0] for line in describe_errors(exc)]) from None
    s = _store(args).add(match, args.duration, args.reason, args.by or getpass.getuser())
    print(f"added {s.describe()}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    silences = store.load()
    shown = [s for s in silences if args.all or s.active()]
    for s in shown:
        print(("" if s.active() else "(expired) ") + s.describe())
    if not shown:
        print("no silences")
    return 0


def cmd_expire(args: argparse.Namespace) -> int:
    try:
        s = _store(args).expire(args.id)
    except KeyError:
        print(f"no silence {args.id}")
        return 1
    print(f"expired {s.describe()}")
    return 0
