"""Settings of one executor process.

Every field is also an environment variable with the prefix `QRELAY_EXECUTOR_`
(`QRELAY_EXECUTOR_SLOTS=4`, `QRELAY_EXECUTOR_TOKEN=...`) and a flag of
`qrelay executor serve`. The prefix differs from the broker's `QRELAY_` so a
host running both never confuses the two; `QRELAY_EXECUTOR_TOKEN` is the same
variable the broker reads as its `executor_token`, so one secret serves both.
List fields accept JSON (`["aer","fake_manila"]`) or a comma-separated string.
Sandbox settings for program jobs (fields of
`qrelay.executor.programs.settings.SandboxSettings`) nest with `__`, e.g.
`QRELAY_EXECUTOR_SANDBOX__WALL_TIMEOUT_S=600`; the sandbox's own
`QRELAY_SANDBOX_<NAME>` variables work too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_executor_id() -> str:
    """A stable-enough id for this process: host name and pid."""
    return f"e-{socket.gethostname()}-{os.getpid()}"


class ExecutorSettings(BaseSettings):
    """What an executor serves and how it talks to the broker."""

    # Errors never repeat a value: it may hold a token.
    model_config = SettingsConfigDict(
        env_prefix="QRELAY_EXECUTOR_",
        env_nested_delimiter="__",
        extra="forbid",
        hide_input_in_errors=True,
    )

    broker: str = Field(
        default="127.0.0.1:50051",
        min_length=1,
        description=(
            "Broker address HOST:PORT; several replicas comma-separated "
            "(HOST:PORT,HOST:PORT), tried in turn when one is lost."
        ),
    )
    backends: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["aer"], description="Backend names this executor serves."
    )
    slots: int = Field(default=2, ge=1, le=1024, description="Jobs run at once.")
    backend_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Extra BackendProviders as module:attribute (besides the built-in ones and "
            "those installed under the 'qrelay.backends' entry point)."
        ),
    )
    executor_id: str = Field(
        default_factory=default_executor_id, min_length=1, description="Stable executor id."
    )
    token: str | None = Field(
        default=None, description="Executor token, sent as 'authorization: Bearer <token>'."
    )
    token_file: Path | None = Field(
        default=None,
        description="File holding the executor token (secrets never travel in argv).",
    )
    tls: bool | None = Field(
        default=None,
        description=(
            "Dial the broker with TLS (default: per address, grpcs:// is TLS; on when a "
            "CA or certificate file is given)."
        ),
    )
    tls_ca: Path | None = Field(
        default=None,
        description="CA file the broker's certificate is checked against (default: system roots).",
    )
    tls_cert: Path | None = Field(
        default=None, description="This executor's client certificate (mutual TLS)."
    )
    tls_key: Path | None = Field(default=None, description="The key of tls_cert.")
    tls_server_name: str | None = Field(
        default=None, description="Name to check the broker's certificate against, if not its host."
    )
    optimization_level: int = Field(
        default=1, ge=0, le=3, description="Transpiler optimization level."
    )
    transpile_cache_size: int = Field(
        default=256, ge=1, description="Transpiled circuits kept in memory."
    )
    reconnect_initial_s: float = Field(
        default=0.5, gt=0, description="First reconnect backoff; doubles up to reconnect_max_s."
    )
    reconnect_max_s: float = Field(default=15.0, gt=0, description="Cap of the reconnect backoff.")
    connect_timeout_s: float = Field(
        default=10.0, gt=0, description="Deadline for connecting and for the broker's Welcome."
    )
    max_message_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0, description="Largest gRPC message sent or received."
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus port; 0 for none.")
    metrics_host: str = Field(
        default="127.0.0.1", min_length=1, description="Host the Prometheus endpoint binds to."
    )
    metrics_token: str | None = Field(
        default=None, description="Bearer token scrapes of /metrics must send (none: open)."
    )
    metrics_token_file: Path | None = Field(
        default=None, description="File holding metrics_token (secrets never travel in argv)."
    )
    worker_memory_mb: int = Field(
        default=0,
        ge=0,
        description=(
            "Address-space limit of each worker process in MiB (a simulation or a bomb "
            "beyond it fails only its job); 0: three quarters of the machine's memory "
            "shared by the slots, at least 4096."
        ),
    )
    worker_nice: int = Field(
        default=2,
        ge=0,
        le=19,
        description="How much lower the worker processes' CPU priority is than the executor's.",
    )
    worker_start_timeout_s: float = Field(
        default=120.0, gt=0, description="Deadline for the worker processes to load the backends."
    )
    max_run_time_s: float = Field(
        default=86400.0,
        gt=0,
        description="Longest a primitive job may run before it is stopped and FAILED.",
    )
    max_run_time_by_backend: dict[str, float] = Field(
        default_factory=dict,
        description='Per-backend overrides of max_run_time_s, e.g. {"aer": 3600}.',
    )
    programs: bool = Field(
        default=True, description="Run program jobs in sandboxes (a warm pool is kept)."
    )
    sandbox: dict[str, Any] = Field(
        default_factory=dict,
        description="Program sandbox settings (fields of SandboxSettings), nested with '__'.",
    )

    @model_validator(mode="after")
    def _token_from_file(self) -> ExecutorSettings:
        if self.token_file is not None:
            from qrelay.broker.settings import read_secret_file

            text = read_secret_file(self.token_file, "token_file").strip()
            if not text:
                raise ValueError(f"token_file {self.token_file} is empty")
            self.token = text
        if self.metrics_token_file is not None:
            from qrelay.broker.settings import read_secret_file

            text = read_secret_file(self.metrics_token_file, "metrics_token_file").strip()
            if not text:
                raise ValueError(f"metrics_token_file {self.metrics_token_file} is empty")
            self.metrics_token = text
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls is False and (self.tls_ca or self.tls_cert):
            raise ValueError("tls is off but TLS files are given")
        return self

    @property
    def broker_addresses(self) -> list[str]:
        """The broker replicas, in the order they are tried."""
        return [part.strip() for part in self.broker.split(",") if part.strip()]

    @property
    def worker_memory_bytes(self) -> int:
        """The per-worker address-space limit in bytes (resolving the 0 default)."""
        from qrelay.executor.workers import default_worker_memory_bytes

        if self.worker_memory_mb:
            return self.worker_memory_mb << 20
        return default_worker_memory_bytes(self.slots)

    def max_run_time_for(self, backend: str) -> float:
        """The maximum run time of one primitive job on `backend`, in seconds."""
        return self.max_run_time_by_backend.get(backend, self.max_run_time_s)

    @field_validator("backends", "backend_providers", mode="before")
    @classmethod
    def _split_backends(cls, value: Any) -> Any:
        """Accept 'aer,fake_manila' and a JSON list, as env vars arrive as strings."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("backends")
    @classmethod
    def _nonempty_unique(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("an executor must serve at least one backend")
        if len(set(value)) != len(value):
            raise ValueError(f"backend names must be unique, got {value}")
        return value
