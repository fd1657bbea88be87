"""A job's result read straight off the wire, for `jobs result`, `jobs show` and `jobs watch`.

The CLI does not rebuild Qiskit objects to print a result: it reads the
`JobResult` message with numpy alone (Qiskit costs ~1 s of CPU to import).
`result_document` is the machine-readable form `qrelay jobs result --json`
prints (its shape is documented in docs/cli.md); `print_summary` prints the
human one from the same document, so both always agree.

Counts follow Qiskit's `BitArray.get_counts()`: bitstrings of `num_bits`
characters, most significant bit first, unioned over every position of the
pub's shape. Arrays keep their shape as nested lists; complex numbers are
`[real, imag]`; NaN and infinities (not JSON) are the strings "NaN",
"Infinity" and "-Infinity".
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from qrelay._proto.v1 import jobs_pb2, types_pb2

#: Counts shown per classical register in the human summary.
TOP_COUNTS = 8
#: Array elements shown per field in the human summary.
SHOWN_VALUES = 6

_KINDS = {
    types_pb2.JOB_KIND_SAMPLER: "sampler",
    types_pb2.JOB_KIND_ESTIMATOR: "estimator",
    types_pb2.JOB_KIND_PROGRAM: "program",
}


def _finite(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _plain(value: Any) -> Any:
    """A nested list from `ndarray.tolist()` as JSON values (see the module docstring)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, complex):
        return [_finite(value.real), _finite(value.imag)]
    if isinstance(value, float):
        return _finite(value)
    return value


def _counts(bits: types_pb2.BitArray) -> dict[str, int]:
    num_bits = int(bits.num_bits)
    num_bytes = (num_bits + 7) // 8
    if num_bytes == 0 or not bits.data:
        shots = math.prod(int(d) for d in bits.shape) * int(bits.num_shots)
        return {"": shots} if shots else {}
    rows = np.frombuffer(bits.data, dtype=np.uint8).reshape(-1, num_bytes)
    unique, freq = np.unique(rows, axis=0, return_counts=True)
    mask = (1 << num_bits) - 1
    counts: dict[str, int] = {}
    for row, n in zip(unique, freq, strict=True):
        key = format(int.from_bytes(row.tobytes(), "big") & mask, f"0{num_bits}b")
        counts[key] = counts.get(key, 0) + int(n)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _field(field: types_pb2.DataField) -> dict[str, Any]:
    which = field.WhichOneof("value")
    if which == "bits":
        b = field.bits
        return {
            "kind": "bits",
            "shape": [int(d) for d in b.shape],
            "num_shots": int(b.num_shots),
            "num_bits": int(b.num_bits),
            "counts": _counts(b),
        }
    if which == "array":
        a = field.array
        shape = [int(d) for d in a.shape]
        values = np.frombuffer(a.data, dtype=np.dtype(a.dtype)).reshape(shape)
        return {
            "kind": "array",
            "shape": shape,
            "dtype": a.dtype,
            "values": _plain(values.tolist()),
        }
    return {"kind": "empty"}


def _json(text: str) -> Any:
    return json.loads(text) if text else {}


def result_document(job: jobs_pb2.Job, result: types_pb2.JobResult) -> dict[str, Any]:
    """The result as plain JSON values (see docs/cli.md, "jobs result --json")."""
    doc: dict[str, Any] = {
        "job_id": job.id,
        "kind": _KINDS.get(job.kind, "unknown"),
        "backend": job.backend,
    }
    if result.WhichOneof("value") == "program_json":
        doc["value"] = _json(result.program_json)
        return doc
    primitive = result.primitive
    doc["metadata"] = _json(primitive.metadata_json)
    doc["pubs"] = [
        {
            "shape": [int(d) for d in pub.shape],
            "metadata": _json(pub.metadata_json),
            "data": {f.name: _field(f) for f in pub.data},
        }
        for pub in primitive.pub_results
    ]
    return doc


def _short(value: Any, limit: int) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flat(values: Any) -> list[Any]:
    if isinstance(values, list):
        return [x for v in values for x in _flat(v)]
    return [values]


def _values_line(field: dict[str, Any]) -> str:
    values = field["values"]
    if not field["shape"]:
        return json.dumps(values)
    flat = _flat(values) if not field["dtype"].startswith("<c") else _pairs(values)
    shown = ", ".join(_number(v) for v in flat[:SHOWN_VALUES])
    more = f", … ({len(flat)} values)" if len(flat) > SHOWN_VALUES else ""
    return f"shape {field['shape']}: [{shown}{more}]"


def _pairs(values: Any) -> list[Any]:
    """Complex values ([re, im] pairs) of a nested list, flattened."""
    if isinstance(values, list) and len(values) == 2 and not isinstance(values[0], list):
        return [values]
    return [p for v in values for p in _pairs(v)]


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):  # complex: [re, im]
        return f"{value[0]:.4g}{value[1]:+.4g}j"
    return json.dumps(value)


def print_summary(doc: dict[str, Any], console: Console, indent: str = "") -> None:
    """Per pub: each register's shots and top counts, each array's values; the metadata."""

    def line(text: str) -> None:
        console.print(f"{indent}{text}", highlight=False, markup=False, overflow="fold")

    if "value" in doc:
        line(f"value: {_short(doc['value'], 2000)}")
        return
    pubs = doc["pubs"]
    if not pubs:
        line("no pubs")
    for index, pub in enumerate(pubs):
        shape = f" shape {pub['shape']}" if pub["shape"] else ""
        console.print(f"{indent}[bold]pub {index}[/]{escape(shape)}", highlight=False)
        for name, field in pub["data"].items():
            if field["kind"] == "bits":
                counts = field["counts"]
                top = list(counts.items())[:TOP_COUNTS]
                shown = "  ".join(f"{k}: {v}" for k, v in top)
                more = f"  (+{len(counts) - len(top)} more)" if len(counts) > len(top) else ""
                total = sum(counts.values())
                line(f"  {name}: {total} shots, {field['num_bits']} bits  {shown}{more}")
            elif field["kind"] == "array":
                line(f"  {name}: {_values_line(field)}")
        if pub["metadata"]:
            line(f"  metadata: {_short(pub['metadata'], 300)}")
    if doc.get("metadata"):
        line(f"metadata: {_short(doc['metadata'], 300)}")
