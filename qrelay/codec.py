"""Lossless conversion between Qiskit's primitive types and the qrelay.v1 wire types.

Shared by the client SDK and the executor (never the broker, which must not
import qiskit). Every decoder validates what it reads and raises
`qrelay.errors.InvalidArgument` with a message naming the PUB at fault, so a
bad request surfaces as INVALID_ARGUMENT rather than as an exception deep in
Qiskit. Big data (bindings, evs, bit arrays) moves as one packed buffer each
way; the only per-element Python loops are over observables and result
fields, which are small by nature.

Metadata travels as JSON. Values JSON cannot hold are converted on the way
out, and do not come back as their original type:

* numpy integer / floating / bool scalars -> int / float / bool;
* numpy arrays, tuples and sets -> (nested) lists;
* complex numbers -> ``[real, imag]``;
* mapping keys -> ``str(key)``;
* any other object -> ``repr(obj)``.

Plain JSON-compatible metadata (what Qiskit's reference primitives produce)
round-trips unchanged.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from qiskit import qasm3, qpy
from qiskit.circuit import Parameter, QuantumCircuit
from qiskit.primitives.containers import (
    BindingsArray,
    BitArray,
    DataBin,
    ObservablesArray,
    PrimitiveResult,
    PubResult,
    SamplerPubResult,
)
from qiskit.primitives.containers.estimator_pub import EstimatorPub, EstimatorPubLike
from qiskit.primitives.containers.object_array import object_array
from qiskit.primitives.containers.sampler_pub import SamplerPub, SamplerPubLike
from qiskit.quantum_info import Pauli, PauliList, SparseObservable, SparsePauliOp

from qrelay._proto.v1 import types_pb2
from qrelay.errors import InvalidArgument

__all__ = [
    "ALLOWED_DTYPES",
    "decode_array",
    "decode_bindings",
    "decode_circuit",
    "decode_estimator_task",
    "decode_observables",
    "decode_primitive_result",
    "decode_sampler_task",
    "encode_array",
    "encode_bindings",
    "encode_circuit",
    "encode_estimator_task",
    "encode_observables",
    "encode_primitive_result",
    "encode_sampler_task",
    "fill_array",
    "fill_bindings",
    "metadata_from_json",
    "metadata_to_json",
]

# Wire dtypes (numpy array-protocol strings, little-endian). Object, string and
# datetime dtypes are excluded: they have no language-neutral byte layout.
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {
        "|b1",
        "|i1",
        "|u1",
        "<i2",
        "<u2",
        "<i4",
        "<u4",
        "<i8",
        "<u8",
        "<f4",
        "<f8",
        "<c8",
        "<c16",
    }
)

# Coefficients whose imaginary part is below this are treated as real, the
# same tolerance Qiskit's np.real_if_close uses for float64 (100 * eps).
_IMAG_ATOL = 100 * float(np.finfo(np.float64).eps)
_PAULI_CHARS = frozenset("IXYZ")


# --------------------------------------------------------------------------- arrays


def encode_array(array: npt.ArrayLike) -> types_pb2.NDArray:
    """Pack an array as shape + dtype + little-endian C-order bytes."""
    msg = types_pb2.NDArray()
    fill_array(msg, array)
    return msg


def fill_array(target: types_pb2.NDArray, array: npt.ArrayLike) -> None:
    """Pack an array into an existing message field.

    Protobuf copies a sub-message on every assignment or constructor kwarg;
    filling the field where it lives keeps a big buffer to one copy.
    """
    arr = np.asarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    dtype = arr.dtype.str
    if dtype not in ALLOWED_DTYPES:
        raise InvalidArgument(
            f"array dtype {arr.dtype} cannot travel on the wire; "
            f"allowed: {', '.join(sorted(ALLOWED_DTYPES))}"
        )
    target.shape[:] = arr.shape
    target.dtype = dtype
    target.data = np.ascontiguousarray(arr).tobytes()


def decode_array(msg: types_pb2.NDArray, what: str = "array") -> npt.NDArray[Any]:
    """Unpack an NDArray, checking dtype and byte length; the result is writable."""
    if msg.dtype not in ALLOWED_DTYPES:
        raise InvalidArgument(
            f"{what}: dtype {msg.dtype!r} is not allowed; "
            f"use one of {', '.join(sorted(ALLOWED_DTYPES))}"
        )
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: shape {list(shape)} has a negative dimension")
    dtype = np.dtype(msg.dtype)
    expected = math.prod(shape) * dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} with dtype {msg.dtype} needs {expected} bytes "
            f"but data has {len(msg.data)}"
        )
    # bytearray makes the result writable without a second copy.
    return np.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)


# --------------------------------------------------------------------------- circuits


def encode_circuit(circuit: QuantumCircuit) -> types_pb2.Circuit:
    """Serialise one circuit with QPY (lossless, including parameters and registers)."""
    buf = io.BytesIO()
    qpy.dump(circuit, buf)
    return types_pb2.Circuit(qpy=buf.getvalue())


def circuit_wire_bytes(msg: types_pb2.Circuit) -> bytes:
    """The bytes that identify a wire circuit (QPY bytes or UTF-8 QASM text), for hashing."""
    fmt = msg.WhichOneof("format")
    if fmt == "qpy":
        return b"qpy:" + msg.qpy
    if fmt == "qasm3":
        return b"qasm3:" + msg.qasm3.encode()
    raise InvalidArgument("circuit is empty: set either qpy or qasm3")


def decode_circuit(msg: types_pb2.Circuit, what: str = "circuit") -> QuantumCircuit:
    """Load a wire circuit from QPY or OpenQASM 3; garbage becomes InvalidArgument."""
    fmt = msg.WhichOneof("format")
    if fmt == "qpy":
        try:
            circuits = qpy.load(io.BytesIO(msg.qpy))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - struct, Qpy, Value... errors, and
            # pyo3's PanicException (a BaseException) when Qiskit's Rust code panics
            raise InvalidArgument(f"{what} is not valid QPY: {_reason(exc)}") from None
        if len(circuits) != 1 or not isinstance(circuits[0], QuantumCircuit):
            raise InvalidArgument(
                f"{what} is not valid QPY: expected exactly one circuit, found {len(circuits)}"
            )
        return circuits[0]
    if fmt == "qasm3":
        try:
            circuit = qasm3.loads(msg.qasm3)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the QASM 3 importers share no base error
            raise InvalidArgument(f"{what} is not valid OpenQASM 3: {_reason(exc)}") from None
        if not isinstance(circuit, QuantumCircuit):
            raise InvalidArgument(f"{what} is not valid OpenQASM 3: it holds no circuit")
        return circuit
    raise InvalidArgument(f"{what} is empty: set either qpy or qasm3")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_BACKTRACE = re.compile(r"(?im)^\s*(stack backtrace:|backtrace:|note: run with `RUST_BACKTRACE)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _reason(exc: BaseException) -> str:
    """A parser's complaint fit for a user: no terminal colour codes, no Rust (or other)
    backtrace, no control characters, at most 300 characters."""
    text = _ANSI.sub("", str(exc))
    found = _BACKTRACE.search(text)
    if found:
        text = text[: found.start()]
    text = _CONTROL.sub("", text).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------- bindings


def encode_bindings(
    bindings: BindingsArray, parameters: Sequence[Parameter]
) -> types_pb2.Bindings | None:
    """Bindings as one float64 array pub_shape + (num_parameters,), in `parameters` order."""
    msg = types_pb2.Bindings()
    return msg if fill_bindings(msg, bindings, parameters) else None


def fill_bindings(
    target: types_pb2.Bindings, bindings: BindingsArray, parameters: Sequence[Parameter]
) -> bool:
    """Fill `target` in place; False (nothing written) for a scalar pub without parameters."""
    if not parameters and bindings.shape == ():
        return False
    values = bindings.as_array(parameters) if parameters else np.zeros((*bindings.shape, 0))
    fill_array(target.values, np.asarray(values, dtype=np.float64))
    target.parameter_names[:] = [p.name for p in parameters]
    return True


def decode_bindings(
    msg: types_pb2.Bindings | None,
    parameter_names: Sequence[str],
    pub_index: int,
) -> tuple[npt.NDArray[np.float64], tuple[int, ...]]:
    """Values of shape pub_shape + (len(parameter_names),) in `parameter_names` order.

    `parameter_names` is the circuit's own parameter order. The message may
    name its columns in another order, which is permuted here; it must name
    exactly the circuit's parameters.
    """
    n = len(parameter_names)
    if msg is None:
        if n:
            raise InvalidArgument(
                f"pub {pub_index}: circuit has {n} parameters but no parameter_values were given"
            )
        return np.zeros((0,), dtype=np.float64), ()
    values = decode_array(msg.values, f"pub {pub_index}: parameter_values")
    if values.dtype.kind not in "iuf":
        raise InvalidArgument(
            f"pub {pub_index}: parameter_values must be real numbers, got dtype {values.dtype}"
        )
    if values.ndim == 0:
        raise InvalidArgument(
            f"pub {pub_index}: parameter_values must have a last axis over parameters"
        )
    values = values.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        raise InvalidArgument(f"pub {pub_index}: parameter_values contain NaN or infinity")
    if values.shape[-1] != n:
        raise InvalidArgument(
            f"pub {pub_index}: circuit has {n} parameters but parameter_values has "
            f"{values.shape[-1]} per binding"
        )
    names = list(msg.parameter_names)
    if names and names != list(parameter_names):
        if len(names) != n or set(names) != set(parameter_names):
            missing = sorted(set(parameter_names) - set(names))
            extra = sorted(set(names) - set(parameter_names))
            raise InvalidArgument(
                f"pub {pub_index}: parameter_names do not match the circuit's parameters"
                f" (missing {missing}, unknown {extra}, {len(names)} names for {n} parameters)"
            )
        order = [names.index(p) for p in parameter_names]
        values = values[..., order]
    return values, values.shape[:-1]


def _bindings_array(
    parameters: Sequence[Parameter], values: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> BindingsArray:
    if not parameters:
        return BindingsArray(shape=shape)
    return BindingsArray({tuple(parameters): values}, shape=shape)


# --------------------------------------------------------------------------- observables


def _to_sparse_observable(obs: Any) -> SparseObservable:
    """One observable-like as a SparseObservable, keeping complex coefficients."""
    if isinstance(obs, SparseObservable):
        return obs
    if isinstance(obs, SparsePauliOp):
        return SparseObservable.from_sparse_pauli_op(obs)
    if isinstance(obs, Pauli):
        return SparseObservable.from_pauli(obs)
    if isinstance(obs, str):
        return SparseObservable.from_label(obs)
    if isinstance(obs, Mapping):
        terms: list[tuple[str, complex]] = []
        for basis, coeff in obs.items():
            if isinstance(basis, Pauli):
                terms.append((basis[:].to_label(), complex(0, 1) ** basis.phase * coeff))
            else:
                terms.append((str(basis), coeff))
        return SparseObservable.from_list(terms)
    raise InvalidArgument(f"invalid observable type: {type(obs).__name__}")


def _encode_observable(obs: Any) -> types_pb2.Observable:
    op = SparsePauliOp.from_sparse_observable(_to_sparse_observable(obs))
    coeffs = np.asarray(op.coeffs, dtype=np.complex128)
    imag = coeffs.imag
    return types_pb2.Observable(
        paulis=op.paulis.to_labels(),
        coeffs=coeffs.real.tolist(),
        coeffs_imag=imag.tolist() if np.any(imag != 0) else [],
    )


def encode_observables(observables: Any) -> types_pb2.ObservablesArray:
    """Any ObservablesArrayLike as Pauli strings + coefficients.

    Projector terms (SparseObservable's 0/1/+/-/r/l) are expanded into Paulis;
    complex coefficients are sent as they are (see `decode_observables`).
    """
    if isinstance(observables, ObservablesArray):
        array = observables.sparse_observables_array()
    else:
        try:
            array = object_array(observables, copy=False, list_types=(PauliList,))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"observables: {exc}") from None
    return types_pb2.ObservablesArray(
        shape=list(array.shape), elements=[_encode_observable(o) for o in array.reshape(-1)]
    )


def decode_observables(
    msg: types_pb2.ObservablesArray, num_qubits: int, pub_index: int
) -> ObservablesArray:
    """Rebuild and validate an ObservablesArray for a circuit of `num_qubits` qubits."""
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape) or math.prod(shape) != len(msg.elements):
        raise InvalidArgument(
            f"pub {pub_index}: observables shape {list(shape)} needs {math.prod(shape)} "
            f"elements but {len(msg.elements)} were given"
        )
    out = np.empty(len(msg.elements), dtype=object)
    for j, element in enumerate(msg.elements):
        out[j] = _decode_observable(element, num_qubits, f"pub {pub_index}: observable {j}")
    try:
        return ObservablesArray(out.reshape(shape), num_qubits=num_qubits, copy=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"pub {pub_index}: {exc}") from None


def _decode_observable(msg: types_pb2.Observable, num_qubits: int, what: str) -> SparseObservable:
    paulis = list(msg.paulis)
    if not paulis:
        raise InvalidArgument(f"{what} has no terms")
    if len(msg.coeffs) != len(paulis):
        raise InvalidArgument(
            f"{what} has {len(paulis)} Pauli terms but {len(msg.coeffs)} coefficients"
        )
    if msg.coeffs_imag and len(msg.coeffs_imag) != len(paulis):
        raise InvalidArgument(
            f"{what} has {len(paulis)} Pauli terms but {len(msg.coeffs_imag)} imaginary parts"
        )
    for label in paulis:
        if len(label) != num_qubits:
            raise InvalidArgument(
                f"{what} acts on {len(label)} qubits ('{label}') but the circuit has "
                f"{num_qubits} qubits"
            )
        if not set(label) <= _PAULI_CHARS:
            raise InvalidArgument(f"{what}: '{label}' is not a Pauli string of I, X, Y, Z")
    coeffs = np.asarray(msg.coeffs, dtype=np.complex128)
    if msg.coeffs_imag:
        coeffs = coeffs + 1j * np.asarray(msg.coeffs_imag, dtype=np.float64)
    if not np.all(np.isfinite(coeffs)):
        raise InvalidArgument(f"{what} has a non-finite coefficient")
    op = SparsePauliOp(paulis, coeffs).simplify()
    simplified = np.asarray(op.coeffs)
    bad = np.abs(simplified.imag) > _IMAG_ATOL
    if np.any(bad):
        i = int(np.argmax(bad))
        raise InvalidArgument(
            f"{what} is not Hermitian: term '{op.paulis[i].to_label()}' has complex "
            f"coefficient {complex(simplified[i])}; a Pauli sum is Hermitian only with "
            "real coefficients"
        )
    if np.all(simplified == 0):
        raise InvalidArgument(f"{what} is zero (all coefficients cancel)")
    return SparseObservable.from_sparse_pauli_op(SparsePauliOp(op.paulis, simplified.real))


# --------------------------------------------------------------------------- tasks


def encode_sampler_task(
    pubs: Iterable[SamplerPubLike], shots: int | None = None
) -> types_pb2.SamplerTask:
    """What `BaseSamplerV2.run(pubs, shots=shots)` receives, on the wire."""
    task = types_pb2.SamplerTask()
    if shots is not None:
        task.shots = int(shots)
    for i, pub_like in enumerate(pubs):
        try:
            pub = SamplerPub.coerce(pub_like)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"pub {i}: {exc}") from None
        msg = task.pubs.add(circuit=encode_circuit(pub.circuit))
        fill_bindings(msg.parameter_values, pub.parameter_values, list(pub.circuit.parameters))
        if pub.shots is not None:
            msg.shots = int(pub.shots)
    return task


def encode_estimator_task(
    pubs: Iterable[EstimatorPubLike], precision: float | None = None
) -> types_pb2.EstimatorTask:
    """What `BaseEstimatorV2.run(pubs, precision=precision)` receives, on the wire.

    Observables are encoded from the raw pub (not through EstimatorPub.coerce)
    so that a non-Hermitian observable reaches the receiver, which says why it
    is rejected.
    """
    task = types_pb2.EstimatorTask()
    if precision is not None:
        task.precision = float(precision)
    for i, pub_like in enumerate(pubs):
        if isinstance(pub_like, EstimatorPub):
            circuit, observables = pub_like.circuit, pub_like.observables
            bindings_arr, pub_precision = pub_like.parameter_values, pub_like.precision
        else:
            if not isinstance(pub_like, tuple | list) or not 2 <= len(pub_like) <= 4:
                raise InvalidArgument(
                    f"pub {i}: an estimator pub is (circuit, observables[, parameter_values"
                    f"[, precision]]), got {type(pub_like).__name__}"
                )
            circuit, observables = pub_like[0], pub_like[1]
            if not isinstance(circuit, QuantumCircuit):
                raise InvalidArgument(f"pub {i}: circuit must be a QuantumCircuit")
            raw_values = pub_like[2] if len(pub_like) > 2 else None
            pub_precision = pub_like[3] if len(pub_like) > 3 else None
            try:
                if raw_values is None:
                    bindings_arr = BindingsArray()
                elif isinstance(raw_values, BindingsArray | Mapping):
                    bindings_arr = BindingsArray.coerce(raw_values)
                else:
                    bindings_arr = BindingsArray.coerce({tuple(circuit.parameters): raw_values})
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"pub {i}: {exc}") from None
        msg = task.pubs.add(
            circuit=encode_circuit(circuit), observables=encode_observables(observables)
        )
        try:
            fill_bindings(msg.parameter_values, bindings_arr, list(circuit.parameters))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"pub {i}: {exc}") from None
        if pub_precision is not None:
            msg.precision = float(pub_precision)
    return task


def _check_positive(value: float, what: str) -> None:
    if not value > 0 or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be > 0, got {value}")


def _check_precision(value: float, what: str) -> None:
    """Precision 0 asks for exact values (the ideal simulator gives them); < 0 is nonsense."""
    if not value >= 0 or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be >= 0, got {value}")


#: Instructions that touch a qubit without acting on its state.
NOT_ACTING = frozenset({"barrier", "delay"})


def active_qubits(circuit: QuantumCircuit) -> tuple[int, ...]:
    """Indices of the qubits some instruction acts on (barriers and delays do not count).

    The ideal simulator runs a circuit wider than itself when these fit (idle
    wires are dropped, as Aer's primitives do); the SDK checks the same before sending.
    """
    used: set[int] = set()
    for inst in circuit.data:
        if inst.operation.name not in NOT_ACTING:
            used.update(circuit.find_bit(q).index for q in inst.qubits)
    return tuple(sorted(used))


def check_sampler_task(task: types_pb2.SamplerTask) -> int | None:
    """Validate task-level fields; returns the job-level shots (None when absent)."""
    if not task.pubs:
        raise InvalidArgument("sampler task has no pubs")
    shots = task.shots if task.HasField("shots") else None
    if shots is not None:
        _check_positive(shots, "shots")
    for i, pub in enumerate(task.pubs):
        if pub.HasField("shots"):
            _check_positive(pub.shots, f"pub {i}: shots")
    return shots


def check_estimator_task(task: types_pb2.EstimatorTask) -> float | None:
    """Validate task-level fields; returns the job-level precision (None when absent)."""
    if not task.pubs:
        raise InvalidArgument("estimator task has no pubs")
    precision = task.precision if task.HasField("precision") else None
    if precision is not None:
        _check_precision(precision, "precision")
    for i, pub in enumerate(task.pubs):
        if pub.HasField("precision"):
            _check_precision(pub.precision, f"pub {i}: precision")
    return precision


def sampler_pub_from_wire(
    msg: types_pb2.SamplerPub, circuit: QuantumCircuit, pub_index: int
) -> SamplerPub:
    """Coerce one wire pub against an already decoded circuit (Qiskit's SamplerPub rules)."""
    params = list(circuit.parameters)
    values, shape = decode_bindings(
        msg.parameter_values if msg.HasField("parameter_values") else None,
        [p.name for p in params],
        pub_index,
    )
    shots = msg.shots if msg.HasField("shots") else None
    try:
        return SamplerPub.coerce((circuit, _bindings_array(params, values, shape), shots))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"pub {pub_index}: {exc}") from None


def estimator_pub_from_wire(
    msg: types_pb2.EstimatorPub, circuit: QuantumCircuit, pub_index: int
) -> EstimatorPub:
    """Coerce one wire pub against an already decoded circuit (Qiskit's EstimatorPub rules)."""
    params = list(circuit.parameters)
    values, shape = decode_bindings(
        msg.parameter_values if msg.HasField("parameter_values") else None,
        [p.name for p in params],
        pub_index,
    )
    observables = decode_observables(msg.observables, circuit.num_qubits, pub_index)
    precision = msg.precision if msg.HasField("precision") else None
    return make_estimator_pub(
        circuit, observables, _bindings_array(params, values, shape), precision, pub_index
    )


def make_estimator_pub(
    circuit: QuantumCircuit,
    observables: ObservablesArray,
    bindings: BindingsArray,
    precision: float | None,
    pub_index: int,
) -> EstimatorPub:
    """EstimatorPub.coerce with a broadcasting check phrased for the user."""
    try:
        np.broadcast_shapes(observables.shape, bindings.shape)
    except ValueError:
        raise InvalidArgument(
            f"pub {pub_index}: observables shape {observables.shape} and parameter_values "
            f"shape {bindings.shape} do not broadcast"
        ) from None
    try:
        return EstimatorPub.coerce((circuit, observables, bindings, precision))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"pub {pub_index}: {exc}") from None


def decode_sampler_task(task: types_pb2.SamplerTask) -> tuple[list[SamplerPub], int | None]:
    """Validated SamplerPubs (pub-level shots kept, None where unset) and the job-level shots."""
    shots = check_sampler_task(task)
    pubs = [
        sampler_pub_from_wire(pub, decode_circuit(pub.circuit, f"pub {i}: circuit"), i)
        for i, pub in enumerate(task.pubs)
    ]
    return pubs, shots


def decode_estimator_task(
    task: types_pb2.EstimatorTask,
) -> tuple[list[EstimatorPub], float | None]:
    """Validated EstimatorPubs (pub precision kept, None where unset) and the job precision."""
    precision = check_estimator_task(task)
    pubs = [
        estimator_pub_from_wire(pub, decode_circuit(pub.circuit, f"pub {i}: circuit"), i)
        for i, pub in enumerate(task.pubs)
    ]
    return pubs, precision


# --------------------------------------------------------------------------- metadata


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, complex | np.complexfloating):
        return [float(obj.real), float(obj.imag)]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, set | frozenset):
        return [_jsonable(v) for v in obj]
    return repr(obj)


def _jsonable(obj: Any) -> Any:
    """Normalise containers so json.dumps sees only str keys and list sequences."""
    if isinstance(obj, Mapping):
        return {k if isinstance(k, str) else str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, complex):
        return [obj.real, obj.imag]
    return obj


def metadata_to_json(metadata: Mapping[str, Any] | None) -> str:
    """Metadata as a JSON object, converting numpy and other values as the module doc says."""
    return json.dumps(_jsonable(dict(metadata or {})), default=_json_default)


def metadata_from_json(text: str, what: str = "metadata") -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- results


def _fill_field(target: types_pb2.DataField, name: str, value: Any) -> None:
    target.name = name
    if isinstance(value, BitArray):
        target.bits.shape[:] = value.shape
        target.bits.num_shots = value.num_shots
        target.bits.num_bits = value.num_bits
        target.bits.data = np.ascontiguousarray(value.array, dtype=np.uint8).tobytes()
        return
    if isinstance(value, np.ndarray | np.generic | float | int | bool):
        fill_array(target.array, np.asarray(value))
        return
    raise InvalidArgument(
        f"result field {name!r} of type {type(value).__name__} cannot be encoded; "
        "only BitArray and numpy arrays travel"
    )


def _decode_field(msg: types_pb2.DataField, what: str) -> Any:
    kind = msg.WhichOneof("value")
    if kind == "array":
        return decode_array(msg.array, f"{what} field {msg.name!r}")
    if kind == "bits":
        b = msg.bits
        shape = tuple(int(d) for d in b.shape)
        if b.num_bits < 0 or b.num_shots < 0 or any(d < 0 for d in shape):
            raise InvalidArgument(f"{what} field {msg.name!r}: negative size")
        num_bytes = (int(b.num_bits) + 7) // 8
        full = (*shape, int(b.num_shots), num_bytes)
        if len(b.data) != math.prod(full):
            raise InvalidArgument(
                f"{what} field {msg.name!r}: bit array of shape {list(full)} needs "
                f"{math.prod(full)} bytes but has {len(b.data)}"
            )
        packed = np.frombuffer(bytearray(b.data), dtype=np.uint8).reshape(full)
        return BitArray(packed, int(b.num_bits))
    raise InvalidArgument(f"{what} field {msg.name!r} has no value")


def encode_primitive_result(result: PrimitiveResult[Any]) -> types_pb2.PrimitiveResult:
    """A PrimitiveResult with its data bins (field order kept) and JSON metadata."""
    out = types_pb2.PrimitiveResult(metadata_json=metadata_to_json(result.metadata))
    for pub_result in result:
        data = pub_result.data
        msg = out.pub_results.add()  # built in place: no copies of the big buffers
        msg.shape[:] = data.shape
        for name, value in data.items():
            _fill_field(msg.data.add(), name, value)
        msg.metadata_json = metadata_to_json(pub_result.metadata)
        msg.sampler = isinstance(pub_result, SamplerPubResult)
    return out


def decode_primitive_result(msg: types_pb2.PrimitiveResult) -> PrimitiveResult[PubResult]:
    """Rebuild the PrimitiveResult; SamplerPubResult where the sender had one."""
    pub_results: list[PubResult] = []
    for i, pr in enumerate(msg.pub_results):
        what = f"pub result {i}"
        fields = {f.name: _decode_field(f, what) for f in pr.data}
        try:
            data = DataBin(shape=tuple(int(d) for d in pr.shape), **fields)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{what}: {exc}") from None
        cls = SamplerPubResult if pr.sampler else PubResult
        pub_results.append(cls(data, metadata_from_json(pr.metadata_json, f"{what} metadata")))
    return PrimitiveResult(pub_results, metadata=metadata_from_json(msg.metadata_json))
