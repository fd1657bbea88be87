"""The `qrelay` command: run a broker or an executor, or a whole dev stack; inspect jobs.

Servers (`broker serve`, `executor serve`, `dev`) run until SIGINT/SIGTERM and
then shut down cleanly with exit code 0. Client commands (`backends`, `jobs
...`, `sessions ...`, `programs ...`, `usage`) take `--broker` (env QRELAY_BROKER) and
`--token-file` (env QRELAY_TOKEN_FILE, or QRELAY_TOKEN itself); those that
only read and manage speak to the broker through `_broker` without importing
Qiskit (a call costs ~0.3 s, not ~1 s), those that upload or run go through
the client SDK.
Their TLS comes from `qrelay --tls-ca FILE ...` (or `--broker grpcs://...`).
Secrets are never taken as flags: a process's arguments are readable by
every user of the host. Errors print `CODE: message` and exit 1;
bad settings exit 2.

One module per command group (broker, executor, dev, backends, jobs, programs,
sessions, usage) over `_shared`; this one assembles them into `app`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

# qrelay starts subprocesses only with fork+exec (sandboxes), never a bare
# fork, so gRPC's fork handlers are not needed; without this, gRPC logs
# "skipping fork() handlers" each time a sandbox starts while calls are live.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from qrelay.cli import (
    _shared,
    admin,
    backends,
    broker,
    dev,
    executor,
    jobs,
    programs,
    sessions,
    usage,
)
from qrelay.cli._shared import Typer
from qrelay.logging import configure_logging
from qrelay.logging import safe_dsn as _redacted

app = Typer(
    name="qrelay",
    help="qrelay: a durable gRPC job broker for Qiskit work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(broker.broker_app, name="broker")
app.add_typer(executor.executor_app, name="executor")
app.add_typer(jobs.jobs_app, name="jobs")
app.command()(dev.dev)
app.command()(backends.backends)
app.add_typer(programs.programs_app, name="programs")
app.add_typer(sessions.sessions_app, name="sessions")
app.command()(usage.usage)
app.add_typer(admin.admin_app, name="admin")


@app.callback()
def main(
    log_level: Annotated[
        str,
        typer.Option(
            envvar="QRELAY_LOG_LEVEL", metavar="LEVEL", help="debug, info, warning or error."
        ),
    ] = "info",
    log_json: Annotated[
        bool | None,
        typer.Option(
            "--log-json/--log-pretty",
            envvar="QRELAY_LOG_JSON",
            show_default="JSON unless stderr is a terminal",
            help="Log format.",
        ),
    ] = None,
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            help="Client commands: dial the broker with TLS (also: --broker grpcs://HOST:PORT, "
            "or a CA file; env QRELAY_TLS).",
        ),
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            help="Client commands: CA file the broker's certificate must be signed by "
            "(env QRELAY_TLS_CA; default with TLS: the system roots).",
        ),
    ] = None,
    tls_client_cert: Annotated[
        Path | None,
        typer.Option(
            help="Client commands: client certificate for a broker that requires one "
            "(env QRELAY_TLS_CLIENT_CERT).",
        ),
    ] = None,
    tls_client_key: Annotated[
        Path | None,
        typer.Option(help="Client commands: its key (env QRELAY_TLS_CLIENT_KEY)."),
    ] = None,
    tls_server_name: Annotated[
        str | None,
        typer.Option(
            help="Client commands: name the broker's certificate carries, if not its host "
            "(env QRELAY_TLS_SERVER_NAME).",
        ),
    ] = None,
) -> None:
    """Configure logging once for whichever command runs, and the client commands' TLS
    (flags only: the SDK reads the QRELAY_TLS_* environment itself, so an address's
    grpc:// or grpcs:// still outranks it)."""
    configure_logging(log_level, log_json)
    _shared.client_tls_options.clear()
    _shared.client_tls_options.update(
        tls=tls,
        tls_ca=tls_ca,
        tls_cert=tls_client_cert,
        tls_key=tls_client_key,
        tls_server_name=tls_server_name,
    )


__all__ = ["_redacted", "app"]
