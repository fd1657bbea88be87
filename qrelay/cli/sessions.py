"""`qrelay sessions create|list|show|close|cancel` (broker calls only: no Qiskit)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.table import Table

from qrelay.cli._shared import (
    BrokerAddr,
    Token,
    Typer,
    _broker,
    _fail,
    _print_rows,
    _run,
    console,
)

if TYPE_CHECKING:
    from qrelay._proto.v1 import sessions_pb2

sessions_app = Typer(
    help="Create, list, inspect, close and cancel sessions and batches.", no_args_is_help=True
)

_STATE_STYLE = {"OPEN": "yellow", "ACTIVE": "cyan", "CLOSED": "green"}
_SESSION_STATES = ("open", "active", "closed", "cancelled", "expired")


def _details(s: sessions_pb2.Session) -> dict[str, Any]:
    from qrelay.client.session import session_details

    return session_details(s)


def _styled(state: str) -> str:
    state = state.upper()
    return f"[{_STATE_STYLE.get(state, 'magenta')}]{state}[/]"


def _session_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    def when(value: Any) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""

    jobs = d["jobs"]
    return [
        ("id", d["id"]),
        ("backend", d["backend_name"]),
        ("mode", d["mode"]),
        ("state", _styled(d["state"]) + (f"  {d['state_reason']}" if d["state_reason"] else "")),
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


def _session_command(session_id: str, broker: str, token: Path | None, action: str) -> None:
    async def call() -> sessions_pb2.Session:
        async with _broker(broker, token) as b:
            if action == "close":
                return await b.close_session(session_id)
            if action == "cancel":
                return await b.cancel_session(session_id)
            return await b.session(session_id)

    _print_rows(_session_rows(_details(_run(call))))


SessionId = Annotated[str, typer.Argument(metavar="SESSION_ID", help="The session's id.")]


@sessions_app.command("create")
def sessions_create(
    backend: Annotated[
        str, typer.Option(metavar="NAME", help="Backend the session's jobs run on.")
    ],
    max_time: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Longest life: seconds or e.g. '1h 30m' (default: the broker's).",
        ),
    ] = None,
    max_idle: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Close after this long without a job (default: the broker's).",
        ),
    ] = None,
    batch: Annotated[bool, typer.Option(help="A batch: grouped jobs, no pinning.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the new session's id.")
    ] = False,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Open a session (or --batch) for `programs run --session ID`.

    With --quiet prints the id alone: SESSION=$(qrelay sessions create --backend aer -q)
    """

    async def create() -> sessions_pb2.Session:
        async with _broker(broker, token) as b:
            return await b.create_session(backend, max_time, max_idle, batch=batch)

    created = _run(create)
    if quiet:
        typer.echo(created.id)
        return
    _print_rows(_session_rows(_details(created)))


@sessions_app.command("list")
def sessions_list(
    state: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Only sessions in this state ({', '.join(_SESSION_STATES)}); repeatable."
        ),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(metavar="NAME", help="Only sessions on this backend.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, metavar="N", help="At most this many sessions, newest first.")
    ] = 20,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the session ids, one per line.")
    ] = False,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Your newest sessions and batches, with their state and job counts (live: queued or
    running); `sessions show ID` for times and the pinned executor."""
    from qrelay._proto.v1 import sessions_pb2

    states = []
    for name in state or []:
        key = name.strip().lower()
        if key not in _SESSION_STATES:
            _fail(f"--state {name!r} is not a session state; use {', '.join(_SESSION_STATES)}", 2)
        states.append(sessions_pb2.SessionState.Value(f"SESSION_STATE_{key.upper()}"))

    async def fetch() -> list[sessions_pb2.Session]:
        async with _broker(broker, token) as b:
            return await b.sessions(limit, states=states, backend=backend or "")

    found = _run(fetch)
    if quiet:
        for s in found:
            console.print(s.id, highlight=False, soft_wrap=True)
        return
    if not found:
        console.print("no sessions" + (" match" if states or backend else ""))
        return
    table = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=f"sessions at {broker}"
    )
    table.add_column("id", no_wrap=True)
    table.add_column("mode", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("backend", overflow="fold")
    table.add_column("jobs", justify="right", no_wrap=True)
    for s in found:
        d = _details(s)
        jobs = d["jobs"]
        active = jobs["queued"] + jobs["running"]
        table.add_row(
            s.id,
            "batch" if d["mode"] == "batch" else "session",
            _styled(d["state"]),
            s.backend,
            f"{jobs['total']}" + (f" ({active} live)" if active else ""),
        )
    console.print(table)


@sessions_app.command("show")
def sessions_show(
    session_id: SessionId,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """A session's state, pinned executor, times and job counts."""
    _session_command(session_id, broker, token, "show")


@sessions_app.command("close")
def sessions_close(
    session_id: SessionId,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Refuse new jobs; the ones already submitted finish."""
    _session_command(session_id, broker, token, "close")


@sessions_app.command("cancel")
def sessions_cancel(
    session_id: SessionId,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Close the session and cancel every unfinished job of it."""
    _session_command(session_id, broker, token, "cancel")
