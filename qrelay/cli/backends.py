"""`qrelay backends`: what runs now, and what an executor could serve."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from qrelay.cli._catalog import FAKE_DEVICES, IDEAL
from qrelay.cli._shared import BrokerAddr, Token, _broker, _run, console

if TYPE_CHECKING:
    from qrelay._proto.v1 import backends_pb2

#: What the status column says, and what it means (printed under the table).
ONLINE, OFFLINE, AVAILABLE = "online", "offline", "available"
LEGEND = (
    f"{ONLINE}: an executor serves it now; {OFFLINE}: one did, none is connected now "
    "(jobs wait); "
    f"{AVAILABLE}: available when an executor serves it "
    "(qrelay executor serve --backend NAME)"
)


def backends(
    available: Annotated[
        bool,
        typer.Option(
            "--available/--online-only",
            help="Also list the backends no executor serves yet but one could.",
        ),
    ] = True,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Backends: online now, announced before, and available to serve."""

    async def fetch() -> list[backends_pb2.Backend]:
        async with _broker(broker, token) as b:
            return await b.backends()

    found = _run(fetch)
    table = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=f"backends at {broker}"
    )
    table.add_column("name", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("qubits", justify="right", no_wrap=True)
    table.add_column("execs", justify="right", no_wrap=True)
    table.add_column("queued", justify="right", no_wrap=True)
    table.add_column("description", overflow="fold")
    for b in sorted(found, key=lambda b: (not b.online, b.info.name)):
        table.add_row(
            b.info.name,
            f"[green]{ONLINE}[/]" if b.online else f"[yellow]{OFFLINE}[/]",
            str(b.info.num_qubits),
            str(b.online_executors),
            str(b.queue_length),
            b.info.description,
        )
    announced = {b.info.name for b in found}
    servable = 0
    if available:
        if IDEAL not in announced:
            servable += 1
            table.add_row(IDEAL, f"[dim]{AVAILABLE}[/]", "", "", "", "ideal Aer")
        for name, qubits in FAKE_DEVICES.items():
            if name not in announced:
                servable += 1
                table.add_row(name, f"[dim]{AVAILABLE}[/]", str(qubits), "", "", "noisy Aer")
    console.print(table)
    console.print(LEGEND, highlight=False, style="dim")
    if not found:
        console.print("no executor has announced a backend yet")
