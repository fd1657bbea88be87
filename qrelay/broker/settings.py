"""Broker configuration: one pydantic-settings object, every field also `QRELAY_<NAME>`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIB = 1024 * 1024


def parse_tokens(value: str) -> dict[str, str]:
    """`"tok1=tenantA,tok2=tenantB"` (or one `token=tenant` per line, `#` comments)
    -> {"tok1": "tenantA", "tok2": "tenantB"}. A malformed entry is named by its
    position, never shown: it may be a secret."""
    tokens: dict[str, str] = {}
    entries = [line.split("#", 1)[0] for line in value.splitlines()]
    items = [item.strip() for entry in entries for item in entry.split(",")]
    for position, item in enumerate((i for i in items if i), start=1):
        token, sep, tenant = item.partition("=")
        if not sep or not token.strip() or not tenant.strip():
            raise ValueError(
                f"tokens entry {position} is not of the form token=tenant "
                f"({len(item)} characters, not shown)"
            )
        tokens[token.strip()] = tenant.strip()
    return tokens


def read_secret_file(path: Path, what: str) -> str:
    """A secret's text from a file (tokens never travel in argv: /proc shows it)."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


class QuotaLimits(BaseModel):
    """One entry of `tenant_quotas`: each limit None (or absent) for none.

    A tenant's entry overrides the "default" entry limit by limit: what it
    names wins (null included: no limit), the rest come from "default"."""

    model_config = ConfigDict(extra="forbid")

    max_queued_jobs: int | None = Field(default=None, ge=0)
    max_running_jobs: int | None = Field(default=None, ge=1)
    max_sessions: int | None = Field(default=None, ge=0)
    max_program_bytes: int | None = Field(default=None, ge=0)
    max_executor_seconds: float | None = Field(default=None, ge=0)

    def over(self, default: QuotaLimits) -> QuotaLimits:
        """These limits where set, else `default`'s."""
        named = self.model_dump(include=self.model_fields_set)
        return default.model_copy(update=named)


class BrokerSettings(BaseSettings):
    """Settings of one broker process; defaults work on a laptop.

    Durability: the store runs SQLite in WAL mode. `sqlite_synchronous="NORMAL"`
    (default) keeps every committed job across a process crash (kill -9), since
    the WAL is written before Submit returns; only an OS crash or power loss
    can drop the last transactions. `"FULL"` fsyncs every commit and survives
    power loss too, at a lower submit rate.

    Scale-out: with `database_url` (e.g. `postgresql://postgres@db:5432/qrelay`)
    the store is PostgreSQL instead, in schema `database_schema`, and any number
    of replicas may share it; they exchange hints by LISTEN/NOTIFY and re-sync
    from the database every `replica_sync_interval_s`.
    """

    # Errors never repeat a value: it may hold a token.
    model_config = SettingsConfigDict(
        env_prefix="QRELAY_", extra="ignore", hide_input_in_errors=True
    )

    listen: str = "127.0.0.1:50051"
    db_path: Path = Path(".qrelay/broker.db")
    lease_ttl_s: float = 10.0
    heartbeat_interval_s: float = 2.0
    max_attempts: int = 3
    max_job_bytes: int = 8 * MIB
    max_queued_per_tenant: int = 10_000
    # Fair share between tenants per backend: a tenant of weight w gets w shares
    # of the slots (absent tenants weigh 1), e.g. QRELAY_TENANT_WEIGHTS='{"lab": 2}'.
    tenant_weights: dict[str, float] = {}
    # Quotas per tenant: "default" for every tenant, plus overrides by tenant
    # name, e.g. QRELAY_TENANT_QUOTAS='{"default": {"max_queued_jobs": 1000,
    # "max_running_jobs": 4}, "lab": {"max_running_jobs": 16}}' (see
    # `QuotaLimits` and the README's "Quotas and usage").
    tenant_quotas: dict[str, QuotaLimits] = {}
    # The executor-seconds budget's period: a calendar "day" or "month", UTC.
    quota_period: Literal["day", "month"] = "month"
    # JobService.RunStream: jobs one stream follows at once (more wait unread).
    max_stream_jobs: int = 1024
    tokens: Annotated[dict[str, str], NoDecode] = {}
    # Files holding them (`token=tenant` per line; the executor token alone):
    # secrets come from files or the environment, never from argv.
    tokens_file: Path | None = None
    executor_token: str | None = None
    executor_token_file: Path | None = None
    default_tenant: str = "default"
    # TLS (see qrelay.tls): certificate and key PEM files turn TLS on. With a
    # client CA, peers must present a certificate it signed: on `listen` itself
    # (everyone, clients too), or, with `executor_listen`, only on that second
    # port, and ExecutorService accepts only peers with a verified certificate.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    executor_listen: str | None = None
    # Prometheus: HOST defaults to the listen host (never 0.0.0.0 unless asked);
    # with a token (file or QRELAY_METRICS_TOKEN) scrapes need `Authorization: Bearer`.
    # Identity (`qrelay.broker.identity`): the HMAC key store tokens are hashed
    # with, from a file or QRELAY_IDENTITY_KEY (never a flag). With SQLite and
    # neither, `identity.key` beside the database is generated and used.
    identity_key_file: Path | None = None
    identity_key: Annotated[str | None, Field(repr=False)] = None
    metrics_port: int = 0
    metrics_host: str | None = None
    metrics_token: str | None = None
    metrics_token_file: Path | None = None
    shutdown_grace_s: float = 10.0
    sqlite_synchronous: str = "NORMAL"
    database_url: str | None = None
    database_schema: str = "qrelay"
    replica_sync_interval_s: float = 2.0
    # Programs: largest archive accepted by ProgramService.Upload.
    max_program_bytes: int = 20 * MIB
    # Sessions: defaults for a Create that leaves max_time_s/max_idle_s at 0,
    # caps for ones that ask for more, and how often the expiry reaper looks.
    session_max_time_s: int = 8 * 3600
    session_max_idle_s: int = 300
    session_max_time_cap_s: int = 24 * 3600
    session_max_idle_cap_s: int = 24 * 3600
    session_check_interval_s: float = 1.0

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_tokens(value)
        return value

    @model_validator(mode="after")
    def _secrets_from_files(self) -> BrokerSettings:
        if self.tokens_file is not None:
            text = read_secret_file(self.tokens_file, "tokens_file")
            self.tokens = {**self.tokens, **parse_tokens(text)}
        if self.executor_token_file is not None:
            text = read_secret_file(self.executor_token_file, "executor_token_file").strip()
            if not text:
                raise ValueError(f"executor_token_file {self.executor_token_file} is empty")
            self.executor_token = text
        if self.metrics_token_file is not None:
            text = read_secret_file(self.metrics_token_file, "metrics_token_file").strip()
            if not text:
                raise ValueError(f"metrics_token_file {self.metrics_token_file} is empty")
            self.metrics_token = text
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> BrokerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.executor_listen is not None and self.tls_client_ca is None:
            raise ValueError(
                "executor_listen is the mutual-TLS port for executors: it needs tls_client_ca"
            )
        return self

    @property
    def tls(self) -> bool:
        """True if the broker serves TLS."""
        return self.tls_cert is not None

    @property
    def metrics_bind_host(self) -> str:
        """Where /metrics listens: metrics_host, else the host of `listen`."""
        if self.metrics_host:
            return self.metrics_host
        host = self.listen.rsplit(":", 1)[0].strip("[]")
        return host or "127.0.0.1"

    @field_validator("tenant_quotas", mode="before")
    @classmethod
    def _quotas_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):  # the CLI flag; the environment arrives decoded
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"tenant_quotas is not JSON ({exc.msg} at character {exc.pos}); expected "
                    '{"default": {"max_queued_jobs": 100, ...}, "<tenant>": {...}}'
                ) from None
        return value

    @field_validator("tenant_weights")
    @classmethod
    def _positive_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for tenant, weight in value.items():
            if not weight > 0:
                raise ValueError(f"tenant {tenant!r}: a weight must be > 0, got {weight}")
        return value

    @field_validator("sqlite_synchronous")
    @classmethod
    def _known_synchronous(cls, value: str) -> str:
        upper = value.upper()
        if upper not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("sqlite_synchronous must be one of OFF, NORMAL, FULL, EXTRA")
        return upper

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "database_url must be a PostgreSQL URL (postgresql://user@host:5432/db); "
                "leave it unset for the embedded SQLite store at db_path"
            )
        return value

    @field_validator("database_schema")
    @classmethod
    def _schema_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,39}", value):
            raise ValueError(
                "database_schema must be a lower-case identifier (letters, digits, underscore; "
                "at most 40 characters)"
            )
        return value

    @field_validator(
        "lease_ttl_s",
        "heartbeat_interval_s",
        "shutdown_grace_s",
        "session_check_interval_s",
        "replica_sync_interval_s",
    )
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be > 0")
        return value

    @field_validator(
        "max_attempts",
        "max_job_bytes",
        "max_queued_per_tenant",
        "max_stream_jobs",
        "max_program_bytes",
        "session_max_time_s",
        "session_max_idle_s",
        "session_max_time_cap_s",
        "session_max_idle_cap_s",
    )
    @classmethod
    def _positive_int(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value
