"""VQE for the H2 molecule at 0.735 Å, as a qrelay program.

The Hamiltonian is the 2-qubit parity-mapped (two-qubit-reduced) electronic
Hamiltonian of H2 in the STO-3G basis at bond length 0.735 Å; its ground
energy is -1.857275 Ha (without nuclear repulsion). The ansatz is a
hardware-efficient RY/CX circuit, the optimizer scipy's COBYLA.

Uploaded as a program, `main(ctx, ...)` runs beside the backend: each
iteration is one local Estimator call (no network hop) and publishes its
energy. `vqe()` is plain Qiskit and takes any `BaseEstimatorV2`, so the
client-driven loop (`examples/vqe/run_client_loop.py`) runs the very same
code with a remote Estimator, one job per iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import ParameterVector
from qiskit.quantum_info import SparsePauliOp
from scipy.optimize import minimize

#: H2 at 0.735 Å, STO-3G, parity mapping with two-qubit reduction.
H2_TERMS = [
    ("II", -1.052373245772859),
    ("IZ", 0.39793742484318045),
    ("ZI", -0.39793742484318045),
    ("ZZ", -0.01128010425623538),
    ("XX", 0.18093119978423156),
]


def hamiltonian() -> SparsePauliOp:
    return SparsePauliOp.from_list(H2_TERMS)


def ansatz(num_qubits: int = 2, reps: int = 2) -> QuantumCircuit:
    """RY layers with a CX ladder between them: num_qubits * (reps + 1) parameters."""
    theta = ParameterVector("θ", num_qubits * (reps + 1))
    qc = QuantumCircuit(num_qubits)
    k = 0
    for layer in range(reps + 1):
        for q in range(num_qubits):
            qc.ry(theta[k], q)
            k += 1
        if layer < reps:
            for q in range(num_qubits - 1):
                qc.cx(q, q + 1)
    return qc


def exact_energy(op: SparsePauliOp) -> float:
    """Ground energy by dense diagonalisation (fine for a handful of qubits)."""
    return float(np.linalg.eigvalsh(op.to_matrix()).min())


def initial_point(num_params: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-np.pi, np.pi, num_params)


def vqe(
    estimator: Any,
    *,
    maxiter: int = 50,
    seed: int = 7,
    precision: float | None = None,
    on_iteration: Callable[[int, float, list[float]], None] | None = None,
) -> dict[str, Any]:
    """Minimise <H> over the ansatz with COBYLA; each evaluation is one Estimator run."""
    op = hamiltonian()
    circuit = ansatz(op.num_qubits)
    history: list[float] = []

    def energy(params: np.ndarray) -> float:
        pub = (circuit, op, params)
        result = estimator.run([pub], precision=precision).result()
        value = float(result[0].data.evs)
        history.append(value)
        if on_iteration is not None:
            on_iteration(len(history), value, [float(p) for p in params])
        return value

    x0 = initial_point(circuit.num_parameters, seed)
    res = minimize(energy, x0, method="COBYLA", options={"maxiter": maxiter, "rhobeg": 0.8})
    return {
        "energy": float(res.fun),
        "best_seen": min(history),
        "params": [float(p) for p in res.x],
        "evaluations": len(history),
        "history": history,
        "exact": exact_energy(op),
    }


def main(
    ctx: Any, maxiter: int = 50, seed: int = 7, precision: float | None = None
) -> dict[str, Any]:
    """Entry point "main:main": publishes {"iteration", "energy"} per evaluation."""
    estimator = ctx.estimator({"seed_simulator": seed})

    def publish(i: int, value: float, params: list[float]) -> None:
        ctx.publish({"iteration": i, "energy": value, "params": params})

    ctx.log.info("VQE on %s: maxiter=%d seed=%d", ctx.backend.name, maxiter, seed)
    return vqe(estimator, maxiter=maxiter, seed=seed, precision=precision, on_iteration=publish)
