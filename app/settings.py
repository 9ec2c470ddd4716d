"""One typed, validated settings object for every Stanch process.

Everything configurable comes from ``STANCH_*`` environment variables and is read once at
start-up (Karapace's pattern): a bad value stops the process with a message that names
the variable and what is wrong, instead of failing minutes later inside a consumer.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Logical topic names (DESIGN.md); the full name is ``topic_prefix + name``.
TOPIC_NAMES: tuple[str, ...] = (
    "requests",
    "errors",
    "changes",
    "windows",
    "anomalies",
    "incidents",
    "commands",
    "acks",
    "control",
    "deadletter",
    "labels",
    "heartbeats",
)

_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]{0,100}$")
_HOSTPORT_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


class SettingsError(Exception):
    """A setting is missing or wrong; the message names the variable and the problem."""


class Settings(BaseSettings):
    """Process settings. Construct directly in tests; use :func:`load_settings` in processes."""

    model_config = SettingsConfigDict(env_prefix="STANCH_", extra="ignore", frozen=True)

    # --- Kafka connection -------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        default=None,
        description="Comma-separated host:port list. Unset = the embedded broker on "
        "127.0.0.1:<broker_port>.",
    )
    broker_port: int = Field(default=9092, ge=1, le=65535)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    # --- Topics -------------------------------------------------------------------------
    topic_prefix: str = "stanch."
    partitions: int = Field(default=4, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1, le=10)
    retention_hours: float = Field(default=72.0, gt=0, le=24 * 365)

    # --- Worker / Faust -----------------------------------------------------------------
    app_id: str = Field(default="stanch", min_length=1, max_length=200)
    data_dir: Path = Path(".stanch-data")
    web_port: int = Field(default=6066, ge=1, le=65535)
    session_timeout_s: float = Field(
        default=10.0,
        gt=1,
        le=300,
        description="Consumer group session timeout. The first join waits about half of it "
        "on the embedded broker; Faust's default of 60 s means a 30 s start.",
    )
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)
    fetch_max_wait_ms: int = Field(
        default=50,
        ge=1,
        le=30_000,
        description="Longest a fetch waits for data. Faust hard-codes 1500 ms; the embedded "
        "broker answers a waiting fetch only when the wait ends, so every hop would cost "
        "1.5 s. 50 ms: an anomaly crosses ~4 hops before its command (100 ms: ~0.1 s more "
        "onset -> command in `stanch bench mitigate`); Kafka answers a fetch as soon as "
        "data is there, so there this only bounds idle polling (20 fetches/s).",
    )
    commit_interval_s: float = Field(default=1.0, gt=0, le=60)

    # --- Detection ---------------------------------------------------------------------
    window_s: float = Field(default=1.0, gt=0, le=3600)
    # How long (event time) a window waits for late events after it ends. Every command
    # waits for it too (the window closes end + grace), so it is a straight cost on
    # onset -> command. 0.5 s: three sidecars of one service on one partition (0.15 s
    # telemetry flush, 900 req/s) were at most 0.147 s behind the partition's newest
    # event (0 late at 0.25 s, 12 of 13,596 late at 0.1 s), and the simulator's events are
    # at most one tick (0.5 s by default) out of order, so 0.5 s drops nothing of either;
    # 2.0 s cost 1.5 s per command for nothing (bench mitigate: 0 late events at 0.5 s).
    # Producers that batch longer (a collector flushing every few seconds) need more:
    # late events are dead-lettered with reason "late", never silently dropped.
    grace_s: float = Field(default=0.5, ge=0, le=3600)
    max_clock_skew_s: float = Field(default=300.0, gt=0, le=86_400)
    series_ttl_s: float = Field(default=3600.0, gt=0, le=30 * 86_400)

    # --- Mitigation / signing ----------------------------------------------------------
    policy_file: Path | None = None
    signing_key_file: Path | None = None
    signing_kid: str | None = Field(default=None, max_length=64)
    trusted_keys_dir: Path | None = None
    # The longest lease a sidecar accepts (expires_at - issued_at). 600 s: the policy's
    # default max lease (models.policy SafeguardPolicy.max_lease_s), ten times its
    # default lease; a command asking for more is rejected with the reason in its ack.
    max_lease_s: float = Field(default=600.0, gt=0, le=86_400)

    # --- Operator control (stanch.control) -------------------------------------------
    # The worker trusts every <kid>.pub.pem here for signed control messages (a key set
    # separate from the mitigation key's). Unset: a local operator key pair in
    # <data_dir>/keys/operator, generated once (usable by the CLI on the same host).
    trusted_operator_keys_dir: Path | None = None
    # The CLI signs approve/pause/resume/dry-run with this private key (+ kid, default:
    # the file name without .key.pem). Unset: the local operator key of data_dir.
    operator_key_file: Path | None = None
    operator_kid: str | None = Field(default=None, max_length=64)
    # A control message whose `at` is older than this when it reaches the decider is
    # dead-lettered as expired (a captured message cannot be replayed later). 600 s: a
    # worker restart or a rebalance takes well under a minute; an operator whose
    # message sat on the topic longer than this, with no worker running, sends it again.
    control_max_age_s: float = Field(default=600.0, gt=0, le=86_400)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        parts = [p.strip() for p in value.split(",") if p.strip()]
        for part in parts:
            if not _HOSTPORT_RE.match(part):
                raise ValueError(f"{part!r} is not host:port")
            port = int(part.rsplit(":", 1)[1])
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} in {part!r} is out of range 1..65535")
        return ",".join(parts)

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.match(value):
            raise ValueError("only letters, digits, '.', '_' and '-' (at most 100) are allowed")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.security_protocol.startswith("SASL"):
            if not self.sasl_mechanism:
                raise ValueError("STANCH_SASL_MECHANISM is required with a SASL protocol")
            if not (self.sasl_username and self.sasl_password):
                raise ValueError(
                    "STANCH_SASL_USERNAME and STANCH_SASL_PASSWORD are required with SASL"
                )
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise ValueError(
                "STANCH_HEARTBEAT_INTERVAL_S must be at most a third of STANCH_SESSION_TIMEOUT_S"
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "policy_file",
                     "signing_key_file", "operator_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"STANCH_{name.upper()}: file {str(path)!r} does not exist")
        if self.trusted_keys_dir is not None and not Path(self.trusted_keys_dir).is_dir():
            raise ValueError(
                f"STANCH_TRUSTED_KEYS_DIR: directory {str(self.trusted_keys_dir)!r} does not exist"
            )
        ops = self.trusted_operator_keys_dir
        if ops is not None and not Path(ops).is_dir():
            raise ValueError(
                f"STANCH_TRUSTED_OPERATOR_KEYS_DIR: directory {str(ops)!r} does not exist"
            )
        return self

    # --- Derived values ----------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """True when no bootstrap server is configured: the embedded broker is used."""
        return self.kafka_bootstrap is None

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.broker_port}"

    def topic(self, name: str) -> str:
        """Full topic name for a logical name of DESIGN.md (``requests`` -> ``stanch.requests``)."""
        if name not in TOPIC_NAMES:
            raise KeyError(f"unknown topic {name!r}; known: {', '.join(TOPIC_NAMES)}")
        return f"{self.topic_prefix}{name}"

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Connection keyword arguments for AIOKafkaProducer / AIOKafkaConsumer / admin."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return kwargs


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        name = f"STANCH_{loc.upper()}" if loc else "settings"
        value = item.get("input")
        shown = "" if isinstance(value, dict) or loc == "" else f" (got {value!r})"
        lines.append(f"{name}{shown}: {item['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


#: STANCH_* variables that are not settings: the environment of a rollback hook
#: (app/sidecar/rollback.py) and the test suite's switch (tests/kafka.py).
OTHER_ENV_VARS = frozenset(
    {"STANCH_TARGET_VERSION", "STANCH_COMMAND_ID", "STANCH_SERVICE", "STANCH_TEST_NO_DOCKER"}
)


def unknown_env_vars(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``STANCH_*`` names in ``environ`` that no setting reads, each with the closest
    known name (None when nothing is close): a typo is otherwise silently ignored."""
    known = {f"STANCH_{name.upper()}" for name in Settings.model_fields} | OTHER_ENV_VARS
    suffixes = sorted(k[len("STANCH_"):] for k in known)  # the shared prefix is no evidence
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith("STANCH_") and upper not in known:
            close = difflib.get_close_matches(upper[len("STANCH_"):], suffixes, n=1, cutoff=0.6)
            out.append((name, f"STANCH_{close[0]}" if close else None))
    return out


def describe_unknown(unknown: list[tuple[str, str | None]]) -> str:
    """One line naming every unknown variable and its closest known name."""
    names = ", ".join(f"{name} (did you mean {close}?)" if close else name
                      for name, close in unknown)
    return f"ignoring unknown environment variable(s): {names}"


_warned_unknown = False


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment; raise :class:`SettingsError` with a clear message.

    Unknown ``STANCH_*`` variables are reported once per process, as one warning line."""
    global _warned_unknown
    if not _warned_unknown:
        _warned_unknown = True
        unknown = unknown_env_vars(os.environ)
        if unknown:
            logging.getLogger(__name__).warning("%s", describe_unknown(unknown))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
