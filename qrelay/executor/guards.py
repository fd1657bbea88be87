"""Cheap checks that run before anything expensive, so a bomb costs nothing.

A 135-byte QPY can claim 2**24 qubits and a one-line OpenQASM program
`qubit[4000000] q;`: decoding either allocates gigabytes before any check on
the decoded circuit could run. Here the sizes are read from the QPY headers
and the QASM declarations, without qiskit, and refused against the backend.
The memory a simulation needs is estimated from the transpiled circuit's
active qubits before Aer allocates it (`simulation_bytes`).

This module imports nothing heavy: the control plane runs `check_circuit`
for every pub before a worker sees the job, and the worker runs it again
before decoding (programs' primitive calls and tests reach the pipeline
directly).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qrelay._proto.v1 import types_pb2
from qrelay.errors import InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit

__all__ = [
    "WIDE_SIMULATOR_QUBITS",
    "CircuitSize",
    "check_circuit",
    "check_spec",
    "circuit_size",
    "simulation_bytes",
    "spec_circuits",
]

# A simulator runs circuits wider than itself when their active qubits fit (as
# Aer's primitives do, dropping idle wires: a circuit transpiled for a
# 127-qubit device). Decoding a circuit this wide is cheap; beyond it, no.
WIDE_SIMULATOR_QUBITS = 1024
# Every QPY instruction takes at least this many bytes (its fixed header).
_MIN_QPY_INSTRUCTION_BYTES = 8
_QPY_FILE = struct.Struct("!6sBBBBQ")
_QPY_HEADERS = {  # by QPY version range: struct, index of num_qubits, num_clbits, num_instructions
    "v12": (struct.Struct("!H1cHIIQIQI"), 3, 4, 7),
    "v2": (struct.Struct("!H1cHIIQIQ"), 3, 4, 7),
    "v1": (struct.Struct("!HdIIQIQ"), 2, 3, 6),
}
# Declarations, matched at the start of a `;`-separated statement: OpenQASM 3
# `qubit[n] q` / `bit[n] c` (size optional) and OpenQASM 2 `qreg q[n]` / `creg c[n]`.
_QASM_STATEMENT = re.compile(r"(?:^|;)\s*(?=qubit|bit|qreg|creg)")
_QASM_DECLARATION = re.compile(
    r"(qubit|bit)\s*(?:\[\s*(\d+)\s*\])?\s+[A-Za-z_]\w*\s*[;=]"
    r"|(qreg|creg)\s+[A-Za-z_]\w*\s*\[\s*(\d+)\s*\]\s*;"
)
_QASM_PHYSICAL = re.compile(r"\$(\d+)")
# Aer simulates Clifford-only circuits with the stabilizer method: memory ~ n^2 bits.
_CLIFFORD = frozenset(
    {"id", "x", "y", "z", "h", "s", "sdg", "sx", "sxdg", "cx", "cy", "cz", "swap", "ecr"}
    | {"iswap", "dcx", "measure", "reset", "barrier", "delay"}
)
_NOT_OPERATIONS = frozenset({"barrier", "delay"})


@dataclass(frozen=True)
class CircuitSize:
    """What a circuit declares, read without decoding it."""

    num_qubits: int
    num_clbits: int


def circuit_size(circuit: types_pb2.Circuit, what: str = "circuit") -> CircuitSize:
    """Qubits and clbits a wire circuit declares; InvalidArgument for an implausible header."""
    fmt = circuit.WhichOneof("format")
    if fmt == "qpy":
        return _qpy_size(circuit.qpy, what)
    if fmt == "qasm3":
        return _qasm_size(circuit.qasm3)
    raise InvalidArgument(f"{what} is empty: set either qpy or qasm3")


def _qpy_size(data: bytes, what: str) -> CircuitSize:
    if len(data) < _QPY_FILE.size or data[:6] != b"QISKIT":
        raise InvalidArgument(f"{what} is not valid QPY: it does not start with a QPY header")
    _, version, _, _, _, programs = _QPY_FILE.unpack_from(data)
    if programs != 1:
        raise InvalidArgument(
            f"{what} is not valid QPY: expected exactly one circuit, the header says {programs}"
        )
    offset = _QPY_FILE.size
    if version >= 10:
        offset += 1  # symbolic encoding
    if version >= 5:
        offset += 1  # program type key
    if version >= 16:
        if len(data) < offset + 8:
            raise InvalidArgument(f"{what} is not valid QPY: truncated circuit table")
        (offset,) = struct.unpack_from("!Q", data, offset)
    header, qi, ci, ii = _QPY_HEADERS["v12" if version >= 12 else "v2" if version >= 2 else "v1"]
    if offset + header.size > len(data):
        raise InvalidArgument(f"{what} is not valid QPY: truncated circuit header")
    fields = header.unpack_from(data, offset)
    instructions = int(fields[ii])
    if instructions * _MIN_QPY_INSTRUCTION_BYTES > len(data):
        raise InvalidArgument(
            f"{what} is not valid QPY: the header claims {instructions} instructions "
            f"in {len(data)} bytes"
        )
    return CircuitSize(num_qubits=int(fields[qi]), num_clbits=int(fields[ci]))


def _qasm_size(text: str) -> CircuitSize:
    qubits = clbits = 0
    for start in _QASM_STATEMENT.finditer(text):
        match = _QASM_DECLARATION.match(text, start.end())
        if match is None:
            continue
        size = int(match.group(2) or match.group(4) or 1)
        if (match.group(1) or match.group(3)) in ("qubit", "qreg"):
            qubits += size
        else:
            clbits += size
    if "$" in text:
        physical = [int(m.group(1)) for m in _QASM_PHYSICAL.finditer(text)]
        qubits = max(qubits, max(physical) + 1)
    return CircuitSize(num_qubits=qubits, num_clbits=clbits)


def max_circuit_qubits(info_qubits: int, simulator: bool) -> int:
    """Widest circuit a backend accepts for decoding (simulators drop idle wires)."""
    return max(info_qubits, WIDE_SIMULATOR_QUBITS) if simulator else info_qubits


def check_circuit(
    circuit: types_pb2.Circuit,
    backend: str,
    backend_qubits: int,
    simulator: bool,
    what: str = "circuit",
) -> CircuitSize:
    """Refuse a circuit wider than the backend accepts, from its header alone."""
    size = circuit_size(circuit, what)
    limit = max_circuit_qubits(backend_qubits, simulator)
    if size.num_qubits > limit:
        raise InvalidArgument(
            f"{what} declares {size.num_qubits} qubits, but backend {backend!r} has "
            f"{backend_qubits}"
            + (
                f" (circuits up to {limit} qubits are accepted when their active qubits fit)"
                if limit > backend_qubits
                else ""
            )
        )
    if size.num_clbits > max(limit, 1) * 64:
        raise InvalidArgument(f"{what} declares {size.num_clbits} classical bits")
    return size


def spec_circuits(spec: types_pb2.JobSpec) -> list[types_pb2.Circuit]:
    """The circuit of every pub of a Sampler or Estimator spec (none for programs)."""
    kind = spec.WhichOneof("work")
    if kind == "sampler":
        return [pub.circuit for pub in spec.sampler.pubs]
    if kind == "estimator":
        return [pub.circuit for pub in spec.estimator.pubs]
    return []


def check_spec(spec: types_pb2.JobSpec, backend_qubits: int, simulator: bool) -> None:
    """`check_circuit` for every pub of a Sampler or Estimator spec."""
    for i, circuit in enumerate(spec_circuits(spec)):
        check_circuit(circuit, spec.backend, backend_qubits, simulator, f"pub {i}: circuit")


def active_qubits(circuit: QuantumCircuit) -> int:
    """Qubits some operation acts on (Aer truncates the others away)."""
    used: set[int] = set()
    for instruction in circuit.data:
        if instruction.operation.name in _NOT_OPERATIONS:
            continue
        used.update(circuit.find_bit(q).index for q in instruction.qubits)
    return len(used)


def simulation_bytes(circuit: QuantumCircuit) -> tuple[int, int, str]:
    """(active qubits, bytes, method): the least memory Aer needs to simulate `circuit`.

    Clifford-only circuits run with the stabilizer method (negligible memory);
    anything else needs at least a double-precision statevector, 16 * 2**n
    bytes (a density matrix, chosen by Aer for some noisy runs, needs the
    square of that, and Aer's own `max_memory_mb` check refuses it).
    """
    n = active_qubits(circuit)
    if all(inst.operation.name in _CLIFFORD for inst in circuit.data):
        return n, n * n, "stabilizer"
    return n, 16 << n, "statevector"


def check_simulation_memory(circuit: QuantumCircuit, budget: int, what: str) -> None:
    """ResourceExhausted, with the numbers, when a simulation cannot fit in `budget` bytes."""
    if budget <= 0:
        return
    n, need, method = simulation_bytes(circuit)
    if need > budget:
        raise ResourceExhausted(
            f"{what}: simulating {n} active qubits ({method}) needs at least "
            f"{_human(need)}, over this executor's limit of {_human(budget)} per job"
        )


def _human(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,} bytes"
