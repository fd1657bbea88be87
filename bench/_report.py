"""What every benchmark records: machine, versions, parameters, rows, figures.

A benchmark builds one `Report`, adds a row per measured configuration and
any free-form figures (ratios, targets met), then `finish()` prints a rich
table and writes `<results_dir>/<name>.json` plus `<name>.png`. The JSON
carries enough about the machine and software to compare runs later; the
numbers themselves are medians and percentiles over repeated samples, and
comparisons are ratios taken within one run because machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: Where results go unless `QRELAY_BENCH_RESULTS` or a Report says otherwise.
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"

_VERSIONED = ("qrelay", "qiskit", "qiskit-aer", "qiskit-ibm-runtime", "grpcio", "protobuf", "numpy")


def results_dir() -> Path:
    """The results directory: `$QRELAY_BENCH_RESULTS` if set (tests use tmp dirs)."""
    env = os.environ.get("QRELAY_BENCH_RESULTS")
    return Path(env) if env else DEFAULT_RESULTS_DIR


def percentiles(samples: Iterable[float], ps: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """`{"p50": ..., "p95": ...}` by linear interpolation; NaN for no samples."""
    data = sorted(float(s) for s in samples)
    out: dict[str, float] = {}
    for p in ps:
        key = f"p{p:g}"
        if not data:
            out[key] = math.nan
            continue
        pos = (len(data) - 1) * p / 100.0
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        out[key] = data[lo] + (data[hi] - data[lo]) * (pos - lo)
    return out


def median(samples: Iterable[float]) -> float:
    """The median (NaN for no samples)."""
    return percentiles(samples, (50,))["p50"]


def summarize(samples: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """n, min, p50, p95, p99, max, mean of `samples` multiplied by `scale` (e.g. 1e3 for ms)."""
    scaled = [s * scale for s in samples]
    if not scaled:
        return {"n": 0}
    return {
        "n": len(scaled),
        "min": min(scaled),
        **percentiles(scaled),
        "max": max(scaled),
        "mean": sum(scaled) / len(scaled),
    }


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero or either is NaN (so a missing mode never divides by zero)."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python, key package versions and the git commit."""
    versions: dict[str, str | None] = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        "git_commit": _git_commit(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _jsonable(value: Any) -> Any:
    """json.dumps fallback for numpy scalars/arrays and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """Replace NaN/inf by None so the JSON is strict (NaN means 'not measured')."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


@dataclass
class Report:
    """One benchmark run's record; see the module docstring."""

    name: str
    title: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    machine: dict[str, Any] = field(default_factory=machine_info)
    started_at: float = field(default_factory=time.time)

    def add_row(self, **values: Any) -> dict[str, Any]:
        """Append one measured configuration (plain JSON-able values)."""
        self.rows.append(values)
        return values

    def note(self, text: str) -> None:
        """A sentence printed under the table and stored in the JSON (e.g. 'not available')."""
        self.notes.append(text)

    @property
    def directory(self) -> Path:
        return self.out_dir if self.out_dir is not None else results_dir()

    @property
    def json_path(self) -> Path:
        return self.directory / f"{self.name}.json"

    @property
    def png_path(self) -> Path:
        return self.directory / f"{self.name}.png"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "started_at": self.started_at,
            "duration_s": time.time() - self.started_at,
            # Other work on the machine at the end; with load_average_at_start it says how noisy
            # the run was (a load above the core count means queued CPU work).
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "machine": self.machine,
            "parameters": self.parameters,
            "rows": self.rows,
            "figures": self.figures,
            "notes": self.notes,
        }

    def table(self, columns: Sequence[str] | None = None) -> Table:
        """The rows as a rich table (columns default to every key, first-seen order)."""
        if columns is None:
            seen: dict[str, None] = {}
            for row in self.rows:
                seen.update(dict.fromkeys(row))
            columns = list(seen)
        table = Table(title=self.title or self.name)
        for col in columns:
            first = next((row[col] for row in self.rows if row.get(col) is not None), None)
            table.add_column(col, justify="left" if isinstance(first, str) else "right")
        for row in self.rows:
            table.add_row(*(_cell(row.get(col)) for col in columns))
        return table

    def print(self, columns: Sequence[str] | None = None, console: Console | None = None) -> None:
        """Print the table, then figures and notes."""
        if console is None:
            console = Console()
            if not console.is_terminal:
                console = Console(width=160)  # logs and CI: don't squeeze the columns
        console.print(self.table(columns))
        for key, value in self.figures.items():
            console.print(f"  {key}: {_cell(value)}")
        for text in self.notes:
            console.print(f"  [yellow]note:[/yellow] {text}")

    def write(self, plot: Callable[[Any], None] | None = None) -> Path:
        """Write the JSON (and the PNG if `plot` draws on the matplotlib Figure it gets)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = _clean(json.loads(json.dumps(self.to_dict(), default=_jsonable)))
        self.json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        if plot is not None:
            import matplotlib

            matplotlib.use("Agg")
            from matplotlib.figure import Figure

            fig = Figure(figsize=(8, 5), layout="constrained")
            plot(fig)
            fig.suptitle(self.title or self.name)
            fig.savefig(self.png_path, dpi=110)
        return self.json_path

    def finish(
        self, plot: Callable[[Any], None] | None = None, columns: Sequence[str] | None = None
    ) -> Path:
        """Print and write; returns the JSON path."""
        self.print(columns)
        path = self.write(plot)
        Console().print(f"  wrote {path}" + (f" and {self.png_path.name}" if plot else ""))
        return path


def arg_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    """The common benchmark CLI: `--tiny` (alias `--quick`) and `--results-dir`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bench {name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tiny",
        "--quick",
        dest="tiny",
        action="store_true",
        help="tiny sizes: proves the benchmark runs end to end (tests); figures meaningless",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where to write JSON and PNG (default $QRELAY_BENCH_RESULTS or bench/results)",
    )
    return parser
