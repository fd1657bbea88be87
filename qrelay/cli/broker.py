"""`qrelay broker serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import anyio
import structlog
import typer

from qrelay.cli._shared import (
    SettingsCommand,
    Typer,
    _freeze_startup_heap,
    _given,
    _reported_errors,
    _run,
    _until_signal,
    refuse_secret_flag,
    warn_loudly,
)
from qrelay.logging import safe_dsn as _redacted
from qrelay.tls import exposure

log = structlog.get_logger(__name__)

broker_app = Typer(help="Run a broker.", no_args_is_help=True)


class _Serve(SettingsCommand):
    settings = "qrelay.broker.settings:BrokerSettings"
    renamed = {
        "db": "db_path",
        "lease_ttl": "lease_ttl_s",
        "heartbeat_interval": "heartbeat_interval_s",
    }


@broker_app.command("serve", cls=_Serve)
def broker_serve(
    listen: Annotated[str | None, typer.Option(help="Address to listen on, HOST:PORT.")] = None,
    db: Annotated[Path | None, typer.Option(help="SQLite database file.")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL URL (postgresql://...) for replicas; overrides --db."),
    ] = None,
    lease_ttl: Annotated[
        float | None, typer.Option(help="Seconds a lease lives without a heartbeat.")
    ] = None,
    heartbeat_interval: Annotated[
        float | None, typer.Option(help="Seconds between executor heartbeats.")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option(help="Attempts before a job whose executors vanish FAILS.")
    ] = None,
    tokens_file: Annotated[
        Path | None,
        typer.Option(
            help="File of client tokens, one 'token=tenant' per line (env QRELAY_TOKENS_FILE, "
            "or QRELAY_TOKENS itself)."
        ),
    ] = None,
    executor_token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the token executors must present (env "
            "QRELAY_EXECUTOR_TOKEN_FILE, or QRELAY_EXECUTOR_TOKEN itself)."
        ),
    ] = None,
    tokens: Annotated[str | None, typer.Option(hidden=True)] = None,
    executor_token: Annotated[str | None, typer.Option(hidden=True)] = None,
    default_tenant: Annotated[
        str | None, typer.Option(help="Tenant of callers when no tokens are configured.")
    ] = None,
    max_job_bytes: Annotated[int | None, typer.Option(help="Largest job accepted.")] = None,
    max_queued_per_tenant: Annotated[
        int | None, typer.Option(help="Queued jobs allowed per tenant.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus metrics port; 0 for none.")
    ] = None,
    metrics_host: Annotated[
        str | None,
        typer.Option(help="Host the metrics endpoint binds to (default: the --listen host)."),
    ] = None,
    metrics_token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the bearer token scrapes must send (env "
            "QRELAY_METRICS_TOKEN_FILE, or QRELAY_METRICS_TOKEN itself); none: open."
        ),
    ] = None,
    metrics_token: Annotated[str | None, typer.Option(hidden=True)] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="TLS certificate (PEM, chain first) to serve with.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            help="CA whose client certificates are required (mutual TLS): from executors on "
            "--executor-listen if given, else from every caller."
        ),
    ] = None,
    executor_listen: Annotated[
        str | None,
        typer.Option(
            help="Second address, HOST:PORT, for executors only, requiring client "
            "certificates (clients keep --listen without one)."
        ),
    ] = None,
    tenant_quotas: Annotated[
        str | None,
        typer.Option(
            help='Quotas per tenant as JSON: a "default" entry and overrides by tenant, e.g. '
            '\'{"default": {"max_queued_jobs": 1000, "max_running_jobs": 4}}\' '
            "(see the README, Quotas and usage)."
        ),
    ] = None,
    quota_period: Annotated[
        str | None,
        typer.Option(help="Period of the executor-seconds budget: day or month (UTC)."),
    ] = None,
) -> None:
    """Run a broker until SIGINT/SIGTERM. Every setting is also QRELAY_<NAME> in the
    environment (a flag wins)."""
    from qrelay.broker.server import running_broker
    from qrelay.broker.settings import BrokerSettings

    if tokens is not None:
        refuse_secret_flag("--tokens", "--tokens-file FILE or QRELAY_TOKENS")
    if executor_token is not None:
        refuse_secret_flag(
            "--executor-token", "--executor-token-file FILE or QRELAY_EXECUTOR_TOKEN"
        )
    if metrics_token is not None:
        refuse_secret_flag("--metrics-token", "--metrics-token-file FILE or QRELAY_METRICS_TOKEN")
    with _reported_errors():
        settings = BrokerSettings(
            **_given(
                listen=listen,
                db_path=db,
                database_url=database_url,
                lease_ttl_s=lease_ttl,
                heartbeat_interval_s=heartbeat_interval,
                max_attempts=max_attempts,
                tokens_file=tokens_file,
                executor_token_file=executor_token_file,
                default_tenant=default_tenant,
                max_job_bytes=max_job_bytes,
                max_queued_per_tenant=max_queued_per_tenant,
                metrics_port=metrics_port,
                metrics_host=metrics_host,
                metrics_token_file=metrics_token_file,
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_client_ca=tls_client_ca,
                executor_listen=executor_listen,
                tenant_quotas=tenant_quotas,
                quota_period=quota_period,
            )
        )
    danger = exposure(settings.listen, tls=settings.tls, tokens=bool(settings.tokens))
    if danger is not None:
        warn_loudly(f"qrelay broker serve is {danger}. Use --tls-cert/--tls-key and tokens.")
        log.warning("broker.exposed", listen=settings.listen, reason=danger)

    async def serve() -> None:
        async with running_broker(settings) as broker:
            store = _redacted(settings.database_url) if settings.database_url else settings.db_path
            log.info("broker.serving", address=broker.address, store=str(store))
            _freeze_startup_heap()
            await anyio.sleep_forever()

    _run(lambda: _until_signal(serve))
