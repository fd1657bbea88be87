"""Sample a GHZ state on an ideal and a noisy backend through qrelay.

Run against any broker: `python -m examples.sampler_ghz --broker 127.0.0.1:50051`.
"""

from __future__ import annotations

import argparse
import os

from qiskit import QuantumCircuit
from rich.console import Console
from rich.table import Table

from qrelay.client import QRelayService, Sampler


def ghz(num_qubits: int) -> QuantumCircuit:
    qc = QuantumCircuit(num_qubits)
    qc.h(0)
    for q in range(1, num_qubits):
        qc.cx(q - 1, q)
    qc.measure_all()
    return qc


def main(broker: str) -> None:
    console = Console()
    circuit = ghz(3)
    table = Table(title="3-qubit GHZ, 2000 shots")
    table.add_column("backend")
    table.add_column("job")
    table.add_column("counts (top 4)")
    table.add_column("P(000)+P(111)", justify="right")
    with QRelayService(broker) as service:
        for name in ("aer", "fake_manila"):
            sampler = Sampler(mode=service.backend(name))
            sampler.options.default_shots = 2000
            sampler.options.seed_simulator = 1234
            job = sampler.run([circuit])
            counts = job.result()[0].data.meas.get_counts()
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:4]
            good = (counts.get("000", 0) + counts.get("111", 0)) / 2000
            table.add_row(name, job.job_id(), ", ".join(f"{k}:{v}" for k, v in top), f"{good:.3f}")
    console.print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", default=os.environ.get("QRELAY_BROKER", "127.0.0.1:50051"))
    main(parser.parse_args().broker)
