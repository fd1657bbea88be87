"""Python warnings raised while a job runs, carried to the caller as warnings again.

Qiskit tells users things with `warnings.warn` (a Sampler circuit without
classical registers, ...). On the executor those would only reach its
console; `capture()` collects them for one pipeline run, the pipeline puts
them in the result's metadata under `METADATA_KEY` (a list of
``{"category": name, "message": text}``; raw-stub clients can read it
there), and the SDK removes them from the metadata and warns them again in
the caller's thread (`reemit`), with the same category when it is one of
Python's own warning classes, else `UserWarning`.

`capture` is thread-safe: one process-wide `showwarning` hook hands each
warning to the collector of the thread that raised it (pipelines run in
worker threads side by side, and `warnings.catch_warnings` is process-wide).
Warnings the filters drop (DeprecationWarning outside `__main__`, by
default) are not collected; a warning raised again by a later job is.
"""

from __future__ import annotations

import builtins
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["METADATA_KEY", "add", "capture", "reemit"]

#: The PrimitiveResult metadata key the warnings travel under.
METADATA_KEY = "warnings"
#: At most this many warnings per job, each at most this long: a loop that warns
#: on every iteration must not grow a result without bound.
MAX_WARNINGS = 20
MAX_MESSAGE_CHARS = 2000

_local = threading.local()
_hook_lock = threading.Lock()
_original_showwarning: Any = None


def _showwarning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    sink: list[dict[str, str]] | None = getattr(_local, "sink", None)
    if sink is None:
        _original_showwarning(message, category, filename, lineno, file, line)
        return
    entry = {"category": category.__name__, "message": str(message)[:MAX_MESSAGE_CHARS]}
    if len(sink) < MAX_WARNINGS and entry not in sink:
        sink.append(entry)


def _install_hook() -> None:
    global _original_showwarning
    with _hook_lock:
        if warnings.showwarning is not _showwarning:
            _original_showwarning = warnings.showwarning
            warnings.showwarning = _showwarning


@contextmanager
def capture() -> Iterator[list[dict[str, str]]]:
    """Collect the warnings this thread raises inside the block (as metadata entries)."""
    _install_hook()
    # The "default" action shows a warning once per code location, remembered in
    # each module's registry; a new filters version makes every job see its own.
    mutated = getattr(warnings, "_filters_mutated", None)
    if callable(mutated):
        mutated()
    sink: list[dict[str, str]] = []
    outer = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = outer


def add(entries: list[dict[str, str]]) -> None:
    """Hand collected entries to this thread's enclosing `capture` (else warn them)."""
    sink: list[dict[str, str]] | None = getattr(_local, "sink", None)
    for entry in entries:
        if sink is None:
            warnings.warn(entry["message"], _category(entry["category"]), stacklevel=2)
        elif len(sink) < MAX_WARNINGS and entry not in sink:
            sink.append(entry)


def _category(name: str) -> type[Warning]:
    found = getattr(builtins, name, None) if isinstance(name, str) else None
    if isinstance(found, type) and issubclass(found, Warning):
        return found
    return UserWarning


def reemit(metadata: dict[str, Any], stacklevel: int = 3) -> None:
    """Take the carried warnings out of a result's metadata and warn them here."""
    carried = metadata.pop(METADATA_KEY, None)
    if not isinstance(carried, list):
        return
    for entry in carried:
        if isinstance(entry, dict):
            warnings.warn(
                str(entry.get("message", "")),
                _category(str(entry.get("category", ""))),
                stacklevel=stacklevel,
            )
