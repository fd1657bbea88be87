"""qrelay benchmarks: `python -m bench NAME [options]` (see `python -m bench --help`).

Each benchmark starts its own broker and executors on loopback, prints a
table and writes JSON plus a PNG under `bench/results/`. Shared recording
helpers live in `bench._report`.
"""

from bench._report import Report, machine_info, median, percentiles, ratio, summarize

__all__ = ["Report", "machine_info", "median", "percentiles", "ratio", "summarize"]
