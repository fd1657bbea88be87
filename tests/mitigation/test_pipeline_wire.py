"""Mitigated results survive the executor pipeline and the wire (JobSpec in, JobResult out)."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import struct_pb2
from qiskit import QuantumCircuit
from qiskit.quantum_info import SparsePauliOp

from qrelay import codec
from qrelay._proto.v1 import types_pb2
from qrelay.errors import FailedPrecondition
from qrelay.executor.backends import Backend
from qrelay.executor.pipeline import PrimitivePipeline
from qrelay.executor.transpile import TranspileCache


def _struct(options: dict[str, object]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(options)
    return s


def _run(backend: Backend, spec: types_pb2.JobSpec) -> object:
    pipeline = PrimitivePipeline(backend, TranspileCache(8))
    wire = types_pb2.JobResult.FromString(pipeline.run(spec).SerializeToString())
    return codec.decode_primitive_result(wire.primitive)


def test_level_two_estimator_result_round_trips_the_wire(manila: Backend) -> None:
    """Virtual 2-qubit Bell pub, level 2 via the options Struct: evs near +1 (tolerance 0.1,
    seed 4) and Runtime's ZNE fields and metadata arrive intact."""
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    spec = types_pb2.JobSpec(
        backend="fake_manila",
        estimator=codec.encode_estimator_task([(qc, [SparsePauliOp("ZZ"), "XX"])], 0.05),
        options=_struct({"resilience_level": 2, "seed_simulator": 4}),
    )
    result = _run(manila, spec)
    pub = result[0]  # type: ignore[index]
    assert np.all(np.abs(pub.data.evs - 1.0) < 0.1)
    assert pub.data.evs_noise_factors.shape == (2, 3)
    assert pub.data.evs_extrapolated.shape == (2, 2, 4)
    assert pub.metadata["techniques"]["zne_mitigation"] is True
    assert pub.metadata["techniques"]["resilience_level"] == 2
    # 400 shots -> Runtime's twirling rule: 7 randomizations x 64 shots, x 3 noise factors.
    assert pub.metadata["num_randomizations"] == 7
    assert pub.metadata["shot_overhead"] == pytest.approx(3 * 448 / 400)


def test_sampler_m3_quasi_dists_round_trip_the_wire(manila: Backend) -> None:
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    spec = types_pb2.JobSpec(
        backend="fake_manila",
        sampler=codec.encode_sampler_task([qc], 2000),
        options=_struct({"resilience": {"measure_mitigation": True}, "seed_simulator": 3}),
    )
    pub = _run(manila, spec)[0]  # type: ignore[index]
    assert pub.data.meas.num_shots == 2000
    assert pub.data.quasi_dists.shape == (4,)
    assert pub.data.quasi_dists[0] + pub.data.quasi_dists[3] > 0.95
    assert pub.metadata["measure_mitigation"]["method"] == "m3"


def test_unsupported_mitigation_fails_the_job_with_a_clear_status(manila: Backend) -> None:
    qc = QuantumCircuit(2, 2)
    qc.measure([0, 1], [0, 1])
    spec = types_pb2.JobSpec(
        backend="fake_manila",
        sampler=codec.encode_sampler_task([qc], 100),
        options=_struct({"execution": {"meas_type": "avg_kerneled"}}),
    )
    with pytest.raises(FailedPrecondition) as err:
        PrimitivePipeline(manila, TranspileCache(8)).run(spec)
    assert err.value.code == 9
    assert "meas_type 'avg_kerneled'" in str(err.value)
