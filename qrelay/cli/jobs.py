"""`qrelay jobs list|show|cancel|watch|delete`, and how a job's events and result print."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from qrelay.cli._shared import (
    _KIND_NAMES,
    DONE,
    BrokerAddr,
    Token,
    _code_name,
    _run,
    _service,
    _state,
    _styled_state,
    _ts,
    console,
)

if TYPE_CHECKING:
    from qrelay._proto.v1 import jobs_pb2, types_pb2

jobs_app = typer.Typer(help="List, inspect, cancel and follow jobs.", no_args_is_help=True)


@jobs_app.command("list")
def jobs_list(
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
    state: Annotated[
        list[str] | None, typer.Option(help="Only these states (queued, running, done, ...).")
    ] = None,
    backend: Annotated[str | None, typer.Option(help="Only jobs for this backend.")] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(help="Only jobs carrying this tag key (repeat: every one of them)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many jobs, newest first.")] = 20,
) -> None:
    """Your newest jobs."""

    async def fetch() -> list[jobs_pb2.Job]:
        async with _service(broker, token) as service:
            found = await service.jobs(limit, state=state or None, backend=backend, tags=tag)
            return [j.last_known for j in found]

    found = _run(fetch)
    table = Table(title=f"jobs at {broker}")
    for column in ("id", "state", "kind", "backend", "attempts", "created", "executor"):
        table.add_column(column, no_wrap=column in ("id", "state"))
    for job in found:
        table.add_row(
            job.id,
            _styled_state(job.state),
            _KIND_NAMES.get(job.kind, "?"),
            job.backend,
            str(job.attempts),
            _ts(job.created_at),
            job.executor_id,
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """One job's state, timing and error or result summary."""

    async def fetch() -> tuple[jobs_pb2.Job, Any]:
        async with _service(broker, token) as service:
            handle = await service.job(job_id)
            job = handle.last_known
            result = await handle.result() if job.state == DONE else None
            return job, result

    job, result = _run(fetch)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
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
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if result is not None:
        _print_result(result)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
    reason: Annotated[str, typer.Option(help="Recorded in the CANCELLED event.")] = "",
) -> None:
    """Cancel a job in any state (a finished job stays as it is)."""

    async def cancel() -> jobs_pb2.Job:
        async with _service(broker, token) as service:
            handle = await service.job(job_id)
            await handle.cancel(reason or "cancelled from the qrelay CLI")
            return handle.last_known

    job = _run(cancel)
    console.print(f"{job.id}: {_styled_state(job.state)}", highlight=False)


@jobs_app.command("delete")
def jobs_delete(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Delete a finished job with its events and result (cancel a queued or running one first)."""

    async def delete() -> None:
        async with _service(broker, token) as service:
            await service.delete_job(job_id)

    _run(delete)
    console.print(f"{job_id}: deleted", highlight=False)


@jobs_app.command("watch")
def jobs_watch(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
    after_seq: Annotated[int, typer.Option(help="Show only events after this seq.")] = 0,
) -> None:
    """Follow a job live: state changes, interim values, logs, then the result.

    Exits 0 when the job is DONE, 1 when it FAILED or was CANCELLED.
    """

    async def follow() -> int:
        final = 0
        async with _service(broker, token) as service:
            handle = await service.job(job_id)
            with console.status(f"{job_id}: waiting for events") as status:
                async for event in handle.stream(after_seq):
                    raw = event.raw
                    if raw is None:
                        continue
                    if event.kind == "progress":
                        status.update(f"{job_id}: {_progress_bar(event.data)}")
                        continue
                    _print_event(raw, event.data)
                    if event.kind == "state":
                        final = raw.state.state
                        status.update(f"{job_id}: {_state(final)}")
        return final

    final = _run(follow)
    raise typer.Exit(0 if final == DONE else 1)


def _progress_bar(progress: Any, width: int = 24) -> str:
    """`run ██████░░░░ 12/40 pubs` for a Progress event."""
    filled = round(width * progress.fraction)
    bar = "█" * filled + "░" * (width - filled)
    return f"{progress.stage} {bar} {progress.done}/{progress.total} pubs"


def _print_event(raw: types_pb2.JobEvent, data: Any) -> None:
    when = _ts(raw.time)[11:] if raw.HasField("time") else ""
    head = f"[dim]{raw.seq:>4} {when}[/]"
    which = raw.WhichOneof("payload")
    if which == "state":
        extra = f" attempt {raw.state.attempt}" if raw.state.attempt else ""
        on = f" on {raw.state.executor_id}" if raw.state.executor_id else ""
        why = f"  {raw.state.message}" if raw.state.message else ""
        console.print(f"{head} {_styled_state(raw.state.state)}{extra}{on}{why}", highlight=False)
    elif which == "interim":
        console.print(f"{head} [blue]interim[/] {_short(data)}", highlight=False)
    elif which == "log":
        console.print(f"{head} [dim]{raw.log.stream or 'log'}[/] {raw.log.text}", highlight=False)
    elif which == "error":
        kind = f"{raw.error.type}: " if raw.error.type else ""
        console.print(
            f"{head} [red]error[/] {_code_name(raw.error.code)}: {kind}{raw.error.message}",
            highlight=False,
        )
        for line in raw.error.traceback:
            console.print(f"       {line}", highlight=False, markup=False)
    elif which == "result":
        console.print(f"{head} [green]result[/]", highlight=False)
        _print_result(data)


def _short(value: Any, limit: int = 160) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _print_result(result: Any) -> None:
    """A summary: top counts per register for Sampler, evs/stds for Estimator, else the value."""
    pubs = getattr(result, "_pub_results", None)
    if pubs is None:
        try:
            pubs = list(result) if hasattr(result, "metadata") else None
        except TypeError:
            pubs = None
    if pubs is None:
        console.print(f"       value: {_short(result, 400)}", highlight=False, markup=False)
        return
    for index, pub in enumerate(pubs):
        data = pub.data
        names = list(data.keys()) if hasattr(data, "keys") else []
        for name in names:
            field = data[name]
            if hasattr(field, "get_counts"):
                counts = field.get_counts()
                top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
                shown = ", ".join(f"{k}: {v}" for k, v in top)
                more = f" (+{len(counts) - len(top)} more)" if len(counts) > len(top) else ""
                console.print(
                    f"       pub {index} {name}: {field.num_shots} shots  {shown}{more}",
                    highlight=False,
                )
            else:
                values = field.tolist() if hasattr(field, "tolist") else field
                console.print(
                    f"       pub {index} {name}: {_short(values)}",
                    highlight=False,
                    markup=False,
                )
