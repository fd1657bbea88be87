"""Circuit transformations on ISA circuits: folding, twirling, readout, DD.

Everything here keeps a circuit runnable on the backend's target without
another transpiler run (which could undo a fold or a twirl):

- `fold_2q_gates`: ZNE noise amplification, each 2-qubit gate G becomes
  G (G^-1 G)^k, partially folded gates chosen at random / from the front / from
  the back (Runtime's ``gate_folding`` amplifiers).
- `twirl_2q_gates`: Pauli twirling of 2-qubit gates with Qiskit's own
  ``pauli_twirl_2q_gates`` (output merged into the target's 1-qubit basis).
- `measure_in_basis`: basis change for a Pauli string plus measurement
  twirling (random X before readout, undone classically).
- `insert_dd`: Qiskit's ``PadDynamicalDecoupling`` on the ALAP/ASAP-scheduled
  circuit with the backend's durations; XY4 and XpXm are lowered to x/rz
  afterwards because fake-device targets have no y or rx gate.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from qiskit.circuit import QuantumCircuit
from qiskit.circuit.library import RXGate, RZGate, XGate, YGate
from qiskit.transpiler import InstructionDurations, PassManager
from qiskit.transpiler.passes import (
    ALAPScheduleAnalysis,
    ASAPScheduleAnalysis,
    PadDynamicalDecoupling,
)

from qrelay.errors import FailedPrecondition

__all__ = [
    "append_flip",
    "fold_2q_gates",
    "has_control_flow",
    "insert_dd",
    "measure_in_basis",
    "twirl_2q_gates",
]

_CONTROL_FLOW = frozenset({"if_else", "while_loop", "for_loop", "switch_case", "box"})


def has_control_flow(circuit: QuantumCircuit) -> bool:
    return any(inst.operation.name in _CONTROL_FLOW for inst in circuit.data)


def fold_2q_gates(
    circuit: QuantumCircuit,
    factor: float,
    amplifier: str,
    rng: np.random.Generator,
    target: Any,
) -> tuple[QuantumCircuit, float]:
    """The circuit with its 2-qubit gate count scaled by ~`factor`, and the factor achieved.

    Raises FailedPrecondition for dynamic circuits and for a gate whose inverse the
    target cannot run.
    """
    if has_control_flow(circuit):
        raise FailedPrecondition(
            "zne_mitigation cannot fold gates inside control flow (dynamic circuits); "
            "turn resilience.zne_mitigation off for this circuit"
        )
    two_q = [
        i
        for i, inst in enumerate(circuit.data)
        if inst.operation.num_qubits == 2
        and inst.operation.name not in ("barrier", "delay")
        and not inst.clbits
    ]
    if factor == 1 or not two_q:
        return circuit.copy(), 1.0
    n = len(two_q)
    extra = (factor - 1) / 2  # folds per gate, on average
    full = math.floor(extra + 1e-9)
    partial = round((extra - full) * n)
    folds = dict.fromkeys(two_q, full)
    if partial:
        if amplifier == "gate_folding_front":
            chosen = two_q[:partial]
        elif amplifier == "gate_folding_back":
            chosen = two_q[-partial:]
        else:
            chosen = [two_q[i] for i in rng.choice(n, size=partial, replace=False)]
        for i in chosen:
            folds[i] += 1
    out = circuit.copy_empty_like()
    for i, inst in enumerate(circuit.data):
        out.append(inst)
        k = folds.get(i, 0)
        if not k:
            continue
        op = inst.operation
        inverse = op.inverse()
        qargs = tuple(circuit.find_bit(q).index for q in inst.qubits)
        if target is not None and not target.instruction_supported(
            inverse.name, qargs, parameters=list(inverse.params) or None
        ):
            raise FailedPrecondition(
                f"zne_mitigation: the inverse of '{op.name}' on qubits {qargs} is not an "
                "instruction of this backend, so it cannot be folded"
            )
        for _ in range(k):
            out.append(inverse, inst.qubits)
            out.append(op, inst.qubits)
    achieved = (n + 2 * sum(folds.values())) / n
    return out, achieved


def twirl_2q_gates(
    circuit: QuantumCircuit, num_twirls: int, seed: int, target: Any
) -> list[QuantumCircuit]:
    """`num_twirls` Pauli-twirled copies (Qiskit's pauli_twirl_2q_gates), ISA for target."""
    from qiskit.circuit import pauli_twirl_2q_gates

    if has_control_flow(circuit):
        raise FailedPrecondition(
            "twirling.enable_gates cannot twirl gates inside control flow (dynamic circuits)"
        )
    if not any(inst.operation.num_qubits == 2 for inst in circuit.data):
        return [circuit] * num_twirls
    twirled = pauli_twirl_2q_gates(circuit, seed=seed, num_twirls=num_twirls, target=target)
    return list(twirled) if isinstance(twirled, list) else [twirled]


def append_flip(circuit: QuantumCircuit, qubit: int, ops: frozenset[str]) -> None:
    """An X on `qubit` in the target's basis: x, or sx twice where there is no x."""
    if "x" in ops or not ops:
        circuit.x(qubit)
    elif "sx" in ops:
        circuit.sx(qubit)
        circuit.sx(qubit)
    else:
        raise FailedPrecondition(f"the backend's basis {sorted(ops)} has neither x nor sx")


def _basis_ops(letter: str, ops: frozenset[str]) -> list[tuple[Any, ...]]:
    """ISA gates that rotate `letter`'s eigenbasis onto Z (trailing Z rotations dropped)."""
    if letter in "IZ":
        return []
    if "sx" in ops and "rz" in ops:
        # X: H ~ rz(pi/2) sx rz(pi/2); Y: sdg then H ~ sx rz(pi/2).
        return [("rz", math.pi / 2), ("sx",)] if letter == "X" else [("sx",)]
    if "h" in ops and (letter == "X" or "sdg" in ops):
        return [("h",)] if letter == "X" else [("sdg",), ("h",)]
    raise FailedPrecondition(
        f"the backend's basis {sorted(ops)} cannot rotate a {letter} measurement onto Z"
    )


def measure_in_basis(
    circuit: QuantumCircuit,
    basis: str,
    flips: np.ndarray | None,
    target: Any,
) -> tuple[QuantumCircuit, list[int]]:
    """`circuit` + rotation into the Pauli `basis` (qubit 0 rightmost) + measurement.

    `flips[i]` (for the i-th measured qubit) inserts an X before its readout:
    measurement twirling, undone by the caller on the bits. Returns the circuit and
    the measured qubits in clbit order.
    """
    ops = frozenset(target.operation_names) if target is not None else frozenset({"h", "sdg"})
    qubits = [q for q, p in enumerate(reversed(basis)) if p != "I"]
    out = circuit.copy()
    creg_size = len(qubits)
    from qiskit.circuit import ClassicalRegister

    creg = ClassicalRegister(creg_size, "mitm")
    out.add_register(creg)
    for i, q in enumerate(qubits):
        letter = basis[len(basis) - 1 - q]
        for gate in _basis_ops(letter, ops):
            name = gate[0]
            if name == "rz":
                out.rz(gate[1], q)
            else:
                getattr(out, name)(q)
        if flips is not None and flips[i]:
            append_flip(out, q, ops)
    if qubits:
        out.measure(qubits, list(creg))
    return out, qubits


_DD_SEQUENCES: dict[str, list[Any]] = {
    "XX": [XGate(), XGate()],
    "XpXm": [XGate(), RXGate(-math.pi)],
    "XY4": [XGate(), YGate(), XGate(), YGate()],
}


def _lower(circuit: QuantumCircuit) -> QuantumCircuit:
    """Replace DD's y and rx(-pi) by x and virtual rz (Y ~ X.Z, RX(-pi) ~ Z.X.Z)."""
    if not any(inst.operation.name in ("y", "rx") for inst in circuit.data):
        return circuit
    out = circuit.copy_empty_like()
    for inst in circuit.data:
        name = inst.operation.name
        if name == "y":
            out.append(RZGate(math.pi), inst.qubits)
            out.append(XGate(), inst.qubits)
        elif name == "rx":
            out.append(RZGate(math.pi), inst.qubits)
            out.append(XGate(), inst.qubits)
            out.append(RZGate(-math.pi), inst.qubits)
        else:
            out.append(inst)
    return out


def insert_dd(
    circuits: Sequence[QuantumCircuit],
    target: Any,
    sequence_type: str,
    scheduling_method: str,
    extra_slack_distribution: str,
    skip_reset_qubits: bool,
) -> list[QuantumCircuit]:
    """Schedule each circuit and fill idle windows with the DD sequence."""
    durations: InstructionDurations = copy.deepcopy(target.durations())
    sequence = _DD_SEQUENCES[sequence_type]
    extra = []
    for q in range(target.num_qubits):
        try:
            d = durations.get("x", [q], unit="s")
        except Exception:  # noqa: BLE001 - TranspilerError: qubit without an x duration
            continue
        extra += [("y", (q,), d, "s"), ("rx", (q,), d, "s")]
    durations.update(extra, dt=target.dt)
    schedule = ALAPScheduleAnalysis if scheduling_method == "alap" else ASAPScheduleAnalysis
    pm = PassManager(
        [
            schedule(durations),
            PadDynamicalDecoupling(
                durations=durations,
                dd_sequence=sequence,
                extra_slack_distribution=extra_slack_distribution,
                skip_reset_qubits=skip_reset_qubits,
                pulse_alignment=getattr(target, "pulse_alignment", 1) or 1,
            ),
        ]
    )
    return [_lower(c) for c in pm.run(list(circuits))]
