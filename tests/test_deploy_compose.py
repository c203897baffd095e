"""docker-compose.yml, Dockerfile and the deploy scripts: validated without a Docker engine.

Debian's ``docker-compose config`` parses, interpolates and validates the file; the rest checks what Compose
cannot know: every censorwatch container runs a real ``censorwatch`` subcommand, its environment is a valid
``Settings``, secrets come from files, and workers can scale.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from censorwatch.cli import build_parser
from censorwatch.config import load_settings
from tests.promserver import require_tool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = ("slack_token", "smtp_password", "grafana_admin_password")
CENSORWATCH_SERVICES = {"create-topics", "poller", "worker", "dispatcher"}


def subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``docker-compose config`` of a copy of the stack with placeholder secret files."""
    tool = require_tool("docker-compose")
    work = tmp_path_factory.mktemp("compose")
    shutil.copy(COMPOSE, work / "docker-compose.yml")
    shutil.copy(ROOT / "Dockerfile", work / "Dockerfile")
    shutil.copytree(ROOT / "deploy", work / "deploy", ignore=shutil.ignore_patterns("secrets"))
    (work / "deploy" / "secrets").mkdir()
    for name in SECRETS:
        (work / "deploy" / "secrets" / name).write_text(f"placeholder-{name}\n")
    proc = subprocess.run(
        [tool, "--project-name", "censorwatch", "config"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    config = yaml.safe_load(proc.stdout)
    config["_workdir"] = work
    return dict(config)


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    expected = {"kafka", "prometheus", "alertmanager", "grafana", "mailpit"} | CENSORWATCH_SERVICES
    assert expected <= set(compose["services"])


def test_every_service_command_is_a_censorwatch_subcommand(compose: dict[str, Any]) -> None:
    known = subcommands()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["censorwatch"]' in dockerfile
    built = {name for name, svc in compose["services"].items() if "build" in svc}
    assert built == CENSORWATCH_SERVICES
    for name in built:
        command = compose["services"][name]["command"]
        assert isinstance(command, list) and command, name
        assert command[0] in known, f"{name}: {command[0]!r} is not a subcommand ({sorted(known)})"


def test_kafka_runs_kraft_with_a_volume(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "zookeeper" not in yaml.safe_dump(kafka).lower()
    assert any(v.startswith("kafka-data:") for v in kafka["volumes"])
    assert "healthcheck" in kafka


def test_health_checks_restart_policies_and_volumes(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: no restart policy"
        if name != "create-topics":
            assert svc.get("healthcheck", {}).get("test"), f"{name}: no health check"
    assert {"kafka-data", "prometheus-data"} <= set(compose["volumes"])
    prom = compose["services"]["prometheus"]
    assert any(v.startswith("prometheus-data:") for v in prom["volumes"])
    assert any(v.endswith(":/etc/prometheus:ro") for v in prom["volumes"])
    grafana = compose["services"]["grafana"]
    assert any(v.endswith(":/etc/grafana/provisioning:ro") for v in grafana["volumes"])


def test_published_ports_are_loopback_only(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_workers_can_scale(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "censorwatch-worker"]
    assert job["dns_sd_configs"][0]["names"] == ["worker"]


def test_secrets_come_from_files_not_environment(compose: dict[str, Any]) -> None:
    assert set(compose["secrets"]) == set(SECRETS)
    for secret in compose["secrets"].values():
        assert "file" in secret
    dispatcher = compose["services"]["dispatcher"]
    assert {s["source"] for s in dispatcher["secrets"]} == {"slack_token", "smtp_password"}
    env = dispatcher["environment"]
    assert env["CENSORWATCH_SLACK__TOKEN_FILE"] == "/run/secrets/slack_token"
    assert env["CENSORWATCH_EMAIL__PASSWORD_FILE"] == "/run/secrets/smtp_password"
    for name, svc in compose["services"].items():
        for key in svc.get("environment", {}):
            assert not key.endswith(("__TOKEN", "__PASSWORD", "_PASSWORD")), f"{name}: secret {key} in env"


@pytest.mark.parametrize("service", sorted(CENSORWATCH_SERVICES))
def test_service_environment_is_valid_settings(
    compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What each container gets from Compose validates as ``Settings`` (secrets: placeholder files)."""
    env = dict(compose["services"][service]["environment"])
    for key, value in env.items():
        if str(value).startswith("/run/secrets/"):
            path = tmp_path / Path(value).name
            path.write_text("placeholder\n")
            value = str(path)
        monkeypatch.setenv(key, str(value))
    settings = load_settings()
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.metrics.host == "0.0.0.0"
    assert settings.topic_partitions >= 4
    if service == "dispatcher":
        assert settings.email.enabled and settings.email.smtp_host == "mailpit"
        assert settings.slack.token is not None  # read from the file, never from the environment


def test_dockerfile_basics() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "pip install" in text
    assert "\nUSER " in text and "USER root" not in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests"):
        assert entry in ignore


def test_scripts_parse() -> None:
    bash = shutil.which("bash")
    assert bash
    for script in sorted((ROOT / "deploy" / "scripts").glob("*.sh")):
        proc = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_init_secrets_creates_and_keeps(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "secrets").mkdir()
    shutil.copy(ROOT / "deploy" / "scripts" / "init-secrets.sh", tmp_path / "scripts" / "init-secrets.sh")
    (tmp_path / "secrets" / "slack_token").write_text("xoxb-real\n")
    subprocess.run(["bash", str(tmp_path / "scripts" / "init-secrets.sh")], check=True, capture_output=True)
    assert (tmp_path / "secrets" / "slack_token").read_text() == "xoxb-real\n"
    for name in SECRETS:
        path = tmp_path / "secrets" / name
        assert path.read_text().strip()
        if name != "slack_token":  # created by the script: private to the owner
            assert path.stat().st_mode & 0o077 == 0


def test_ensure_script_is_idempotent_when_tools_exist() -> None:
    for tool in ("promtool", "prometheus", "amtool", "docker-compose"):
        require_tool(tool)
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "scripts" / "ensure-prometheus.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout == "" and proc.stderr == "", "quiet when everything is installed"


@pytest.mark.kafka
def test_create_topics_command_on_a_real_broker(kafka_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose stack's one-shot `create-topics` step, against the session's real broker."""
    from censorwatch.bus import admin
    from censorwatch.cli import main

    monkeypatch.setenv("CENSORWATCH_KAFKA_BOOTSTRAP", kafka_settings.kafka_bootstrap)
    monkeypatch.setenv("CENSORWATCH_TOPIC_PREFIX", kafka_settings.topic_prefix)
    monkeypatch.setenv("CENSORWATCH_TOPIC_PARTITIONS", "3")
    assert main(["create-topics"]) == 0
    assert main(["create-topics"]) == 0  # idempotent
    client = admin(kafka_settings)
    try:
        topics = client.list_topics()
    finally:
        client.close()
    assert kafka_settings.topics.measurements in topics
    assert kafka_settings.topics.poller_cursor in topics
