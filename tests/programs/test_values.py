"""The qrelay value encoding: lossless round trips, exact errors, no qiskit for plain values."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.quantum_info import SparsePauliOp

from qrelay._proto.v1 import types_pb2
from qrelay.codec import encode_estimator_task
from qrelay.errors import InvalidArgument
from qrelay.executor.pipeline import PrimitivePipeline
from qrelay.values import decode_value, encode_value


def _roundtrip(value: object) -> object:
    return decode_value(encode_value(value))


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**70),
        1.5,
        "text ✓",
        [1, "a", None, [2.5]],
        {"a": {"b": [1, 2]}},
        (1, (2, "x")),
        1 - 2j,
        b"\x00\xffbytes",
        {1: "int key", (2, 3): "tuple key"},
        {"$qrelay": "looks like a tag", "other": 1},
        float("inf"),
        -float("inf"),
    ],
)
def test_plain_values_round_trip_exactly(value: object) -> None:
    assert _roundtrip(value) == value
    assert type(_roundtrip(value)) is type(value)


def test_nan_round_trips() -> None:
    out = _roundtrip({"x": float("nan")})
    assert isinstance(out, dict)
    assert math.isnan(out["x"])


def test_json_objects_stay_plain_json() -> None:
    assert encode_value({"a": [1, 2.5, "x", None, True]}) == '{"a":[1,2.5,"x",null,true]}'


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.linspace(0, 1, 7),
        np.array([1 + 2j, 3 - 4j], dtype=np.complex128),
        np.array([True, False]),
        np.zeros((0, 3), dtype=np.float32),
        np.array(3.25),
        np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian travels little-endian
        np.arange(10, dtype=np.uint8)[::2],  # non-contiguous
    ],
)
def test_numpy_arrays_round_trip_with_dtype_and_shape(array: np.ndarray) -> None:
    out = _roundtrip(array)
    assert isinstance(out, np.ndarray)
    assert out.shape == array.shape
    assert out.dtype == array.dtype.newbyteorder("<") or out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "scalar", [np.float32(1.5), np.int16(-3), np.complex64(1j), np.bool_(True)]
)
def test_numpy_scalars_round_trip_as_numpy_scalars(scalar: np.generic) -> None:
    out = _roundtrip(scalar)
    assert type(out) is type(scalar)
    assert out == scalar


def test_sparse_pauli_op_round_trips() -> None:
    op = SparsePauliOp(["XZI", "IYY", "ZZZ"], [0.5, -1.25j, 2.0])
    out = _roundtrip(op)
    assert isinstance(out, SparsePauliOp)
    assert out == op


def test_quantum_circuit_round_trips_through_qpy() -> None:
    theta = Parameter("θ")
    qc = QuantumCircuit(2, name="ansatz")
    qc.ry(theta, 0)
    qc.cx(0, 1)
    qc.measure_all()
    out = _roundtrip({"circuit": qc})
    assert isinstance(out, dict)
    assert out["circuit"] == qc


def test_primitive_result_round_trips_through_the_codec(pipeline: PrimitivePipeline) -> None:
    qc = QuantumCircuit(1)
    qc.h(0)
    spec = types_pb2.JobSpec(
        backend="aer",
        estimator=encode_estimator_task([(qc, [SparsePauliOp("X"), SparsePauliOp("Z")])], 0.05),
    )
    from qrelay.codec import decode_primitive_result

    result = decode_primitive_result(pipeline.run(spec).primitive)
    out = _roundtrip(result)
    np.testing.assert_array_equal(out[0].data.evs, result[0].data.evs)  # type: ignore[index]
    np.testing.assert_array_equal(out[0].data.stds, result[0].data.stds)  # type: ignore[index]
    assert out.metadata == result.metadata  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": {"b": [1, 2, {3}]}}, "cannot encode object of type set at path a.b[2]"),
        (object(), "cannot encode object of type object at path <root>"),
        ([len], "cannot encode object of type builtin_function_or_method at path [0]"),
        (
            {"x": np.array(["a"], dtype=object)},
            "cannot encode numpy array of dtype object at path x: only bool, integer, float "
            "and complex arrays are supported",
        ),
        (
            SparsePauliOp(["X"], [Parameter("a")]),
            "cannot encode SparsePauliOp with parameterised coefficients at path <root>; "
            "bind its parameters first",
        ),
    ],
)
def test_unencodable_values_name_type_and_path(value: object, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        encode_value(value)
    assert info.value.message == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "{",
            "value is not valid JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
        ('{"a": {"$qrelay": "pickle", "data": "x"}}', "unknown value tag 'pickle' at path a"),
        (
            '{"$qrelay": "ndarray", "dtype": "<f8", "shape": [2], "base64": "AAAA"}',
            "ndarray at path <root> has 3 bytes, expected 16 for shape (2,) and dtype <f8",
        ),
        (
            '{"$qrelay": "ndarray", "dtype": "|O", "shape": [1], "base64": ""}',
            "dtype '|O' at path <root> is not allowed",
        ),
        (
            '[{"$qrelay": "bytes", "base64": "@@@"}]',
            "invalid base64 at path [0]: Only base64 data is allowed",
        ),
        (
            '{"$qrelay": "complex", "real": 1}',
            "malformed complex value at path <root>: KeyError('imag')",
        ),
    ],
)
def test_malformed_values_are_invalid_argument(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_value(text)
    assert info.value.message == message


def test_garbage_qpy_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_value(json.dumps({"$qrelay": "QuantumCircuit", "qpy": "AAAA"}))
    assert info.value.message.startswith("circuit at path <root> is not valid QPY")


def test_plain_values_need_no_qiskit_so_the_broker_can_use_them() -> None:
    code = (
        "import sys, qrelay.values as v\n"
        "s = v.encode_value({'a': (1, 2j, b'x')})\n"
        "assert v.decode_value(s) == {'a': (1, 2j, b'x')}\n"
        "assert 'qiskit' not in sys.modules, sorted(m for m in sys.modules if 'qiskit' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
