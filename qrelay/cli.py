"""The `qrelay` command: run a broker or an executor, or a whole dev stack; inspect jobs.

Servers (`broker serve`, `executor serve`, `dev`) run until SIGINT/SIGTERM and
then shut down cleanly with exit code 0. Client commands (`backends`, `jobs
...`) take `--broker` (env QRELAY_BROKER) and `--token` (env QRELAY_TOKEN)
and speak through the client SDK. Errors print `CODE: message` and exit 1;
bad settings exit 2.
"""

from __future__ import annotations

import gc
import json
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import anyio
import structlog
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from qrelay.errors import DeadlineExceeded, QRelayError, exception_leaves
from qrelay.logging import configure_logging

if TYPE_CHECKING:
    from qrelay._proto.v1 import jobs_pb2, types_pb2
    from qrelay.client import AsyncQRelayService

# qrelay starts subprocesses only with fork+exec (sandboxes), never a bare
# fork, so gRPC's fork handlers are not needed; without this, gRPC logs
# "skipping fork() handlers" each time a sandbox starts while calls are live.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

log = structlog.get_logger(__name__)
console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

app = typer.Typer(
    name="qrelay",
    help="qrelay: a durable gRPC job broker for Qiskit work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
broker_app = typer.Typer(help="Run a broker.", no_args_is_help=True)
executor_app = typer.Typer(help="Run an executor beside its backends.", no_args_is_help=True)
jobs_app = typer.Typer(help="List, inspect, cancel and follow jobs.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
app.add_typer(executor_app, name="executor")
app.add_typer(jobs_app, name="jobs")

BrokerAddr = Annotated[
    str, typer.Option("--broker", envvar="QRELAY_BROKER", help="Broker address HOST:PORT.")
]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="QRELAY_TOKEN", help="Bearer token naming your tenant."),
]

_STATE_NAMES = {1: "QUEUED", 2: "RUNNING", 3: "DONE", 4: "FAILED", 5: "CANCELLED"}
_STATE_STYLE = {
    "QUEUED": "yellow",
    "RUNNING": "cyan",
    "DONE": "green",
    "FAILED": "red",
    "CANCELLED": "magenta",
}
_KIND_NAMES = {1: "sampler", 2: "estimator", 3: "program"}


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


# -- helpers -------------------------------------------------------------------


def _fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn qrelay errors and bad settings into one line and an exit code."""
    try:
        yield
    except (QRelayError, ValidationError, BaseExceptionGroup) as exc:
        for leaf in exception_leaves(exc):
            if isinstance(leaf, QRelayError):
                _fail(f"{leaf.code_name}: {leaf.message}")
            if isinstance(leaf, ValidationError):
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                    for e in leaf.errors()
                )
                _fail(f"invalid settings: {problems}", 2)
        raise


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    with _reported_errors():
        return anyio.run(fn, backend="asyncio")


def _freeze_startup_heap() -> None:
    """Move everything alive after start-up out of the garbage collector's view.

    An executor holds Qiskit, Aer and its backends: ~180k long-lived objects
    that every full collection walks (~80 ms here, with the GIL held, so a job
    or a heartbeat waits). Frozen, a full collection only sees what jobs made.
    """
    gc.collect()
    gc.freeze()


async def _executor_frozen_once_connected(executor: Any) -> None:
    """Freeze the heap once the executor is up (backends loaded, first Welcome)."""
    while True:
        try:
            await executor.wait_connected(3600)
        except DeadlineExceeded:
            continue
        _freeze_startup_heap()
        return


async def _until_signal(serve: Callable[[], Awaitable[None]]) -> None:
    """Run `serve` until it returns or SIGINT/SIGTERM arrives, then cancel it cleanly."""
    # A serving process configures logging once: each logger may keep its bound
    # form instead of rebuilding it on every call (the job path logs several times).
    structlog.configure(cache_logger_on_first_use=True)
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("shutdown.requested", signal=signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        await serve()
        tg.cancel_scope.cancel()


def _given(**values: Any) -> dict[str, Any]:
    """Only the flags the user gave, so environment variables and defaults still apply."""
    return {k: v for k, v in values.items() if v is not None}


def _service(broker: str, token: str | None) -> AsyncQRelayService:
    from qrelay.client import AsyncQRelayService

    return AsyncQRelayService(broker, token, timeout=15.0)


def _state(state: int) -> str:
    return _STATE_NAMES.get(state, "UNSPECIFIED")


def _styled_state(state: int) -> str:
    name = _state(state)
    return f"[{_STATE_STYLE.get(name, 'white')}]{name}[/]"


def _ts(value: Any) -> str:
    """A protobuf Timestamp as local 'YYYY-MM-DD HH:MM:SS', '' when unset."""
    if value is None or (value.seconds == 0 and value.nanos == 0):
        return ""
    return datetime.fromtimestamp(value.seconds + value.nanos / 1e9).strftime("%Y-%m-%d %H:%M:%S")


# -- servers -------------------------------------------------------------------


def _redacted(url: str) -> str:
    """A database URL without its password, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@broker_app.command("serve")
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
    tokens: Annotated[
        str | None, typer.Option(help="Client tokens, 'token=tenant,token2=tenant2'.")
    ] = None,
    executor_token: Annotated[
        str | None, typer.Option(help="Token executors must present.")
    ] = None,
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
) -> None:
    """Run a broker until SIGINT/SIGTERM. Every flag is also QRELAY_<NAME> in the environment."""
    from qrelay.broker.server import running_broker
    from qrelay.broker.settings import BrokerSettings

    with _reported_errors():
        settings = BrokerSettings(
            **_given(
                listen=listen,
                db_path=db,
                database_url=database_url,
                lease_ttl_s=lease_ttl,
                heartbeat_interval_s=heartbeat_interval,
                max_attempts=max_attempts,
                tokens=tokens,
                executor_token=executor_token,
                default_tenant=default_tenant,
                max_job_bytes=max_job_bytes,
                max_queued_per_tenant=max_queued_per_tenant,
                metrics_port=metrics_port,
            )
        )

    async def serve() -> None:
        async with running_broker(settings) as broker:
            store = _redacted(settings.database_url) if settings.database_url else settings.db_path
            log.info("broker.serving", address=broker.address, store=str(store))
            _freeze_startup_heap()
            await anyio.sleep_forever()

    _run(lambda: _until_signal(serve))


def _executor_settings(**flags: Any) -> Any:
    from qrelay.executor.settings import ExecutorSettings

    values = _given(**flags)
    if (
        "broker" not in values
        and "QRELAY_EXECUTOR_BROKER" not in os.environ
        and os.environ.get("QRELAY_BROKER")
    ):
        values["broker"] = os.environ["QRELAY_BROKER"]
    return ExecutorSettings(**values)


@executor_app.command("serve")
def executor_serve(
    broker: Annotated[
        str | None,
        typer.Option(
            help="Broker address HOST:PORT (env QRELAY_EXECUTOR_BROKER or QRELAY_BROKER)."
        ),
    ] = None,
    backend: Annotated[
        list[str] | None, typer.Option(help="Backend to serve (repeat for several).")
    ] = None,
    slots: Annotated[int | None, typer.Option(help="Jobs run at once.")] = None,
    executor_id: Annotated[str | None, typer.Option(help="Stable executor id.")] = None,
    token: Annotated[
        str | None, typer.Option(help="Executor token (env QRELAY_EXECUTOR_TOKEN).")
    ] = None,
    optimization_level: Annotated[
        int | None, typer.Option(help="Transpiler optimization level 0-3.")
    ] = None,
    transpile_cache_size: Annotated[
        int | None, typer.Option(help="Transpiled circuits kept in memory.")
    ] = None,
    reconnect_initial: Annotated[
        float | None, typer.Option(help="First reconnect backoff in seconds.")
    ] = None,
    reconnect_max: Annotated[float | None, typer.Option(help="Reconnect backoff cap.")] = None,
    connect_timeout: Annotated[
        float | None, typer.Option(help="Deadline for connecting and for the Welcome.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus metrics port; 0 for none.")
    ] = None,
    programs: Annotated[
        bool | None,
        typer.Option(
            "--programs/--no-programs", help="Run program jobs in sandboxes (default: yes)."
        ),
    ] = None,
) -> None:
    """Run an executor until SIGINT/SIGTERM. Every flag is also QRELAY_EXECUTOR_<NAME>."""
    from qrelay.executor.agent import Executor

    with _reported_errors():
        settings = _executor_settings(
            broker=broker,
            backends=backend or None,
            slots=slots,
            executor_id=executor_id,
            token=token,
            optimization_level=optimization_level,
            transpile_cache_size=transpile_cache_size,
            reconnect_initial_s=reconnect_initial,
            reconnect_max_s=reconnect_max,
            connect_timeout_s=connect_timeout,
            metrics_port=metrics_port,
            programs=programs,
        )
    executor = Executor(settings)

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_executor_frozen_once_connected, executor)
            await executor.run()
            tg.cancel_scope.cancel()

    _run(lambda: _until_signal(serve))


@app.command()
def dev(
    port: Annotated[
        int, typer.Option(help="Broker port on 127.0.0.1; 0 picks a free one.")
    ] = 50051,
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the SQLite database lives.")
    ] = Path(".qrelay"),
    backend: Annotated[
        list[str] | None, typer.Option(help="Backends of the executor (default: aer, fake_manila).")
    ] = None,
    slots: Annotated[int, typer.Option(help="Executor slots.")] = 2,
) -> None:
    """A broker and one executor in this process, until Ctrl-C."""
    from qrelay.broker.server import running_broker
    from qrelay.broker.settings import BrokerSettings
    from qrelay.executor.agent import running_executor
    from qrelay.executor.settings import ExecutorSettings

    backends = backend or ["aer", "fake_manila"]

    async def serve() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        broker_settings = BrokerSettings(
            listen=f"127.0.0.1:{port}", db_path=directory / "broker.db"
        )
        async with running_broker(broker_settings) as broker:
            executor_settings = ExecutorSettings(
                broker=broker.address, backends=backends, slots=slots
            )
            async with running_executor(executor_settings):
                _freeze_startup_heap()
                console.print(
                    f"qrelay dev: broker on [bold cyan]{broker.address}[/] "
                    f"(executor {executor_settings.executor_id}: {', '.join(backends)}; "
                    f"db {broker_settings.db_path}); Ctrl-C to stop",
                    highlight=False,
                    soft_wrap=True,
                )
                await anyio.sleep_forever()

    _run(lambda: _until_signal(serve))
    console.print("qrelay dev: stopped")


# -- client commands -------------------------------------------------------------


@app.command()
def backends(broker: BrokerAddr = "127.0.0.1:50051", token: Token = None) -> None:
    """The backends executors have announced, online or not."""

    async def fetch() -> list[Any]:
        async with _service(broker, token) as service:
            return [b.proto for b in await service.backends()]

    found = _run(fetch)
    table = Table(title=f"backends at {broker}")
    for column in ("name", "online", "executors", "queued", "qubits", "simulator", "description"):
        table.add_column(
            column,
            justify="right" if column in ("executors", "queued", "qubits") else "left",
            no_wrap=column == "name",
        )
    for b in found:
        table.add_row(
            b.info.name,
            "[green]yes[/]" if b.online else "[red]no[/]",
            str(b.online_executors),
            str(b.queue_length),
            str(b.info.num_qubits),
            "yes" if b.info.simulator else "no",
            b.info.description,
        )
    console.print(table)
    if not found:
        console.print("no executor has announced a backend yet")


@jobs_app.command("list")
def jobs_list(
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
    state: Annotated[
        list[str] | None, typer.Option(help="Only these states (queued, running, done, ...).")
    ] = None,
    backend: Annotated[str | None, typer.Option(help="Only jobs for this backend.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many jobs, newest first.")] = 20,
) -> None:
    """Your newest jobs."""

    async def fetch() -> list[jobs_pb2.Job]:
        async with _service(broker, token) as service:
            found = await service.jobs(limit, state=state or None, backend=backend)
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
            result = await handle.result() if job.state == 3 else None
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
                    _print_event(raw, event.data)
                    if event.kind == "state":
                        final = raw.state.state
                        status.update(f"{job_id}: {_state(final)}")
        return final

    final = _run(follow)
    raise typer.Exit(0 if final == 3 else 1)


def _code_name(code: int) -> str:
    from qrelay.errors import error_for_code

    cls = type(error_for_code(code, ""))
    return cls.code_name if cls is not QRelayError else f"code {code}"


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


# -- programs and sessions -----------------------------------------------------------

programs_app = typer.Typer(
    help="Upload, list, inspect, delete and run programs.", no_args_is_help=True
)
sessions_app = typer.Typer(help="Create, inspect, close and cancel sessions.", no_args_is_help=True)
app.add_typer(programs_app, name="programs")
app.add_typer(sessions_app, name="sessions")


def _program_rows(p: Any) -> list[tuple[str, str]]:
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


def _print_rows(rows: list[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # ids stay whole, if on two lines
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


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


@programs_app.command("list")
def programs_list(
    name: Annotated[
        str | None, typer.Option(help="Every version of this name instead of the newest of each.")
    ] = None,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Your programs: the newest version of each name (or every version of --name)."""

    async def fetch() -> list[Any]:
        async with _service(broker, token) as service:
            return await service.programs(name)

    found = _run(fetch)
    table = Table(title=f"programs at {broker}")
    for column in ("name", "version", "id", "entry point", "size", "created", "description"):
        # The id is long (p- + 64 hex digits): fold it rather than squeeze the rest away.
        table.add_column(
            column, no_wrap=column == "name", overflow="fold" if column == "id" else "ellipsis"
        )
    for p in found:
        table.add_row(
            p.name,
            str(p.version),
            p.id,
            p.entry_point,
            str(p.size_bytes),
            p.created_at.strftime("%Y-%m-%d %H:%M:%S") if p.created_at else "",
            p.description,
        )
    console.print(table)
    if not found:
        console.print("no programs yet: qrelay programs upload DIR --name NAME")


@programs_app.command("show")
def programs_show(
    program: Annotated[str, typer.Argument(help="Program id, or name for its newest version.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """One program version: id, entry point, requirements, input schema."""

    async def fetch() -> Any:
        async with _service(broker, token) as service:
            return await service.program(program)

    _print_rows(_program_rows(_run(fetch)))


@programs_app.command("delete")
def programs_delete(
    program: Annotated[str, typer.Argument(help="Program id (one version) or name (all).")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Delete one version by id, or every version of a name."""

    async def delete() -> int:
        async with _service(broker, token) as service:
            return await service.delete_program(program)

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
            _print_event(raw, event.data)
            if event.kind == "state":
                final = raw.state.state
                status.update(f"{job_id}: {_state(final)}")
            elif event.kind == "interim":
                interims += 1
                status.update(f"{job_id}: RUNNING, interim {interims}: {_short(event.data, 60)}")
    return final


@programs_app.command("run")
def programs_run(
    program: Annotated[str, typer.Argument(help="Program id, or name for its newest version.")],
    backend: Annotated[
        str | None, typer.Option(help="Backend to run beside (or take the session's).")
    ] = None,
    inputs: Annotated[
        str, typer.Option(help="Keyword arguments as a JSON object, or @FILE holding one.")
    ] = "{}",
    session: Annotated[
        str | None, typer.Option(help="Run inside this session or batch (id).")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option(help="KEY=VALUE label (repeatable).")] = None,
    watch: Annotated[
        bool, typer.Option("--watch/--no-watch", help="Follow interim values, logs and result.")
    ] = False,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Run a program; prints the job id, or with --watch follows it to its result.

    With --watch exits 0 when the job is DONE, 1 when it FAILED or was CANCELLED.
    """

    async def submit() -> tuple[str, int]:
        arguments = _read_inputs(inputs)
        tags = _parse_tags(tag)
        async with _service(broker, token) as service:
            mode = await service.session(session) if session else None
            handle = await service.run(program, arguments, backend=backend, mode=mode, tags=tags)
            console.print(
                f"submitted {handle.job_id()} ({program} on {handle.backend_name})",
                highlight=False,
                soft_wrap=True,
            )
            return handle.job_id(), await _follow(handle) if watch else 0

    _job_id, final = _run(submit)
    if watch:
        raise typer.Exit(0 if final == 3 else 1)


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


def _session_command(session_id: str, broker: str, token: str | None, action: str) -> None:
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
