"""A BackendProvider for tests: a "device" whose run only waits on its provider.

`remote_wait` is Aer behind a wait of WAIT_S seconds before each run, as a
cloud device's queue would be: the job holds no CPU while it waits, so many
such jobs share one worker process.
"""

from __future__ import annotations

import time
from typing import Any

from qrelay.executor.backends import Backend, BackendProvider, _ExecutorAerSimulator

WAIT_S = 2.0


class _WaitingSimulator(_ExecutorAerSimulator):  # type: ignore[misc]
    def _run_circuits(self, circuits: Any, parameter_binds: Any, **run_options: Any) -> Any:
        time.sleep(WAIT_S)  # the provider's queue: no CPU, no GIL held
        return super()._run_circuits(circuits, parameter_binds, **run_options)


def _build(name: str) -> Backend:
    return Backend(
        name=name,
        qiskit=_WaitingSimulator(),
        description="a remote device (Aer after a queue wait)",
        simulator=False,
    )


provider = BackendProvider("test remote devices", lambda: ["remote_wait"], _build, local=False)
