"""SessionService on a real broker, with FakeExecutors as real ExecutorService peers.

Ordering is proved by which job an executor is handed next, never by wall
times. Expiry is driven through `Sessions.reap(now=...)` with a chosen clock
(deterministic), plus one test of the background reaper with 1 s limits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from qrelay._proto.v1 import (
    executor_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    types_pb2,
)
from qrelay.broker.server import Broker, running_broker
from tests.broker.conftest import (
    FakeExecutor,
    announce,
    broker_settings,
    sampler_spec,
    wait_state,
)

DEDICATED = sessions_pb2.SESSION_MODE_DEDICATED
BATCH = sessions_pb2.SESSION_MODE_BATCH
QUEUED, RUNNING, DONE, CANCELLED = (
    types_pb2.JOB_STATE_QUEUED,
    types_pb2.JOB_STATE_RUNNING,
    types_pb2.JOB_STATE_DONE,
    types_pb2.JOB_STATE_CANCELLED,
)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """Like the shared fixture, with a session reaper that looks every 50 ms."""
    async with running_broker(broker_settings(tmp_path, session_check_interval_s=0.05)) as b:
        await announce(b.address)
        yield b


@pytest.fixture
def sessions(channel: grpc.aio.Channel) -> sessions_pb2_grpc.SessionServiceStub:
    return sessions_pb2_grpc.SessionServiceStub(channel)


async def create(stub: sessions_pb2_grpc.SessionServiceStub, **fields: Any) -> sessions_pb2.Session:
    return await stub.Create(sessions_pb2.CreateSessionRequest(**{"backend": "aer", **fields}))


async def get(stub: sessions_pb2_grpc.SessionServiceStub, session_id: str) -> sessions_pb2.Session:
    return await stub.Get(sessions_pb2.GetSessionRequest(session_id=session_id))


async def submit(jobs: jobs_pb2_grpc.JobServiceStub, session_id: str = "", **kw: Any) -> str:
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec(session_id=session_id, **kw)))
    return job.id


async def expect_error(call: Any, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in (info.value.details() or ""), info.value.details()


def counts(session: sessions_pb2.Session) -> dict[str, int]:
    return {
        "total": session.jobs_total,
        "queued": session.jobs_queued,
        "running": session.jobs_running,
        "done": session.jobs_done,
        "failed": session.jobs_failed,
        "cancelled": session.jobs_cancelled,
    }


async def serve(executor: FakeExecutor, ran: dict[str, str]) -> None:
    """Finish every assignment at once, recording which executor ran which job."""
    while True:
        assignment = await executor.recv("assignment", within=30)
        ran[assignment.job_id] = executor.executor_id
        executor.finish(assignment)


# --- create / get: defaults, caps, bad arguments ---------------------------------


async def test_create_fills_defaults_and_caps_limits(
    sessions: sessions_pb2_grpc.SessionServiceStub,
) -> None:
    session = await create(sessions)
    assert session.id.startswith("s-")
    assert session.mode == DEDICATED  # unspecified means a dedicated session, as in Runtime
    assert session.state == sessions_pb2.SESSION_STATE_OPEN
    assert (session.max_time_s, session.max_idle_s) == (8 * 3600, 300)
    assert session.created_at.seconds > 0
    assert not session.HasField("activated_at")
    assert not session.HasField("closed_at")
    assert counts(session) == dict.fromkeys(counts(session), 0)
    capped = await create(sessions, mode=BATCH, max_time_s=10**9, max_idle_s=60)
    assert (capped.mode, capped.max_time_s, capped.max_idle_s) == (BATCH, 24 * 3600, 60)
    assert (await get(sessions, capped.id)).max_time_s == 24 * 3600


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"backend": ""}, grpc.StatusCode.INVALID_ARGUMENT, "backend is required"),
        ({"backend": "no_such"}, grpc.StatusCode.NOT_FOUND, "unknown backend 'no_such'; known:"),
        ({"max_time_s": -1}, grpc.StatusCode.INVALID_ARGUMENT, "max_time_s must be >= 0"),
        ({"max_idle_s": -5}, grpc.StatusCode.INVALID_ARGUMENT, "max_idle_s must be >= 0"),
        ({"mode": 7}, grpc.StatusCode.INVALID_ARGUMENT, "mode 7 is not a SessionMode"),
    ],
)
async def test_bad_create_arguments_are_refused(
    sessions: sessions_pb2_grpc.SessionServiceStub,
    fields: dict[str, Any],
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    await expect_error(create(sessions, **fields), code, fragment)


async def test_get_close_cancel_of_unknown_or_missing_session(
    sessions: sessions_pb2_grpc.SessionServiceStub,
) -> None:
    await expect_error(get(sessions, ""), grpc.StatusCode.INVALID_ARGUMENT, "session_id")
    await expect_error(get(sessions, "s-nope"), grpc.StatusCode.NOT_FOUND, "'s-nope' not found")
    await expect_error(
        sessions.Close(sessions_pb2.CloseSessionRequest(session_id="s-nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        sessions.Cancel(sessions_pb2.CancelSessionRequest(session_id="s-nope")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_job_session_must_exist_and_match_the_backend(
    sessions: sessions_pb2_grpc.SessionServiceStub, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    session = await create(sessions)
    await expect_error(
        submit(jobs, "s-unknown"), grpc.StatusCode.NOT_FOUND, "session 's-unknown' not found"
    )
    await expect_error(
        submit(jobs, session.id, backend="fake_manila"),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"job backend 'fake_manila' differs from the backend 'aer' of session {session.id}",
    )
    assert not (await jobs.List(jobs_pb2.ListJobsRequest())).jobs


async def test_another_tenants_session_is_not_found(tmp_path: Path) -> None:
    alice = (("authorization", "Bearer tok-a"),)
    bob = (("authorization", "Bearer tok-b"),)
    settings = broker_settings(tmp_path, tokens={"tok-a": "alice", "tok-b": "bob"})
    async with running_broker(settings) as broker:
        await announce(broker.address)
        async with grpc.aio.insecure_channel(broker.address) as channel:
            stub = sessions_pb2_grpc.SessionServiceStub(channel)
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            session = await stub.Create(
                sessions_pb2.CreateSessionRequest(backend="aer"), metadata=alice
            )
            sid = session.id
            for call in (
                stub.Get(sessions_pb2.GetSessionRequest(session_id=sid), metadata=bob),
                stub.Close(sessions_pb2.CloseSessionRequest(session_id=sid), metadata=bob),
                stub.Cancel(sessions_pb2.CancelSessionRequest(session_id=sid), metadata=bob),
                jobs.Submit(
                    jobs_pb2.SubmitRequest(spec=sampler_spec(session_id=sid)), metadata=bob
                ),
            ):
                await expect_error(call, grpc.StatusCode.NOT_FOUND, sid)
            mine = await stub.Get(sessions_pb2.GetSessionRequest(session_id=sid), metadata=alice)
            assert mine.state == sessions_pb2.SESSION_STATE_OPEN


async def test_list_sessions_shows_only_the_callers_newest_first_paged(tmp_path: Path) -> None:
    alice = (("authorization", "Bearer tok-a"),)
    bob = (("authorization", "Bearer tok-b"),)
    settings = broker_settings(tmp_path, tokens={"tok-a": "alice", "tok-b": "bob"})
    async with running_broker(settings) as broker:
        await announce(broker.address)
        async with grpc.aio.insecure_channel(broker.address) as channel:
            stub = sessions_pb2_grpc.SessionServiceStub(channel)
            mine = [
                (await create_as(stub, alice, backend=b)).id for b in ("aer", "fake_manila", "aer")
            ]
            theirs = (await create_as(stub, bob)).id
            await stub.Close(sessions_pb2.CloseSessionRequest(session_id=mine[0]), metadata=alice)

            listed = await stub.List(sessions_pb2.ListSessionsRequest(), metadata=alice)
            assert [s.id for s in listed.sessions] == mine[::-1]
            assert not listed.next_page_token
            bobs = await stub.List(sessions_pb2.ListSessionsRequest(), metadata=bob)
            assert [s.id for s in bobs.sessions] == [theirs]

            first = await stub.List(sessions_pb2.ListSessionsRequest(page_size=2), metadata=alice)
            rest = await stub.List(
                sessions_pb2.ListSessionsRequest(page_token=first.next_page_token),
                metadata=alice,
            )
            assert [s.id for s in (*first.sessions, *rest.sessions)] == mine[::-1]
            # Alice's cursor shows Bob nothing of hers (his one session is newer than it).
            cursor = await stub.List(
                sessions_pb2.ListSessionsRequest(page_token=first.next_page_token), metadata=bob
            )
            assert not cursor.sessions

            closed = await stub.List(
                sessions_pb2.ListSessionsRequest(states=[sessions_pb2.SESSION_STATE_CLOSED]),
                metadata=alice,
            )
            assert [s.id for s in closed.sessions] == [mine[0]]
            assert closed.sessions[0].state == sessions_pb2.SESSION_STATE_CLOSED
            manila = await stub.List(
                sessions_pb2.ListSessionsRequest(backend="fake_manila"), metadata=alice
            )
            assert [s.id for s in manila.sessions] == [mine[1]]


async def test_list_sessions_refuses_bad_requests_with_invalid_argument(
    sessions: sessions_pb2_grpc.SessionServiceStub,
) -> None:
    for request, message in (
        (sessions_pb2.ListSessionsRequest(page_size=-1), "page_size must be >= 0"),
        (sessions_pb2.ListSessionsRequest(page_token="garbage"), "page_token 'garbage'"),
        (sessions_pb2.ListSessionsRequest(page_token="nan/s-x"), "page_token"),
        (sessions_pb2.ListSessionsRequest(page_token="9" * 5000 + "/s"), "page_token"),
        (sessions_pb2.ListSessionsRequest(states=[42]), "unknown session state"),  # type: ignore[list-item]
        (sessions_pb2.ListSessionsRequest(backend="a\x00b"), "backend contains a NUL character"),
        (
            sessions_pb2.ListSessionsRequest(page_token="1.0/s\x00"),
            "page_token contains a NUL character",
        ),
    ):
        await expect_error(sessions.List(request), grpc.StatusCode.INVALID_ARGUMENT, message)
    assert not (await sessions.List(sessions_pb2.ListSessionsRequest())).sessions


async def test_list_jobs_by_program_refuses_nul_with_invalid_argument(
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    await expect_error(
        jobs.List(jobs_pb2.ListJobsRequest(program="p-\x00")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "program contains a NUL character",
    )
    assert not (await jobs.List(jobs_pb2.ListJobsRequest(program="no-such"))).jobs


async def create_as(
    stub: sessions_pb2_grpc.SessionServiceStub, who: tuple[tuple[str, str], ...], **fields: Any
) -> sessions_pb2.Session:
    request = sessions_pb2.CreateSessionRequest(**{"backend": "aer", **fields})
    return await stub.Create(request, metadata=who)


# --- pinning and queue jumping ---------------------------------------------------


async def test_dedicated_session_runs_every_job_on_one_executor(
    broker: Broker,
    sessions: sessions_pb2_grpc.SessionServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    async with (
        FakeExecutor(broker.address, executor_id="e-1", slots=2) as e1,
        FakeExecutor(broker.address, executor_id="e-2", slots=2) as e2,
    ):
        session = await create(sessions, mode=DEDICATED)
        ids = [await submit(jobs, session.id) for _ in range(6)]
        ran: dict[str, str] = {}
        workers = [asyncio.create_task(serve(e, ran)) for e in (e1, e2)]
        try:
            for job_id in ids:
                await wait_state(jobs, job_id, DONE)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        details = await get(sessions, session.id)
    assert set(ran) == set(ids)
    assert len(set(ran.values())) == 1
    assert details.executor_id == next(iter(ran.values()))
    assert details.state == sessions_pb2.SESSION_STATE_ACTIVE
    assert details.HasField("activated_at")
    assert details.HasField("last_job_at")
    assert counts(details) == {**dict.fromkeys(counts(details), 0), "total": 6, "done": 6}
    listed = await jobs.List(jobs_pb2.ListJobsRequest(session_id=session.id))
    assert {j.executor_id for j in listed.jobs} == {details.executor_id}


async def test_batch_groups_jobs_without_pinning(
    broker: Broker,
    sessions: sessions_pb2_grpc.SessionServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    async with FakeExecutor(broker.address, executor_id="e-1", slots=4) as e1:
        batch = await create(sessions, mode=BATCH)
        ids = [await submit(jobs, batch.id) for _ in range(3)]
        ran: dict[str, str] = {}
        worker = asyncio.create_task(serve(e1, ran))
        try:
            for job_id in ids:
                await wait_state(jobs, job_id, DONE)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    details = await get(sessions, batch.id)
    assert details.mode == BATCH
    assert details.state == sessions_pb2.SESSION_STATE_ACTIVE
    assert details.executor_id == ""  # a batch never pins
    assert details.jobs_done == 3


async def test_session_job_jumps_the_pinned_executors_backlog(
    broker: Broker,
    sessions: sessions_pb2_grpc.SessionServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    async with FakeExecutor(broker.address, executor_id="e-1", slots=1) as executor:
        session = await create(sessions)
        first = await submit(jobs, session.id)
        running = await executor.recv("assignment")
        assert running.job_id == first  # pins the session to e-1
        backlog = [await submit(jobs) for _ in range(4)]
        executor.finish(running)
        running = await executor.recv("assignment")
        assert running.job_id == backlog[0]  # no session job queued: oldest first
        later = await submit(jobs, session.id)  # younger than backlog[1:]
        executor.finish(running)
        running = await executor.recv("assignment")
        assert running.job_id == later  # jumped the three older backlog jobs
        order = [running.job_id]
        for _ in range(3):
            executor.finish(running)
            running = await executor.recv("assignment")
            order.append(running.job_id)
        executor.finish(running)
        assert order == [later, *backlog[1:]]
        for job_id in backlog:
            await wait_state(jobs, job_id, DONE)


async def test_session_is_repinned_when_its_executor_vanishes(
    broker: Broker,
    sessions: sessions_pb2_grpc.SessionServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    session = await create(sessions)
    async with FakeExecutor(broker.address, executor_id="e-1") as e1:
        first = await submit(jobs, session.id)
        assignment = await e1.recv("assignment")
        e1.finish(assignment)
        await wait_state(jobs, first, DONE)
    assert (await get(sessions, session.id)).executor_id == "e-1"
    async with FakeExecutor(broker.address, executor_id="e-2") as e2:
        second = await submit(jobs, session.id)
        # Pinned to e-1 (gone): e-2 gets it once e-1 has been away a lease TTL (1 s).
        assignment = await e2.recv("assignment", within=10)
        assert assignment.job_id == second
        assert (await get(sessions, session.id)).executor_id == "e-2"
        e2.finish(assignment)
        await wait_state(jobs, second, DONE)


# --- close, cancel -----------------------------------------------------------------


async def test_closed_session_refuses_new_jobs_and_lets_submitted_ones_finish(
    broker: Broker,
    sessions: sessions_pb2_grpc.SessionServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    session = await create(sessions)
    queued = await submit(jobs, session.id)
    closed = await sessions.Close(sessions_pb2.CloseSessionRequest(session_id=session.id))
    assert closed.state == sessions_pb2.SESSION_STATE_CLOSED
    assert closed.state_reason == "closed by the client"
    assert closed.HasField("closed_at")
    await expect_error(
        submit(jobs, session.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"session {session.id} is closed",
    )
    again = await sessions.Close(sessions_pb2.CloseSessionRequest(session_id=session.id))
    assert again.closed_at == closed.closed_at  # closing twice changes nothing
    async with FakeExecutor(broker.address) as executor:
        assignment = await executor.recv("assignment")
        assert assignment.job_id == queued
        executor.finish(assignment)
        await wait_state(jobs, queued, DONE)
    details = await get(sessions, session.id)
    assert details.state == sessions_pb2.SESSION_STATE_CLOSED
    assert counts(details) == {**dict.fromkeys(counts(details), 0), "total": 1, "done": 1}


async def test_cancel_cancels_every_unfinished_job_and_stops_the_running_one(
    broker: Broker,
    sessions: sessions_pb2_grpc.SessionServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    async with FakeExecutor(broker.address, slots=1) as executor:
        session = await create(sessions)
        ids = [await submit(jobs, session.id) for _ in range(3)]
        running = await executor.recv("assignment")
        assert running.job_id == ids[0]
        await wait_state(jobs, ids[0], RUNNING)
        outside = await submit(jobs)  # not the session's: untouched
        cancelled = await sessions.Cancel(sessions_pb2.CancelSessionRequest(session_id=session.id))
        stop = await executor.recv("cancel")
        assert (stop.job_id, stop.lease_id) == (ids[0], running.lease_id)
        executor.leases.pop(ids[0], None)
        executor.update(ids[0], running.lease_id, released=executor_pb2.Released(reason="stopped"))
        assert cancelled.state == sessions_pb2.SESSION_STATE_CANCELLED
        assert cancelled.state_reason == "cancelled by the client"
        assert counts(cancelled) == {
            **dict.fromkeys(counts(cancelled), 0),
            "total": 3,
            "cancelled": 3,
        }
        for job_id in ids:
            job = await jobs.Get(jobs_pb2.GetJobRequest(job_id=job_id))
            assert job.state == CANCELLED
        await expect_error(
            submit(jobs, session.id),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"session {session.id} is cancelled",
        )
        nxt = await executor.recv("assignment")
        assert nxt.job_id == outside
        executor.finish(nxt)
        await wait_state(jobs, outside, DONE)


async def test_cancel_after_close_cancels_the_remaining_jobs(
    sessions: sessions_pb2_grpc.SessionServiceStub, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    session = await create(sessions)
    job_id = await submit(jobs, session.id)
    await sessions.Close(sessions_pb2.CloseSessionRequest(session_id=session.id))
    cancelled = await sessions.Cancel(sessions_pb2.CancelSessionRequest(session_id=session.id))
    assert cancelled.state == sessions_pb2.SESSION_STATE_CANCELLED
    assert (await jobs.Get(jobs_pb2.GetJobRequest(job_id=job_id))).state == CANCELLED


# --- expiry ---------------------------------------------------------------------------


async def test_idle_session_expires_only_once_no_job_is_pending(
    broker: Broker,
    sessions: sessions_pb2_grpc.SessionServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    assert broker.sessions is not None
    session = await create(sessions, max_idle_s=600)
    job_id = await submit(jobs, session.id)
    later = time.time() + 601
    assert await broker.sessions.reap(now=later) == []  # a queued job is not idleness
    async with FakeExecutor(broker.address) as executor:
        assignment = await executor.recv("assignment")
        executor.finish(assignment)
        await wait_state(jobs, job_id, DONE)
    assert await broker.sessions.reap(now=time.time() + 300) == []
    (expired,) = await broker.sessions.reap(now=time.time() + 601)
    assert expired.state_reason == "max_idle 600 s reached (no job for 600 s)"
    details = await get(sessions, session.id)
    assert details.state == sessions_pb2.SESSION_STATE_EXPIRED
    assert details.HasField("closed_at")
    assert details.jobs_done == 1
    await expect_error(submit(jobs, session.id), grpc.StatusCode.FAILED_PRECONDITION, "is expired")


async def test_max_time_cancels_queued_jobs_and_lets_running_ones_finish(
    broker: Broker,
    sessions: sessions_pb2_grpc.SessionServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    assert broker.sessions is not None
    async with FakeExecutor(broker.address, slots=1) as executor:
        session = await create(sessions, max_time_s=600, max_idle_s=600)
        running_id = await submit(jobs, session.id)
        queued_id = await submit(jobs, session.id)
        running = await executor.recv("assignment")
        assert running.job_id == running_id
        assert await broker.sessions.reap(now=time.time() + 599) == []
        (expired,) = await broker.sessions.reap(now=time.time() + 601)
        assert expired.state_reason == "max_time 600 s reached"
        queued = await jobs.Get(jobs_pb2.GetJobRequest(job_id=queued_id))
        assert queued.state == CANCELLED
        assert (await jobs.Get(jobs_pb2.GetJobRequest(job_id=running_id))).state == RUNNING
        executor.finish(running)
        await wait_state(jobs, running_id, DONE)
    details = await get(sessions, session.id)
    assert details.state == sessions_pb2.SESSION_STATE_EXPIRED
    assert details.state_reason == "max_time 600 s reached"
    assert counts(details) == {
        **dict.fromkeys(counts(details), 0),
        "total": 2,
        "done": 1,
        "cancelled": 1,
    }
    stream = jobs.Watch(jobs_pb2.WatchRequest(job_id=queued_id), timeout=10)
    last = [event async for event in stream][-1]
    assert f"session {session.id} expired: max_time 600 s reached" in last.state.message


async def test_background_reaper_expires_an_idle_session_with_its_reason(
    broker: Broker, sessions: sessions_pb2_grpc.SessionServiceStub
) -> None:
    session = await create(sessions, max_idle_s=1)
    async with asyncio.timeout(10):
        details = await get(sessions, session.id)
        while details.state != sessions_pb2.SESSION_STATE_EXPIRED:
            await asyncio.sleep(0.05)
            details = await get(sessions, session.id)
    assert details.state_reason == "max_idle 1 s reached (no job for 1 s)"


async def test_program_job_moves_a_session_off_an_executor_without_a_sandbox(
    broker: Broker,
    channel: grpc.aio.Channel,
    sessions: sessions_pb2_grpc.SessionServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    from qrelay._proto.v1 import programs_pb2_grpc
    from tests.broker.test_programs import ProgramExecutor, program_spec, upload_request

    await programs_pb2_grpc.ProgramServiceStub(channel).Upload(upload_request())
    session = await create(sessions)
    async with FakeExecutor(broker.address, executor_id="e-plain") as plain:
        first = await submit(jobs, session.id)
        assignment = await plain.recv("assignment")
        plain.finish(assignment)
        await wait_state(jobs, first, DONE)
        assert (await get(sessions, session.id)).executor_id == "e-plain"
        spec = program_spec("counter", session_id=session.id)
        program_job = (await jobs.Submit(jobs_pb2.SubmitRequest(spec=spec))).id
        async with ProgramExecutor(broker.address, executor_id="e-prog") as prog:
            assignment = await prog.recv("assignment", within=10)
            assert assignment.job_id == program_job
            assert (await get(sessions, session.id)).executor_id == "e-prog"
            prog.finish(assignment)
            await wait_state(jobs, program_job, DONE)
