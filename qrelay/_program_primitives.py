"""`ctx.sampler()` / `ctx.estimator()`: Qiskit V2 primitives whose work goes to the executor.

Part of the program author API (`qrelay.program` owns them): they speak only
to the `ProgramHost` the sandbox provides, and the executor implements that
host, so nothing here imports the executor.

Each `run` encodes the PUBs with `qrelay.codec` into a `JobSpec`, hands it to
the sandbox host (which asks the executor's primitive pipeline over the
sandbox channel) and returns an already finished job: the sandbox has one
thread of control, so there is nothing to overlap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf import struct_pb2
from qiskit.primitives import (
    BaseEstimatorV2,
    BaseSamplerV2,
    PrimitiveResult,
)

from qrelay import codec  # type: ignore[attr-defined,unused-ignore]
from qrelay._proto.v1 import types_pb2
from qrelay.finished_job import FinishedJob
from qrelay.pubs import estimator_pubs, sampler_pubs

if TYPE_CHECKING:
    from qrelay.program import ProgramContext

_counter = 0


def _next_id(ctx: ProgramContext) -> str:
    global _counter
    _counter += 1
    return f"{ctx.job_id}/primitive-{_counter}"


#: What `run` returns here: the executor answered before `run` returned.
LocalJob = FinishedJob


def _empty(ctx: ProgramContext) -> LocalJob:
    """`run([])`: an empty PrimitiveResult and no work, as the reference primitives."""
    return LocalJob(_next_id(ctx), PrimitiveResult([], metadata={"version": 2}))


def _spec(options: Mapping[str, Any]) -> types_pb2.JobSpec:
    spec = types_pb2.JobSpec()
    if options:
        struct = struct_pb2.Struct()
        struct.update(dict(options))
        spec.options.CopyFrom(struct)
    return spec


class LocalSampler(BaseSamplerV2):  # type: ignore[misc]
    """Sampler bound to the executor's backend, options as qiskit-ibm-runtime V2 names."""

    def __init__(self, ctx: ProgramContext, options: dict[str, Any]) -> None:
        self._ctx = ctx
        self.options = options

    def run(self, pubs: Iterable[Any], *, shots: int | None = None) -> LocalJob:
        coerced = sampler_pubs(pubs, shots)  # Qiskit's exception classes and messages
        if not coerced:
            return _empty(self._ctx)
        spec = _spec(self.options)
        spec.sampler.CopyFrom(codec.encode_sampler_task(coerced, shots))
        return LocalJob(_next_id(self._ctx), self._ctx._run(spec))


class LocalEstimator(BaseEstimatorV2):  # type: ignore[misc]
    """Estimator bound to the executor's backend, options as qiskit-ibm-runtime V2 names."""

    def __init__(self, ctx: ProgramContext, options: dict[str, Any]) -> None:
        self._ctx = ctx
        self.options = options

    def run(self, pubs: Iterable[Any], *, precision: float | None = None) -> LocalJob:
        coerced = estimator_pubs(pubs, precision)
        if not coerced:
            return _empty(self._ctx)
        spec = _spec(self.options)
        spec.estimator.CopyFrom(codec.encode_estimator_task(coerced, precision))
        return LocalJob(_next_id(self._ctx), self._ctx._run(spec))
