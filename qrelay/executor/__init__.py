"""The executor role: runs quantum work beside a backend.

Public names are loaded lazily so that importing `qrelay.executor.settings`
(e.g. by the CLI) does not pay for importing Qiskit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qrelay.executor.backends import Backend, available_backends, load_backend
    from qrelay.executor.pipeline import PrimitivePipeline
    from qrelay.executor.transpile import TranspileCache, TranspiledCircuit

__all__ = [
    "Backend",
    "PrimitivePipeline",
    "TranspileCache",
    "TranspiledCircuit",
    "available_backends",
    "load_backend",
]

_WHERE = {
    "Backend": "backends",
    "available_backends": "backends",
    "load_backend": "backends",
    "PrimitivePipeline": "pipeline",
    "TranspileCache": "transpile",
    "TranspiledCircuit": "transpile",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'qrelay.executor' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qrelay.executor.{module}"), name)
