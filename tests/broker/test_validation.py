"""Every envelope check of validation.py, with its exact message (no network)."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.struct_pb2 import Struct

from qrelay._proto.v1 import types_pb2 as T
from qrelay.broker.store import JobKind
from qrelay.broker.validation import check_idempotency_key, validate_spec
from qrelay.errors import InvalidArgument, NotFound, QRelayError

QASM = "OPENQASM 3.0; qubit[2] q;"


def arr(values: np.ndarray, dtype: str | None = None) -> T.NDArray:
    return T.NDArray(
        shape=list(values.shape), dtype=dtype or values.dtype.str, data=values.tobytes()
    )


def obs(
    paulis: list[str], coeffs: list[float] | None = None, imag: list[float] | None = None
) -> T.Observable:
    return T.Observable(
        paulis=paulis,
        coeffs=coeffs if coeffs is not None else [1.0] * len(paulis),
        coeffs_imag=imag or [],
    )


def sampler(*pubs: T.SamplerPub, shots: int | None = None) -> T.JobSpec:
    task = T.SamplerTask(pubs=list(pubs))
    if shots is not None:
        task.shots = shots
    return T.JobSpec(backend="aer", sampler=task)


def estimator(*pubs: T.EstimatorPub, precision: float | None = None) -> T.JobSpec:
    task = T.EstimatorTask(pubs=list(pubs))
    if precision is not None:
        task.precision = precision
    return T.JobSpec(backend="aer", estimator=task)


def spub(**kw: object) -> T.SamplerPub:
    return T.SamplerPub(circuit=T.Circuit(qasm3=QASM), **kw)  # type: ignore[arg-type]


def epub(observables: T.ObservablesArray | None = None, **kw: object) -> T.EstimatorPub:
    return T.EstimatorPub(
        circuit=T.Circuit(qasm3=QASM),
        observables=observables or T.ObservablesArray(elements=[obs(["ZZ"])]),
        **kw,  # type: ignore[arg-type]
    )


def struct(values: dict[str, object]) -> Struct:
    out = Struct()
    out.update(values)
    return out


def check(spec: T.JobSpec) -> JobKind:
    return validate_spec(spec, known_backend=True, known=["aer"])


def test_valid_specs_pass_and_report_their_kind() -> None:
    bindings = T.Bindings(values=arr(np.zeros((3, 2))))
    assert check(sampler(spub(parameter_values=bindings, shots=10), shots=5)) is JobKind.SAMPLER
    observables = T.ObservablesArray(
        shape=[2], elements=[obs(["XX", "ZI"], [0.5, -1.0]), obs(["YY"], imag=[0.0])]
    )
    assert check(estimator(epub(observables, precision=0.01))) is JobKind.ESTIMATOR
    # Precision 0 asks the ideal simulator for exact values; the executor decides.
    assert check(estimator(epub(observables, precision=0.0))) is JobKind.ESTIMATOR
    program = T.JobSpec(backend="aer", program=T.ProgramTask(program="vqe"))
    assert check(program) is JobKind.PROGRAM
    with_options = sampler(spub())
    with_options.options.update({"default_shots": 64})
    assert check(with_options) is JobKind.SAMPLER


BAD: list[tuple[str, T.JobSpec, type[QRelayError], str]] = [
    (
        "no backend",
        T.JobSpec(sampler=T.SamplerTask(pubs=[spub()])),
        InvalidArgument,
        "spec.backend is required",
    ),
    (
        "no work",
        T.JobSpec(backend="aer"),
        InvalidArgument,
        "exactly one of sampler, estimator or program",
    ),
    ("no pubs", sampler(), InvalidArgument, "sampler: at least one pub is required"),
    ("no estimator pubs", estimator(), InvalidArgument, "estimator: at least one pub is required"),
    (
        "missing circuit",
        sampler(spub(), T.SamplerPub()),
        InvalidArgument,
        "pub 1: circuit is missing (set qpy or qasm3)",
    ),
    (
        "empty qpy",
        sampler(T.SamplerPub(circuit=T.Circuit(qpy=b""))),
        InvalidArgument,
        "pub 0: circuit is missing",
    ),
    (
        "zero pub shots",
        sampler(spub(), spub(), spub(shots=0)),
        InvalidArgument,
        "pub 2: shots must be > 0, got 0",
    ),
    (
        "negative job shots",
        sampler(spub(), shots=-5),
        InvalidArgument,
        "sampler: shots must be > 0, got -5",
    ),
    (
        "bad dtype",
        sampler(
            spub(
                parameter_values=T.Bindings(
                    values=T.NDArray(shape=[1], dtype="<f16", data=b"x" * 16)
                )
            )
        ),
        InvalidArgument,
        "pub 0: parameter_values.values: dtype '<f16' is not supported",
    ),
    (
        "short data",
        sampler(
            spub(
                parameter_values=T.Bindings(
                    values=T.NDArray(shape=[2, 3], dtype="<f8", data=b"\0" * 40)
                )
            )
        ),
        InvalidArgument,
        "pub 0: parameter_values.values: data is 40 bytes but shape [2, 3] of <f8 needs 48",
    ),
    (
        "complex bindings",
        sampler(
            spub(parameter_values=T.Bindings(values=arr(np.zeros((1, 1), dtype="<c16")))),
        ),
        InvalidArgument,
        "pub 0: parameter_values.values: dtype '<c16' is not a real number type",
    ),
    (
        "scalar bindings",
        sampler(spub(parameter_values=T.Bindings(values=arr(np.float64(1.0) * np.ones(()))))),
        InvalidArgument,
        "needs at least one axis",
    ),
    (
        "names vs last axis",
        sampler(
            spub(
                parameter_values=T.Bindings(
                    values=arr(np.zeros((4, 2))), parameter_names=["a", "b", "c"]
                )
            )
        ),
        InvalidArgument,
        "pub 0: parameter_values: 3 parameter_names but the last axis of values has 2 entries",
    ),
    (
        "negative precision",
        estimator(epub(precision=-0.5)),
        InvalidArgument,
        "pub 0: precision must be a finite number >= 0, got -0.5",
    ),
    (
        "nan precision",
        estimator(epub(), precision=float("nan")),
        InvalidArgument,
        "estimator: precision must be a finite number >= 0, got nan",
    ),
    (
        "no observables",
        estimator(T.EstimatorPub(circuit=T.Circuit(qasm3=QASM))),
        InvalidArgument,
        "pub 0: observables are required",
    ),
    (
        "bad pauli char",
        estimator(epub(T.ObservablesArray(elements=[obs(["XA"])]))),
        InvalidArgument,
        "pub 0: observables[0]: Pauli term 0 'XA' must be a non-empty string of I, X, Y, Z",
    ),
    (
        "ragged paulis",
        estimator(epub(T.ObservablesArray(elements=[obs(["XX", "ZZZ"])]))),
        InvalidArgument,
        "pub 0: observables[0]: Pauli term 1 'ZZZ' has 3 qubits, expected 2",
    ),
    (
        "ragged across array",
        estimator(epub(T.ObservablesArray(shape=[2], elements=[obs(["XX"]), obs(["Z"])]))),
        InvalidArgument,
        "pub 0: observables[1]: Pauli term 0 'Z' has 1 qubits, expected 2",
    ),
    (
        "coeff count",
        estimator(epub(T.ObservablesArray(elements=[obs(["XX", "ZZ"], [1.0])]))),
        InvalidArgument,
        "pub 0: observables[0]: 2 Pauli terms but 1 coeffs",
    ),
    (
        "non-hermitian",
        estimator(epub(T.ObservablesArray(elements=[obs(["XX"], [1.0], [0.5])]))),
        InvalidArgument,
        "pub 0: observables[0]: observable is not Hermitian",
    ),
    (
        "element count",
        estimator(epub(T.ObservablesArray(shape=[3], elements=[obs(["X"])]))),
        InvalidArgument,
        "pub 0: observables: shape [3] needs 3 observables, got 1",
    ),
    (
        "too many tags",
        T.JobSpec(
            backend="aer",
            sampler=T.SamplerTask(pubs=[spub()]),
            tags={str(i): "x" for i in range(33)},
        ),
        InvalidArgument,
        "spec.tags has 33 entries; at most 32 allowed",
    ),
    (
        "unknown option",
        T.JobSpec(
            backend="aer",
            sampler=T.SamplerTask(pubs=[spub()]),
            options=struct({"default_shotz": 10}),
        ),
        InvalidArgument,
        "unknown option 'default_shotz'; did you mean 'default_shots'?",
    ),
    (
        "program without name",
        T.JobSpec(backend="aer", program=T.ProgramTask()),
        InvalidArgument,
        "program.program is required",
    ),
]


@pytest.mark.parametrize(
    ("spec", "error", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_envelope_is_rejected_with_a_message_naming_the_field(
    spec: T.JobSpec, error: type[QRelayError], message: str
) -> None:
    with pytest.raises(error) as exc:
        check(spec)
    assert message in exc.value.message


def test_unknown_backend_is_not_found_and_lists_known_ones() -> None:
    with pytest.raises(NotFound, match=r"unknown backend 'nope'; known: aer, fake_manila"):
        validate_spec(
            sampler(spub()).__class__(backend="nope", sampler=T.SamplerTask(pubs=[spub()])),
            known_backend=False,
            known=["fake_manila", "aer"],
        )


def test_idempotency_key_length_is_limited() -> None:
    check_idempotency_key("k" * 128)
    with pytest.raises(InvalidArgument, match="idempotency_key is 129 characters; at most 128"):
        check_idempotency_key("k" * 129)
