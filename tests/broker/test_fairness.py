"""Tenants share an executor fairly: a real broker, a real executor, real Aer.

Tenant A queues 200 jobs; tenant B then submits one; then the executor
starts. B's job runs after at most one of A's per slot, not after A's
backlog (the broker used to run all 200 first). Counts of jobs, ordered by
when they started, are asserted; never durations.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import grpc

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.broker.server import running_broker
from qrelay.executor.agent import running_executor
from tests.broker.conftest import announce, auth, broker_settings
from tests.executor.test_agent import executor_settings
from tests.integration.rawstubs import BELL_QASM3, sampler_spec

SLOTS = 2


async def done_job(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, token: str) -> jobs_pb2.Job:
    with anyio.fail_after(120):
        while True:
            job = await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), metadata=auth(token))
            if job.state == types_pb2.JOB_STATE_DONE:
                return job
            await anyio.sleep(0.05)


async def all_done(stub: jobs_pb2_grpc.JobServiceStub, token: str) -> list[jobs_pb2.Job]:
    with anyio.fail_after(300):
        while True:
            listed = await stub.List(jobs_pb2.ListJobsRequest(page_size=500), metadata=auth(token))
            if all(j.state == types_pb2.JOB_STATE_DONE for j in listed.jobs):
                return list(listed.jobs)
            await anyio.sleep(0.2)


async def test_a_tenants_first_job_overtakes_anothers_backlog_of_200(tmp_path: Path) -> None:
    settings = broker_settings(
        tmp_path, tokens={"tok-a": "a", "tok-b": "b"}, max_queued_per_tenant=1000
    )
    async with (
        running_broker(settings) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        await announce(broker.address, ["aer"])
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        spec = sampler_spec("aer", BELL_QASM3, shots=10)
        a_ids = [
            (await jobs.Submit(jobs_pb2.SubmitRequest(spec=spec), metadata=auth("tok-a"))).id
            for _ in range(200)
        ]
        # B's one job arrives behind A's whole backlog; then the executor starts.
        b_id = (await jobs.Submit(jobs_pb2.SubmitRequest(spec=spec), metadata=auth("tok-b"))).id
        async with running_executor(executor_settings(broker.address, slots=SLOTS)):
            b_job = await done_job(jobs, b_id, "tok-b")
            a_jobs = await all_done(jobs, "tok-a")
    assert {j.id for j in a_jobs} == set(a_ids), "A sees its own 200 jobs and no one else's"
    b_started = b_job.started_at.ToDatetime()
    ahead = [j for j in a_jobs if j.started_at.ToDatetime() < b_started]
    assert len(ahead) <= SLOTS, f"{len(ahead)} of A's jobs ran before B's first"
