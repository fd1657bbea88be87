"""Backends: names resolve to real Aer simulators with the right target and announce it."""

from __future__ import annotations

import pytest

from qrelay.errors import NotFound
from qrelay.executor.backends import available_backends, load_backend


def test_aer_is_an_ideal_all_to_all_simulator() -> None:
    backend = load_backend("aer")
    info = backend.info()
    assert info.name == "aer"
    assert info.simulator
    assert info.num_qubits == backend.qiskit.num_qubits >= 20
    assert list(info.coupling_map) == []  # all-to-all
    assert {"cx", "h", "measure", "rz"} <= set(info.basis_gates)
    assert "ideal" in info.description
    assert backend.qiskit.options.noise_model is None


def test_aer_builds_its_target_once_and_again_after_an_option_change() -> None:
    from qiskit_aer import AerSimulator

    sim = load_backend("aer").qiskit
    assert isinstance(sim, AerSimulator)
    first = sim.target
    assert sim.target is first  # cached: Aer itself rebuilds it on every access
    assert first.num_qubits == AerSimulator().target.num_qubits
    assert set(first.operation_names) == set(AerSimulator().target.operation_names)
    sim.set_options(method="statevector")
    assert sim.target is not first  # options can change the target: rebuilt


@pytest.mark.parametrize("name", ["aer", "fake_manila"])
def test_backend_run_finishes_in_the_calling_thread_with_aers_own_counts(name: str) -> None:
    import threading

    from qiskit import QuantumCircuit, transpile
    from qiskit_aer import AerSimulator

    backend = load_backend(name)
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    isa = transpile(qc, backend.qiskit, seed_transpiler=1)
    seen: list[str] = []
    original = backend.qiskit._execute_circuits_job

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    backend.qiskit._execute_circuits_job = spy
    job = backend.qiskit.run(isa, shots=200, seed_simulator=7)
    assert job.done(), "finished when run() returns: no hop to Aer's worker thread"
    assert seen == [threading.current_thread().name]
    plain = AerSimulator(noise_model=backend.qiskit.options.noise_model)
    expected = plain.run(isa, shots=200, seed_simulator=7).result().get_counts()
    assert job.result().get_counts() == expected


def test_backend_run_reports_a_simulation_error_through_the_job() -> None:
    from qiskit import QuantumCircuit
    from qiskit.circuit import Parameter
    from qiskit_aer import AerError

    backend = load_backend("aer")
    qc = QuantumCircuit(1)
    qc.rx(Parameter("a"), 0)
    qc.measure_all()
    job = backend.qiskit.run(qc, shots=1)  # the failure travels in the job, as with Aer's thread
    with pytest.raises(AerError, match="parameter"):
        job.result()


def test_executor_aer_threads_wait_passively_unless_configured() -> None:
    import os

    import qrelay.executor  # noqa: F401 - sets the default on import

    assert os.environ["OMP_WAIT_POLICY"].upper() in {"PASSIVE", "ACTIVE"}


def test_fake_manila_has_the_device_target_and_noise_model() -> None:
    backend = load_backend("fake_manila")
    info = backend.info()
    assert info.num_qubits == 5
    assert info.simulator
    edges = {(e.control, e.target) for e in info.coupling_map}
    assert edges == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3)}
    assert {"cx", "rz", "sx", "x", "measure"} <= set(info.basis_gates)
    assert "h" not in info.basis_gates
    assert "FakeManilaV2" in info.description
    assert backend.qiskit.options.noise_model is not None
    assert backend.target is backend.qiskit.target


def test_available_backends_lists_aer_and_fake_devices() -> None:
    names = available_backends()
    assert names[0] == "aer"
    assert {"fake_manila", "fake_sherbrooke", "fake_jakarta"} <= set(names)
    assert len(names) == len(set(names)) > 20


def test_unknown_backend_is_not_found_and_suggests_names() -> None:
    with pytest.raises(NotFound) as err:
        load_backend("fake_manilla")
    assert err.value.code == 5
    assert str(err.value).startswith("unknown backend 'fake_manilla' (")
    assert "; did you mean fake_manila" in str(err.value)


def test_unknown_backend_without_near_match_lists_some_valid_names() -> None:
    expected = r"unknown backend 'ibm_nowhere' \(\d+ are available\); e.g. aer, fake_"
    with pytest.raises(NotFound, match=expected):
        load_backend("ibm_nowhere")
