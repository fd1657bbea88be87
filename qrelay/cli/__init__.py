"""The `qrelay` command: run a broker or an executor, or a whole dev stack; inspect jobs.

Servers (`broker serve`, `executor serve`, `dev`) run until SIGINT/SIGTERM and
then shut down cleanly with exit code 0. Client commands (`backends`, `jobs
...`) take `--broker` (env QRELAY_BROKER) and `--token-file` (env
QRELAY_TOKEN_FILE, or QRELAY_TOKEN itself) and speak through the client SDK.
Secrets are never taken as flags: a process's arguments are readable by
every user of the host. Errors print `CODE: message` and exit 1;
bad settings exit 2.

One module per command group (broker, executor, dev, backends, jobs, programs,
sessions) over `_shared`; this one assembles them into `app`.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

# qrelay starts subprocesses only with fork+exec (sandboxes), never a bare
# fork, so gRPC's fork handlers are not needed; without this, gRPC logs
# "skipping fork() handlers" each time a sandbox starts while calls are live.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from qrelay.cli import admin, backends, broker, dev, executor, jobs, programs, sessions
from qrelay.logging import configure_logging
from qrelay.logging import safe_dsn as _redacted

app = typer.Typer(
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
app.add_typer(admin.admin_app, name="admin")


@app.callback()
def main(
    log_level: Annotated[
        str, typer.Option(envvar="QRELAY_LOG_LEVEL", help="debug, info, warning or error.")
    ] = "info",
    log_json: Annotated[
        bool | None,
        typer.Option(
            "--log-json/--log-pretty",
            help="Log format; default JSON unless stderr is a terminal (env QRELAY_LOG_JSON).",
        ),
    ] = None,
) -> None:
    """Configure logging once for whichever command runs."""
    configure_logging(log_level, log_json)


__all__ = ["_redacted", "app"]
