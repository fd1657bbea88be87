"""Codec: lossless round trips between Qiskit primitive types and the wire, and every
validation message a bad request can earn."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter, ParameterVector
from qiskit.primitives.containers import (
    BindingsArray,
    BitArray,
    DataBin,
    ObservablesArray,
    PrimitiveResult,
    PubResult,
    SamplerPubResult,
)
from qiskit.quantum_info import Pauli, SparseObservable, SparsePauliOp

from qrelay import codec
from qrelay._proto.v1 import types_pb2
from qrelay.errors import InvalidArgument


def _wire(msg: Any) -> Any:
    """Serialise and parse, as the message would cross gRPC."""
    return type(msg).FromString(msg.SerializeToString())


def _param_circuit() -> QuantumCircuit:
    a, b = Parameter("a"), Parameter("b")
    qc = QuantumCircuit(2)
    qc.ry(a, 0)
    qc.rx(b, 1)
    qc.cx(0, 1)
    qc.measure_all()
    return qc


def _two_register_circuit() -> QuantumCircuit:
    from qiskit.circuit import ClassicalRegister, QuantumRegister

    q = QuantumRegister(3, "q")
    alpha, beta = ClassicalRegister(2, "alpha"), ClassicalRegister(1, "beta")
    qc = QuantumCircuit(q, alpha, beta)
    qc.x(0)
    qc.h(2)
    qc.measure([0, 1], alpha)
    qc.measure(2, beta)
    return qc


# ----------------------------------------------------------------- arrays


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.array(3.5),
        np.array([1 + 2j, -3j], dtype=np.complex128),
        np.array([[True, False]]),
        np.arange(10, dtype=np.uint8),
        np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian goes out little-endian
        np.zeros((0, 3)),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    ],
)
def test_array_round_trip_is_exact_and_little_endian(array: np.ndarray) -> None:
    msg = _wire(codec.encode_array(array))
    assert msg.dtype.startswith(("<", "|"))
    back = codec.decode_array(msg)
    assert back.shape == array.shape
    assert np.array_equal(back, array)
    back[...] = back  # writable


def test_array_with_object_dtype_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="cannot travel on the wire"):
        codec.encode_array(np.array(["a", "b"], dtype=object))


def test_array_with_unknown_dtype_is_invalid_argument() -> None:
    msg = types_pb2.NDArray(shape=[1], dtype="<U4", data=b"abcd")
    with pytest.raises(InvalidArgument, match=r"dtype '<U4' is not allowed") as err:
        codec.decode_array(msg)
    assert err.value.code == 3


def test_array_with_wrong_byte_length_is_invalid_argument() -> None:
    msg = types_pb2.NDArray(shape=[2, 3], dtype="<f8", data=b"\0" * 40)
    with pytest.raises(InvalidArgument, match=r"needs 48 bytes but data has 40"):
        codec.decode_array(msg)


def test_array_with_negative_shape_is_invalid_argument() -> None:
    msg = types_pb2.NDArray(shape=[-1], dtype="<f8", data=b"")
    with pytest.raises(InvalidArgument, match="negative dimension"):
        codec.decode_array(msg)


# ----------------------------------------------------------------- circuits


def test_circuit_qpy_round_trip_keeps_parameters_and_registers() -> None:
    qc = _two_register_circuit()
    qc.metadata = {"name": "two registers"}
    back = codec.decode_circuit(_wire(codec.encode_circuit(qc)))
    assert back == qc
    assert [r.name for r in back.cregs] == ["alpha", "beta"]
    assert back.metadata == {"name": "two registers"}


def test_garbage_qpy_is_invalid_argument_with_reason() -> None:
    with pytest.raises(InvalidArgument, match=r"^circuit is not valid QPY: .+"):
        codec.decode_circuit(types_pb2.Circuit(qpy=b"definitely not qpy"))


def test_two_circuits_in_one_qpy_blob_are_refused() -> None:
    import io

    from qiskit import qpy

    buf = io.BytesIO()
    qpy.dump([QuantumCircuit(1), QuantumCircuit(2)], buf)
    with pytest.raises(InvalidArgument, match="expected exactly one circuit, found 2"):
        codec.decode_circuit(types_pb2.Circuit(qpy=buf.getvalue()))


def test_openqasm3_circuit_decodes() -> None:
    src = """
OPENQASM 3.0;
include "stdgates.inc";
input float theta;
qubit[2] q;
bit[2] c;
h q[0];
cx q[0], q[1];
rz(theta) q[1];
c = measure q;
"""
    qc = codec.decode_circuit(types_pb2.Circuit(qasm3=src))
    assert qc.num_qubits == 2
    assert [p.name for p in qc.parameters] == ["theta"]


def test_bad_openqasm3_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match=r"^circuit is not valid OpenQASM 3: "):
        codec.decode_circuit(types_pb2.Circuit(qasm3="OPENQASM 3.0; qubit[2] q; frobnicate q;"))


def test_empty_circuit_message_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="set either qpy or qasm3"):
        codec.decode_circuit(types_pb2.Circuit())


# ----------------------------------------------------------------- sampler tasks


def test_sampler_task_round_trip_with_broadcast_bindings_and_shots() -> None:
    qc = _param_circuit()
    values = np.random.default_rng(7).uniform(size=(4, 3, 2))
    plain = QuantumCircuit(1, 1)
    plain.h(0)
    plain.measure(0, 0)
    task = _wire(codec.encode_sampler_task([(qc, values, 300), plain], shots=123))
    pubs, shots = codec.decode_sampler_task(task)
    assert shots == 123
    assert pubs[0].shape == (4, 3)
    assert pubs[0].shots == 300
    assert pubs[1].shots is None
    assert pubs[1].shape == ()
    assert pubs[0].circuit == qc
    assert np.array_equal(pubs[0].parameter_values.as_array(qc.parameters), values)


def test_sampler_bindings_keyed_by_parameter_object_round_trip_in_circuit_order() -> None:
    qc = _param_circuit()
    a, b = sorted(qc.parameters, key=lambda p: p.name)
    bindings = BindingsArray({(b, a): np.array([[2.0, 1.0], [4.0, 3.0]])})
    task = codec.encode_sampler_task([(qc, bindings)])
    pubs, _ = codec.decode_sampler_task(task)
    assert np.array_equal(pubs[0].parameter_values.as_array([a, b]), [[1.0, 2.0], [3.0, 4.0]])


def test_sampler_parameter_names_in_another_order_are_permuted() -> None:
    qc = _param_circuit()
    task = codec.encode_sampler_task([(qc, [0.1, 0.2])])
    # A non-Python client names its columns b, a.
    task.pubs[0].parameter_values.CopyFrom(
        types_pb2.Bindings(
            values=codec.encode_array(np.array([0.2, 0.1])), parameter_names=["b", "a"]
        )
    )
    pubs, _ = codec.decode_sampler_task(task)
    assert np.allclose(pubs[0].parameter_values.as_array(qc.parameters), [0.1, 0.2])


def test_sampler_parameter_count_mismatch_message() -> None:
    qc = _param_circuit()
    task = codec.encode_sampler_task([(qc, [0.1, 0.2])])
    task.pubs[0].parameter_values.values.CopyFrom(codec.encode_array(np.zeros((5, 3))))
    del task.pubs[0].parameter_values.parameter_names[:]
    with pytest.raises(InvalidArgument) as err:
        codec.decode_sampler_task(task)
    assert (
        str(err.value) == "pub 0: circuit has 2 parameters but parameter_values has 3 per binding"
    )


def test_sampler_missing_bindings_for_parametric_circuit_message() -> None:
    task = types_pb2.SamplerTask(
        pubs=[types_pb2.SamplerPub(circuit=codec.encode_circuit(_param_circuit()))]
    )
    with pytest.raises(
        InvalidArgument, match=r"pub 0: circuit has 2 parameters but no parameter_values"
    ):
        codec.decode_sampler_task(task)


def test_sampler_unknown_parameter_names_message() -> None:
    task = codec.encode_sampler_task([(_param_circuit(), [0.1, 0.2])])
    task.pubs[0].parameter_values.parameter_names[:] = ["a", "zeta"]
    with pytest.raises(
        InvalidArgument,
        match=r"pub 0: parameter_names do not match .*missing \['b'\], unknown \['zeta'\]",
    ):
        codec.decode_sampler_task(task)


def test_sampler_non_real_bindings_are_invalid_argument() -> None:
    task = codec.encode_sampler_task([(_param_circuit(), [0.1, 0.2])])
    task.pubs[0].parameter_values.values.CopyFrom(codec.encode_array(np.array([1j, 2j])))
    with pytest.raises(InvalidArgument, match=r"pub 0: parameter_values must be real numbers"):
        codec.decode_sampler_task(task)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_bindings_are_invalid_argument(bad: float) -> None:
    task = codec.encode_sampler_task([(_param_circuit(), [[0.1, 0.2], [bad, 0.0]])])
    with pytest.raises(InvalidArgument) as err:
        codec.decode_sampler_task(task)
    assert str(err.value) == "pub 0: parameter_values contain NaN or infinity"


@pytest.mark.parametrize(("where", "value"), [("task", 0), ("task", -5), ("pub", 0), ("pub", -1)])
def test_non_positive_shots_are_invalid_argument(where: str, value: int) -> None:
    qc = QuantumCircuit(1, 1)
    qc.measure(0, 0)
    task = codec.encode_sampler_task([qc])
    if where == "task":
        task.shots = value
        expected = f"shots must be > 0, got {value}"
    else:
        task.pubs[0].shots = value
        expected = f"pub 0: shots must be > 0, got {value}"
    with pytest.raises(InvalidArgument) as err:
        codec.decode_sampler_task(task)
    assert str(err.value) == expected


def test_empty_sampler_task_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="sampler task has no pubs"):
        codec.decode_sampler_task(types_pb2.SamplerTask())


def test_bad_qpy_in_second_pub_names_the_pub() -> None:
    qc = QuantumCircuit(1, 1)
    qc.measure(0, 0)
    task = codec.encode_sampler_task([qc, qc])
    task.pubs[1].circuit.qpy = b"QISKIT garbage"
    with pytest.raises(InvalidArgument, match=r"^pub 1: circuit is not valid QPY: "):
        codec.decode_sampler_task(task)


# ----------------------------------------------------------------- estimator tasks


def test_estimator_task_round_trip_with_broadcasting_and_precision() -> None:
    qc = _param_circuit().remove_final_measurements(inplace=False)
    obs = [[SparsePauliOp(["ZZ", "XI"], [0.5, -1.25])], [Pauli("YY")], ["IZ"]]  # shape (3, 1)
    values = np.linspace(0, 1, 4 * 2).reshape(1, 4, 2)  # shape (1, 4)
    task = _wire(codec.encode_estimator_task([(qc, obs, values, 0.05)], precision=0.1))
    pubs, precision = codec.decode_estimator_task(task)
    assert precision == pytest.approx(0.1)
    pub = pubs[0]
    assert pub.shape == (3, 4)
    assert pub.precision == pytest.approx(0.05)
    assert pub.observables.equivalent(ObservablesArray(obs))
    assert np.array_equal(pub.parameter_values.as_array(qc.parameters), values)


def test_estimator_observable_types_all_encode() -> None:
    qc = QuantumCircuit(2)
    observables = [
        "XZ",
        Pauli("-iXY") * 1j,  # phase folds into the coefficient: -i * i = 1
        {"ZZ": 2.0, "XX": -1.0},
        SparseObservable.from_label("0Z"),  # projector expands into Paulis
        ObservablesArray("YI"),
    ]
    for obs in observables:
        task = codec.encode_estimator_task([(qc, obs)])
        (pub,), _ = codec.decode_estimator_task(task)
        got = pub.observables.sparse_observables_array()[()]
        want = ObservablesArray.coerce(obs).sparse_observables_array()[()]
        assert np.allclose(_matrix(got), _matrix(want)), obs


def _matrix(obs: SparseObservable) -> np.ndarray:
    return SparsePauliOp.from_sparse_observable(obs).to_matrix()


def test_non_hermitian_observable_travels_and_is_rejected_with_reason() -> None:
    qc = QuantumCircuit(2)
    op = SparsePauliOp(["XY", "ZZ"], [1.0, 0.5j])
    task = _wire(codec.encode_estimator_task([(qc, op)]))
    assert list(task.pubs[0].observables.elements[0].coeffs_imag) == [0.0, 0.5]
    with pytest.raises(InvalidArgument) as err:
        codec.decode_estimator_task(task)
    assert str(err.value).startswith("pub 0: observable 0 is not Hermitian: term 'ZZ'")


def test_complex_coefficients_that_cancel_are_hermitian() -> None:
    qc = QuantumCircuit(1)
    op = SparsePauliOp(["Z", "Z", "X"], [1j, -1j, 2.0])
    (pub,), _ = codec.decode_estimator_task(codec.encode_estimator_task([(qc, op)]))
    assert pub.observables.equivalent(ObservablesArray("X").__class__({"X": 2.0}))


def test_observable_qubit_mismatch_message() -> None:
    qc = QuantumCircuit(2)
    task = codec.encode_estimator_task([(qc, "ZZ")])
    task.pubs[0].observables.elements[0].paulis[:] = ["ZZZ"]
    with pytest.raises(InvalidArgument) as err:
        codec.decode_estimator_task(task)
    assert (
        str(err.value)
        == "pub 0: observable 0 acts on 3 qubits ('ZZZ') but the circuit has 2 qubits"
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda o: o.paulis.__setitem__(0, "ZQ"),
            "pub 0: observable 0: 'ZQ' is not a Pauli string",
        ),
        (
            lambda o: o.coeffs.append(1.0),
            "pub 0: observable 0 has 1 Pauli terms but 2 coefficients",
        ),
        (lambda o: o.coeffs_imag.extend([0.0, 0.0]), "has 1 Pauli terms but 2 imaginary parts"),
        (lambda o: o.coeffs.__setitem__(0, 0.0), "pub 0: observable 0 is zero"),
        (lambda o: o.coeffs.__setitem__(0, float("nan")), "non-finite coefficient"),
        (
            lambda o: (o.ClearField("paulis"), o.ClearField("coeffs")),
            "pub 0: observable 0 has no terms",
        ),
    ],
)
def test_malformed_observable_messages(mutate: Any, message: str) -> None:
    task = codec.encode_estimator_task([(QuantumCircuit(2), "ZX")])
    mutate(task.pubs[0].observables.elements[0])
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace("'", "'")):
        codec.decode_estimator_task(task)


def test_observables_shape_and_element_count_must_agree() -> None:
    task = codec.encode_estimator_task([(QuantumCircuit(1), ["Z", "X"])])
    task.pubs[0].observables.shape[:] = [3]
    with pytest.raises(
        InvalidArgument, match=r"pub 0: observables shape \[3\] needs 3 elements but 2"
    ):
        codec.decode_estimator_task(task)


def test_observables_and_bindings_that_do_not_broadcast_message() -> None:
    qc = QuantumCircuit(1)
    qc.rx(Parameter("t"), 0)
    task = codec.encode_estimator_task([(qc, ["Z", "X", "Y"], [[0.1], [0.2]])])
    with pytest.raises(InvalidArgument) as err:
        codec.decode_estimator_task(task)
    assert str(err.value) == (
        "pub 0: observables shape (3,) and parameter_values shape (2,) do not broadcast"
    )


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_negative_or_non_finite_precision_is_invalid_argument(value: float) -> None:
    task = codec.encode_estimator_task([(QuantumCircuit(1), "Z")])
    task.precision = value
    with pytest.raises(InvalidArgument, match=r"^precision must be >= 0"):
        codec.decode_estimator_task(task)
    task.ClearField("precision")
    task.pubs[0].precision = value
    with pytest.raises(InvalidArgument, match=r"^pub 0: precision must be >= 0"):
        codec.decode_estimator_task(task)


def test_precision_zero_asks_for_exact_values_and_is_accepted() -> None:
    task = codec.encode_estimator_task([(QuantumCircuit(1), "Z", None, 0.0)], precision=0.0)
    pubs, precision = codec.decode_estimator_task(task)
    assert precision == 0.0
    assert pubs[0].precision == 0.0


def test_malformed_estimator_pub_like_is_invalid_argument_on_encode() -> None:
    with pytest.raises(InvalidArgument, match=r"pub 0: an estimator pub is \(circuit, observables"):
        codec.encode_estimator_task([QuantumCircuit(1)])  # type: ignore[list-item]


def test_bindings_for_circuit_without_parameters_keep_pub_shape() -> None:
    qc = QuantumCircuit(1, 1)
    qc.measure(0, 0)
    task = codec.encode_sampler_task([(qc, BindingsArray(shape=(5,)))])
    pubs, _ = codec.decode_sampler_task(_wire(task))
    assert pubs[0].shape == (5,)


def test_big_parameter_sweep_encodes_as_one_buffer() -> None:
    theta = ParameterVector("t", 8)
    qc = QuantumCircuit(8)
    for i, t in enumerate(theta):
        qc.ry(t, i)
    values = np.random.default_rng(1).uniform(size=(10_000, 8))
    task = codec.encode_sampler_task([(qc, values)])
    assert len(task.pubs[0].parameter_values.values.data) == values.nbytes
    pubs, _ = codec.decode_sampler_task(_wire(task))
    assert np.array_equal(pubs[0].parameter_values.as_array(qc.parameters), values)


# ----------------------------------------------------------------- results


def _sampler_result() -> PrimitiveResult[SamplerPubResult]:
    rng = np.random.default_rng(3)
    alpha = BitArray(rng.integers(0, 4, size=(2, 3, 50, 1), dtype=np.uint8), 2)
    beta = BitArray(rng.integers(0, 2, size=(2, 3, 50, 2), dtype=np.uint8) & 1, 9)
    first = SamplerPubResult(
        DataBin(alpha=alpha, beta=beta, shape=(2, 3)),
        metadata={"shots": 50, "circuit_metadata": {"k": [1, 2]}},
    )
    second = SamplerPubResult(
        DataBin(meas=BitArray(np.zeros((7, 1), dtype=np.uint8), 1), shape=()),
        metadata={"shots": 7, "circuit_metadata": {}},
    )
    return PrimitiveResult([first, second], metadata={"version": 2})


def test_sampler_result_round_trip_keeps_registers_in_order() -> None:
    result = _sampler_result()
    back = codec.decode_primitive_result(_wire(codec.encode_primitive_result(result)))
    assert back.metadata == {"version": 2}
    assert len(back) == 2
    for got, want in zip(back, result, strict=True):
        assert isinstance(got, SamplerPubResult)
        assert list(got.data.keys()) == list(want.data.keys())
        assert got.data.shape == want.data.shape
        for name in want.data.keys():  # noqa: SIM118 - DataBin is not a Mapping
            assert got.data[name] == want.data[name]
            assert got.data[name].num_bits == want.data[name].num_bits
        assert got.metadata == want.metadata
    assert list(back[0].data.alpha.get_counts(loc=(1, 2))) == list(
        result[0].data.alpha.get_counts(loc=(1, 2))
    )


def test_estimator_result_round_trip_with_extra_arrays_and_numpy_metadata() -> None:
    rng = np.random.default_rng(4)
    evs, stds = rng.normal(size=(3, 4)), rng.uniform(size=(3, 4))
    pub = PubResult(
        DataBin(
            evs=evs,
            stds=stds,
            ensemble_standard_error=stds * 2,
            evs_noise_factors=rng.normal(size=(3, 4, 3)),
            shape=(3, 4),
        ),
        metadata={
            "target_precision": np.float64(0.015625),
            "shots": np.int64(4096),
            "noise_factors": np.array([1.0, 3.0, 5.0]),
            "flags": (True, np.bool_(False)),
            "phase": 1 + 2j,
            "by_qubit": {0: 0.1},
            "circuit_metadata": {"name": "x"},
        },
    )
    result = PrimitiveResult([pub], metadata={"dynamical_decoupling": {"enable": False}})
    back = codec.decode_primitive_result(_wire(codec.encode_primitive_result(result)))
    got = back[0]
    assert type(got) is PubResult
    assert list(got.data.keys()) == ["evs", "stds", "ensemble_standard_error", "evs_noise_factors"]
    for name in got.data.keys():  # noqa: SIM118
        assert np.array_equal(got.data[name], pub.data[name])
        assert got.data[name].dtype == pub.data[name].dtype
    # numpy values in metadata come back as the documented JSON forms.
    assert got.metadata == {
        "target_precision": 0.015625,
        "shots": 4096,
        "noise_factors": [1.0, 3.0, 5.0],
        "flags": [True, False],
        "phase": [1.0, 2.0],
        "by_qubit": {"0": 0.1},
        "circuit_metadata": {"name": "x"},
    }
    assert isinstance(got.metadata["shots"], int)
    assert back.metadata == result.metadata


def test_metadata_unknown_objects_become_repr() -> None:
    text = codec.metadata_to_json({"obj": Parameter("x")})
    assert json.loads(text) == {"obj": "Parameter(x)"}


def test_result_field_of_unsupported_type_is_refused() -> None:
    result = PrimitiveResult([PubResult(DataBin(thing=["a"], shape=()))])
    with pytest.raises(
        InvalidArgument, match="result field 'thing' of type list cannot be encoded"
    ):
        codec.encode_primitive_result(result)


def test_corrupt_bit_array_in_result_is_invalid_argument() -> None:
    msg = codec.encode_primitive_result(_sampler_result())
    msg.pub_results[0].data[0].bits.num_shots = 51
    with pytest.raises(
        InvalidArgument,
        match=r"pub result 0 field 'alpha': bit array of shape \[2, 3, 51, 1\] "
        r"needs 306 bytes but has 300",
    ):
        codec.decode_primitive_result(msg)


def test_bad_metadata_json_is_invalid_argument() -> None:
    msg = codec.encode_primitive_result(_sampler_result())
    msg.pub_results[1].metadata_json = "[1, 2]"
    with pytest.raises(InvalidArgument, match="pub result 1 metadata must be a JSON object"):
        codec.decode_primitive_result(msg)


class _PanicException(BaseException):
    """Stands in for pyo3's PanicException (a BaseException) from Qiskit's Rust code."""


def test_a_rust_panic_in_qpy_is_invalid_argument_without_backtrace_or_colour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    panic = (
        "\x1b[1m\x1b[31mthread '<unnamed>' panicked at crates/qpy/src/circuits.rs:42:9:\x1b[0m\n"
        "index out of bounds: the len is 0 but the index is 3\n"
        "stack backtrace:\n   0: rust_begin_unwind\n   1: core::panicking::panic_fmt\n"
    )

    def load(_: object) -> None:
        raise _PanicException(panic)

    monkeypatch.setattr(codec.qpy, "load", load)
    with pytest.raises(InvalidArgument) as err:
        codec.decode_circuit(types_pb2.Circuit(qpy=b"QISKIT..."), "pub 0: circuit")
    assert str(err.value) == (
        "pub 0: circuit is not valid QPY: thread '<unnamed>' panicked at "
        "crates/qpy/src/circuits.rs:42:9:\nindex out of bounds: the len is 0 but the index is 3"
    )
