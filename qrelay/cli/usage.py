"""`qrelay usage`: your tenant's use in the current quota period, beside its quotas."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.table import Table

from qrelay.cli._shared import BrokerAddr, Token, _broker, _run, console

if TYPE_CHECKING:
    from qrelay._proto.v1 import jobs_pb2

#: (label, Usage field, Quotas field) per row, in the order shown.
ROWS = (
    ("executor-seconds", "executor_seconds", "max_executor_seconds"),
    ("queued jobs", "queued_jobs", "max_queued_jobs"),
    ("running jobs", "running_jobs", "max_running_jobs"),
    ("open sessions", "open_sessions", "max_sessions"),
    ("program bytes", "program_bytes", "max_program_bytes"),
)


def _amount(value: float) -> str:
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def usage(broker: BrokerAddr = "127.0.0.1:50051", token: Token = None) -> None:
    """Your use in the current period (executor-seconds) and now, with your quotas."""

    async def fetch() -> jobs_pb2.Usage:
        async with _broker(broker, token) as b:
            return await b.usage()

    found = _run(fetch)
    start = found.period_start.ToDatetime().strftime("%Y-%m-%d")
    end = found.period_end.ToDatetime().strftime("%Y-%m-%d")
    # A line, not the table's title: the table is narrow and would wrap it.
    console.print(f"usage at {broker}, period {start} to {end} (UTC)")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("what", no_wrap=True)
    table.add_column("used", justify="right", no_wrap=True)
    table.add_column("quota", justify="right", no_wrap=True)
    for label, used, limit in ROWS:
        quota = (
            _amount(getattr(found.quotas, limit))
            if found.quotas.HasField(limit)  # type: ignore[arg-type]
            else "none"
        )
        table.add_row(label, _amount(getattr(found, used)), quota)
    console.print(table)
