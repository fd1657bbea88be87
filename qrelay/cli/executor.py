"""`qrelay executor serve`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import anyio
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
)
from qrelay.errors import DeadlineExceeded

executor_app = Typer(help="Run an executor beside its backends.", no_args_is_help=True)


async def _executor_frozen_once_connected(executor: Any) -> None:
    """Freeze the heap once the executor is up (backends loaded, first Welcome)."""
    while True:
        try:
            await executor.wait_connected(3600)
        except DeadlineExceeded:
            continue
        _freeze_startup_heap()
        return


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


class _Serve(SettingsCommand):
    settings = "qrelay.executor.settings:ExecutorSettings"
    renamed = {
        "backend": "backends",
        "backend_provider": "backend_providers",
        "reconnect_initial": "reconnect_initial_s",
        "reconnect_max": "reconnect_max_s",
        "connect_timeout": "connect_timeout_s",
        "max_run_time": "max_run_time_s",
    }


@executor_app.command("serve", cls=_Serve)
def executor_serve(
    broker: Annotated[
        str | None,
        typer.Option(
            help=(
                "Broker address HOST:PORT, or replicas HOST:PORT,HOST:PORT tried in turn "
                "(env QRELAY_EXECUTOR_BROKER or QRELAY_BROKER)."
            )
        ),
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="Backend to serve (repeat for several)."),
    ] = None,
    slots: Annotated[int | None, typer.Option(help="Jobs run at once.")] = None,
    executor_id: Annotated[str | None, typer.Option(help="Stable executor id.")] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the executor token (env QRELAY_EXECUTOR_TOKEN_FILE, or "
            "QRELAY_EXECUTOR_TOKEN itself)."
        ),
    ] = None,
    token: Annotated[str | None, typer.Option(hidden=True)] = None,
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
    max_run_time: Annotated[
        float | None,
        typer.Option(help="Longest a primitive job may run, in seconds (default 86400)."),
    ] = None,
    worker_memory_mb: Annotated[
        int | None,
        typer.Option(
            help="Address-space limit of each worker process in MiB "
            "(default: 3/4 of the machine shared by the slots, at least 4096)."
        ),
    ] = None,
    backend_provider: Annotated[
        list[str] | None,
        typer.Option(
            metavar="MOD:ATTR",
            help="Extra BackendProvider as module:attribute (repeat for several).",
        ),
    ] = None,
) -> None:
    """Run an executor until SIGINT/SIGTERM. Every setting is also QRELAY_EXECUTOR_<NAME>
    in the environment (a flag wins)."""
    from qrelay.executor.agent import Executor

    if token is not None:
        refuse_secret_flag("--token", "--token-file FILE or QRELAY_EXECUTOR_TOKEN")
    with _reported_errors():
        settings = _executor_settings(
            broker=broker,
            backends=backend or None,
            slots=slots,
            executor_id=executor_id,
            token_file=token_file,
            optimization_level=optimization_level,
            transpile_cache_size=transpile_cache_size,
            reconnect_initial_s=reconnect_initial,
            reconnect_max_s=reconnect_max,
            connect_timeout_s=connect_timeout,
            metrics_port=metrics_port,
            programs=programs,
            max_run_time_s=max_run_time,
            worker_memory_mb=worker_memory_mb,
            backend_providers=backend_provider or None,
        )
    executor = Executor(settings)

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_executor_frozen_once_connected, executor)
            await executor.run()
            tg.cancel_scope.cancel()

    _run(lambda: _until_signal(serve))
