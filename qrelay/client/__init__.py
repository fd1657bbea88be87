"""The qrelay client SDK, shaped like qiskit-ibm-runtime.

    from qrelay.client import QRelayService, Sampler

    with QRelayService("localhost:50051", token="...") as service:
        sampler = Sampler(mode=service.backend("aer"))
        result = sampler.run([circuit], shots=1000).result()

`QRelayService`/`RuntimeJob` block and work anywhere, including inside a
running event loop; `AsyncQRelayService`/`AsyncRuntimeJob` are the asyncio
core they are built on.
"""

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
