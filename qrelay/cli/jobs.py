"""`qrelay jobs list|show|result|logs|cancel|watch`, and how a job's events print.

Every command here only talks to the broker (`qrelay.cli._broker`) and reads
results off the wire (`qrelay.cli._results`): none imports Qiskit.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.table import Table

from qrelay.cli._shared import (
    _KIND_NAMES,
    _STATE_NAMES,
    DONE,
    BrokerAddr,
    Token,
    Typer,
    _broker,
    _code_name,
    _fail,
    _print_rows,
    _run,
    _state,
    _styled_state,
    _ts,
    _ts_short,
    console,
)

if TYPE_CHECKING:
    from qrelay._proto.v1 import jobs_pb2, types_pb2

jobs_app = Typer(
    help="List, inspect, follow and cancel jobs; print results and logs.", no_args_is_help=True
)

_STATE_CHOICES = "queued, running, done, failed, cancelled"


def _wire_states(names: list[str] | None) -> list[types_pb2.JobState.ValueType]:
    """--state values as wire states ('error' is Qiskit's name for failed)."""
    wanted = []
    by_name = {name.lower(): number for number, name in _STATE_NAMES.items()}
    for name in names or []:
        key = name.strip().lower()
        number = by_name.get("failed" if key == "error" else key)
        if number is None:
            _fail(f"--state {name!r} is not a job state; use {_STATE_CHOICES}", 2)
        wanted.append(number)
    return wanted  # type: ignore[return-value]


@jobs_app.command("list")
def jobs_list(
    state: Annotated[
        list[str] | None,
        typer.Option(help=f"Only jobs in this state ({_STATE_CHOICES}); repeatable."),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(metavar="NAME", help="Only jobs for this backend.")
    ] = None,
    session: Annotated[
        str | None, typer.Option(metavar="ID", help="Only jobs of this session or batch.")
    ] = None,
    program: Annotated[
        str | None,
        typer.Option(
            metavar="ID|NAME",
            help="Only runs of this program: an id, or a name for all its versions.",
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, metavar="N", help="At most this many jobs, newest first.")
    ] = 20,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the job ids, one per line.")
    ] = False,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Your newest jobs, filtered by state, backend, session or program."""
    states = _wire_states(state)

    async def fetch() -> list[jobs_pb2.Job]:
        async with _broker(broker, token) as b:
            return await b.jobs(
                limit,
                states=states,
                backend=backend or "",
                session_id=session or "",
                program=program or "",
            )

    found = _run(fetch)
    if quiet:
        for job in found:
            console.print(job.id, highlight=False, soft_wrap=True)
        return
    if not found:
        console.print("no jobs" + (" match" if states or backend or session or program else ""))
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=f"jobs at {broker}")
    table.add_column("id", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("backend", overflow="fold")
    table.add_column("created", no_wrap=True)
    for job in found:
        table.add_row(
            job.id,
            _styled_state(job.state),
            _KIND_NAMES.get(job.kind, "?"),
            job.backend,
            _ts_short(job.created_at),
        )
    console.print(table)


def _job_rows(job: jobs_pb2.Job) -> list[tuple[str, str]]:
    rows = [
        ("id", job.id),
        ("state", _styled_state(job.state)),
        ("kind", _KIND_NAMES.get(job.kind, "?")),
        ("backend", job.backend),
        ("attempts", str(job.attempts)),
        ("created", _ts(job.created_at)),
        ("started", _ts(job.started_at)),
        ("finished", _ts(job.finished_at)),
        ("executor", job.executor_id),
        ("pubs", str(job.num_pubs)),
    ]
    if job.queue_position:
        rows.append(("queue position", str(job.queue_position)))
    if job.session_id:
        rows.append(("session", job.session_id))
    if job.tags:
        rows.append(("tags", ", ".join(f"{k}={v}" for k, v in sorted(job.tags.items()))))
    if job.HasField("error"):
        rows.append(("error", f"[red]{_code_name(job.error.code)}[/]: {job.error.message}"))
    return rows


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """One job's state, timing and error, and a summary of its result when DONE."""

    async def fetch() -> tuple[jobs_pb2.Job, types_pb2.JobResult | None]:
        async with _broker(broker, token) as b:
            job = await b.job(job_id)
            return job, await b.result(job_id) if job.state == DONE else None

    job, result = _run(fetch)
    _print_rows(_job_rows(job))
    if result is not None:
        from qrelay.cli._results import print_summary, result_document

        console.print("[bold]result[/]  (qrelay jobs result ID --json for all of it)")
        print_summary(result_document(job, result), console, indent="  ")


@jobs_app.command("result")
def jobs_result(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id.")],
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the whole result as JSON (shape in docs/cli.md)."),
    ] = False,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """A DONE job's result: per pub the top counts or the values, and the metadata.

    A FAILED job exits 1 with its error; an unfinished one exits 1 saying so.
    """
    from qrelay.cli._results import print_summary, result_document

    async def fetch() -> tuple[jobs_pb2.Job, types_pb2.JobResult | None]:
        async with _broker(broker, token) as b:
            job = await b.job(job_id)
            return job, await b.result(job_id) if job.state == DONE else None

    job, result = _run(fetch)
    if result is None:
        if job.HasField("error"):
            _fail(
                f"job {job.id} {_state(job.state)}: {_code_name(job.error.code)}: "
                f"{job.error.message}"
            )
        _fail(f"job {job.id} is {_state(job.state)}, it has no result yet (qrelay jobs watch ID)")
    doc = result_document(job, result)
    if as_json:
        typer.echo(json.dumps(doc, indent=2, allow_nan=False))
        return
    print_summary(doc, console)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id.")],
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep printing new lines until the job ends."),
    ] = False,
    prefix: Annotated[
        bool,
        typer.Option("--prefix", help="Start each line with its time and stream."),
    ] = False,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """A program job's log lines (its stdout, stderr and ctx.log), in order."""

    async def show() -> None:
        async with _broker(broker, token) as b:
            job = await b.job(job_id)
            until = None if follow else job.last_seq
            async for event in b.events(job_id, 0, until_seq=until):
                if event.WhichOneof("payload") == "log":
                    _print_log_line(event, prefix)

    _run(show)


def _print_log_line(event: types_pb2.JobEvent, prefix: bool) -> None:
    line = event.log
    if prefix:
        stream = line.stream or "log"
        if stream == "log" and line.level:
            stream = f"log:{_LEVELS.get(line.level, 'info')}"
        when = _ts(event.time)[11:] if event.HasField("time") else ""
        console.print(f"{when} {stream:<11} {line.text}", highlight=False, markup=False)
    else:
        console.print(line.text, highlight=False, markup=False, soft_wrap=True)


_LEVELS = {1: "debug", 2: "info", 3: "warning", 4: "error"}


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id.")],
    reason: Annotated[str, typer.Option(help="Recorded in the CANCELLED event.")] = "",
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Cancel a job in any state (a finished job stays as it is)."""

    async def cancel() -> jobs_pb2.Job:
        async with _broker(broker, token) as b:
            return await b.cancel(job_id, reason or "cancelled from the qrelay CLI")

    job = _run(cancel)
    console.print(f"{job.id}: {_styled_state(job.state)}", highlight=False)


@jobs_app.command("watch")
def jobs_watch(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id.")],
    after_seq: Annotated[
        int, typer.Option(metavar="SEQ", help="Show only events after this seq.")
    ] = 0,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Follow a job live: state changes, interim values, logs, then the result.

    Exits 0 when the job is DONE, 1 when it FAILED or was CANCELLED.
    """

    async def follow() -> int:
        final = 0
        async with _broker(broker, token) as b:
            job = await b.job(job_id)
            with console.status(f"{job_id}: waiting for events") as status:
                async for event in b.events(job_id, after_seq):
                    if event.WhichOneof("payload") == "progress":
                        status.update(f"{job_id}: {_progress_bar(event.progress)}")
                        continue
                    _print_event(event, job)
                    if event.WhichOneof("payload") == "state":
                        final = event.state.state
                        status.update(f"{job_id}: {_state(final)}")
        return final

    final = _run(follow)
    raise typer.Exit(0 if final == DONE else 1)


def _progress_bar(progress: Any, width: int = 24) -> str:
    """`run ██████░░░░ 12/40 pubs` for a Progress event."""
    fraction = progress.done / progress.total if progress.total else 0.0
    filled = round(width * min(max(fraction, 0.0), 1.0))
    bar = "█" * filled + "░" * (width - filled)
    return f"{progress.stage} {bar} {progress.done}/{progress.total} pubs"


def _print_event(raw: types_pb2.JobEvent, job: jobs_pb2.Job) -> None:
    when = _ts(raw.time)[11:] if raw.HasField("time") else ""
    head = f"[dim]{raw.seq:>4} {when}[/]"
    which = raw.WhichOneof("payload")
    if which == "state":
        extra = f" attempt {raw.state.attempt}" if raw.state.attempt else ""
        on = f" on {raw.state.executor_id}" if raw.state.executor_id else ""
        why = f"  {raw.state.message}" if raw.state.message else ""
        console.print(f"{head} {_styled_state(raw.state.state)}{extra}{on}{why}", highlight=False)
    elif which == "interim":
        console.print(f"{head} [blue]interim[/] {_short_json(raw.interim.value_json)}")
    elif which == "log":
        console.print(f"{head} [dim]{raw.log.stream or 'log'}[/] ", end="", highlight=False)
        console.print(raw.log.text, highlight=False, markup=False)
    elif which == "error":
        kind = f"{raw.error.type}: " if raw.error.type else ""
        console.print(
            f"{head} [red]error[/] {_code_name(raw.error.code)}: ", end="", highlight=False
        )
        console.print(f"{kind}{raw.error.message}", highlight=False, markup=False)
        for line in raw.error.traceback:
            console.print(f"       {line}", highlight=False, markup=False)
    elif which == "result":
        from qrelay.cli._results import print_summary, result_document

        console.print(f"{head} [green]result[/]", highlight=False)
        print_summary(result_document(job, raw.result), console, indent="       ")


def _short_json(text: str, limit: int = 160) -> str:
    from rich.markup import escape

    with contextlib.suppress(ValueError):
        text = json.dumps(json.loads(text))
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")
