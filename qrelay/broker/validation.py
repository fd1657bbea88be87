"""Envelope checks of a submitted JobSpec, without qiskit.

The broker cannot read circuits, but it can catch every mistake visible in
the envelope (shapes, sizes, dtypes, Pauli labels, options) and answer with a
message naming the PUB and field, long before an executor would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from qrelay._proto.v1 import types_pb2
from qrelay.broker.store import JobKind
from qrelay.errors import InvalidArgument, NotFound
from qrelay.limits import MAX_TAG_KEY, MAX_TAGS, tag_problem
from qrelay.options import options_from_wire

MAX_IDEMPOTENCY_KEY = 128
# numpy array-protocol strings accepted in NDArray.dtype, with their item size.
DTYPES: dict[str, int] = {
    "<f8": 8,
    "<f4": 4,
    "<c16": 16,
    "<c8": 8,
    "<i8": 8,
    "<i4": 4,
    "<i2": 2,
    "|i1": 1,
    "<u8": 8,
    "<u4": 4,
    "<u2": 2,
    "|u1": 1,
    "|b1": 1,
}
# Bindings are real parameter values.
BINDING_DTYPES = {"<f8", "<f4", "<i8", "<i4", "<i2", "|i1", "<u8", "<u4", "<u2", "|u1"}
PAULI_CHARS = frozenset("IXYZ")


def _prod(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_ndarray(array: types_pb2.NDArray, where: str) -> None:
    """dtype known, shape non-negative, data length == prod(shape) * itemsize."""
    if array.dtype not in DTYPES:
        raise InvalidArgument(
            f"{where}: dtype {array.dtype!r} is not supported; use one of {', '.join(DTYPES)}"
        )
    if any(d < 0 for d in array.shape):
        raise InvalidArgument(f"{where}: shape {list(array.shape)} has a negative dimension")
    expected = _prod(array.shape) * DTYPES[array.dtype]
    if len(array.data) != expected:
        raise InvalidArgument(
            f"{where}: data is {len(array.data)} bytes but shape {list(array.shape)} of "
            f"{array.dtype} needs {expected}"
        )


def check_circuit(circuit: types_pb2.Circuit, where: str) -> None:
    fmt = circuit.WhichOneof("format")
    if fmt is None or (fmt == "qpy" and not circuit.qpy) or (fmt == "qasm3" and not circuit.qasm3):
        raise InvalidArgument(f"{where}: circuit is missing (set qpy or qasm3)")


def check_bindings(bindings: types_pb2.Bindings, where: str) -> None:
    values = bindings.values
    check_ndarray(values, f"{where}.values")
    if values.dtype not in BINDING_DTYPES:
        raise InvalidArgument(f"{where}.values: dtype {values.dtype!r} is not a real number type")
    if len(values.shape) == 0:
        raise InvalidArgument(
            f"{where}.values: needs at least one axis (the last axis holds the parameters)"
        )
    if bindings.parameter_names and len(bindings.parameter_names) != values.shape[-1]:
        raise InvalidArgument(
            f"{where}: {len(bindings.parameter_names)} parameter_names but the last axis of "
            f"values has {values.shape[-1]} entries"
        )
    if bindings.parameter_names and len(set(bindings.parameter_names)) != len(
        bindings.parameter_names
    ):
        raise InvalidArgument(f"{where}: parameter_names has duplicates")


def _check_observable(obs: types_pb2.Observable, where: str, width: int | None) -> int | None:
    """Returns the Pauli label length of this observable (None if it has no terms)."""
    if not obs.paulis:
        raise InvalidArgument(f"{where}: observable has no Pauli terms")
    if len(obs.coeffs) != len(obs.paulis):
        raise InvalidArgument(
            f"{where}: {len(obs.paulis)} Pauli terms but {len(obs.coeffs)} coeffs"
        )
    if obs.coeffs_imag and len(obs.coeffs_imag) != len(obs.paulis):
        raise InvalidArgument(
            f"{where}: {len(obs.paulis)} Pauli terms but {len(obs.coeffs_imag)} coeffs_imag"
        )
    for i, label in enumerate(obs.paulis):
        bad = set(label) - PAULI_CHARS
        if not label or bad:
            raise InvalidArgument(
                f"{where}: Pauli term {i} {label!r} must be a non-empty string of I, X, Y, Z"
            )
        if width is None:
            width = len(label)
        elif len(label) != width:
            raise InvalidArgument(
                f"{where}: Pauli term {i} {label!r} has {len(label)} qubits, expected {width} "
                "(all observables of a PUB act on the same qubits)"
            )
    for i, (re, im) in enumerate(
        zip(obs.coeffs, obs.coeffs_imag or [0.0] * len(obs.coeffs), strict=True)
    ):
        if not (math.isfinite(re) and math.isfinite(im)):
            raise InvalidArgument(f"{where}: coefficient {i} is not finite")
        if im != 0.0:
            raise InvalidArgument(
                f"{where}: observable is not Hermitian: term {i} ({obs.paulis[i]}) has "
                f"imaginary coefficient {im}; Estimator observables must be Hermitian"
            )
    return width


def check_observables(observables: types_pb2.ObservablesArray, where: str) -> None:
    if any(d < 0 for d in observables.shape):
        raise InvalidArgument(f"{where}: shape {list(observables.shape)} has a negative dimension")
    expected = _prod(observables.shape)
    if len(observables.elements) != expected:
        raise InvalidArgument(
            f"{where}: shape {list(observables.shape)} needs {expected} observables, "
            f"got {len(observables.elements)}"
        )
    width: int | None = None
    for i, obs in enumerate(observables.elements):
        width = _check_observable(obs, f"{where}[{i}]", width)


def _check_shots(value: int, where: str) -> None:
    if value <= 0:
        raise InvalidArgument(f"{where}: shots must be > 0, got {value}")


def _check_precision(value: float, where: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument(f"{where}: precision must be a finite number >= 0, got {value}")


def check_options(kind: Literal["sampler", "estimator"], options: dict[str, Any]) -> None:
    """Options by qiskit-ibm-runtime V2 names; `qrelay.options` names the bad one.

    No options means the defaults, which are valid: skipped, as it is the
    common case and building the option models costs more than the rest of
    the envelope check.
    """
    if options:
        options_from_wire(kind, options)


def validate_spec(spec: types_pb2.JobSpec, known_backend: bool, known: Sequence[str]) -> JobKind:
    """Raise InvalidArgument / NotFound for a bad envelope; return the job's kind.

    `known_backend` says whether spec.backend was ever announced; `known`
    lists announced names for the error message.
    """
    if not spec.backend:
        raise InvalidArgument(
            "spec.backend is required (a backend name as BackendService lists it)"
        )
    if not known_backend:
        names = ", ".join(sorted(known)) or "none yet (no executor has connected)"
        raise NotFound(f"unknown backend {spec.backend!r}; known: {names}")
    work = spec.WhichOneof("work")
    if work is None:
        raise InvalidArgument("spec must carry exactly one of sampler, estimator or program")
    check_tags(dict(spec.tags), "spec.tags")
    options = MessageToDict(spec.options) if spec.HasField("options") else {}
    if work == "sampler":
        check_sampler(spec.sampler)
        check_options("sampler", options)
        return JobKind.SAMPLER
    if work == "estimator":
        check_estimator(spec.estimator)
        check_options("estimator", options)
        return JobKind.ESTIMATOR
    if not spec.program.program:
        raise InvalidArgument("program.program is required (a program id or name)")
    return JobKind.PROGRAM


def check_sampler(task: types_pb2.SamplerTask) -> None:
    if task.HasField("shots"):
        _check_shots(task.shots, "sampler")
    if not task.pubs:
        raise InvalidArgument("sampler: at least one pub is required")
    for i, pub in enumerate(task.pubs):
        where = f"pub {i}"
        if not pub.HasField("circuit"):
            raise InvalidArgument(f"{where}: circuit is missing (set qpy or qasm3)")
        check_circuit(pub.circuit, where)
        if pub.HasField("parameter_values"):
            check_bindings(pub.parameter_values, f"{where}: parameter_values")
        if pub.HasField("shots"):
            _check_shots(pub.shots, where)


def check_estimator(task: types_pb2.EstimatorTask) -> None:
    if task.HasField("precision"):
        _check_precision(task.precision, "estimator")
    if not task.pubs:
        raise InvalidArgument("estimator: at least one pub is required")
    for i, pub in enumerate(task.pubs):
        where = f"pub {i}"
        if not pub.HasField("circuit"):
            raise InvalidArgument(f"{where}: circuit is missing (set qpy or qasm3)")
        check_circuit(pub.circuit, where)
        if not pub.HasField("observables"):
            raise InvalidArgument(f"{where}: observables are required")
        check_observables(pub.observables, f"{where}: observables")
        if pub.HasField("parameter_values"):
            check_bindings(pub.parameter_values, f"{where}: parameter_values")
        if pub.HasField("precision"):
            _check_precision(pub.precision, where)


def num_pubs(spec: types_pb2.JobSpec) -> int:
    work = spec.WhichOneof("work")
    if work == "sampler":
        return len(spec.sampler.pubs)
    if work == "estimator":
        return len(spec.estimator.pubs)
    return 0


def check_idempotency_key(key: str) -> None:
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(
            f"idempotency_key is {len(key)} characters; at most {MAX_IDEMPOTENCY_KEY} allowed"
        )


def check_tags(tags: dict[str, str], where: str) -> None:
    """A job's tags (Submit's spec.tags, UpdateTags): `limits.tag_problem`'s rules."""
    problem = tag_problem(tags)
    if problem is not None:
        raise InvalidArgument(f"{where} {problem}")


def tag_filter(keys: Sequence[str]) -> list[str]:
    """ListJobs' tag keys, duplicates dropped (order kept): each a possible tag key."""
    unique = list(dict.fromkeys(keys))
    if len(unique) > MAX_TAGS:
        raise InvalidArgument(f"tags has {len(unique)} keys; at most {MAX_TAGS} allowed")
    for key in unique:
        if not key or len(key) > MAX_TAG_KEY:
            raise InvalidArgument(
                f"tags: {key[:40]!r} is not a tag key (1 to {MAX_TAG_KEY} characters)"
            )
    return unique


# --- NUL characters -----------------------------------------------------------------

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def _shown(key: str) -> str:
    return repr(key[:40] + "…" if len(key) > 40 else key)


def nul_field(message: Message, path: str = "") -> str | None:
    """The path of the first string field of `message` (nested messages, repeated
    fields and maps included) that holds a NUL character, or None.

    Protobuf strings may hold NUL, PostgreSQL text may not (and no qrelay
    string has a use for it), so every string a client sends is checked
    before anything reads it, for both stores alike."""
    for field, value in message.ListFields():
        name = f"{path}.{field.name}" if path else field.name
        if field.type == _STRING:
            if field.is_repeated:
                for i, text in enumerate(value):
                    if "\x00" in text:
                        return f"{name}[{i}]"
            elif "\x00" in value:
                return name
        elif field.type == _MESSAGE:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                values_are_text = entry.fields_by_name["value"].type == _STRING
                for key, item in value.items():
                    if isinstance(key, str) and "\x00" in key:
                        return f"{name} key {_shown(key)}"
                    where = f"{name}[{_shown(key) if isinstance(key, str) else key}]"
                    if values_are_text:
                        if "\x00" in item:
                            return where
                    elif isinstance(item, Message):
                        found = nul_field(item, where)
                        if found:
                            return found
            elif field.is_repeated:
                for i, item in enumerate(value):
                    found = nul_field(item, f"{name}[{i}]")
                    if found:
                        return found
            else:
                found = nul_field(value, name)
                if found:
                    return found
    return None


def nul_problem(message: Message, path: str = "") -> str | None:
    """Why `message` is refused for a NUL character (the field named), or None."""
    field = nul_field(message, path)
    if field is None:
        return None
    return f"{field} contains a NUL character (\\x00), which no qrelay string may hold"


def check_no_nul(message: Message, path: str = "") -> None:
    """Raise InvalidArgument naming the first string field holding a NUL character."""
    problem = nul_problem(message, path)
    if problem is not None:
        raise InvalidArgument(problem)


def check_text(value: str, name: str) -> None:
    """Raise InvalidArgument if one string field holds a NUL character."""
    if "\x00" in value:
        raise InvalidArgument(
            f"{name} contains a NUL character (\\x00), which no qrelay string may hold"
        )
