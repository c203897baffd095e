"""``censorwatch <command>``: the one entry point. Every command validates the settings first."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from censorwatch.config import ConfigError, Settings, load_settings
from censorwatch.logsetup import setup_logging

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"config_file": args.config} if args.config else {}
    return load_settings(**overrides)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from alerts.routing import problems

    if found := problems(settings):
        raise ConfigError(found)
    print("configuration OK")
    print(f"  kafka: {settings.kafka_bootstrap or 'embedded Tansu broker on ' + settings.bootstrap()}")
    print(f"  countries: {', '.join(settings.countries)}; tests: {', '.join(settings.test_names)}")
    print(f"  OONI API: {settings.ooni_api_url} every {settings.poll_interval_seconds:g} s")
    sinks = ["console"] if settings.console else []
    sinks += ["slack " + settings.slack.channel] if settings.slack.enabled else []
    sinks += [f"email ({len(settings.email.recipients)} recipients)"] if settings.email.enabled else []
    print(f"  sinks: {', '.join(sinks) or 'none'}")
    return 0


def cmd_poll(args: argparse.Namespace) -> int:
    from services.poller import run

    return run(_settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.worker import run

    return run(_settings(args))


def cmd_dispatch(args: argparse.Namespace) -> int:
    from alerts.dispatcher import run

    return run(_settings(args))


def cmd_create_topics(args: argparse.Namespace) -> int:
    """Create every topic (partitions, compaction) on the configured cluster: a one-shot production step."""
    from censorwatch.bus import ensure_topics

    settings = _settings(args)
    if settings.embedded:
        print("censorwatch: create-topics needs CENSORWATCH_KAFKA_BOOTSTRAP", file=sys.stderr)
        return 2
    ensure_topics(settings)
    print(f"topics ready on {settings.bootstrap()} ({settings.topic_partitions} partitions)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from services.replay import run

    return run(_settings(args), [Path(f) for f in args.files])


class _Stop:
    """Turns SIGTERM/SIGINT/SIGHUP into a flag so the supervisor can stop children in order (a closed terminal
    sends SIGHUP: unhandled, it killed ``up`` alone and left the broker and the services running)."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if signum == signal.SIGHUP and signal.getsignal(signum) is signal.SIG_IGN:
                continue  # started under nohup: keep running when the terminal goes
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def cmd_up(args: argparse.Namespace) -> int:
    """Everything in one process tree: broker (if embedded), poller, worker, dispatcher."""
    settings = _settings(args)
    stop = _Stop()
    broker = None
    env = dict(os.environ)
    if settings.embedded:
        from censorwatch.broker import EmbeddedBroker

        broker = EmbeddedBroker(settings.embedded_broker_port, settings.state_dir / "broker.log").start()
        env["CENSORWATCH_KAFKA_BOOTSTRAP"] = broker.bootstrap
        # Tansu quirks (see DEVELOPERS.md): one partition, one record per producer batch for table recovery.
        env["CENSORWATCH_BROKER_KIND"] = "tansu"
        env["CENSORWATCH_TOPIC_PARTITIONS"] = "1"
        log.info("no CENSORWATCH_KAFKA_BOOTSTRAP set: using the embedded broker at %s", broker.bootstrap)
    if args.config:
        env["CENSORWATCH_CONFIG_FILE"] = str(Path(args.config).resolve())
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        from censorwatch.bus import ensure_topics

        ensure_topics(
            settings.model_copy(
                update={
                    "kafka_bootstrap": broker.bootstrap if broker is not None else settings.kafka_bootstrap,
                    "topic_partitions": int(env.get("CENSORWATCH_TOPIC_PARTITIONS", settings.topic_partitions)),
                }
            )
        )
        if stop.requested:  # Ctrl-C while the broker and topics were coming up: start nothing
            return 130
        exe = [sys.executable, "-m", "censorwatch"]
        for name in ("worker", "dispatch", "poll"):
            # a session of its own, as the broker's: the terminal's Ctrl-C and hang-up reach only us, and we stop
            # the services in order (all at once, the dispatcher could stop before the worker's last notices); no
            # controlling terminal either, so a terminal set to stop background writers cannot freeze one
            children[name] = subprocess.Popen([*exe, name], env=env, start_new_session=True)
            log.info("started %s (pid %d)", name, children[name].pid)
        print("censorwatch is up: poller, worker and dispatcher running. Ctrl-C stops everything.", flush=True)
        failed = False
        while not stop.requested:
            for name, proc in children.items():
                if proc.poll() is not None:
                    log.error("%s exited with status %s; stopping everything", name, proc.returncode)
                    stop.requested = failed = True
            time.sleep(0.2)
        return 1 if failed else 0
    finally:
        _stop_children(children)
        if broker is not None:
            broker.stop()
        log.info("censorwatch stopped")


def _stop_children(children: dict[str, subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    # Poller first (no new input), then worker, then dispatcher (so it can deliver what is in flight).
    for name in ("poll", "worker", "dispatch"):
        proc = children.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", name, timeout)
            proc.kill()
            proc.wait()
        log.info("stopped %s (exit status %s)", name, proc.returncode)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "up": (cmd_up, "run everything (embedded broker unless CENSORWATCH_KAFKA_BOOTSTRAP is set)"),
    "poll": (cmd_poll, "poll the OONI API and produce measurements"),
    "worker": (cmd_worker, "run the Faust stream processor (detection)"),
    "dispatch": (cmd_dispatch, "deliver events to console, Slack and email"),
    "check-config": (cmd_check_config, "validate the settings and print every problem"),
    "create-topics": (cmd_create_topics, "create the Kafka topics if missing (production one-shot step)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="censorwatch", description=__doc__)
    parser.add_argument("--config", help="YAML config file (or CENSORWATCH_CONFIG_FILE)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_).set_defaults(func=func)
    replay = sub.add_parser("replay", help="push recorded measurements (JSONL or saved API pages) onto the topic")
    replay.add_argument("files", nargs="+", metavar="FILE")
    replay.set_defaults(func=cmd_replay)
    from services.simulate import build_parser as add_simulate_parser
    from streams.backtest import build_parser as add_backtest_parser

    add_backtest_parser(sub)
    add_simulate_parser(sub)
    from reports.cli import add_parser as add_report_parser

    add_report_parser(sub)
    from alerts.cli import add_parser as add_silence_parser

    add_silence_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = os.environ.get("CENSORWATCH_LOG_LEVEL", "INFO").upper()
    setup_logging(level if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO")  # Settings says why
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print("censorwatch: invalid configuration:", file=sys.stderr)
        for line in exc.problems:
            print(f"  - {line}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # Kafka not reachable at start (bus.admin, bus.producer): one line, no traceback
        print(f"censorwatch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
