"""`qrelay programs upload|list|show|delete|run`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from qrelay.cli._shared import (
    DONE,
    BrokerAddr,
    Token,
    Typer,
    _broker,
    _fail,
    _print_rows,
    _run,
    _service,
    _state,
    _ts_short,
    console,
)
from qrelay.cli.jobs import _print_event, _short_json

programs_app = Typer(help="Upload, list, inspect, delete and run programs.", no_args_is_help=True)


def _program_rows(proto: Any) -> list[tuple[str, str]]:
    from qrelay.client.programs import Program

    p = Program.from_proto(proto)
    created = p.created_at.strftime("%Y-%m-%d %H:%M:%S") if p.created_at else ""
    rows = [
        ("id", p.id),
        ("name", p.name),
        ("version", str(p.version)),
        ("entry point", p.entry_point),
        ("size", f"{p.size_bytes} bytes"),
        ("created", created),
    ]
    if p.description:
        rows.append(("description", p.description))
    if p.requirements:
        rows.append(("requirements", ", ".join(p.requirements)))
    if p.input_schema is not None:
        rows.append(("input schema", json.dumps(p.input_schema, sort_keys=True)))
    return rows


@programs_app.command("upload")
def programs_upload(
    directory: Annotated[Path, typer.Argument(help="The program's directory.")],
    name: Annotated[str, typer.Option(help="Program name (versions are kept per name).")],
    entry_point: Annotated[
        str, typer.Option(help="Entry point module:function, called as f(ctx, **inputs).")
    ] = "main:main",
    requirements: Annotated[
        Path | None, typer.Option(help="A requirements.txt installed for the program.")
    ] = None,
    schema: Annotated[
        Path | None, typer.Option(help="A JSON Schema file the inputs must satisfy.")
    ] = None,
    description: Annotated[str, typer.Option(help="Free text shown by list/show.")] = "",
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Pack DIRECTORY and store it; uploading the same content again changes nothing."""

    async def upload() -> Any:
        async with _service(broker, token) as service:
            return await service.upload_program(
                directory, name, entry_point, requirements, schema, description
            )

    with console.status(f"packing and uploading {directory}"):
        program = _run(upload)
    console.print(
        f"uploaded [bold]{program.name}[/] version {program.version}: {program.id} "
        f"({program.size_bytes} bytes)",
        highlight=False,
        soft_wrap=True,
    )


#: Hex digits of a program id (a content hash) shown in tables; `show` prints it whole.
SHORT_ID = 12


@programs_app.command("list")
def programs_list(
    name: Annotated[
        str | None,
        typer.Option(
            metavar="NAME", help="Every version of this name instead of the newest of each."
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the full ids, one per line.")
    ] = False,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Your programs: the newest version of each name (or every version of --name).

    Ids are content hashes, shown shortened; commands take the name instead
    (its newest version), `programs show NAME` or --quiet print them whole.
    """

    async def fetch() -> list[Any]:
        async with _broker(broker, token) as b:
            return await b.programs(name or "")

    found = _run(fetch)
    if quiet:
        for p in found:
            console.print(p.id, highlight=False, soft_wrap=True)
        return
    if not found:
        console.print("no programs yet: qrelay programs upload DIR --name NAME")
        return
    table = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=f"programs at {broker}"
    )
    table.add_column("name", overflow="fold")
    table.add_column("ver", justify="right", no_wrap=True)
    table.add_column("id", no_wrap=True)
    table.add_column("entry point", overflow="fold")
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("description", overflow="ellipsis", no_wrap=True)
    for p in found:
        table.add_row(
            p.name,
            str(p.version),
            p.id[: 2 + SHORT_ID] + "…",
            p.entry_point,
            str(p.size_bytes),
            _ts_short(p.created_at),
            p.description,
        )
    console.print(table)


@programs_app.command("show")
def programs_show(
    program: Annotated[
        str, typer.Argument(metavar="PROGRAM", help="Program id, or name for its newest version.")
    ],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """One program version: id, entry point, requirements, input schema."""

    async def fetch() -> Any:
        async with _broker(broker, token) as b:
            return await b.program(program)

    _print_rows(_program_rows(_run(fetch)))


@programs_app.command("delete")
def programs_delete(
    program: Annotated[
        str, typer.Argument(metavar="PROGRAM", help="Program id (one version) or name (all).")
    ],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Delete one version by id, or every version of a name."""

    async def delete() -> int:
        async with _broker(broker, token) as b:
            return await b.delete_program(program)

    deleted = _run(delete)
    console.print(f"deleted {deleted} version{'s' if deleted != 1 else ''} of {program}")


def _read_inputs(text: str) -> dict[str, Any]:
    """--inputs as JSON text or @file, in the qrelay value encoding (plain JSON is fine)."""
    from qrelay.errors import InvalidArgument
    from qrelay.values import decode_value

    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise InvalidArgument(f"--inputs file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
    try:
        value = decode_value(text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"--inputs: {exc.message}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"--inputs must be a JSON object of keyword arguments, got {type(value).__name__}"
        )
    return value


def _parse_tags(tags: list[str] | None) -> dict[str, str]:
    from qrelay.errors import InvalidArgument

    out: dict[str, str] = {}
    for tag in tags or []:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--tag must look like KEY=VALUE, got {tag!r}")
        out[key] = value
    return out


async def _follow(handle: Any) -> int:
    """Print a job's events live with a status line; its final state."""
    final = 0
    interims = 0
    job_id = handle.job_id()
    with console.status(f"{job_id}: waiting for an executor") as status:
        async for event in handle.stream():
            raw = event.raw
            if raw is None:
                continue
            _print_event(raw, handle.last_known)
            if event.kind == "state":
                final = raw.state.state
                status.update(f"{job_id}: {_state(final)}")
            elif event.kind == "interim":
                interims += 1
                value = _short_json(raw.interim.value_json, 60)
                status.update(f"{job_id}: RUNNING, interim {interims}: {value}")
    return final


@programs_app.command("run")
def programs_run(
    program: Annotated[
        str, typer.Argument(metavar="PROGRAM", help="Program id, or name for its newest version.")
    ],
    backend: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Backend to run beside (or take the session's)."),
    ] = None,
    inputs: Annotated[
        str, typer.Option(help="Keyword arguments as a JSON object, or @FILE holding one.")
    ] = "{}",
    session: Annotated[
        str | None, typer.Option(metavar="ID", help="Run inside this session or batch.")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option(metavar="KEY=VALUE", help="A label; repeatable.")
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch/--no-watch", help="Follow interim values, logs and result.")
    ] = False,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Run a program; prints the job id, or with --watch follows it to its result.

    With --watch exits 0 when the job is DONE, 1 when it FAILED or was CANCELLED.
    """

    if not backend and not session:
        _fail("give --backend NAME to run beside, or --session ID to run in a session", 2)

    async def submit() -> tuple[str, int]:
        arguments = _read_inputs(inputs)
        tags = _parse_tags(tag)
        async with _service(broker, token) as service:
            mode = await service.session(session) if session else None
            if mode is not None and backend and backend != mode.backend_name:
                _fail(
                    f"--backend {backend} differs from {mode.backend_name}, the backend of "
                    f"--session {session}; give only one of them",
                    2,
                )
            run_on = None if mode is not None else backend
            handle = await service.run(program, arguments, backend=run_on, mode=mode, tags=tags)
            console.print(
                f"submitted {handle.job_id()} ({program} on {handle.backend_name})",
                highlight=False,
                soft_wrap=True,
            )
            return handle.job_id(), await _follow(handle) if watch else 0

    _job_id, final = _run(submit)
    if watch:
        raise typer.Exit(0 if final == DONE else 1)
