"""A 20-point parameter sweep of <ZZ> and <XX> in one Estimator job.

The whole sweep is one PUB (parameters broadcast against observables), so the
executor transpiles the ansatz once. Compares with the exact values.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.primitives import StatevectorEstimator
from qiskit.quantum_info import SparsePauliOp
from rich.console import Console
from rich.table import Table

from qrelay.client import Estimator, QRelayService


def ansatz() -> QuantumCircuit:
    theta = Parameter("θ")
    qc = QuantumCircuit(2)
    qc.ry(theta, 0)
    qc.cx(0, 1)
    return qc


def main(broker: str, points: int = 20) -> None:
    circuit = ansatz()
    observables = [[SparsePauliOp("ZZ")], [SparsePauliOp("XX")]]  # shape (2, 1)
    thetas = np.linspace(0, np.pi, points).reshape(1, points, 1)  # shape (1, points)
    pub = (circuit, observables, thetas)  # broadcasts to (2, points)
    exact = StatevectorEstimator().run([pub]).result()[0].data.evs
    with QRelayService(broker) as service:
        results = {}
        for name in ("aer", "fake_manila"):
            estimator = Estimator(mode=service.backend(name))
            estimator.options.default_precision = 0.02
            estimator.options.seed_simulator = 42
            results[name] = estimator.run([pub]).result()[0].data
    table = Table(title=f"<ZZ> and <XX> over a {points}-point sweep of θ")
    for col in (
        "θ",
        "exact ZZ",
        "aer ZZ",
        "fake_manila ZZ",
        "exact XX",
        "aer XX",
        "fake_manila XX",
    ):
        table.add_column(col, justify="right")
    for i in range(0, points, max(1, points // 10)):
        table.add_row(
            f"{thetas[0, i, 0]:.2f}",
            *(
                f"{v:+.3f}"
                for v in (exact[0, i], results["aer"].evs[0, i], results["fake_manila"].evs[0, i])
            ),
            *(
                f"{v:+.3f}"
                for v in (exact[1, i], results["aer"].evs[1, i], results["fake_manila"].evs[1, i])
            ),
        )
    console = Console()
    console.print(table)
    err = {n: float(np.mean(np.abs(r.evs - exact))) for n, r in results.items()}
    console.print("mean |error| vs exact: " + ", ".join(f"{n} {e:.3f}" for n, e in err.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", default=os.environ.get("QRELAY_BROKER", "127.0.0.1:50051"))
    parser.add_argument("--points", type=int, default=20)
    args = parser.parse_args()
    main(args.broker, args.points)
