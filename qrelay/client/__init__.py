"""The qrelay client SDK, shaped like qiskit-ibm-runtime.

    from qrelay.client import QRelayService, Sampler

    with QRelayService("localhost:50051", token="...") as service:
        sampler = Sampler(mode=service.backend("aer"))
        result = sampler.run([circuit], shots=1000).result()

`QRelayService`/`RuntimeJob` block and work anywhere, including inside a
running event loop; `AsyncQRelayService`/`AsyncRuntimeJob` are the asyncio
core they are built on.

Public names are loaded lazily (as in `qrelay.executor`): the primitives and
jobs import Qiskit, and the `qrelay` CLI's broker-only commands reach the
SDK's qiskit-free parts (`_connection`, `accounts`) through this package
without paying ~1 s of CPU for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qrelay.client._connection import RetryPolicy
    from qrelay.client.backend import BackendStatus, QRelayBackend
    from qrelay.client.job import AsyncRuntimeJob, JobEvent, Progress, RuntimeJob
    from qrelay.client.modes import Batch, Session
    from qrelay.client.primitives import Estimator, Sampler
    from qrelay.client.programs import Program
    from qrelay.client.service import AsyncQRelayService, QRelayService
    from qrelay.client.session import AsyncBatch, AsyncSession

__all__ = [
    "AsyncBatch",
    "AsyncQRelayService",
    "AsyncRuntimeJob",
    "AsyncSession",
    "BackendStatus",
    "Batch",
    "Estimator",
    "JobEvent",
    "Program",
    "Progress",
    "QRelayBackend",
    "QRelayService",
    "RetryPolicy",
    "RuntimeJob",
    "Sampler",
    "Session",
]

_WHERE = {
    "RetryPolicy": "_connection",
    "BackendStatus": "backend",
    "QRelayBackend": "backend",
    "AsyncRuntimeJob": "job",
    "JobEvent": "job",
    "Progress": "job",
    "RuntimeJob": "job",
    "Batch": "modes",
    "Session": "modes",
    "Estimator": "primitives",
    "Sampler": "primitives",
    "Program": "programs",
    "AsyncQRelayService": "service",
    "QRelayService": "service",
    "AsyncBatch": "session",
    "AsyncSession": "session",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'qrelay.client' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qrelay.client.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
