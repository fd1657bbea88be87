"""Guarantees 1 and 2 of DESIGN.md, proven with real processes and kill -9."""

from __future__ import annotations

from pathlib import Path

import anyio
import grpc
import pytest

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.executor.agent import running_executor
from qrelay.executor.settings import ExecutorSettings
from qrelay.testing import free_port, local_stack
from tests.integration.procs import Proc, start_broker
from tests.integration.rawstubs import heavy_qasm3, sampler_spec, wait_terminal, watch_all

pytestmark = pytest.mark.slow

FAST_LEASES = {"QRELAY_LEASE_TTL_S": "2", "QRELAY_HEARTBEAT_INTERVAL_S": "0.25"}
HEAVY = heavy_qasm3()


async def _wait_state(
    stub: jobs_pb2_grpc.JobServiceStub, job_id: str, state: int, deadline: float = 30.0
) -> jobs_pb2.Job:
    with anyio.fail_after(deadline):
        while True:
            job = await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id))
            if job.state == state:
                return job
            await anyio.sleep(0.05)


async def _result_events(
    stub: jobs_pb2_grpc.JobServiceStub, job_id: str
) -> list[types_pb2.JobEvent]:
    return [e for e in await watch_all(stub, job_id) if e.WhichOneof("payload") == "result"]


async def test_broker_kill9_loses_no_queued_or_running_job(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    db = tmp_path / "broker.db"
    broker = start_broker(port, db, tmp_path, FAST_LEASES)
    try:
        settings = ExecutorSettings(
            broker=address, backends=["aer"], slots=1, reconnect_initial_s=0.1, reconnect_max_s=0.5
        )
        async with running_executor(settings), grpc.aio.insecure_channel(address) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            ids = []
            for i in range(5):
                job = await stub.Submit(
                    jobs_pb2.SubmitRequest(
                        spec=sampler_spec("aer", HEAVY, shots=2000), idempotency_key=f"crash-{i}"
                    )
                )
                ids.append(job.id)
            await _wait_state(stub, ids[0], types_pb2.JOB_STATE_RUNNING)
            queued = await stub.List(
                jobs_pb2.ListJobsRequest(states=[types_pb2.JOB_STATE_QUEUED], page_size=100)
            )
            assert len(queued.jobs) >= 3, "the crash must hit queued jobs too"

            broker.kill9()
            broker = start_broker(port, db, tmp_path, FAST_LEASES)

            jobs = await wait_terminal(stub, ids, deadline=120)
            assert all(j.state == types_pb2.JOB_STATE_DONE for j in jobs.values()), jobs
            for job_id in ids:
                assert len(await _result_events(stub, job_id)) == 1
            # Submitting again with the same keys after the crash creates nothing new.
            again = await stub.Submit(
                jobs_pb2.SubmitRequest(spec=sampler_spec("aer", HEAVY), idempotency_key="crash-3")
            )
            assert again.id == ids[3]
    finally:
        broker.stop()


async def test_executor_kill9_mid_job_is_finished_by_another(tmp_path: Path) -> None:
    async with local_stack(
        executors=0, broker={"lease_ttl_s": 1.5, "heartbeat_interval_s": 0.25}
    ) as stack:
        doomed = Proc(
            ["executor", "serve", "--broker", stack.address, "--backend", "aer", "--slots", "1"],
            tmp_path / "executor.log",
        )
        try:
            async with grpc.aio.insecure_channel(stack.address) as channel:
                stub = jobs_pb2_grpc.JobServiceStub(channel)
                with anyio.fail_after(30):
                    while True:  # the subprocess announces 'aer' when it connects
                        try:
                            job = await stub.Submit(
                                jobs_pb2.SubmitRequest(spec=sampler_spec("aer", HEAVY, shots=20000))
                            )
                            break
                        except grpc.aio.AioRpcError as exc:
                            if exc.code() != grpc.StatusCode.NOT_FOUND:
                                raise
                            await anyio.sleep(0.1)
                first = await _wait_state(stub, job.id, types_pb2.JOB_STATE_RUNNING)
                doomed.kill9()

                survivor = await stack.add_executor(["aer"])
                done = (await wait_terminal(stub, [job.id], deadline=90))[job.id]
                assert done.state == types_pb2.JOB_STATE_DONE
                assert done.attempts == 2
                assert done.executor_id != first.executor_id
                assert done.executor_id == survivor.settings.executor_id
                assert len(await _result_events(stub, job.id)) == 1
                history = await watch_all(stub, job.id)
                requeues = [
                    e
                    for e in history
                    if e.WhichOneof("payload") == "state"
                    and e.state.state == types_pb2.JOB_STATE_QUEUED
                ]
                assert len(requeues) == 2, "submitted once, requeued once after the lease lapsed"
        finally:
            doomed.stop()
