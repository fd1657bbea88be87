"""Broker logic (jobs, scheduler, leases, event fan-out) on plain values, without a socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qrelay._proto.v1 import backends_pb2, executor_pb2, types_pb2
from qrelay.broker.events import EventHub, follow
from qrelay.broker.jobs import Jobs
from qrelay.broker.leases import LeaseReaper
from qrelay.broker.metrics import BrokerMetrics
from qrelay.broker.scheduler import ExecutorLink, Scheduler
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import JobState, StoredEvent
from qrelay.broker.store.sqlite import SQLiteJobStore
from qrelay.errors import NotFound
from tests.broker.conftest import sampler_spec


@dataclass
class Parts:
    store: SQLiteJobStore
    hub: EventHub
    scheduler: Scheduler
    jobs: Jobs
    reaper: LeaseReaper


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    settings = BrokerSettings(db_path=tmp_path / "b.db", lease_ttl_s=30, max_attempts=2)
    store = SQLiteJobStore(settings.db_path)
    await store.open()
    hub = EventHub()
    scheduler = Scheduler(store, hub, settings, BrokerMetrics())
    await scheduler.load()
    yield Parts(
        store,
        hub,
        scheduler,
        Jobs(store, hub, scheduler, settings),
        LeaseReaper(store, hub, scheduler, settings),
    )
    await store.close()


def hello(executor_id: str, backends: list[str], slots: int) -> executor_pb2.Hello:
    return executor_pb2.Hello(
        executor_id=executor_id,
        slots=slots,
        backends=[backends_pb2.BackendInfo(name=b) for b in backends],
    )


def drain(link: ExecutorLink) -> list[executor_pb2.BrokerMessage]:
    out = []
    while not link.outbox.empty():
        message = link.outbox.get_nowait()
        assert message is not None
        out.append(message)
    return out


async def test_scheduler_respects_slots_and_fifo(parts: Parts) -> None:
    link, _ = await parts.scheduler.attach(hello("e-1", ["aer", "fake_manila"], slots=2))
    await parts.scheduler.dispatch()
    ids = [
        (await parts.jobs.submit("t", sampler_spec(backend)))[0].id
        for backend in ("fake_manila", "aer", "aer")
    ]
    assert await parts.scheduler.dispatch() == 2
    assigned = [m.assignment for m in drain(link)]
    assert [a.job_id for a in assigned] == ids[:2]  # oldest first across its backends
    assert await parts.scheduler.dispatch() == 0  # no free slot
    done = executor_pb2.JobUpdate(
        job_id=assigned[0].job_id,
        lease_id=assigned[0].lease_id,
        result=types_pb2.JobResult(program_json="1"),
    )
    await parts.scheduler.update(link, done)
    assert await parts.scheduler.dispatch() == 1
    assert [m.assignment.job_id for m in drain(link)] == [ids[2]]


async def test_submit_for_a_never_announced_backend_is_not_found(parts: Parts) -> None:
    with pytest.raises(NotFound, match="unknown backend 'aer'; known: none yet"):
        await parts.jobs.submit("t", sampler_spec("aer"))


async def test_reaper_requeues_then_fails_and_tells_the_holder(parts: Parts) -> None:
    link, _ = await parts.scheduler.attach(hello("e-1", ["aer"], slots=1))
    job, _ = await parts.jobs.submit("t", sampler_spec())
    parts.scheduler.settings.lease_ttl_s = 0.0  # leases granted from now on lapse at once
    await parts.scheduler.dispatch()
    (first,) = [m.assignment for m in drain(link)]
    expired = await parts.reaper.reap()
    assert [e.job.state for e in expired] == [JobState.QUEUED]
    (cancel,) = [m.cancel for m in drain(link)]
    assert (cancel.job_id, cancel.lease_id) == (job.id, first.lease_id)
    # The slot stays taken until the executor reports the stop.
    assert await parts.scheduler.dispatch() == 0
    released = executor_pb2.JobUpdate(
        job_id=job.id, lease_id=first.lease_id, released=executor_pb2.Released()
    )
    await parts.scheduler.update(link, released)
    rejected = drain(link)
    assert [m.WhichOneof("message") for m in rejected] == ["rejected"]  # stale lease
    assert await parts.scheduler.dispatch() == 1
    drain(link)
    (failed,) = await parts.reaper.reap()
    assert failed.job.state is JobState.FAILED
    assert failed.job.attempts == 2


async def test_watch_follows_replay_then_live_without_gaps_or_duplicates(parts: Parts) -> None:
    await parts.scheduler.attach(hello("e-1", ["aer"], slots=1))
    job, _ = await parts.jobs.submit("t", sampler_spec())
    seen: list[int] = []

    async def watch() -> None:
        async for event in parts.jobs.watch("t", job.id, 0):
            seen.append(event.seq)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.05)
    await parts.scheduler.dispatch()  # RUNNING (seq 2), published live
    # A duplicate and an out-of-order publish must neither repeat nor skip events.
    stored = await parts.store.events_after(job.id, 0)
    parts.hub.publish(stored)
    await parts.jobs.cancel("t", job.id, "stop")  # seq 3, terminal
    await asyncio.wait_for(watcher, 5)
    assert seen == [1, 2, 3]
    assert parts.hub.subscriber_count == 0


async def test_follow_fills_a_gap_from_the_store(parts: Parts) -> None:
    await parts.scheduler.attach(hello("e-1", ["aer"], slots=1))
    job, _ = await parts.jobs.submit("t", sampler_spec())
    got: list[StoredEvent] = []

    async def run() -> None:
        async for event in follow(parts.store, parts.hub, job.id, 1, terminal_seq=None):
            got.append(event)

    task = asyncio.create_task(run())
    await asyncio.sleep(0.05)
    # Commit two events but publish only the later one: the follower must
    # notice the gap and read seq 2 from the store.
    await parts.store.claim(["aer"], "e-1", 30, 1)  # seq 2, never published
    outcome = await parts.store.cancel(job.id, "t", "")
    parts.hub.publish(outcome.events)
    await asyncio.wait_for(task, 5)
    assert [e.seq for e in got] == [2, 3]


async def test_program_jobs_go_only_to_executors_with_the_program_capability(
    parts: Parts,
) -> None:
    plain, _ = await parts.scheduler.attach(hello("e-plain", ["aer"], slots=2))
    program_spec = types_pb2.JobSpec(backend="aer", program=types_pb2.ProgramTask(program="vqe"))
    job, _ = await parts.jobs.submit("t", program_spec)
    assert await parts.scheduler.dispatch() == 0
    able_hello = hello("e-sandbox", ["aer"], slots=1)
    able_hello.capabilities.append("program")
    able, _ = await parts.scheduler.attach(able_hello)
    assert await parts.scheduler.dispatch() == 1
    assert [m.assignment.job_id for m in drain(able)] == [job.id]
    assert drain(plain) == []


async def test_cancel_whose_caller_vanishes_still_publishes_and_tells_the_executor(
    parts: Parts,
) -> None:
    link, _ = await parts.scheduler.attach(hello("e-1", ["aer"], slots=1))
    job, _ = await parts.jobs.submit("t", sampler_spec())
    await parts.scheduler.dispatch()
    drain(link)
    with parts.hub.subscribe(job.id) as sub:
        caller = asyncio.create_task(parts.jobs.cancel("t", job.id, "bye"))
        await asyncio.sleep(0)  # the step has started...
        caller.cancel()  # ...and the client goes away (deadline, disconnect)
        with pytest.raises(asyncio.CancelledError):
            await caller
        await parts.scheduler.drain()
        published = sub.queue.get_nowait()
    assert published is not None
    assert published.terminal
    assert [m.WhichOneof("message") for m in drain(link)] == ["cancel"]
