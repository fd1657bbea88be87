"""Watch with after_seq at or beyond the last event of a job that has not finished.

What a client gets (documented on JobService.Watch): the events numbered above
after_seq as they happen, and the stream ends when the job does; when the
job's terminal event is numbered after_seq or lower, it ends with no event at
all. Before, a cursor beyond the last event made every new event, the
terminal one included, look already delivered, and the Watch never ended.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.broker.server import Broker
from tests.broker.conftest import FakeExecutor, sampler_spec, until, wait_state
from tests.integration.test_replicas import replicas, wait_online

HUGE = 2**62


async def _events(call: grpc.aio.UnaryStreamCall) -> list[types_pb2.JobEvent]:
    return [event async for event in call]


async def _running_job(
    jobs: jobs_pb2_grpc.JobServiceStub, executor: FakeExecutor
) -> tuple[jobs_pb2.Job, str]:
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
    assignment = await executor.recv("assignment")
    assert assignment.job_id == job.id
    running = await wait_state(jobs, job.id, types_pb2.JOB_STATE_RUNNING)
    return running, assignment.lease_id


@pytest.mark.parametrize("cursor", ["last", "huge"])
async def test_watch_from_the_last_event_or_beyond_ends_when_the_job_ends(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub, cursor: str
) -> None:
    async with FakeExecutor(broker.address) as executor:
        job, lease = await _running_job(jobs, executor)
        after = job.last_seq if cursor == "last" else HUGE
        watch = asyncio.ensure_future(
            _events(jobs.Watch(jobs_pb2.WatchRequest(job_id=job.id, after_seq=after), timeout=20))
        )
        # The job keeps running for a while (a log line, then the result).
        executor.update(job.id, lease, log=types_pb2.LogLine(text="working", stream="log"))
        await asyncio.sleep(0.2)
        assert not watch.done()
        executor.finish(executor_assignment(job.id, lease))
        events = await asyncio.wait_for(watch, 10)
    final = await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id))
    assert final.state == types_pb2.JOB_STATE_DONE
    if cursor == "last":
        # Every event after the cursor, in order, ending with the terminal one.
        assert [e.seq for e in events] == list(range(job.last_seq + 1, final.last_seq + 1))
        assert [e.WhichOneof("payload") for e in events] == ["log", "result", "state"]
        assert events[-1].state.state == types_pb2.JOB_STATE_DONE
    else:
        assert events == []  # nothing is numbered above the cursor; the stream still ends


async def test_watch_beyond_the_end_of_a_finished_job_ends_at_once(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with FakeExecutor(broker.address) as executor:
        job, lease = await _running_job(jobs, executor)
        executor.finish(executor_assignment(job.id, lease))
        done = await wait_state(jobs, job.id, types_pb2.JOB_STATE_DONE)
    for after in (done.last_seq, done.last_seq + 1, HUGE):
        call = jobs.Watch(jobs_pb2.WatchRequest(job_id=job.id, after_seq=after), timeout=10)
        assert await _events(call) == []
    tail = await _events(
        jobs.Watch(jobs_pb2.WatchRequest(job_id=job.id, after_seq=done.last_seq - 1), timeout=10)
    )
    assert [e.seq for e in tail] == [done.last_seq]


def executor_assignment(job_id: str, lease_id: str) -> object:
    """What FakeExecutor.finish needs of an assignment."""
    from qrelay._proto.v1 import executor_pb2

    return executor_pb2.Assignment(job_id=job_id, lease_id=lease_id)


async def test_watch_beyond_the_end_on_one_replica_ends_when_the_other_finishes_the_job(
    tmp_path: Path,
) -> None:
    """Across replicas the Watch learns of new events by asking the store for those
    after its cursor: a cursor beyond the last event would never hear of the end."""
    async with (
        replicas(tmp_path) as (a, b),
        FakeExecutor(b.address, executor_id="e-b") as executor,
        grpc.aio.insecure_channel(a.address) as channel,
    ):
        await wait_online(a.address, "aer", 1)
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job, lease = await _running_job(jobs, executor)
        watch = asyncio.ensure_future(
            _events(jobs.Watch(jobs_pb2.WatchRequest(job_id=job.id, after_seq=HUGE), timeout=20))
        )
        await until(lambda: job.id in a.hub.watching())
        executor.finish(executor_assignment(job.id, lease))
        assert await asyncio.wait_for(watch, 10) == []
