"""The qrelay value encoding: program inputs, interim results and return values as JSON.

Program values cross a trust boundary (user code on an executor, clients
anywhere), so they travel as plain JSON with a few *tagged objects* for the
types JSON lacks, and never as pickle: decoding can build only the types
listed here. Tagged objects are JSON objects with a ``"$qrelay"`` key naming
the type; see docs/values.md for the exact layout of each tag.

Qiskit is imported lazily, only when a Qiskit value is encoded or decoded, so
the broker (which never imports qiskit) may import this module.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import math
from typing import Any

from qrelay.errors import InvalidArgument

__all__ = ["TAG", "decode_value", "encode_value"]

TAG = "$qrelay"

# numpy dtype kinds that round-trip as raw bytes: bool, signed/unsigned int,
# float, complex. Object arrays are refused (they would need pickle).
_ARRAY_KINDS = frozenset("biufc")


def encode_value(obj: object) -> str:
    """Encode `obj` as qrelay-value JSON; `InvalidArgument` names the first unencodable part."""
    return json.dumps(_encode(obj, ""), separators=(",", ":"), allow_nan=False)


def decode_value(s: str) -> object:
    """Decode qrelay-value JSON back into Python, numpy and Qiskit objects."""
    try:
        raw = json.loads(s)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"value is not valid JSON: {exc}") from None
    return _decode(raw, "")


def _type_name(obj: object) -> str:
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _where(path: str) -> str:
    return path or "<root>"


def _join_key(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, path: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidArgument(f"expected a base64 string at path {_where(path)}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidArgument(f"invalid base64 at path {_where(path)}: {exc}") from None


def _codec() -> Any:
    """qrelay.codec (imports qiskit), loaded on first use of a PrimitiveResult."""
    return importlib.import_module("qrelay.codec")


def _encode(obj: object, path: str) -> Any:
    # bool before int: bool is an int subclass and JSON keeps it apart.
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {TAG: "float", "value": repr(obj)}  # "nan", "inf", "-inf"
    if isinstance(obj, list):
        return [_encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {TAG: "tuple", "items": [_encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: _encode(v, _join_key(path, k)) for k, v in obj.items()}
        # Non-string keys, or a user key that would look like a tag.
        return {
            TAG: "dict",
            "items": [
                [_encode(k, f"{path}<key {i}>"), _encode(v, _join_key(path, k))]
                for i, (k, v) in enumerate(obj.items())
            ],
        }
    if isinstance(obj, complex):
        return {TAG: "complex", "real": _encode(obj.real, path), "imag": _encode(obj.imag, path)}
    if isinstance(obj, bytes | bytearray | memoryview):
        return {TAG: "bytes", "base64": _b64(bytes(obj))}
    return _encode_foreign(obj, path)


def _encode_foreign(obj: object, path: str) -> Any:
    """numpy and Qiskit values, recognised by module so numpy/qiskit load only if in use."""
    module = type(obj).__module__ or ""
    if module.startswith("numpy"):
        import numpy as np

        if isinstance(obj, np.ndarray):
            return _encode_ndarray(obj, path)
        if isinstance(obj, np.generic) and obj.dtype.kind in _ARRAY_KINDS:
            arr = np.asarray(obj)
            dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
            return {
                TAG: "npscalar",
                "dtype": dtype.str,
                "base64": _b64(arr.astype(dtype).tobytes()),
            }
    if module.startswith("qiskit"):
        from qiskit.circuit import QuantumCircuit
        from qiskit.primitives import PrimitiveResult
        from qiskit.quantum_info import SparsePauliOp

        if isinstance(obj, QuantumCircuit):
            from qiskit import qpy

            buf = io.BytesIO()
            qpy.dump(obj, buf)
            return {TAG: "QuantumCircuit", "qpy": _b64(buf.getvalue())}
        if isinstance(obj, SparsePauliOp):
            import numpy as np

            coeffs = np.asarray(obj.coeffs)
            if coeffs.dtype.kind not in _ARRAY_KINDS:
                raise InvalidArgument(
                    f"cannot encode SparsePauliOp with parameterised coefficients at path "
                    f"{_where(path)}; bind its parameters first"
                )
            return {
                TAG: "SparsePauliOp",
                "paulis": [str(p) for p in obj.paulis.to_labels()],
                "coeffs": _encode_ndarray(coeffs, f"{path}.coeffs"),
            }
        if isinstance(obj, PrimitiveResult):
            codec = _codec()
            try:
                message = codec.encode_primitive_result(obj)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"cannot encode PrimitiveResult at path {_where(path)}: {exc}"
                ) from None
            return {TAG: "PrimitiveResult", "proto": _b64(message.SerializeToString())}
    raise InvalidArgument(f"cannot encode object of type {_type_name(obj)} at path {_where(path)}")


def _encode_ndarray(arr: Any, path: str) -> Any:
    import numpy as np

    if arr.dtype.kind not in _ARRAY_KINDS:
        raise InvalidArgument(
            f"cannot encode numpy array of dtype {arr.dtype} at path {_where(path)}: only bool, "
            "integer, float and complex arrays are supported"
        )
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
    return {TAG: "ndarray", "dtype": dtype.str, "shape": list(arr.shape), "base64": _b64(data)}


def _decode(raw: Any, path: str) -> object:
    if isinstance(raw, list):
        return [_decode(v, f"{path}[{i}]") for i, v in enumerate(raw)]
    if not isinstance(raw, dict):
        return raw
    if TAG not in raw:
        return {k: _decode(v, _join_key(path, k)) for k, v in raw.items()}
    tag = raw[TAG]
    try:
        return _decode_tagged(tag, raw, path)
    except InvalidArgument:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"malformed {tag!s} value at path {_where(path)}: {exc!r}") from None


def _decode_tagged(tag: object, raw: dict[str, Any], path: str) -> object:
    if tag == "tuple":
        return tuple(_decode(v, f"{path}[{i}]") for i, v in enumerate(raw["items"]))
    if tag == "dict":
        out: dict[Any, object] = {}
        for i, (k, v) in enumerate(raw["items"]):
            key = _decode(k, f"{path}<key {i}>")
            try:
                out[key] = _decode(v, _join_key(path, key))
            except TypeError:
                raise InvalidArgument(
                    f"unhashable dict key of type {_type_name(key)} at path {_where(path)}"
                ) from None
        return out
    if tag == "float":
        value = raw["value"]
        if value not in ("nan", "inf", "-inf"):
            raise InvalidArgument(f"float tag at path {_where(path)} must be nan, inf or -inf")
        return float(value)
    if tag == "complex":
        return complex(float(raw["real"]), float(raw["imag"]))
    if tag == "bytes":
        return _unb64(raw["base64"], path)
    if tag == "ndarray":
        return _decode_ndarray(raw, path)
    if tag == "npscalar":
        import numpy as np

        dtype = _checked_dtype(raw["dtype"], path)
        data = _unb64(raw["base64"], path)
        if len(data) != dtype.itemsize:
            raise InvalidArgument(
                f"numpy scalar at path {_where(path)} has {len(data)} bytes, "
                f"expected {dtype.itemsize}"
            )
        return np.frombuffer(data, dtype=dtype)[0]
    if tag == "QuantumCircuit":
        from qiskit import qpy

        try:
            circuits = qpy.load(io.BytesIO(_unb64(raw["qpy"], path)))
        except Exception as exc:  # noqa: BLE001 - QPY raises many types on garbage
            raise InvalidArgument(
                f"circuit at path {_where(path)} is not valid QPY: {exc}"
            ) from None
        if len(circuits) != 1:
            raise InvalidArgument(
                f"QPY at path {_where(path)} holds {len(circuits)} circuits, expected 1"
            )
        return circuits[0]
    if tag == "SparsePauliOp":
        from qiskit.quantum_info import SparsePauliOp

        coeffs = _decode_ndarray(raw["coeffs"], f"{path}.coeffs")
        paulis = raw["paulis"]
        if not isinstance(paulis, list) or not all(isinstance(p, str) for p in paulis):
            raise InvalidArgument(
                f"SparsePauliOp at path {_where(path)} needs a list of Pauli labels"
            )
        return SparsePauliOp(paulis, coeffs=coeffs)
    if tag == "PrimitiveResult":
        from google.protobuf.message import DecodeError

        from qrelay._proto.v1 import types_pb2

        message = types_pb2.PrimitiveResult()
        try:
            message.ParseFromString(_unb64(raw["proto"], path))
        except DecodeError as exc:
            raise InvalidArgument(
                f"PrimitiveResult at path {_where(path)} is not valid protobuf: {exc}"
            ) from None
        return _codec().decode_primitive_result(message)
    raise InvalidArgument(f"unknown value tag {tag!r} at path {_where(path)}")


def _checked_dtype(text: object, path: str) -> Any:
    import numpy as np

    if not isinstance(text, str):
        raise InvalidArgument(f"dtype at path {_where(path)} must be a string")
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise InvalidArgument(f"unknown dtype {text!r} at path {_where(path)}") from None
    if dtype.kind not in _ARRAY_KINDS:
        raise InvalidArgument(f"dtype {text!r} at path {_where(path)} is not allowed")
    return dtype


def _decode_ndarray(raw: Any, path: str) -> Any:
    import numpy as np

    if not isinstance(raw, dict) or raw.get(TAG) != "ndarray":
        raise InvalidArgument(f"expected an ndarray value at path {_where(path)}")
    dtype = _checked_dtype(raw["dtype"], path)
    shape = raw["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidArgument(
            f"ndarray shape at path {_where(path)} must be a list of non-negative ints"
        )
    data = _unb64(raw["base64"], path)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"ndarray at path {_where(path)} has {len(data)} bytes, expected {expected} for shape "
            f"{tuple(shape)} and dtype {dtype.str}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
