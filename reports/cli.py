"""``censorwatch report``: one command from a source to md/html/csv, wiring fetchers, core and renderers."""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from censorwatch.data import ASN_NAMES
from reports.core import (
    References,
    add_test_list,
    build_report,
    parse_asn_names,
    parse_legend,
    parse_test_list,
)
from reports.model import Report, ReportInput, Rule
from reports.sources import (
    AggregationSource,
    SourceError,
    from_events,
    from_measurements,
    iter_events,
    iter_json_items,
)

DATA = Path(__file__).resolve().parent / "data"


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``report`` on the main parser's subcommands."""
    p = sub.add_parser("report", help="advocacy report (tables and charts) for a country and period")
    p.add_argument("--country", required=True, type=str.upper, help="two-letter country code, e.g. KH")
    p.add_argument("--since", required=True, type=_date, help="first day, YYYY-MM-DD (UTC)")
    p.add_argument("--until", required=True, type=_date, help="last day, inclusive, YYYY-MM-DD (UTC)")
    p.add_argument("--source", choices=("api", "events", "measurements"), default="api")
    p.add_argument("files", nargs="*", metavar="FILE", help="JSONL input for --source events|measurements")
    p.add_argument("--watchlist", type=Path, help="Citizen Lab format CSV: only these websites, their categories")
    p.add_argument("--test-list", type=Path, action="append", default=[], help="more URL->category CSVs")
    p.add_argument("--category", type=str.upper, help="only this Citizen Lab category code")
    p.add_argument("--asn-names", type=Path, help="CSV asn,name of ISP names (a Cambodian list is built in)")
    p.add_argument("--format", choices=("md", "html", "csv"), default="md")
    p.add_argument("--out", type=Path, help="output file (a directory for csv); default stdout")
    p.add_argument("--min-blocked", type=int, default=Rule.min_blocked, help="blocked pair: at least N anomalies")
    p.add_argument("--min-share", type=float, default=Rule.min_share, help="...and this share of valid ones")
    p.add_argument("--simulated", action="store_true", help="label the report SIMULATED whatever the input says")
    p.set_defaults(func=cmd_report)
    return p


def references(args: argparse.Namespace) -> References:
    refs = References()
    for name in ("category_codes_new.csv", "category_codes_legacy.csv"):
        for code, label in parse_legend((DATA / name).read_text(encoding="utf-8")).items():
            refs.category_names.setdefault(code, label)
    refs.asn_names = parse_asn_names(ASN_NAMES.read_text(encoding="utf-8"))
    if args.asn_names:
        refs.asn_names.update(parse_asn_names(args.asn_names.read_text(encoding="utf-8")))
    if args.watchlist:
        add_test_list(refs, parse_test_list(args.watchlist.read_text(encoding="utf-8")), watch=True)
    for path in args.test_list:
        add_test_list(refs, parse_test_list(path.read_text(encoding="utf-8")))
    if args.category:
        refs.categories = {args.category}
    return refs


def make_report(args: argparse.Namespace) -> Report:
    """Fetch or read the input, then build the tables (separate from output so tests can call it)."""
    if args.min_blocked < 1:
        raise SourceError(f"--min-blocked must be at least 1, got {args.min_blocked}")
    if not 0 < args.min_share <= 1:  # also refuses nan
        raise SourceError(f"--min-share must be more than 0 and at most 1, got {args.min_share}")
    refs = references(args)
    rule = Rule(args.min_blocked, args.min_share)
    files = [Path(f) for f in args.files]
    inp: ReportInput
    if args.source == "api":
        if files:
            raise SourceError("--source api takes no FILE arguments")
        from censorwatch.cli import _settings
        from services.ooni_client import OoniClient

        client = OoniClient(_settings(args))
        try:
            agg = AggregationSource(client.get_json, args.country, args.since, args.until, category=args.category)
            inp = agg.fetch(refs, rule)
        finally:
            client.close()
    elif not files:
        raise SourceError(f"--source {args.source} needs at least one FILE")
    elif args.source == "events":
        inp = from_events(iter_events(files), args.country, args.since, args.until)
    else:
        inp = from_measurements(iter_json_items(files), args.country, args.since, args.until)
    if args.until < args.since:
        raise SourceError(f"--until {args.until} is before --since {args.since}")
    if args.category and not refs.domain_category and args.source != "api" and not inp.domain_category:
        # without categories every site is UNCAT and the filter would silently leave an empty report
        raise SourceError(
            f"--category {args.category} needs --watchlist or --test-list (no categories in the {inp.source})"
        )
    inp.simulated = inp.simulated or args.simulated
    return build_report(inp, refs, rule)


def cmd_report(args: argparse.Namespace) -> int:
    from services.ooni_client import OoniError

    try:
        report = make_report(args)
    except (SourceError, OoniError, OSError) as exc:
        print(f"censorwatch report: {exc}", file=sys.stderr)
        return 2
    try:
        write_report(report, args)
    except OSError as exc:  # --out is a file for csv, a directory for md/html, not writable, ...
        print(f"censorwatch report: cannot write --out {args.out}: {_out_problem(exc, args)}", file=sys.stderr)
        return 2
    return 0


def write_report(report: Report, args: argparse.Namespace) -> None:
    """Render in ``args.format`` to stdout or ``args.out`` (a file is overwritten; csv: a directory)."""
    from reports import render

    if args.format == "csv":
        if args.out:
            for path in render.to_csv_files(report, args.out):
                print(path, file=sys.stderr)
        else:
            sys.stdout.write(render.to_csv_stream(report))
        return
    if args.format == "html":
        from reports.charts import all_charts

        text = render.to_html(report, all_charts(report))
    else:
        text = render.to_markdown(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(args.out, file=sys.stderr)
    else:
        sys.stdout.write(text)


def _out_problem(exc: OSError, args: argparse.Namespace) -> str:
    if args.format == "csv" and args.out is not None and args.out.exists() and not args.out.is_dir():
        return "it is a file, and --format csv writes one file per table into a directory"
    if args.format != "csv" and args.out is not None and args.out.is_dir():
        return "it is a directory; --format md/html write one file"
    return exc.strerror or str(exc)
