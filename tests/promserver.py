"""A real Prometheus server on loopback for tests: scrape given targets, load the project's rules, query it.

Used by tests/test_deploy_grafana.py (every dashboard query against sample metrics) and meant for the
end-to-end test that scrapes a running pipeline fed with recorded data::

    with running_prometheus(tmp_path, {"censorwatch-poller": [f"127.0.0.1:{port}"]}) as prom:
        prom.wait_for_targets()
        assert prom.wait_for_series('censorwatch_poller_measurements_fetched_total{cc="KH"}')

Every wait polls the HTTP API until a condition holds or a deadline passes; nothing sleeps and hopes.
The binaries come from Debian's ``prometheus`` package (deploy/scripts/ensure-prometheus.sh installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES_DIR = DEPLOY / "prometheus" / "rules"

T = TypeVar("T")


def require_tool(name: str) -> str:
    """Path of a Debian-packaged tool. Missing: the test fails under CI (CI=true) and is skipped elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    message = (
        f"{name} not found on PATH: run `bash deploy/scripts/ensure-prometheus.sh` as root "
        "(Debian packages prometheus, prometheus-alertmanager, docker-compose)"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Call ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class PromQueryError(AssertionError):
    """Prometheus rejected a query (bad PromQL) or answered with an error."""


class PromServer:
    """A running Prometheus and a thin client for its HTTP API."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log_file: Path, jobs: Sequence[str]):
        self.proc = proc
        self.url = url
        self.log_file = log_file
        self.jobs = list(jobs)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _get(self, path: str, params: Mapping[str, str] | None = None, timeout: float = 10.0) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback only
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                body = json.load(exc)
            except ValueError:
                raise PromQueryError(f"{path}: HTTP {exc.code}") from None
        if body.get("status") != "success":
            raise PromQueryError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``).

        Raises ``PromQueryError`` (an AssertionError) naming the problem when the expression does not parse.
        """
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            data = self._get("/api/v1/query", params)
        except PromQueryError as exc:
            raise PromQueryError(f"query {expr!r} failed: {exc}") from None
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def wait_for_series(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns at least one series."""
        return wait_for(f"series from {expr!r}", lambda: self.query(expr), timeout)

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets")["activeTargets"])

    def wait_for_targets(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every configured target is scraped successfully and its samples are queryable."""

        def all_up() -> list[dict[str, Any]] | None:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return targets
            return None

        try:
            targets = wait_for("every target up", all_up, timeout)
        except AssertionError:
            states = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in self.targets()]
            raise AssertionError(f"targets not all up within {timeout:g} s: {states}") from None
        for job in self.jobs:
            self.wait_for_series(f'up{{job="{job}"}} == 1', timeout)
        return targets

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_config(
    path: Path,
    targets: Mapping[str, Sequence[str]],
    *,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] | None = None,
) -> Path:
    """A Prometheus config scraping ``targets`` (job -> ["127.0.0.1:port", ...]) and loading the rules."""
    if rule_files is None:
        rule_files = sorted(RULES_DIR.glob("*.yml"))
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(addrs)}]} for job, addrs in targets.items()
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(
    workdir: Path,
    targets: Mapping[str, Sequence[str]],
    *,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] | None = None,
    timeout: float = 30.0,
) -> PromServer:
    """Start ``prometheus`` on a free loopback port, scraping ``targets``; returns once it is ready."""
    for addrs in targets.values():
        for addr in addrs:
            host = addr.rsplit(":", 1)[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError(f"loopback targets only, not {addr}")
    binary = require_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "prometheus.yml", targets, scrape_interval=scrape_interval, rule_files=rule_files)
    port = free_port()
    log_file = workdir / "prometheus.log"
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = PromServer(proc, f"http://127.0.0.1:{port}", log_file, list(targets))

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    try:
        wait_for("prometheus /-/ready", ready, timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def running_prometheus(
    workdir: Path,
    targets: Mapping[str, Sequence[str]],
    **kwargs: Any,
) -> Iterator[PromServer]:
    """``start_prometheus`` as a context manager that always stops the server."""
    server = start_prometheus(workdir, targets, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# The metric-names contract of DEVELOPERS.md ("Metric names"), as exposed (histograms by their base name).
# Rules and dashboards may use only these; tests/test_deploy_*.py check it.
DOCUMENTED_METRICS: dict[str, tuple[str, ...]] = {
    "censorwatch_poller_measurements_fetched_total": ("cc",),
    "censorwatch_poller_measurements_produced_total": ("cc",),
    "censorwatch_poller_late_uploads_total": ("cc",),
    "censorwatch_poller_errors_total": ("kind",),
    "censorwatch_poller_last_success_timestamp_seconds": ("cc",),
    "censorwatch_poller_api_quota_remaining": (),
    "censorwatch_poller_request_duration_seconds": (),
    "censorwatch_deadletter_total": ("stage",),
    "censorwatch_worker_measurements_processed_total": ("cc", "outcome"),
    "censorwatch_worker_duplicates_total": (),
    "censorwatch_worker_input_gaps_total": (),
    "censorwatch_worker_input_expired_total": (),
    "censorwatch_worker_late_measurements_total": ("kind",),
    "censorwatch_worker_events_emitted_total": ("kind", "action"),
    "censorwatch_worker_events_open": ("kind", "cc"),
    "censorwatch_worker_assigned_partitions": (),
    "censorwatch_worker_processing_latency_seconds": (),
    "censorwatch_series_anomaly_share": ("cc", "asn", "target"),
    "censorwatch_series_measurements": ("cc", "asn", "target"),
    "censorwatch_consumer_lag": ("group", "topic"),
    "censorwatch_notifications_total": ("sink", "outcome"),
    "censorwatch_notification_duration_seconds": ("sink",),
    "censorwatch_dispatcher_heartbeat_timestamp_seconds": (),
    "censorwatch_dispatcher_last_delivery_timestamp_seconds": ("sink",),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def metric_names_in(expr: str) -> set[str]:
    """The censorwatch metric names a PromQL expression reads (recording-rule names excluded)."""
    import re

    names = set()
    for token in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if token.startswith("censorwatch_") and ":" not in token:
            for suffix in HISTOGRAM_SUFFIXES:
                if token.endswith(suffix) and token.removesuffix(suffix) in DOCUMENTED_METRICS:
                    token = token.removesuffix(suffix)
            names.add(token)
    return names
