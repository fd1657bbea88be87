"""`qrelay dev`: a broker and an executor in one process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import anyio
import typer

from qrelay.cli._shared import _freeze_startup_heap, _run, _until_signal, console


def dev(
    port: Annotated[
        int, typer.Option(help="Broker port on 127.0.0.1; 0 picks a free one.")
    ] = 50051,
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the SQLite database lives.")
    ] = Path(".qrelay"),
    backend: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="Backends of the executor (default: aer, fake_manila)."),
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
            # One developer on loopback: programs run even where the host cannot
            # isolate them (not root, no namespaces); the executor logs what is
            # missing. QRELAY_SANDBOX_ALLOW_WEAK_SANDBOX=false keeps the refusal.
            sandbox = (
                {}
                if "QRELAY_SANDBOX_ALLOW_WEAK_SANDBOX" in os.environ
                else {"allow_weak_sandbox": True}
            )
            executor_settings = ExecutorSettings(
                broker=broker.address, backends=backends, slots=slots, sandbox=sandbox
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
