"""Sampler techniques: twirled bits keep their meaning, M3 corrects readout (fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit
from qiskit.primitives import BackendSamplerV2
from qiskit.transpiler import generate_preset_pass_manager

from qrelay.errors import FailedPrecondition
from qrelay.executor.backends import Backend
from qrelay.executor.mitigation import CalibrationCache, run_sampler


def isa(backend: Backend, qc: QuantumCircuit) -> QuantumCircuit:
    pm = generate_preset_pass_manager(
        optimization_level=1, target=backend.target, seed_transpiler=0
    )
    return pm.run(qc)


def ghz3() -> QuantumCircuit:
    qc = QuantumCircuit(3, 3)
    qc.h(0)
    qc.cx(0, 1)
    qc.cx(1, 2)
    qc.measure([0, 1, 2], [0, 1, 2])
    return qc


def test_no_technique_is_qiskit_backend_sampler_bit_for_bit(manila: Backend) -> None:
    circuit = isa(manila, ghz3())
    got = run_sampler(manila, [circuit], None, 300, seed=5)[0]
    ref = BackendSamplerV2(backend=manila.qiskit, options={"seed_simulator": 5})
    want = ref.run([circuit], shots=300).result()[0]
    assert got.data.c == want.data.c
    assert got.metadata == want.metadata


def test_measurement_twirling_keeps_the_bits_meaning(asymmetric: Backend) -> None:
    """|011> read through asymmetric readout, measurements twirled: each bit's error
    becomes the average (0.07 +- 0.02 at 4096 shots, seed 2); registers stay intact."""
    qc = QuantumCircuit(3)
    qc.x([0, 1])
    qc.add_register(ClassicalRegister(2, "low"))
    qc.add_register(ClassicalRegister(1, "high"))
    qc.measure([0, 1, 2], [0, 1, 2])
    res = run_sampler(asymmetric, [qc], {"twirling": {"enable_measure": True}}, 4096, seed=2)[0]
    low_bits = res.data.low.to_bool_array(order="little")
    high_bits = res.data.high.to_bool_array(order="little")
    assert res.data.low.num_shots == 4096
    assert 1 - low_bits[:, 0].mean() == pytest.approx(0.07, abs=0.02)
    assert 1 - low_bits[:, 1].mean() == pytest.approx(0.07, abs=0.02)
    assert high_bits[:, 0].mean() == pytest.approx(0.07, abs=0.02)
    assert res.metadata["num_randomizations"] == 32


def test_gate_twirling_keeps_the_distribution(manila: Backend) -> None:
    """Twirled CXs on Manila: GHZ weight on 000/111 stays within 0.03 of untwirled (seed 3)."""
    circuit = isa(manila, ghz3())
    plain = run_sampler(manila, [circuit], None, 4096, seed=3)[0].data.c.get_counts()
    tw = run_sampler(manila, [circuit], {"twirling": {"enable_gates": True}}, 4096, seed=3)
    counts = tw[0].data.c.get_counts()
    good = (counts.get("000", 0) + counts.get("111", 0)) / 4096
    good_plain = (plain.get("000", 0) + plain.get("111", 0)) / 4096
    assert good == pytest.approx(good_plain, abs=0.03)
    assert tw[0].metadata["techniques"]["twirling"]["enable_gates"] is True


def test_m3_quasi_probabilities_correct_readout(manila: Backend, cals: CalibrationCache) -> None:
    """GHZ on Manila: raw P(000)+P(111) ~0.84 (qubit 2 reads wrong ~10%); M3 brings it
    above 0.95 and halves the gap to 1 at least (seed 7, 4096 shots)."""
    circuit = isa(manila, ghz3())
    opts = {"resilience": {"measure_mitigation": True}}
    res = run_sampler(manila, [circuit], opts, 4096, seed=7, calibrations=cals)[0]
    counts = res.data.c.get_counts()
    raw_good = (counts.get("000", 0) + counts.get("111", 0)) / 4096
    quasi = res.data.quasi_dists
    assert quasi.shape == (8,)
    assert quasi.sum() == pytest.approx(1.0, abs=1e-6)
    good = quasi[0] + quasi[7]
    assert good > 0.95
    assert 1 - good < (1 - raw_good) / 2
    meta = res.metadata["measure_mitigation"]
    assert meta["method"] == "m3"
    assert meta["mitigation_overhead"][0] >= 1.0


def test_m3_with_parameters_and_twirling_has_pub_shape(
    manila: Backend, cals: CalibrationCache
) -> None:
    from qiskit.circuit import Parameter

    theta = Parameter("t")
    qc = QuantumCircuit(2, 2)
    qc.ry(theta, 0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    circuit = isa(manila, qc)
    values = np.array([[0.0], [np.pi]])
    opts = {"resilience": {"measure_mitigation": True}, "twirling": {"enable_measure": True}}
    res = run_sampler(manila, [(circuit, values)], opts, 2048, seed=1, calibrations=cals)[0]
    quasi = res.data.quasi_dists
    assert quasi.shape == (2, 4)
    assert quasi[0, 0] > 0.95  # theta = 0: |00>
    assert quasi[1, 3] > 0.9  # theta = pi: |11>
    assert res.data.c.shape == (2,)


def test_m3_needs_terminal_measurements(manila: Backend) -> None:
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.measure(0, 0)
    qc.cx(0, 1)
    qc.measure(0, 1)
    with pytest.raises(FailedPrecondition, match="terminal measurements"):
        run_sampler(manila, [qc], {"resilience": {"measure_mitigation": True}}, 100, seed=1)


def test_kerneled_measurements_are_refused_with_reason(manila: Backend) -> None:
    qc = ghz3()
    with pytest.raises(FailedPrecondition, match="meas_type 'kerneled' needs level-1"):
        run_sampler(manila, [qc], {"execution": {"meas_type": "kerneled"}}, 100)


def test_dd_on_a_sampler_is_reported(manila: Backend) -> None:
    circuit = isa(manila, ghz3())
    res = run_sampler(manila, [circuit], {"dynamical_decoupling": {"enable": True}}, 500, seed=2)
    assert res[0].metadata["techniques"]["dynamical_decoupling"]["sequence_type"] == "XX"
    assert res[0].data.c.num_shots == 500
