"""The SDK's primitives behave as Qiskit's reference primitives document, end to end.

Bad input raises the class Qiskit raises (ValueError / TypeError) with
Qiskit's message, sync and async; `run([])` is an empty result; warnings
Qiskit raises on the executor are warned to the caller; circuit width is
checked before sending; exact mode on the ideal simulator.
"""

from __future__ import annotations

import uuid
import warnings

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.primitives import PrimitiveResult, StatevectorEstimator
from qiskit.quantum_info import SparsePauliOp

from qrelay import codec
from qrelay._proto.v1 import types_pb2
from qrelay.client import AsyncQRelayService, Estimator, QRelayService, Sampler
from qrelay.errors import InvalidArgument, InvalidType
from tests.client.conftest import bell


def _no_jobs(service: QRelayService) -> None:
    assert service.jobs(limit=100) == [], "nothing may reach the broker"


def test_bad_input_raises_qiskits_exception_classes_and_messages(service: QRelayService) -> None:
    aer = service.backend("aer")
    sampler, estimator = Sampler(mode=aer), Estimator(mode=aer)
    qc = QuantumCircuit(2)
    qc.h(0)

    # A single pub without brackets: Qiskit's own message, a ValueError.
    with pytest.raises(ValueError, match=r"wrap it with `\[\]` like `sampler.run\(\[circuit\]\)`"):
        sampler.run(bell())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"wrap it with `\[\]` like `estimator.run\(\[\("):
        estimator.run((qc, SparsePauliOp("ZZ")))  # type: ignore[arg-type]
    # Shots: a TypeError when not an integer, a ValueError when not positive.
    with pytest.raises(TypeError, match=r"^shots must be an integer$") as as_type:
        sampler.run([bell()], shots=1.5)  # type: ignore[arg-type]
    assert isinstance(as_type.value, InvalidType)
    with pytest.raises(ValueError, match=r"^shots must be positive$"):
        sampler.run([bell()], shots=-3)
    with pytest.raises(TypeError, match="pub 0: shots must be an integer"):
        sampler.run([(bell(), None, 2.5)])
    # Precision: a TypeError when not a number, a ValueError when negative.
    with pytest.raises(TypeError, match="precision must be a real number"):
        estimator.run([(qc, "ZZ")], precision="high")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be non-negative"):
        estimator.run([(qc, "ZZ")], precision=-0.1)
    # Qiskit's coercion errors keep Qiskit's words (with the pub's index in front).
    with pytest.raises(ValueError, match="pub 0: The length of pub must be 2, 3 or 4"):
        estimator.run([(qc,)])
    with pytest.raises(InvalidArgument):  # and InvalidArgument is still what qrelay raises
        estimator.run([(qc, "ZZZ")])
    _no_jobs(service)


async def test_async_sdk_raises_the_same_classes(aservice: AsyncQRelayService) -> None:
    qc = QuantumCircuit(1)
    qc.h(0)
    spec = types_pb2.JobSpec(
        backend="fake_manila", estimator=codec.encode_estimator_task([(qc, "X")], 0.0)
    )
    job = await aservice.submit(spec, idempotency_key=uuid.uuid4().hex)
    with pytest.raises(ValueError, match="precision 0 asks for exact expectation values"):
        await job.result(timeout=60)


def test_run_of_no_pubs_is_an_empty_result_and_no_job(service: QRelayService) -> None:
    aer = service.backend("aer")
    for job in (Sampler(mode=aer).run([]), Estimator(mode=aer).run([], precision=0.1)):
        result = job.result()
        assert isinstance(result, PrimitiveResult)
        assert len(result) == 0
        assert list(result) == []
        assert job.done()
        assert job.in_final_state()
        assert not job.cancelled()
        assert job.status().name == "DONE"
    _no_jobs(service)


def test_qiskit_warnings_on_the_executor_reach_the_caller(service: QRelayService) -> None:
    no_cregs = QuantumCircuit(1)
    no_cregs.h(0)
    sampler = Sampler(mode=service.backend("aer"))
    for _ in range(2):  # every job warns, not only the first (Python's once-per-location)
        with pytest.warns(UserWarning, match="no output classical registers") as record:
            result = sampler.run([no_cregs], shots=10).result()
        # Exactly once, warned by result() at the caller's line (the executor, in this
        # process here, kept its own copy for the result's metadata).
        assert [w.filename for w in record] == [__file__]
        assert "warnings" not in result.metadata  # taken out: the metadata is Qiskit's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a circuit with registers warns nothing
        sampler.run([bell()], shots=10).result()


async def test_async_job_result_warns_too(aservice: AsyncQRelayService) -> None:
    no_cregs = QuantumCircuit(1)
    spec = types_pb2.JobSpec(backend="aer", sampler=codec.encode_sampler_task([no_cregs], 5))
    job = await aservice.submit(spec, idempotency_key=uuid.uuid4().hex)
    with pytest.warns(UserWarning, match="no output classical registers") as record:
        await job.result(timeout=60)
    assert [w.filename for w in record] == [__file__]


def test_the_sdk_checks_circuit_width_before_sending(service: QRelayService) -> None:
    too_wide = QuantumCircuit(6)  # fake_manila has 5 qubits
    too_wide.h(range(6))
    too_wide.measure_all()
    with pytest.raises(
        ValueError, match="pub 0: circuit has 6 qubits but backend fake_manila has 5"
    ):
        Sampler(mode=service.backend("fake_manila")).run([too_wide])
    aer = service.backend("aer")
    busy = QuantumCircuit(aer.num_qubits + 3)
    busy.h(range(aer.num_qubits + 1))
    with pytest.raises(
        ValueError,
        match=rf"circuit has {aer.num_qubits + 3} qubits, {aer.num_qubits + 1} of them active, "
        rf"but backend aer has {aer.num_qubits}",
    ):
        Estimator(mode=aer).run([(busy, "Z" * busy.num_qubits)])
    _no_jobs(service)


def test_a_circuit_transpiled_for_a_wide_device_runs_on_the_ideal_simulator(
    service: QRelayService,
) -> None:
    qc = QuantumCircuit(127)  # as transpiled for a 127-qubit device: 2 qubits used
    qc.h(40)
    qc.cx(40, 90)
    observable = SparsePauliOp.from_sparse_list([("ZZ", [40, 90], 1.0), ("X", [0], 1.0)], 127)
    result = Estimator(mode=service.backend("aer")).run([(qc, observable)], precision=0).result()
    assert float(result[0].data.evs) == pytest.approx(1.0, abs=1e-12)


def test_exact_mode_on_the_ideal_simulator_equals_statevector_estimator(
    service: QRelayService,
) -> None:
    theta = Parameter("θ")
    qc = QuantumCircuit(2)
    qc.ry(theta, 0)
    qc.cx(0, 1)
    observables = [[SparsePauliOp(["ZZ", "XX"], [1.0, 0.5])], [SparsePauliOp("YI")]]
    pub = (qc, observables, np.linspace(0, np.pi, 7).reshape(1, 7, 1))
    want = StatevectorEstimator().run([pub]).result()[0].data.evs
    aer = service.backend("aer")
    by_run = Estimator(mode=aer).run([pub], precision=0).result()[0]
    by_default = Estimator(mode=aer, options={"default_precision": 0}).run([pub]).result()[0]
    for got in (by_run, by_default):
        np.testing.assert_allclose(got.data.evs, want, atol=1e-12)
        assert np.all(got.data.stds == 0)
