"""The executor role: runs quantum work beside a backend.

Public names are loaded lazily so that importing `qrelay.executor.settings`
(e.g. by the CLI) does not pay for importing Qiskit.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# Aer's OpenMP threads spin (busy-wait) between parallel regions by default.
# On an executor whose cores are shared (job slots, sandboxes, the broker on
# the same host) the spinning threads take the CPU the other work needs:
# measured on 2 cores, the hybrid_loop Estimator call took 3x the CPU and
# 3-4x the wall time under load. Passive waiting sleeps instead. libgomp reads
# this once, when qiskit_aer is first imported; every executor module that
# imports Aer is under this package, so this runs first. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
