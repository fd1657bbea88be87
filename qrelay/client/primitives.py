"""`Sampler` and `Estimator`: Qiskit V2 primitives that run on a qrelay broker.

Drop-in for `qiskit_ibm_runtime.SamplerV2` / `EstimatorV2`: same `mode=`,
same options names, same `run(pubs, shots=...)` / `run(pubs, precision=...)`.
`run` coerces the PUBs with Qiskit's own coercion and encodes them with the
codec the executor decodes with, so bad input raises what Qiskit raises, with
Qiskit's message (`InvalidArgument` is a `ValueError`, `InvalidType` a
`TypeError`) in the caller's thread before anything is sent; `run([])` gives
an empty PrimitiveResult without a job; then it submits once under a
fresh idempotency key (retries on UNAVAILABLE reuse it, so a lost response
never duplicates the job) and returns a `RuntimeJob`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

from qiskit.primitives import BaseEstimatorV2, BaseSamplerV2
from qiskit.primitives.containers.estimator_pub import EstimatorPubLike
from qiskit.primitives.containers.sampler_pub import SamplerPubLike

from qrelay._proto.v1 import types_pb2
from qrelay.client.backend import QRelayBackend
from qrelay.client.job import EmptyJob, RuntimeJob, wire_tags
from qrelay.client.modes import ModeLike, SubmitTarget, default_service
from qrelay.client.service import QRelayService
from qrelay.errors import InvalidArgument, InvalidType
from qrelay.limits import MAX_PRIORITY, MIN_PRIORITY
from qrelay.options import EstimatorOptions, SamplerOptions, options_from_wire, options_to_wire
from qrelay.pubs import estimator_pubs, sampler_pubs

OptionsT = TypeVar("OptionsT", SamplerOptions, EstimatorOptions)


def resolve_mode(
    mode: QRelayBackend | str | ModeLike, service: QRelayService | None
) -> SubmitTarget:
    """Turn `mode=` (backend object, backend name, or session/batch) into a submit target."""
    if isinstance(mode, QRelayBackend):
        owner = mode.service or service
        if owner is None:
            raise InvalidArgument(
                f"backend {mode.name!r} came from AsyncQRelayService; the blocking primitives "
                "need a backend from QRelayService (or pass service=...)"
            )
        return SubmitTarget(owner, mode)
    if isinstance(mode, str):
        owner = service or default_service()
        return SubmitTarget(owner, owner.backend(mode))
    hook = getattr(mode, "_qrelay_target", None)
    if callable(hook):
        target = hook()
        if isinstance(target, SubmitTarget):
            return target
    raise InvalidArgument(
        f"mode must be a QRelayBackend or a backend name (or a Session or Batch), "
        f"got {type(mode).__name__}"
    )


OptionsKind = Literal["sampler", "estimator"]


def _make_options(
    kind: OptionsKind, cls: type[OptionsT], options: OptionsT | Mapping[str, Any] | None
) -> OptionsT:
    if options is None:
        return cls()
    if isinstance(options, cls):
        return options.model_copy(deep=True)
    if isinstance(options, Mapping):
        made = options_from_wire(kind, options)
        assert isinstance(made, cls)
        return made
    raise InvalidArgument(
        f"options must be a {cls.__name__} or a dict, got {type(options).__name__}"
    )


def _options_struct(
    spec: types_pb2.JobSpec, kind: OptionsKind, options: SamplerOptions | EstimatorOptions
) -> None:
    """Put the explicitly set options on the spec, after the broker's own check of them."""
    wire = options_to_wire(options)
    options_from_wire(kind, wire)  # conflicting settings fail here, not at the broker
    if wire:
        spec.options.update(wire)
    if options.environment.job_tags:  # Runtime's job tags: the job's own tags here
        spec.tags.update(wire_tags(options.environment.job_tags))


def _check_width(target: SubmitTarget, circuits: Iterable[Any]) -> None:
    """Refuse, before sending, a circuit the backend cannot hold.

    A backend without a coupling map (the ideal simulator) runs a wider circuit
    whose active qubits fit, as Aer's primitives do by dropping idle wires.
    """
    from qrelay.codec import active_qubits

    backend = target.backend
    width = backend.num_qubits
    if width <= 0:
        return  # the broker announced no size: the executor decides
    for i, circuit in enumerate(circuits):
        if circuit.num_qubits <= width:
            continue
        if backend.coupling_map is None:
            active = len(active_qubits(circuit))
            if active <= width:
                continue
            raise InvalidArgument(
                f"pub {i}: circuit has {circuit.num_qubits} qubits, {active} of them active, "
                f"but backend {backend.name} has {width}"
            )
        raise InvalidArgument(
            f"pub {i}: circuit has {circuit.num_qubits} qubits but backend {backend.name} "
            f"has {width}"
        )


def sampler_spec(
    target: SubmitTarget,
    pubs: Iterable[SamplerPubLike],
    shots: int | None,
    options: SamplerOptions,
) -> types_pb2.JobSpec | None:
    """Validate and encode a Sampler run (None: no pubs, nothing to run); raises
    InvalidArgument (a ValueError) or InvalidType (a TypeError), sends nothing."""
    from qrelay.codec import check_sampler_task, encode_sampler_task

    coerced = sampler_pubs(pubs, shots)
    if not coerced:
        return None
    _check_width(target, (p.circuit for p in coerced))
    task = encode_sampler_task(coerced, shots)
    check_sampler_task(task)  # the checks the broker and executor apply
    spec = types_pb2.JobSpec(
        backend=target.backend.name, sampler=task, session_id=target.session_id
    )
    _options_struct(spec, "sampler", options)
    return spec


def estimator_spec(
    target: SubmitTarget,
    pubs: Iterable[EstimatorPubLike],
    precision: float | None,
    options: EstimatorOptions,
) -> types_pb2.JobSpec | None:
    """Validate and encode an Estimator run (None: no pubs, nothing to run); raises
    InvalidArgument (a ValueError) or InvalidType (a TypeError), sends nothing."""
    from qrelay.codec import check_estimator_task, encode_estimator_task

    coerced = estimator_pubs(pubs, precision)
    if not coerced:
        return None
    _check_width(target, (p.circuit for p in coerced))
    task = encode_estimator_task(coerced, precision)
    check_estimator_task(task)  # the checks the broker and executor apply
    spec = types_pb2.JobSpec(
        backend=target.backend.name, estimator=task, session_id=target.session_id
    )
    _options_struct(spec, "estimator", options)
    return spec


class _Primitive:
    """What Sampler and Estimator share: where to submit and how."""

    _target: SubmitTarget
    _priority: int = 0

    @property
    def priority(self) -> int:
        """Order of this primitive's jobs among your own queued jobs on the
        backend: higher first, -10 to 10, default 0 (never your share
        against other tenants). A qrelay addition; Runtime has none."""
        return self._priority

    @priority.setter
    def priority(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidType(f"priority must be an int, got {type(value).__name__}")
        if not MIN_PRIORITY <= value <= MAX_PRIORITY:
            raise InvalidArgument(
                f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {value}"
            )
        self._priority = value

    @property
    def mode(self) -> QRelayBackend:
        return self._target.backend

    def backend(self) -> QRelayBackend:
        """The backend jobs run on (as Runtime's primitives offer)."""
        return self._target.backend

    @property
    def service(self) -> QRelayService:
        return self._target.service

    def _submit(self, spec: types_pb2.JobSpec | None) -> RuntimeJob | EmptyJob:
        if spec is None:  # run([]): an empty PrimitiveResult, as the reference primitives
            return EmptyJob(self._target.backend.name)
        spec.priority = self._priority
        # One key per run: every retry names the same job. Run (not Submit):
        # result() then reads the stream already open, one round trip in all.
        return self._target.service.submit_and_follow(spec, idempotency_key=uuid.uuid4().hex)


class Sampler(_Primitive, BaseSamplerV2):  # type: ignore[misc]
    """A `BaseSamplerV2` whose jobs run on a qrelay executor.

    `mode` is a `QRelayBackend` (from `service.backend(name)`) or a backend
    name (with `service=` or QRELAY_BROKER set). `options` is a
    `SamplerOptions` or a dict of the same names.
    """

    def __init__(
        self,
        mode: QRelayBackend | str | ModeLike,
        options: SamplerOptions | Mapping[str, Any] | None = None,
        *,
        service: QRelayService | None = None,
    ) -> None:
        self._options = _make_options("sampler", SamplerOptions, options)
        self._target = resolve_mode(mode, service)

    def __repr__(self) -> str:
        return f"<Sampler backend={self._target.backend.name!r}>"

    @property
    def options(self) -> SamplerOptions:
        """Settable as attributes: `sampler.options.default_shots = 4000`."""
        return self._options

    def run(
        self, pubs: Iterable[SamplerPubLike], *, shots: int | None = None
    ) -> RuntimeJob | EmptyJob:
        """Validate, submit and return the job; `result()` gives a `PrimitiveResult`."""
        return self._submit(sampler_spec(self._target, pubs, shots, self._options))


class Estimator(_Primitive, BaseEstimatorV2):  # type: ignore[misc]
    """A `BaseEstimatorV2` whose jobs run on a qrelay executor (see `Sampler` for `mode`)."""

    def __init__(
        self,
        mode: QRelayBackend | str | ModeLike,
        options: EstimatorOptions | Mapping[str, Any] | None = None,
        *,
        service: QRelayService | None = None,
    ) -> None:
        self._options = _make_options("estimator", EstimatorOptions, options)
        self._target = resolve_mode(mode, service)

    def __repr__(self) -> str:
        return f"<Estimator backend={self._target.backend.name!r}>"

    @property
    def options(self) -> EstimatorOptions:
        """Settable as attributes: `estimator.options.resilience_level = 2`."""
        return self._options

    def run(
        self, pubs: Iterable[EstimatorPubLike], *, precision: float | None = None
    ) -> RuntimeJob | EmptyJob:
        """Validate, submit and return the job; `result()` gives a `PrimitiveResult`."""
        return self._submit(estimator_spec(self._target, pubs, precision, self._options))
