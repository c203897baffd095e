"""Settings: defaults, every problem reported at once, secrets never shown, files and env in the right order."""

from __future__ import annotations

from pathlib import Path

import pytest

from censorwatch.cli import main
from censorwatch.config import DEFAULT_TESTS, ConfigError, load_settings, unknown_env


def test_defaults_match_the_cambodian_deployment() -> None:
    s = load_settings()
    assert s.countries == ["KH"]
    assert s.test_names == DEFAULT_TESTS
    assert s.ooni_api_url == "https://api.ooni.io"
    assert s.poll_interval_seconds == 60
    assert s.embedded and s.bootstrap() == "127.0.0.1:9092"
    assert not s.slack.enabled and s.slack.token is None


def test_every_problem_is_listed_with_field_and_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CENSORWATCH_COUNTRIES", '["KHM", "kh"]')
    monkeypatch.setenv("CENSORWATCH_SLACK__ENABLED", "true")
    monkeypatch.setenv("CENSORWATCH_POLL_INTERVAL_SECONDS", "0")
    monkeypatch.setenv("CENSORWATCH_DETECTION__CLOSE_THRESHOLD", "0.9")
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert "countries: not a two-letter country code: 'KHM'" in err
    assert "slack: slack is enabled but no token is set" in err
    assert "poll_interval_seconds" in err and "CENSORWATCH_POLL_INTERVAL_SECONDS" in err
    assert "close_threshold must be below open_threshold" in err


def test_every_command_validates_at_start(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CENSORWATCH_EMAIL__ENABLED", "true")
    for command in (["poll"], ["worker"], ["dispatch"], ["replay", "x.jsonl"]):
        assert main(command) == 2
        assert "email is enabled but no recipients are set" in capsys.readouterr().err


def test_secrets_come_from_env_or_files_and_are_never_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "slack_token"
    token.write_text("xoxb-from-a-file\n")
    monkeypatch.setenv("CENSORWATCH_SLACK__ENABLED", "true")
    monkeypatch.setenv("CENSORWATCH_SLACK__TOKEN_FILE", str(token))
    s = load_settings()
    assert s.slack.token is not None and s.slack.token.get_secret_value() == "xoxb-from-a-file"
    assert "xoxb-from-a-file" not in repr(s) and "xoxb-from-a-file" not in str(s.model_dump())
    assert main(["check-config"]) == 0
    assert "xoxb" not in capsys.readouterr().out

    monkeypatch.setenv("CENSORWATCH_SLACK__TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read secret file"):
        load_settings()


def test_yaml_file_then_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "censorwatch.yaml"
    config.write_text("countries: [KH, MM]\npoll_interval_seconds: 120\ndetection:\n  min_probes: 3\n")
    monkeypatch.setenv("CENSORWATCH_CONFIG_FILE", str(config))
    monkeypatch.setenv("CENSORWATCH_POLL_INTERVAL_SECONDS", "30")
    s = load_settings()
    assert s.countries == ["KH", "MM"]
    assert s.poll_interval_seconds == 30  # the environment wins over the file
    assert s.detection.min_probes == 3

    config.write_text("countries: [KH\n")
    with pytest.raises(ConfigError, match="config_file"):
        load_settings()
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(config_file=tmp_path / "nope.yaml")


def test_the_shipped_example_configuration_is_valid_and_loads_the_watchlist() -> None:
    from streams.detection import DetectionContext

    root = Path(__file__).resolve().parent.parent
    s = load_settings(config_file=root / "examples/kh-election.yaml")
    assert s.watch.windows[0].route == "election"
    ctx = DetectionContext.from_settings(s)
    assert ctx.categories[("KH", "kamnotra.io")] == "NEWS"
    assert ctx.asn_names[38623].startswith("VIETTEL")


def test_a_list_given_without_json_names_the_variable_and_the_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: the error blamed the config file and never said JSON was needed."""
    monkeypatch.setenv("CENSORWATCH_COUNTRIES", "KH,MM")
    with pytest.raises(ConfigError) as err:
        load_settings()
    (line,) = err.value.problems
    assert "CENSORWATCH_COUNTRIES" in line and "JSON" in line and '["KH", "MM"]' in line
    assert "config_file" not in line


def test_a_misspelt_variable_is_reported_with_the_likely_name() -> None:
    """Found in review: CENSORWATCH_POLL_INTERVAL=30 was silently ignored and the default used."""
    env = {
        "CENSORWATCH_POLL_INTERVAL": "30",
        "CENSORWATCH_SLACK__ENABLE": "true",
        "CENSORWATCH_SLACK__ENABLED": "true",
        "CENSORWATCH_CONFIG_FILE": "x.yaml",
        "PATH": "/bin",
    }
    env["CENSORWATCH_ALERTS__DIGEST__ENABLED"] = "true"  # sections nest deeper than one level
    lines = unknown_env(env)
    assert len(lines) == 2
    assert "CENSORWATCH_POLL_INTERVAL is not a censorwatch setting" in lines[0]
    assert lines[0].endswith("did you mean CENSORWATCH_POLL_INTERVAL_SECONDS?")
    assert "did you mean CENSORWATCH_SLACK__ENABLED?" in lines[1]


def test_digest_receivers_are_checked_like_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: a digest sent to a list that does not exist went to nobody, and the check said OK."""
    monkeypatch.setenv("CENSORWATCH_ALERTS__DIGEST__ENABLED", "true")
    monkeypatch.setenv("CENSORWATCH_ALERTS__DIGEST__RECEIVERS", '["email:nosuch"]')
    assert main(["check-config"]) != 0


def test_blank_and_lower_case_values_mean_what_they_say(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: CENSORWATCH_KAFKA_BOOTSTRAP= (blank, as in an .env file) was "set" for some commands and
    "embedded" for others; CENSORWATCH_LOG_LEVEL=debug was refused; a section given as text got a list example."""
    monkeypatch.setenv("CENSORWATCH_KAFKA_BOOTSTRAP", "  ")
    monkeypatch.setenv("CENSORWATCH_LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.embedded and settings.log_level == "DEBUG"
    monkeypatch.setenv("CENSORWATCH_SLACK", "on")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert """CENSORWATCH_SLACK='{"enabled": true}'""" in err.value.problems[0]


def test_a_misspelt_match_value_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: kind, action and severity were free text, so "blocked" or "Critical" never matched and
    the events they meant went to the defaults."""
    monkeypatch.setenv(
        "CENSORWATCH_ALERTS__ROUTES", '[{"match": {"severity": ["Critical"]}, "receivers": ["console"]}]'
    )
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "alerts.routes.0.match.severity.0" in err.value.problems[0]
    assert err.value.problems[0].endswith("[env CENSORWATCH_ALERTS__ROUTES]")
