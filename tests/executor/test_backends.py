"""Backends: names resolve to real Aer simulators with the right target and announce it."""

from __future__ import annotations

import pytest

from qrelay.errors import NotFound
from qrelay.executor.backends import available_backends, load_backend


def test_aer_is_an_ideal_all_to_all_simulator() -> None:
    backend = load_backend("aer", warm=False)
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

    sim = load_backend("aer", warm=False).qiskit
    assert isinstance(sim, AerSimulator)
    first = sim.target
    assert sim.target is first  # cached: Aer itself rebuilds it on every access
    assert first.num_qubits == AerSimulator().target.num_qubits
    assert set(first.operation_names) == set(AerSimulator().target.operation_names)
    sim.set_options(method="statevector")
    assert sim.target is not first  # options can change the target: rebuilt


def test_executor_aer_threads_wait_passively_unless_configured() -> None:
    import os

    import qrelay.executor  # noqa: F401 - sets the default on import

    assert os.environ["OMP_WAIT_POLICY"].upper() in {"PASSIVE", "ACTIVE"}


def test_fake_manila_has_the_device_target_and_noise_model() -> None:
    backend = load_backend("fake_manila", warm=False)
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
