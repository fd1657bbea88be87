"""Backends for mitigation tests: real Aer simulations (fake device noise, or a custom
asymmetric readout noise model where a property needs one)."""

from __future__ import annotations

import pytest
from qiskit_aer import AerSimulator
from qiskit_aer.noise import NoiseModel, ReadoutError

from qrelay.executor.backends import Backend, load_backend
from qrelay.executor.mitigation import CalibrationCache


@pytest.fixture(scope="session")
def manila() -> Backend:
    return load_backend("fake_manila")


@pytest.fixture(scope="session")
def ideal() -> Backend:
    return load_backend("aer")


@pytest.fixture(scope="session")
def asymmetric() -> Backend:
    """Noiseless gates, readout P(1|0)=0.02, P(0|1)=0.12 on every qubit of 3."""
    nm = NoiseModel()
    nm.add_all_qubit_readout_error(ReadoutError([[0.98, 0.02], [0.12, 0.88]]))
    return Backend(
        name="asymmetric",
        qiskit=AerSimulator(noise_model=nm, n_qubits=3),
        description="Aer with asymmetric readout error",
    )


@pytest.fixture
def cals() -> CalibrationCache:
    return CalibrationCache(seed=1234)
