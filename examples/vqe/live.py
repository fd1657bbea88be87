"""A live rich view of an iterative algorithm: progress, current and best value, sparkline."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 50) -> str:
    """The last `width` values as block characters, low = ▁."""
    tail = values[-width:]
    if not tail:
        return ""
    lo, hi = min(tail), max(tail)
    span = (hi - lo) or 1.0
    return "".join(_BARS[int((v - lo) / span * (len(_BARS) - 1))] for v in tail)


class IterationView:
    """`with IterationView(title, total, label) as view: view.update(i, value)`."""

    def __init__(
        self,
        title: str,
        total: int,
        label: str = "energy",
        console: Console | None = None,
        minimise: bool = True,
    ) -> None:
        self.values: list[float] = []
        self._label = label
        self._minimise = minimise
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        self._task = self._progress.add_task(title, total=total, status="waiting for executor")
        self._spark = Text()
        self._console = console or Console()
        self._live = Live(
            Group(self._progress, self._spark), console=self._console, refresh_per_second=12
        )

    def __enter__(self) -> IterationView:
        self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.__exit__(exc_type, exc, tb)
        if not self._console.is_terminal:
            self._console.line()  # the final frame ends without a newline off-terminal

    def update(self, iteration: int, value: float) -> None:
        self.values.append(value)
        best = min(self.values) if self._minimise else max(self.values)
        self._progress.update(
            self._task,
            completed=iteration,
            status=f"{self._label} {value:+.5f}  best {best:+.5f}",
        )
        self._spark.plain = f"  {sparkline(self.values)}"
