"""A job submitted, watched and read with nothing but the generated stubs."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from qrelay._proto.v1 import backends_pb2, backends_pb2_grpc, jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.testing import LocalStack
from tests.integration.rawstubs import BELL_QASM3, array, sampler_spec, unpack_bits, watch_all

PARAM_QASM3 = """OPENQASM 3.0;
include "stdgates.inc";
input float[64] theta;
qubit[1] q;
ry(theta) q[0];
"""


async def test_sampler_job_with_plain_stubs_and_qasm3(stack: LocalStack) -> None:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer", BELL_QASM3, 400)))
        assert job.state == types_pb2.JOB_STATE_QUEUED
        assert job.id

        events = await watch_all(jobs, job.id)
        seqs = [e.seq for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), "seq must start at 1 and have no gaps"
        kinds = [e.WhichOneof("payload") for e in events]
        assert kinds[-2:] == ["result", "state"]
        assert events[-1].state.state == types_pb2.JOB_STATE_DONE

        result = await jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id))
        (pub,) = result.primitive.pub_results
        assert pub.sampler
        (field,) = pub.data
        assert field.name == "c"
        bits = unpack_bits(field.bits)
        assert bits.shape == (400, 2)
        # A Bell pair: both bits always agree, and both outcomes appear.
        assert np.all(bits[:, 0] == bits[:, 1])
        assert 0 < bits[:, 0].sum() < 400
        assert isinstance(json.loads(pub.metadata_json), dict)

        # Resuming after the first two events replays exactly the rest.
        tail = await watch_all(jobs, job.id, after_seq=2)
        assert [e.seq for e in tail] == seqs[2:]


async def test_estimator_job_with_plain_stubs(stack: LocalStack) -> None:
    thetas = np.array([[0.0], [np.pi / 2], [np.pi]])
    pub = types_pb2.EstimatorPub(
        circuit=types_pb2.Circuit(qasm3=PARAM_QASM3),
        observables=types_pb2.ObservablesArray(
            elements=[types_pb2.Observable(paulis=["Z"], coeffs=[1.0])]
        ),
        parameter_values=types_pb2.Bindings(values=array(thetas), parameter_names=["theta"]),
    )
    task = types_pb2.EstimatorTask(pubs=[pub])
    task.precision = 0.01
    spec = types_pb2.JobSpec(backend="aer", estimator=task)
    spec.options.update({"seed_simulator": 7, "resilience_level": 0})
    async with grpc.aio.insecure_channel(stack.address) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=spec))
        await watch_all(jobs, job.id)
        result = await jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id))
    fields = {f.name: f.array for f in result.primitive.pub_results[0].data}
    evs = np.frombuffer(fields["evs"].data, dtype=fields["evs"].dtype).reshape(
        tuple(fields["evs"].shape)
    )
    # <Z> after ry(theta) is cos(theta); precision 0.01 -> 5 sigma = 0.05.
    np.testing.assert_allclose(evs, np.cos(thetas[:, 0]), atol=0.05)


async def test_backends_listed_with_plain_stubs(stack: LocalStack) -> None:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        backends = backends_pb2_grpc.BackendServiceStub(channel)
        listed = await backends.List(backends_pb2.ListBackendsRequest())
        by_name = {b.info.name: b for b in listed.backends}
        assert {"aer", "fake_manila"} <= set(by_name)
        manila = by_name["fake_manila"]
        assert manila.online
        assert manila.online_executors == 1
        assert manila.info.num_qubits == 5
        assert manila.info.coupling_map
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await backends.Get(backends_pb2.GetBackendRequest(name="fake_nowhere"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_garbage_qpy_fails_job_with_invalid_argument(stack: LocalStack) -> None:
    spec = types_pb2.JobSpec(
        backend="aer",
        sampler=types_pb2.SamplerTask(
            pubs=[types_pb2.SamplerPub(circuit=types_pb2.Circuit(qpy=b"not a qpy file"))]
        ),
    )
    async with grpc.aio.insecure_channel(stack.address) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=spec))
        events = await watch_all(jobs, job.id)
        assert events[-1].state.state == types_pb2.JOB_STATE_FAILED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "QPY" in (err.value.details() or "")
        # The executor keeps serving: a good job right after succeeds.
        ok = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer")))
        events = await watch_all(jobs, ok.id)
        assert events[-1].state.state == types_pb2.JOB_STATE_DONE
