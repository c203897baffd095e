"""``censorwatch up`` on the embedded broker, as a user runs it: everything starts, a replayed file with an injected
blocking series makes an alert appear on the console sink, and SIGTERM stops every process, broker included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.conftest import free_port
from tests.fakes.ooni_api import make_item
from tests.services import wait_until


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _drill_file(path: Path) -> Path:
    """A simulated drill: a site answering normally, then DNS-blocked on one ISP by several probes."""
    start = datetime(2023, 7, 10, tzinfo=UTC)
    items = [make_item(start=start + timedelta(hours=3 * i), input="https://www.rfa.org/", seq=i) for i in range(8)]
    items += [
        make_item(
            start=start + timedelta(days=7, hours=i),
            input="https://www.rfa.org/",
            anomaly=True,
            blocking_type="dns",
            seq=100 + i,
        )
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def test_up_runs_everything_shows_alerts_on_the_console_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CENSORWATCH_")}
    env.update(
        {
            "CENSORWATCH_EMBEDDED_BROKER_PORT": str(port),
            "CENSORWATCH_OONI_API_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens: "no internet"
            "CENSORWATCH_POLL_INTERVAL_SECONDS": "1",
            "CENSORWATCH_KAFKA_SESSION_TIMEOUT_SECONDS": "6",
            "CENSORWATCH_STATE_DIR": str(tmp_path / "var"),
            "CENSORWATCH_METRICS__POLLER_PORT": str(free_port()),
            "CENSORWATCH_METRICS__WORKER_PORT": str(free_port()),
            "CENSORWATCH_METRICS__DISPATCHER_PORT": str(free_port()),
        }
    )
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as out:
        # a process group of its own, as a shell's foreground job: the Ctrl-C below goes to the whole group
        up = subprocess.Popen(
            [sys.executable, "-m", "censorwatch", "up"], env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:

        def log() -> str:
            return log_path.read_text(errors="replace")

        def running() -> bool:
            assert up.poll() is None, f"censorwatch up exited with {up.returncode}:\n{log()[-4000:]}"
            return True

        wait_until(lambda: running() and "censorwatch is up" in log(), 60, "censorwatch up to start")
        wait_until(
            lambda: running() and log().count("WARNING services.ooni_client: OONI API") >= 2,
            60,
            "the poller to report the unreachable API and keep retrying",
        )
        descendants = _children(up.pid)
        assert len(descendants) >= 4, "broker, poller, worker and dispatcher run under censorwatch up"

        # a user replays a recorded drill file from a second terminal (same default broker port)
        replay_env = {**env}
        replay = subprocess.run(
            [sys.executable, "-m", "censorwatch", "replay", str(_drill_file(tmp_path / "drill.jsonl"))],
            env=replay_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        wait_until(
            lambda: running() and "ALERT" in log() and "www.rfa.org" in log(), 90, "the alert on the console sink"
        )
        alert_line = next(line for line in log().splitlines() if "ALERT" in line and "www.rfa.org" in line)
        assert "blocked" in alert_line.lower()

        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert up.wait(60) == 0, log()[-4000:]
        wait_until(lambda: not any(_alive(p) for p in descendants), 10, "every child process to exit")
        # `up` alone got the Ctrl-C and stopped the services in order: no new input, then detection, then delivery
        stops = [line.split("stopped ")[1].split(" ")[0] for line in log().splitlines() if "cli: stopped " in line]
        assert stops == ["poll", "worker", "dispatch"], log()[-4000:]
        assert "SIGTERM received: stopping the poller" in log() and "dispatcher: signal 15" in log()
        assert "SIGINT received: stopping the poller" not in log()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_a_closed_terminal_stops_up_like_ctrl_c() -> None:
    """A closed terminal sends SIGHUP: unhandled, it killed ``up`` alone and left the broker running. Under nohup
    it is ignored, and stays so."""
    from censorwatch.cli import _Stop

    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    before = {signum: signal.getsignal(signum) for signum in signums}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # under nohup: the hang-up is not ours to act on
        _Stop()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        stop = _Stop()
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)  # else the kill ends pytest
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: stop.requested, 5, "the stop flag")
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
