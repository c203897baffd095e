"""Run censorwatch commands as real subprocesses in tests, configured from a ``Settings`` object."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from censorwatch.config import Settings


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def write_config(settings: Settings, path: Path) -> Path:
    """The settings as a YAML config file a subprocess can load (secrets included: test-only)."""
    data = _plain(settings.model_dump(exclude={"config_file"}))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Service:
    """``python -m censorwatch <command>`` with a config file; its output goes to a log file for diagnosis."""

    def __init__(self, command: list[str], settings: Settings, workdir: Path, name: str | None = None) -> None:
        self.command = command
        self.name = name or command[0]
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = write_config(settings, workdir / f"{self.name}.yaml")
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CENSORWATCH_")}
        env["CENSORWATCH_CONFIG_FILE"] = str(self.config)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "censorwatch", *self.command],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def check(self) -> bool:
        """True while running; a crashed service fails the waiting test at once, with its log."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(  # noqa: B904 - the timeout is the failure being reported
                    f"{self.name} did not stop within {timeout:.0f} s:\n{self.log()[-3000:]}"
                )
        return proc.returncode

    def kill(self) -> None:
        self.stop(sig=signal.SIGKILL)


def scrape(port: int) -> str | None:
    """The Prometheus text a service serves on 127.0.0.1:port, or None while it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def metric_value(port: int, line_prefix: str) -> float:
    """Sum of the samples whose line starts with ``line_prefix`` (name plus the start of the labels)."""
    text = scrape(port) or ""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))
