"""Job lifecycle over a real in-process broker, with a fake executor on raw stubs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from qrelay._proto.v1 import executor_pb2, jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.broker.server import Broker, running_broker
from tests.broker.conftest import (
    FakeExecutor,
    announce,
    broker_settings,
    result_for,
    sampler_spec,
    wait_state,
    watch_all,
)

S = types_pb2


async def drain(call: Any) -> None:
    """Read a stream until it ends (or raises)."""
    while await call.read() is not grpc.aio.EOF:
        pass


def states(events: list[S.JobEvent]) -> list[int]:
    return [e.state.state for e in events if e.WhichOneof("payload") == "state"]


async def test_submit_assign_result_and_watch_sees_ordered_seqs(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with FakeExecutor(broker.address) as executor:
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        assert job.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING)
        assignment = await executor.recv("assignment")
        assert assignment.job_id == job.id
        assert assignment.attempt == 1
        assert assignment.tenant == "default"
        assert assignment.spec == sampler_spec()
        running = await wait_state(jobs, job.id, S.JOB_STATE_RUNNING)
        assert running.executor_id == "e-1"
        executor.update(job.id, assignment.lease_id, log=S.LogLine(text="hello", stream="log"))
        executor.finish(assignment)

        events = await watch_all(jobs, job.id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        kinds = [e.WhichOneof("payload") for e in events]
        assert kinds == ["state", "state", "log", "result", "state"]
        assert states(events) == [S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING, S.JOB_STATE_DONE]
        assert events[1].state.executor_id == "e-1"
        assert events[1].state.attempt == 1
        assert all(e.job_id == job.id and e.time.seconds > 0 for e in events)

        done = await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id))
        assert done.state == S.JOB_STATE_DONE
        assert done.last_seq == 5
        assert done.finished_at.seconds > 0
        assert await jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id)) == result_for(job.id)


async def test_watch_live_then_resume_with_after_seq(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with FakeExecutor(broker.address) as executor:
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        assignment = await executor.recv("assignment")
        call = jobs.Watch(jobs_pb2.WatchRequest(job_id=job.id), timeout=10)
        seen = [await call.read(), await call.read()]  # QUEUED, RUNNING (replayed)
        assert [e.seq for e in seen] == [1, 2]
        executor.update(job.id, assignment.lease_id, interim=S.Interim(value_json="1"))
        live = await call.read()
        assert live.seq == 3
        assert live.WhichOneof("payload") == "interim"
        call.cancel()

        executor.update(job.id, assignment.lease_id, interim=S.Interim(value_json="2"))
        executor.finish(assignment)
        rest = await watch_all(jobs, job.id, after_seq=3)
        assert [e.seq for e in rest] == [4, 5, 6]
        assert rest[0].interim.value_json == "2"
        assert rest[-1].state.state == S.JOB_STATE_DONE
        # Resuming after the terminal event returns nothing and ends.
        assert await watch_all(jobs, job.id, after_seq=6) == []


async def test_idempotent_submit_returns_the_same_job(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    first = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="k1"))
    again = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="k1"))
    other = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="k2"))
    assert again.id == first.id
    assert other.id != first.id
    assert first.idempotency_key == "k1"
    listed = await jobs.List(jobs_pb2.ListJobsRequest())
    assert sorted(j.id for j in listed.jobs) == sorted([first.id, other.id])


async def test_cancel_queued_job_never_starts(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
    cancelled = await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id, reason="changed mind"))
    assert cancelled.state == S.JOB_STATE_CANCELLED
    async with FakeExecutor(broker.address) as executor:
        with pytest.raises(TimeoutError):
            await executor.recv("assignment", within=0.5)
    events = await watch_all(jobs, job.id)
    assert states(events) == [S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLED]
    assert "changed mind" in events[-1].state.message
    # Cancelling a finished job changes nothing and returns it.
    again = await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id))
    assert again.state == S.JOB_STATE_CANCELLED
    assert again.last_seq == cancelled.last_seq
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancel_running_job_tells_the_executor_and_fences_its_result(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with FakeExecutor(broker.address, slots=1) as executor:
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        assignment = await executor.recv("assignment")
        cancelled = await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id))
        assert cancelled.state == S.JOB_STATE_CANCELLED
        cancel = await executor.recv("cancel")
        assert (cancel.job_id, cancel.lease_id) == (job.id, assignment.lease_id)
        # A late result from the cancelled run is fenced out...
        executor.update(job.id, assignment.lease_id, result=result_for(job.id))
        rejected = await executor.recv("rejected")
        assert rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "CANCELLED" in rejected.message
        # ...and that final update freed the slot: the next job is assigned.
        second = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        assert (await executor.recv("assignment")).job_id == second.id
    events = await watch_all(jobs, job.id)
    assert states(events)[-1] == S.JOB_STATE_CANCELLED
    assert not [e for e in events if e.WhichOneof("payload") == "result"]


async def test_released_after_cancel_frees_the_slot_quietly(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with FakeExecutor(broker.address, slots=1) as executor:
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        assignment = await executor.recv("assignment")
        await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id))
        await executor.recv("cancel")
        executor.update(
            job.id, assignment.lease_id, released=executor_pb2.Released(reason="stopped")
        )
        second = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        message = await asyncio.wait_for(executor.inbox.get(), 5)
        # A cancel may be said again until the release lands (cancels are idempotent);
        # nothing else comes before the second job's assignment.
        while message is not None and message.WhichOneof("message") == "cancel":
            assert message.cancel.job_id == job.id
            message = await asyncio.wait_for(executor.inbox.get(), 5)
        assert message is not None
        assert message.WhichOneof("message") == "assignment"
        assert message.assignment.job_id == second.id


async def test_update_for_a_job_not_held_is_rejected_and_stream_continues(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with FakeExecutor(broker.address) as executor:
        executor.update("j-nope", "l-nope", log=S.LogLine(text="?"))
        rejected = await executor.recv("rejected")
        assert rejected.job_id == "j-nope"
        assert rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "unknown job" in rejected.message
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        assignment = await executor.recv("assignment")
        executor.update(job.id, "l-forged", result=result_for(job.id))
        rejected = await executor.recv("rejected")
        assert "not the current lease" in rejected.message
        executor.finish(assignment)
        assert (await wait_state(jobs, job.id, S.JOB_STATE_DONE)).attempts == 1


async def test_stale_lease_cannot_overwrite_result_after_requeue(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with FakeExecutor(broker.address, executor_id="e-slow", extend=False) as slow:
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        stale = await slow.recv("assignment")
        # Still connected, but its heartbeats stop listing the lease: the lease
        # lapses and the job is requeued...
        requeued = await wait_state(jobs, job.id, S.JOB_STATE_QUEUED)
        assert requeued.attempts == 1
        cancel = await slow.recv("cancel")  # the broker tells the silent holder to stop
        assert cancel.lease_id == stale.lease_id
        async with FakeExecutor(broker.address, executor_id="e-fast") as fast:
            fresh = await fast.recv("assignment")
            assert fresh.job_id == job.id
            assert fresh.attempt == 2
            assert fresh.lease_id != stale.lease_id
            slow.update(job.id, stale.lease_id, result=S.JobResult(program_json='"stale"'))
            assert "not the current lease" in (await slow.recv("rejected")).message
            fast.finish(fresh)
            done = await wait_state(jobs, job.id, S.JOB_STATE_DONE)
    assert done.executor_id == "e-fast"
    assert done.attempts == 2
    assert await jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id)) == result_for(job.id)
    events = await watch_all(jobs, job.id)
    assert len([e for e in events if e.WhichOneof("payload") == "result"]) == 1
    queued = [e.state for e in events if e.WhichOneof("payload") == "state"][2]
    assert queued.state == S.JOB_STATE_QUEUED
    assert queued.message == "lease expired on executor e-slow; requeued (attempt 1 of 3)"


async def test_max_attempts_fails_job_with_unavailable(tmp_path: Path) -> None:
    async with (
        running_broker(broker_settings(tmp_path, max_attempts=2)) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        await announce(broker.address)
        async with FakeExecutor(broker.address, extend=False, slots=1) as executor:
            job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
            first = await executor.recv("assignment")
            await executor.recv("cancel")
            # The slot stays busy until the executor reports the stop.
            executor.update(job.id, first.lease_id, released=executor_pb2.Released())
            second = await executor.recv("assignment")
            assert second.attempt == 2
            failed = await wait_state(jobs, job.id, S.JOB_STATE_FAILED)
        assert failed.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "attempt 2 of 2" in failed.error.message
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        events = await watch_all(jobs, job.id)
        assert [e.WhichOneof("payload") for e in events][-2:] == ["error", "state"]
        assert events[-1].state.state == S.JOB_STATE_FAILED


async def test_reconnect_keeps_valid_held_leases_and_cancels_others(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with FakeExecutor(broker.address, slots=2) as executor:
        a = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        b = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        la = await executor.recv("assignment")
        lb = await executor.recv("assignment")
    held = [(la.job_id, la.lease_id), (lb.job_id, "l-made-up")]
    async with FakeExecutor(broker.address, slots=2, held=held) as again:
        cancel = await again.recv("cancel")
        assert (cancel.job_id, cancel.lease_id) == (lb.job_id, "l-made-up")
        again.finish(la)
        assert (await wait_state(jobs, la.job_id, S.JOB_STATE_DONE)).attempts == 1
        # b's real lease was not held by anyone: it lapses and b runs again here.
        rerun = await again.recv("assignment", within=10)
        assert rerun.job_id == lb.job_id
        assert rerun.attempt == 2
    assert {a.id, b.id} == {la.job_id, lb.job_id}


async def test_silent_executor_stream_is_closed(tmp_path: Path) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        FakeExecutor(broker.address, heartbeat=False) as executor,
    ):
        await executor.ended(within=5)  # 3 x 0.2 s heartbeat interval of silence
        assert not broker.scheduler.executors


async def test_graceful_shutdown_ends_executor_streams_and_watches(tmp_path: Path) -> None:
    settings = broker_settings(tmp_path)
    async with running_broker(settings) as broker, grpc.aio.insecure_channel(broker.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        await announce(broker.address)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        call = jobs.Watch(jobs_pb2.WatchRequest(job_id=job.id), timeout=10)
        assert (await call.read()).seq == 1
        executor = FakeExecutor(broker.address, heartbeat=True)
        await executor.__aenter__()
        await executor.recv("assignment")
        await broker.shutdown()
        await executor.ended()
        await executor.close()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await drain(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The job was accepted before shutdown: it is still there after a restart.
    async with running_broker(settings) as broker, grpc.aio.insecure_channel(broker.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        again = await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id))
        assert again.state == S.JOB_STATE_RUNNING  # lease still honoured after restart


async def test_a_job_handed_back_by_a_stopping_executor_goes_to_another(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with FakeExecutor(broker.address, executor_id="e-stopping", slots=2) as stopping:
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        first = await stopping.recv("assignment")
        stopping.leases.pop(job.id, None)
        # Under its still-valid lease: a voluntary hand-back, as on shutdown.
        stopping.update(job.id, first.lease_id, released=executor_pb2.Released(reason="stopping"))
        await wait_state(jobs, job.id, S.JOB_STATE_QUEUED)
        other = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        async with FakeExecutor(broker.address, executor_id="e-fresh", slots=2) as fresh:
            got = {(await fresh.recv("assignment")).job_id for _ in range(2)}
            assert got == {job.id, other.id}
        # The stopping executor was given nothing more, though it has free slots.
        assert stopping.inbox.empty()
