"""`qrelay sessions create|show|close|cancel`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from qrelay.cli._shared import BrokerAddr, Token, _print_rows, _run, _service

sessions_app = typer.Typer(help="Create, inspect, close and cancel sessions.", no_args_is_help=True)


def _session_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    def when(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""

    state = d["state"].upper()
    style = {"OPEN": "yellow", "ACTIVE": "cyan", "CLOSED": "green"}.get(state, "magenta")
    jobs = d["jobs"]
    rows = [
        ("id", d["id"]),
        ("backend", d["backend_name"]),
        ("mode", d["mode"]),
        ("state", f"[{style}]{state}[/]" + (f"  {d['state_reason']}" if d["state_reason"] else "")),
        ("accepting jobs", "yes" if d["accepting_jobs"] else "no"),
        ("executor", d["executor_id"]),
        ("max time", f"{d['max_time']} s"),
        ("max idle", f"{d['interactive_timeout']} s"),
        ("created", when(d["created_at"])),
        ("activated", when(d["activated_at"])),
        ("last job", when(d["last_job_at"])),
        ("closed", when(d["closed_at"])),
        (
            "jobs",
            f"{jobs['total']} total: {jobs['queued']} queued, {jobs['running']} running, "
            f"{jobs['done']} done, {jobs['failed']} failed, {jobs['cancelled']} cancelled",
        ),
    ]
    return rows


def _session_command(session_id: str, broker: str, token: Path | None, action: str) -> None:
    async def call() -> dict[str, Any]:
        async with _service(broker, token) as service:
            handle = await service.session(session_id)
            if action == "close":
                await handle.close()
            elif action == "cancel":
                await handle.cancel()
            return await handle.details()

    _print_rows(_session_rows(_run(call)))


@sessions_app.command("create")
def sessions_create(
    backend: Annotated[str, typer.Option(help="Backend the session's jobs run on.")],
    max_time: Annotated[
        str | None, typer.Option(help="Longest life, seconds or e.g. '1h 30m' (broker default).")
    ] = None,
    max_idle: Annotated[
        str | None, typer.Option(help="Close after this long without a job (broker default).")
    ] = None,
    batch: Annotated[bool, typer.Option(help="A batch: grouped jobs, no pinning.")] = False,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Open a session (or --batch); prints its id for `programs run --session`."""

    async def create() -> dict[str, Any]:
        async with _service(broker, token) as service:
            handle = await service.create_session(backend, max_time, max_idle=max_idle, batch=batch)
            return await handle.details()

    _print_rows(_session_rows(_run(create)))


@sessions_app.command("show")
def sessions_show(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """A session's state, pinned executor, times and job counts."""
    _session_command(session_id, broker, token, "show")


@sessions_app.command("close")
def sessions_close(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Refuse new jobs; the ones already submitted finish."""
    _session_command(session_id, broker, token, "close")


@sessions_app.command("cancel")
def sessions_cancel(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Close the session and cancel every unfinished job of it."""
    _session_command(session_id, broker, token, "cancel")
