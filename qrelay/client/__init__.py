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
from qrelay.client.job import AsyncRuntimeJob, JobEvent, RuntimeJob
from qrelay.client.primitives import Estimator, Sampler
from qrelay.client.service import AsyncQRelayService, QRelayService

__all__ = [
    "AsyncQRelayService",
    "AsyncRuntimeJob",
    "BackendStatus",
    "Estimator",
    "JobEvent",
    "QRelayBackend",
    "QRelayService",
    "RetryPolicy",
    "RuntimeJob",
    "Sampler",
]
