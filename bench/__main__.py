"""`python -m bench NAME [options]`: run one benchmark, or `all` of them.

Every benchmark is a module `bench.<name>` with `main(argv) -> int`. `all`
runs them one after another at default sizes (or tiny sizes with `--tiny`),
each in this process, and exits non-zero if any failed.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import time
from collections.abc import Sequence

from rich.console import Console

#: Benchmarks in the order `all` runs them (cheap verification first).
BENCHMARKS = (
    "echo",
    "dispatch",
    "throughput",
    "long_jobs",
    "fairness",
    "transpile_cache",
    "estimator_ideal",
    "hybrid_loop",
    "mitigation",
)


def available() -> list[str]:
    """Benchmarks present in this build (a module may not have landed yet)."""
    return [name for name in BENCHMARKS if importlib.util.find_spec(f"bench.{name}") is not None]


def summary(name: str) -> str:
    """First line of a benchmark's docstring, read without importing it (qiskit is slow)."""
    spec = importlib.util.find_spec(f"bench.{name}")
    if spec is None or spec.origin is None:
        return "(not in this build)"
    with open(spec.origin, encoding="utf-8") as src:
        doc = ast.get_docstring(ast.parse(src.read()))
    return (doc or "").strip().splitlines()[0] if doc else ""


def usage() -> str:
    lines = [
        "usage: python -m bench NAME [options]    (python -m bench NAME --help for its options)",
        "       python -m bench all [--tiny]      (every benchmark at default or tiny sizes)",
        "",
        "benchmarks:",
    ]
    width = max(len(n) for n in BENCHMARKS)
    for name in BENCHMARKS:
        lines.append(f"  {name:<{width}}  {summary(name)}")
    lines.append("")
    lines.append("Results: bench/results/NAME.json and NAME.png (or --results-dir DIR).")
    return "\n".join(lines)


def run_one(name: str, argv: Sequence[str]) -> int:
    module = importlib.import_module(f"bench.{name}")
    code: int = module.main(list(argv))
    return code


def run_all(argv: Sequence[str]) -> int:
    console = Console()
    failed: list[str] = []
    for name in available():
        console.rule(f"bench {name}")
        start = time.perf_counter()
        try:
            code = run_one(name, argv)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            console.print(f"[red]{name} failed: {type(exc).__name__}: {exc}[/red]")
            console.print_exception()
            code = 1
        console.print(f"  {name}: exit {code} in {time.perf_counter() - start:.1f} s")
        if code:
            failed.append(name)
    missing = [n for n in BENCHMARKS if n not in available()]
    if missing:
        console.print(f"not in this build: {', '.join(missing)}")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help", "list"):
        print(usage())
        return 0 if args else 2
    from qrelay.logging import configure_logging

    configure_logging("warning")
    name, rest = args[0], args[1:]
    if name == "all":
        return run_all(rest)
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name not in available():
        print(f"benchmark {name!r} is not available in this build", file=sys.stderr)
        return 2
    return run_one(name, rest)


if __name__ == "__main__":
    raise SystemExit(main())
