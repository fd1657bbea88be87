"""Sampler and Estimator through the sync SDK against a real broker, executors and Aer.

Statistical checks use fixed seeds (seed_simulator) and tolerances of about
six standard errors, so they neither flake nor hide a wrong answer.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.primitives import (
    PrimitiveResult,
    SamplerPubResult,
    StatevectorEstimator,
    StatevectorSampler,
)
from qiskit.primitives.containers import BitArray
from qiskit.quantum_info import SparsePauliOp

from qrelay.client import Estimator, QRelayService, RuntimeJob, Sampler
from qrelay.errors import InvalidArgument, NotFound
from tests.client.conftest import bell, one_qubit

SEED = 1234


def _ry_sweep() -> tuple[QuantumCircuit, np.ndarray]:
    theta = Parameter("θ")
    qc = QuantumCircuit(1)
    qc.ry(theta, 0)
    qc.measure_all()
    return qc, np.array([[0.0], [np.pi / 3], [np.pi / 2], [np.pi]])


def test_sampler_result_has_statevector_sampler_structure_and_distribution(
    service: QRelayService,
) -> None:
    sweep, thetas = _ry_sweep()
    pubs = [(bell(),), (sweep, thetas)]
    sampler = Sampler(mode=service.backend("aer"), options={"seed_simulator": SEED})
    job = sampler.run(pubs, shots=4000)
    assert isinstance(job, RuntimeJob)
    result = job.result()
    reference = StatevectorSampler(seed=SEED).run(pubs, shots=4000).result()

    assert isinstance(result, PrimitiveResult)
    assert len(result) == len(reference) == 2
    for got, ref in zip(result, reference, strict=True):
        assert isinstance(got, SamplerPubResult)
        assert list(got.data.keys()) == list(ref.data.keys()) == ["meas"]
        assert isinstance(got.data.meas, BitArray)
        assert got.data.meas.shape == ref.data.meas.shape
        assert got.data.meas.num_shots == ref.data.meas.num_shots == 4000
        assert got.data.meas.num_bits == ref.data.meas.num_bits

    # Bell state: only 00 and 11, each 1/2 (sd 0.0079 at 4000 shots; tolerance 0.05).
    counts = result[0].data.meas.get_counts()
    assert set(counts) <= {"00", "11"}
    assert abs(counts.get("00", 0) / 4000 - 0.5) < 0.05
    # ry(θ)|0>: P(1) = sin²(θ/2) per sweep point, same tolerance.
    ones = result[1].data.meas.bitcount().mean(axis=-1)
    expected = np.sin(thetas[:, 0] / 2) ** 2
    np.testing.assert_allclose(ones, expected, atol=0.05)


def test_estimator_result_matches_statevector_estimator(service: QRelayService) -> None:
    theta = Parameter("θ")
    ansatz = QuantumCircuit(2)
    ansatz.ry(theta, 0)
    ansatz.cx(0, 1)
    observables = [[SparsePauliOp("ZZ")], [SparsePauliOp("XX")]]  # shape (2, 1)
    thetas = np.linspace(0, np.pi, 5).reshape(1, 5, 1)  # broadcasts to (2, 5)
    pub = (ansatz, observables, thetas)

    estimator = Estimator(mode=service.backend("aer"))
    estimator.options.default_precision = 0.01
    estimator.options.seed_simulator = SEED
    result = estimator.run([pub]).result()
    reference = StatevectorEstimator().run([pub]).result()

    assert isinstance(result, PrimitiveResult)
    assert len(result) == 1
    got, ref = result[0].data, reference[0].data
    assert got.evs.shape == ref.evs.shape == (2, 5)
    assert got.stds.shape == ref.stds.shape
    # Target precision 0.01 per value: 6 standard errors is 0.06.
    np.testing.assert_allclose(got.evs, ref.evs, atol=0.06)


def test_options_from_dict_and_attributes_reach_the_executor(service: QRelayService) -> None:
    sampler = Sampler(mode=service.backend("aer"), options={"default_shots": 123})
    assert sampler.run([one_qubit()]).result()[0].data.meas.num_shots == 123
    sampler.options.default_shots = 77
    assert sampler.run([one_qubit()]).result()[0].data.meas.num_shots == 77
    # Job-level shots override the options' default, as in Qiskit.
    assert sampler.run([one_qubit()], shots=9).result()[0].data.meas.num_shots == 9


def test_unknown_option_names_the_nearest_valid_one(service: QRelayService) -> None:
    with pytest.raises(InvalidArgument, match="resilience_level"):
        Estimator(mode=service.backend("aer"), options={"resilence_level": 1})


def test_backend_name_as_mode_needs_a_known_backend(service: QRelayService) -> None:
    sampler = Sampler(mode="aer", service=service)
    assert sampler.backend().name == "aer"
    with pytest.raises(NotFound, match="nope"):
        Sampler(mode="nope", service=service)


def test_bad_input_is_rejected_before_anything_is_sent(service: QRelayService) -> None:
    backend = service.backend("aer")
    sampler = Sampler(mode=backend)
    estimator = Estimator(mode=backend)
    two_qubit = QuantumCircuit(2)
    two_qubit.h(0)

    with pytest.raises(InvalidArgument, match=r"wrap it with `\[\]` like `sampler.run\(\[circuit"):
        sampler.run(bell())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="shots must be positive"):
        sampler.run([bell()], shots=0)
    two_params = QuantumCircuit(1)
    two_params.rx(Parameter("a"), 0)
    two_params.rz(Parameter("b"), 0)
    two_params.measure_all()
    with pytest.raises(InvalidArgument, match="pub 1: "):
        sampler.run([bell(), (two_params, np.zeros((4, 3)))])  # 3 values for 2 parameters
    with pytest.raises(InvalidArgument, match="pub 0: "):
        estimator.run([(two_qubit, SparsePauliOp("ZZZ"))])  # 3-qubit observable, 2 qubits
    with pytest.raises(InvalidArgument, match="precision must be non-negative"):
        estimator.run([(two_qubit, SparsePauliOp("ZZ"))], precision=-1)
    with pytest.raises(InvalidArgument, match="pub 0: precision must be non-negative"):
        estimator.run([(two_qubit, SparsePauliOp("ZZ"), None, -0.5)])

    assert service.jobs(limit=100) == [], "nothing may reach the broker"


def test_job_the_executor_rejects_raises_its_error_class(service: QRelayService) -> None:
    qc = QuantumCircuit(1)
    qc.h(0)
    # Exact values (precision 0) only the ideal simulator gives: the executor refuses.
    job = Estimator(mode=service.backend("fake_manila")).run([(qc, "X")], precision=0)
    with pytest.raises(InvalidArgument) as info:
        job.result(timeout=60)
    assert "precision 0 asks for exact expectation values" in str(info.value)
    assert isinstance(info.value, ValueError)  # what Qiskit's primitives raise
    assert job.status().name == "ERROR"
    assert job.in_final_state()
    assert not job.done()


async def test_sync_api_works_inside_a_running_event_loop(service: QRelayService) -> None:
    """As in Jupyter: this coroutine's loop is running while the blocking calls happen."""
    asyncio.get_running_loop()
    sampler = Sampler(mode=service.backend("aer"))
    result = sampler.run([one_qubit()], shots=5).result()
    assert result[0].data.meas.get_counts() == {"1": 5}


def test_sync_api_works_from_a_thread_with_its_own_running_loop(service: QRelayService) -> None:
    outcome: list[object] = []

    async def in_loop() -> None:
        job = Sampler(mode=service.backend("aer")).run([one_qubit()], shots=3)
        outcome.append(job.result()[0].data.meas.get_counts())

    thread = threading.Thread(target=lambda: asyncio.run(in_loop()))
    thread.start()
    thread.join(60)
    assert outcome == [{"1": 3}]
