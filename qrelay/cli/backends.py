"""`qrelay backends`."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from qrelay.cli._shared import BrokerAddr, Token, _run, _service, console


def backends(broker: BrokerAddr = "127.0.0.1:50051", token: Token = None) -> None:
    """The backends executors have announced, online or not."""

    async def fetch() -> list[Any]:
        async with _service(broker, token) as service:
            return [b.proto for b in await service.backends()]

    found = _run(fetch)
    table = Table(title=f"backends at {broker}")
    # "your queue": the caller's own queued jobs as its fair share makes them wait.
    columns = ("name", "online", "executors", "your queue", "qubits", "simulator", "description")
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in ("executors", "your queue", "qubits") else "left",
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
