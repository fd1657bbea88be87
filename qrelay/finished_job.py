"""A primitive job that is over before anyone asks: what a local run returns.

`ctx.sampler().run(...)` inside a program (the executor answered before
`run` returned) and the SDK's `run([])` (nothing to send) both hand back a
Qiskit `BasePrimitiveJob` that is already DONE with its result.
"""

from __future__ import annotations

from typing import Any

from qiskit.primitives import BasePrimitiveJob, PrimitiveResult
from qiskit.providers import JobStatus


class FinishedJob(BasePrimitiveJob[PrimitiveResult[Any], JobStatus]):  # type: ignore[misc]
    """A job that is DONE with `result` from the start; there is nothing to cancel."""

    def __init__(self, job_id: str, result: PrimitiveResult[Any]) -> None:
        super().__init__(job_id)
        self._result = result

    def result(self, timeout: float | None = None) -> PrimitiveResult[Any]:
        return self._result

    def status(self) -> JobStatus:
        return JobStatus.DONE

    def done(self) -> bool:
        return True

    def running(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def in_final_state(self) -> bool:
        return True

    def cancel(self, reason: str = "") -> None:
        """Nothing to cancel: the work is over (or there was none)."""
