"""One typed ``Settings`` for every command, validated at start-up.

Values come from, highest priority first: keyword arguments, ``CENSORWATCH_*`` environment variables (nested
fields with ``__``, e.g. ``CENSORWATCH_SLACK__CHANNEL``), the YAML config file named by ``CENSORWATCH_CONFIG_FILE``
(or ``--config``), then the defaults below. Secrets are ``SecretStr``: required only when their sink is enabled,
never defaulted, never logged; each may also be read from a file (``*_file``), as Docker secrets are mounted.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from censorwatch.topics import Topics

log = logging.getLogger(__name__)

DEFAULT_TESTS = [
    "web_connectivity",
    "signal",
    "telegram",
    "whatsapp",
    "facebook_messenger",
    "psiphon",
    "riseupvpn",
    "tor",
]
CONFIG_FILE_ENV = "CENSORWATCH_CONFIG_FILE"


def _read_secret_file(path: Path | None, current: SecretStr | None) -> SecretStr | None:
    if current is not None or path is None:
        return current
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"secret file {path} is empty")
    return SecretStr(value)


class SlackSettings(BaseModel):
    """Slack Web API delivery (bot token, ``chat.postMessage``)."""

    enabled: bool = False
    token: SecretStr | None = Field(default=None, description="bot token xoxb-…; required when enabled")
    token_file: Path | None = Field(default=None, description="file holding the bot token (Docker secret)")
    channel: str = Field(default="#censorship-alerts", min_length=1)
    base_url: str = Field(default="https://slack.com/api/", description="Slack Web API base URL")
    timeout_seconds: float = Field(default=10.0, gt=0)
    max_retry_seconds: float = Field(default=120.0, gt=0, description="give up (dead-letter) after this long")
    min_interval_seconds: float = Field(
        default=1.0, ge=0, description="pace per channel between Slack calls (Slack allows about 1 message/s)"
    )

    @model_validator(mode="after")
    def _token_when_enabled(self) -> SlackSettings:
        self.token = _read_secret_file(self.token_file, self.token)
        if self.enabled and self.token is None:
            raise ValueError("slack is enabled but no token is set (CENSORWATCH_SLACK__TOKEN or token_file)")
        if not self.base_url.endswith("/"):
            self.base_url += "/"
        return self


class EmailSettings(BaseModel):
    """SMTP delivery (multipart text + HTML)."""

    enabled: bool = False
    smtp_host: str = "localhost"
    smtp_port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    ssl: bool = Field(default=False, description="implicit TLS (port 465) instead of STARTTLS")
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    sender: str = "censorwatch@localhost"
    recipients: list[str] = Field(default_factory=list)
    timeout_seconds: float = Field(default=15.0, gt=0)
    max_retry_seconds: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> EmailSettings:
        self.password = _read_secret_file(self.password_file, self.password)
        if self.enabled:
            if not self.recipients:
                raise ValueError("email is enabled but no recipients are set")
            if self.username and self.password is None:
                raise ValueError("email username is set but no password (CENSORWATCH_EMAIL__PASSWORD)")
        for address in [self.sender, *self.recipients]:
            if "@" not in address or any(c in address for c in "\r\n<>,;"):
                raise ValueError(f"not a plain e-mail address: {address!r}")
        return self


class MetricsSettings(BaseModel):
    """Where each process serves Prometheus metrics; 0 disables that endpoint."""

    host: str = "127.0.0.1"
    poller_port: int = Field(default=9464, ge=0, le=65535)
    worker_port: int = Field(default=9465, ge=0, le=65535)
    dispatcher_port: int = Field(default=9466, ge=0, le=65535)
    series_cap: int = Field(
        default=2000, ge=0, description="most per (cc, ASN, target) series one worker exposes (bound)"
    )


class DetectionSettings(BaseModel):
    """Knobs of the detection engine (see docs/detection.md for what each means and how to tune it)."""

    min_measurements: int = Field(default=3, ge=1, description="evidence floor: measurements per series")
    min_probes: int = Field(default=2, ge=1, description="evidence floor: distinct probe runs per series")
    window_hours: float = Field(
        default=168.0, gt=0, description="evidence window per series (a week: KH series get a few per week)"
    )
    open_threshold: float = Field(default=0.5, gt=0, le=1, description="open when the share's lower bound ≥")
    close_threshold: float = Field(default=0.2, ge=0, lt=1, description="clear when the share's upper bound ≤")
    confidence_z: float = Field(default=1.64, gt=0, description="z of the Wilson interval (1.64 ≈ 90 %)")
    min_open_seconds: float = Field(default=3600.0, ge=0, description="hysteresis in time before resolving")
    confirmed_opens: bool = Field(default=True, description="a confirmed measurement opens an event at once")
    warmup_hours: float = Field(
        default=72.0,
        ge=0,
        description="series first seen this soon after monitoring began and blocked at once: "
        "'already blocked when monitoring began' (sparse networks need ~3 days to reach the floor)",
    )
    revision_window_hours: float = Field(default=72.0, ge=0, description="late data within this revises")
    future_skew_seconds: float = Field(default=3600.0, ge=0, description="clamp start times beyond now+this")
    outage_min_targets: int = Field(default=5, ge=2, description="targets failing at once on an ASN = outage")
    outage_share: float = Field(default=0.8, gt=0, le=1, description="share of an ASN's targets failing")
    coverage_gap_hours: float = Field(default=12.0, gt=0, description="silent watched ASN raises a notice")
    max_alerts_per_run: int = Field(default=50, ge=1, description="cap per evaluation; the rest is recorded")
    cusum_p0: float = Field(default=0.05, gt=0, lt=1, description="CUSUM: anomaly share of an unblocked series")
    cusum_p1: float = Field(default=0.5, gt=0, lt=1, description="CUSUM: anomaly share of a (partly) blocked one")
    cusum_threshold: float = Field(default=6.0, gt=0, description="CUSUM log-likelihood ratio that opens")
    clear_after_hours: float = Field(
        default=72.0, gt=0, description="a series clears only when this many recent hours are clean (weekends)"
    )
    pooled_window_hours: float = Field(
        default=72.0, gt=0, description="window of the per-target evidence pooled across ASNs"
    )
    join_min_blocked: int = Field(
        default=2, ge=1, description="anomalies (and a majority) an ASN needs to join an already open event"
    )
    late_after_seconds: float = Field(
        default=3600.0, ge=0, description="older than the country watermark by more than this = late data"
    )
    coverage_min_measurements: int = Field(
        default=20, ge=1, description="an ASN is watched for coverage gaps once it sent this many measurements"
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> DetectionSettings:
        if self.close_threshold >= self.open_threshold:
            raise ValueError("close_threshold must be below open_threshold (hysteresis)")
        if self.cusum_p0 >= self.cusum_p1:
            raise ValueError("cusum_p0 (unblocked anomaly share) must be below cusum_p1 (blocked share)")
        return self


class WatchWindow(BaseModel):
    """A time-boxed watch (an election, exams): matching targets get a routing label and more sensitivity."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    start: datetime
    end: datetime
    countries: list[str] = Field(default_factory=list, description="empty = every country")
    categories: list[str] = Field(default_factory=list, description="Citizen Lab category codes, e.g. NEWS")
    urls: list[str] = Field(default_factory=list, description="URLs or domains (or app test names)")
    asns: list[int] = Field(default_factory=list, description="networks always watched for coverage gaps")
    sensitivity: float = Field(default=1.0, gt=0, le=10, description=">1 lowers the opening thresholds")
    route: str | None = Field(default=None, description="routing label put on matching events")


class WatchSettings(BaseModel):
    """Per-country watchlists (Citizen Lab CSVs), network names and watch windows (see docs/detection.md)."""

    watchlists: dict[str, Path] = Field(default_factory=dict, description="country code -> test-list CSV")
    asn_names_files: list[Path] = Field(default_factory=list, description="CSV files with asn,name columns")
    asn_names: dict[int, str] = Field(default_factory=dict, description="ASN -> name (wins over files)")
    windows: list[WatchWindow] = Field(default_factory=list)


class EnrichSettings(BaseModel):
    """Local confirmation of anomalies from raw measurement bodies (DNS block answers, block pages).

    Each fetch costs API quota (``/api/v1/raw_measurement``), so it is limited to a few countries and tests and
    to a budget per poll round; what the budget skips stays an (unconfirmed) anomaly.
    """

    enabled: bool = True
    countries: list[str] = Field(default_factory=lambda: ["KH"], description="countries to enrich")
    test_names: list[str] = Field(default_factory=lambda: ["web_connectivity"])
    max_fetches_per_round: int = Field(default=20, ge=0, description="raw bodies fetched per poll round")


class AlertMatch(BaseModel):
    """Which events a route or a silence applies to: every listed field must match (a list means any of)."""

    model_config = ConfigDict(extra="forbid")

    cc: list[str] = Field(default_factory=list, description="country codes")
    # The closed sets are checked at start-up: a misspelt value ("blocked", "Critical") would never match, and the
    # events it meant would silently go to the defaults.
    kind: list[Literal["target_blocked", "network_outage", "coverage_gap"]] = Field(default_factory=list)
    action: list[Literal["opened", "updated", "revised", "resolved"]] = Field(default_factory=list)
    state: list[Literal["open", "resolved"]] = Field(default_factory=list)
    category: list[str] = Field(default_factory=list, description="Citizen Lab category codes")
    watch: list[str] = Field(default_factory=list, description="watch window labels (Event.watch)")
    severity: list[Literal["info", "warning", "critical"]] = Field(default_factory=list)
    target: list[str] = Field(default_factory=list, description="shell patterns, e.g. '*.rfa.org'")
    asn: list[int] = Field(default_factory=list, description="an event matches if any of its networks is listed")
    simulated: bool | None = None


class AlertRoute(BaseModel):
    """Events matching ``match`` go to ``receivers``: 'console', 'slack:#channel', 'email:<list or address>'."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    match: AlertMatch = Field(default_factory=AlertMatch)
    receivers: list[str] = Field(min_length=1)
    continue_matching: bool = Field(default=False, alias="continue", description="also try the next routes")
    language: Literal["en", "km"] | None = None
    group_wait_seconds: float | None = Field(default=None, ge=0)
    group_interval_seconds: float | None = Field(default=None, ge=0)
    repeat_interval_seconds: float | None = Field(default=None, ge=0)

    @field_validator("receivers")
    @classmethod
    def _receiver_syntax(cls, value: list[str]) -> list[str]:
        for r in value:
            sink, _, name = r.partition(":")
            if not (r == "console" or (sink in ("slack", "email") and name.strip())):
                raise ValueError(f"receiver {r!r} is not 'console', 'slack:<channel>' or 'email:<list|address>'")
        return value


class DigestSettings(BaseModel):
    """The daily email digest per recipient (opened, changed, resolved, coverage gaps, silenced)."""

    enabled: bool = False
    hour_utc: int = Field(default=6, ge=0, le=23, description="send each day at this hour (UTC)")
    receivers: list[str] = Field(default_factory=list, description="email receivers; empty = all of them")


class AlertsSettings(BaseModel):
    """Routing, grouping, silences, heartbeat and digest of the dispatcher (see docs/alerts.md)."""

    language: Literal["en", "km"] = "en"
    templates_dir: Path | None = Field(default=None, description="edited templates (falls back to shipped)")
    routes: list[AlertRoute] = Field(default_factory=list, description="empty = every enabled sink gets all")
    email_lists: dict[str, list[str]] = Field(default_factory=dict, description="name -> addresses")
    group_wait_seconds: float = Field(default=0.0, ge=0, description="wait before an event's first notice")
    group_interval_seconds: float = Field(default=0.0, ge=0, description="least time between an event's notices")
    repeat_interval_seconds: float = Field(default=0.0, ge=0, description="remind of long blocks; 0 = never")
    retry_initial_seconds: float = Field(default=1.0, gt=0)
    retry_max_backoff_seconds: float = Field(default=60.0, gt=0)
    heartbeat_interval_seconds: float = Field(default=60.0, gt=0)
    heartbeat_receivers: list[str] = Field(default_factory=list, description="also send a heartbeat notice here")
    silences_refresh_seconds: float = Field(default=15.0, gt=0)
    digest: DigestSettings = Field(default_factory=DigestSettings)

    @field_validator("email_lists")
    @classmethod
    def _addresses(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, addresses in value.items():
            for address in addresses:
                if "@" not in address or any(c in address for c in "\r\n<>,;"):
                    raise ValueError(f"email list {name}: not a plain e-mail address: {address!r}")
        return value


class Settings(BaseSettings):
    """Everything censorwatch can be told. ``censorwatch check-config`` prints every problem at once."""

    model_config = SettingsConfigDict(
        env_prefix="CENSORWATCH_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    config_file: Path | None = Field(default=None, description="YAML file with lists and nested sections")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    state_dir: Path = Field(default=Path("var"), description="local state (Faust tables, embedded broker logs)")

    # Kafka
    kafka_bootstrap: str | None = Field(
        default=None, description="host:port[,host:port]; unset = start the embedded Tansu broker"
    )
    embedded_broker_port: int = Field(default=9092, ge=1, le=65535)
    topic_prefix: str = Field(default="censorwatch", pattern=r"^[A-Za-z0-9._-]*$")
    topic_partitions: int = Field(default=4, ge=1)
    topic_replication: int = Field(default=1, ge=1)
    kafka_session_timeout_seconds: float = Field(default=10.0, ge=2.0)
    broker_kind: Literal["kafka", "tansu"] = Field(
        default="kafka",
        description="'tansu' (the embedded broker) works around its quirks: exact high watermarks need one "
        "record per producer batch (for table recovery and for readers to see the last records), and topics "
        "use one partition",
    )

    # OONI poller
    countries: list[str] = Field(default_factory=lambda: ["KH"], min_length=1)
    test_names: list[str] = Field(default_factory=lambda: list(DEFAULT_TESTS), min_length=1)
    ooni_api_url: str = Field(default="https://api.ooni.io", pattern=r"^https?://[^\s/]+")
    poll_interval_seconds: float = Field(default=60.0, ge=1.0)
    poll_lookback_seconds: float = Field(
        default=6 * 3600.0, ge=0, description="re-ask this far behind the cursor for late uploads"
    )
    poll_late_sweep_seconds: float = Field(
        default=72 * 3600.0,
        ge=0,
        description="every sweep re-reads this far back for uploads later than the look-back (0 = no sweep); "
        "detection revises evidence with data up to detection.revision_window_hours late",
    )
    poll_late_sweep_every_seconds: float = Field(default=3600.0, gt=0, description="time between late sweeps")
    poll_api_delay_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="how long the API may take to show a measurement after its collector received it: the late "
        "sweep's margin (an upload shown later than this, late by about the look-back, would be missed)",
    )
    poll_start: datetime | None = Field(default=None, description="first start: poll from here (UTC)")
    poll_initial_lookback_seconds: float = Field(default=24 * 3600.0, ge=0)
    poll_page_size: int = Field(default=500, ge=1, le=10000)
    http_timeout_seconds: float = Field(default=30.0, gt=0)
    http_max_backoff_seconds: float = Field(default=600.0, gt=0)
    user_agent: str = "censorwatch/0.1 (+https://github.com/censorwatch)"

    # Detection, delivery, metrics
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    console: bool = Field(default=True, description="log every notification on the console")
    slack: SlackSettings = Field(default_factory=SlackSettings)
    email: EmailSettings = Field(default_factory=EmailSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)
    enrich: EnrichSettings = Field(default_factory=EnrichSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    deadletter_max_ratio: float = Field(
        default=0.5, gt=0, le=1, description="stop when more than this share of recent input is dead-lettered"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value  # "debug" is as good as "DEBUG"

    @field_validator("kafka_bootstrap", mode="before")
    @classmethod
    def _bootstrap(cls, value: Any) -> Any:
        """A blank address is no address: the embedded broker (an empty ``CENSORWATCH_KAFKA_BOOTSTRAP=`` in an
        ``.env`` file meant "unset", and half the commands read it as set)."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("countries")
    @classmethod
    def _country_codes(cls, value: list[str]) -> list[str]:
        out = []
        for cc in value:
            code = cc.strip().upper()
            if len(code) != 2 or not code.isalpha() or not code.isascii():
                raise ValueError(f"not a two-letter country code: {cc!r}")
            out.append(code)
        return out

    @field_validator("test_names")
    @classmethod
    def _test_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or not all(c.islower() or c.isdigit() or c == "_" for c in name):
                raise ValueError(f"not an OONI test name: {name!r}")
        return value

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)

    @property
    def embedded(self) -> bool:
        return self.kafka_bootstrap is None

    def bootstrap(self) -> str:
        """The bootstrap servers in use (the embedded broker's address when none is configured)."""
        return self.kafka_bootstrap or f"127.0.0.1:{self.embedded_broker_port}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs: dict[str, Any] = getattr(init_settings, "init_kwargs", {})
        path = init_kwargs.get("config_file") or os.environ.get(CONFIG_FILE_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            if not Path(path).is_file():
                raise ConfigError([f"config_file: no such file: {path}"])
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


class ConfigError(Exception):
    """Every configuration problem at once, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def describe_errors(exc: ValidationError) -> list[str]:
    """Turn a pydantic error into lines that name the field, what is wrong, and the env var to set."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) or "(settings)"
        head = loc[: next((i for i, p in enumerate(err["loc"]) if isinstance(p, int)), len(loc))]  # a list is one var
        env = "CENSORWATCH_" + "__".join(p.upper() for p in head) if head else ""
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {msg}" + (f"  [env {env}]" if env else ""))
    return lines


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings, raising ``ConfigError`` with every problem listed."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None
    except SettingsError as exc:  # an environment value that must be JSON (a list, a section) and is not
        raise ConfigError([_not_json(exc)]) from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # unreadable or malformed YAML
        raise ConfigError([f"config_file: {exc}"]) from None
    for line in unknown_env(os.environ):
        log.warning("%s", line)
    return settings


def _not_json(exc: SettingsError) -> str:
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match.group(1) if match else "(a setting)"
    env = f"CENSORWATCH_{field.upper()}"
    info = Settings.model_fields.get(field)
    section = info is not None and isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
    example = '{"enabled": true}' if section else '["KH", "MM"]'
    return f"{field}: the value of {env} must be JSON (lists and sections are), e.g. {env}='{example}'  [env {env}]"


def env_names(model: type[BaseModel] | None = None, prefix: str = "CENSORWATCH_") -> set[str]:
    """Every environment variable a setting can be read from (sections at any depth, joined with ``__``)."""
    names = {CONFIG_FILE_ENV} if model is None else set()
    for name, info in (model or Settings).model_fields.items():
        names.add(f"{prefix}{name.upper()}")
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            names |= env_names(sub, f"{prefix}{name.upper()}__")
    return names


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """A warning per ``CENSORWATCH_`` variable no setting reads: a misspelt one is otherwise silently ignored.
    Not an error: Compose reads a few of its own (``CENSORWATCH_SLACK_ENABLED``) on the host."""
    known = env_names()
    out = []
    for key in sorted(k for k in environ if k.startswith("CENSORWATCH_") and k.upper() not in known):
        close = difflib.get_close_matches(key.upper(), known, n=1)
        out.append(f"{key} is not a censorwatch setting (ignored)" + (f"; did you mean {close[0]}?" if close else ""))
    return out
