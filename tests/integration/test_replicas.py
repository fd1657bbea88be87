"""Two broker replicas over one PostgreSQL database behave as one broker.

Each test starts two real brokers in-process (`running_broker`, different
ports, the same `database_url` and a fresh schema), real executors or
protocol-level fake executors connected to one replica only, and clients
that talk to the other one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from qrelay._proto.v1 import (
    backends_pb2,
    backends_pb2_grpc,
    executor_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    types_pb2,
)
from qrelay.broker import Broker, BrokerSettings, running_broker
from qrelay.broker.store.postgres import PostgresJobStore
from qrelay.executor.agent import running_executor
from qrelay.executor.settings import ExecutorSettings
from qrelay.testing import free_port
from tests.broker.conftest import FakeExecutor, postgres_schema, sampler_spec, until, wait_state
from tests.integration.procs import Proc, start_broker
from tests.integration.rawstubs import heavy_qasm3, unpack_bits, watch_all

# Leases long enough that a loaded machine cannot fake a silent executor (no
# test here waits for one to expire).
REPLICA = {"lease_ttl_s": 10.0, "heartbeat_interval_s": 0.25, "shutdown_grace_s": 1.0}
# Long enough that only LISTEN/NOTIFY hints can make a test pass in time; the
# catch-up test shortens it to prove the sync tick alone also gets there.
HINTS_ONLY_SYNC_S = 60.0


@asynccontextmanager
async def replicas(
    tmp_path: Path, count: int = 2, sync_s: float = HINTS_ONLY_SYNC_S
) -> AsyncIterator[list[Broker]]:
    """`count` brokers sharing one fresh PostgreSQL schema."""
    async with postgres_schema() as (dsn, schema), AsyncExitStack() as stack:
        brokers = []
        for i in range(count):
            settings = BrokerSettings(
                listen="127.0.0.1:0",
                db_path=tmp_path / f"unused-{i}.db",
                database_url=dsn,
                database_schema=schema,
                replica_sync_interval_s=sync_s,
                **REPLICA,
            )
            brokers.append(await stack.enter_async_context(running_broker(settings)))
        yield brokers


async def online_on(address: str, backend: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = backends_pb2_grpc.BackendServiceStub(channel)
        reply = await stub.Get(backends_pb2.GetBackendRequest(name=backend))
        return reply.online_executors


async def wait_online(address: str, backend: str, count: int, within: float = 10.0) -> None:
    """Poll BackendService (a remote peer: there is nothing local to wait on)."""
    async with asyncio.timeout(within):
        while True:
            if await online_on(address, backend) == count:
                return
            await asyncio.sleep(0.05)


async def test_client_on_one_replica_runs_a_job_on_an_executor_of_the_other(
    tmp_path: Path,
) -> None:
    async with replicas(tmp_path) as (a, b):
        settings = ExecutorSettings(broker=b.address, backends=["aer"], slots=1)
        async with running_executor(settings), grpc.aio.insecure_channel(a.address) as channel:
            # BackendService on A counts the executor connected to B.
            await wait_online(a.address, "aer", 1)
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer", shots=400)))
            events = await watch_all(jobs, job.id)

            seqs = [e.seq for e in events]
            assert seqs == list(range(1, len(seqs) + 1)), "every event, in order, no gaps"
            states = [e.state.state for e in events if e.WhichOneof("payload") == "state"]
            assert states == [
                types_pb2.JOB_STATE_QUEUED,
                types_pb2.JOB_STATE_RUNNING,
                types_pb2.JOB_STATE_DONE,
            ]
            assert [e.WhichOneof("payload") for e in events][-2:] == ["result", "state"]
            running = next(e for e in events if e.state.state == types_pb2.JOB_STATE_RUNNING)
            assert running.state.executor_id == settings.executor_id

            # The same history, watched through B.
            async with grpc.aio.insecure_channel(b.address) as channel_b:
                via_b = await watch_all(jobs_pb2_grpc.JobServiceStub(channel_b), job.id)
            assert [e.SerializeToString() for e in via_b] == [e.SerializeToString() for e in events]

            result = await jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id))
            (pub,) = result.primitive.pub_results
            bits = unpack_bits(pub.data[0].bits)
            assert bits.shape == (400, 2)
            assert np.all(bits[:, 0] == bits[:, 1])  # a Bell pair: the bits always agree
        # The executor left B: A stops counting it.
        await wait_online(a.address, "aer", 0)


async def test_cancel_on_one_replica_stops_the_job_on_an_executor_of_the_other(
    tmp_path: Path,
) -> None:
    async with (
        replicas(tmp_path) as (a, b),
        FakeExecutor(b.address, executor_id="e-b", backends=("aer",)) as fake,
        grpc.aio.insecure_channel(a.address) as channel,
    ):
        await wait_online(a.address, "aer", 1)
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer")))
        assignment = await fake.recv("assignment")
        assert assignment.job_id == job.id
        await wait_state(jobs, job.id, types_pb2.JOB_STATE_RUNNING)

        cancelled = await jobs.Cancel(
            jobs_pb2.CancelJobRequest(job_id=job.id, reason="changed my mind")
        )
        assert cancelled.state == types_pb2.JOB_STATE_CANCELLED
        stop = await fake.recv("cancel")
        assert (stop.job_id, stop.lease_id) == (job.id, assignment.lease_id)
        assert "changed my mind" in stop.reason

        # The executor confirms; a late result is refused by the fence.
        fake.update(job.id, assignment.lease_id, released=executor_pb2.Released())
        fake.update(job.id, assignment.lease_id, result=types_pb2.JobResult())
        rejected = await fake.recv("rejected")
        assert rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        events = await watch_all(jobs, job.id)
        assert events[-1].state.state == types_pb2.JOB_STATE_CANCELLED
        assert not [e for e in events if e.WhichOneof("payload") == "result"]


async def test_jobs_submitted_across_replicas_run_exactly_once(tmp_path: Path) -> None:
    total = 50
    async with replicas(tmp_path) as (a, b):
        assigned: Counter[str] = Counter()
        by_executor: Counter[str] = Counter()

        async def serve(fake: FakeExecutor, tg: asyncio.TaskGroup) -> None:
            while True:
                assignment = await fake.recv("assignment", within=60)
                assigned[assignment.job_id] += 1
                by_executor[fake.executor_id] += 1
                tg.create_task(finish_soon(fake, assignment))

        async def finish_soon(fake: FakeExecutor, assignment: executor_pb2.Assignment) -> None:
            # A little work per job, so that neither executor drains the queue alone.
            await asyncio.sleep(0.02)
            fake.finish(assignment)

        async with (
            FakeExecutor(a.address, executor_id="e-a", slots=4) as on_a,
            FakeExecutor(b.address, executor_id="e-b", slots=4) as on_b,
            grpc.aio.insecure_channel(a.address) as chan_a,
            grpc.aio.insecure_channel(b.address) as chan_b,
            asyncio.TaskGroup() as tg,
        ):
            workers = [tg.create_task(serve(on_a, tg)), tg.create_task(serve(on_b, tg))]
            stubs = [jobs_pb2_grpc.JobServiceStub(chan_a), jobs_pb2_grpc.JobServiceStub(chan_b)]
            submitted = await asyncio.gather(
                *(
                    stubs[i % 2].Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer")))
                    for i in range(total)
                )
            )
            ids = [job.id for job in submitted]
            assert len(set(ids)) == total
            for i, job_id in enumerate(ids):
                await wait_state(stubs[i % 2], job_id, types_pb2.JOB_STATE_DONE, within=30)
            for worker in workers:
                worker.cancel()

            # No job was leased twice, and each has exactly one result event.
            assert set(assigned) == set(ids)
            assert max(assigned.values()) == 1
            assert sum(by_executor.values()) == total
            assert by_executor["e-a"] > 0, by_executor
            assert by_executor["e-b"] > 0, by_executor
            for i, job_id in enumerate(ids):
                events = await watch_all(stubs[(i + 1) % 2], job_id)  # read via the other replica
                kinds = Counter(e.WhichOneof("payload") for e in events)
                assert kinds["result"] == 1, (job_id, kinds)
                assert events[-1].state.state == types_pb2.JOB_STATE_DONE


async def test_watch_on_a_replica_catches_up_when_notifications_are_lost(
    tmp_path: Path,
) -> None:
    async with (
        replicas(tmp_path, sync_s=0.3) as (a, b),
        FakeExecutor(b.address, executor_id="e-b") as fake,
        grpc.aio.insecure_channel(a.address) as channel,
    ):
        await wait_online(a.address, "aer", 1)
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer")))
        assignment = await fake.recv("assignment")
        watch = asyncio.create_task(watch_all(jobs, job.id))
        await until(lambda: job.id in a.hub.watching())
        # B's hints now go to a channel nobody listens on: only A's sync
        # tick (every 0.3 s) can bring the result to the Watch.
        assert b.fanout is not None
        b.store.channel = "qrelay_nobody_listens"  # type: ignore[attr-defined]
        fake.finish(assignment)
        events = await asyncio.wait_for(watch, 10)
        assert events[-1].state.state == types_pb2.JOB_STATE_DONE
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_a_replica_relistens_after_losing_its_database_connection(
    tmp_path: Path,
) -> None:
    async with (
        replicas(tmp_path) as (a, b),
        FakeExecutor(b.address, executor_id="e-b") as fake,
        grpc.aio.insecure_channel(a.address) as channel,
    ):
        assert b.fanout is not None
        lost_pid = b.fanout.listener_pid
        # The database drops B's listening connection (as a failover or restart would).
        assert isinstance(b.store, PostgresJobStore)
        async with b.store._require_pool().acquire() as conn:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", lost_pid)
        await until(
            lambda: (
                b.fanout is not None
                and b.fanout.connected.is_set()
                and b.fanout.listener_pid != lost_pid
            ),
            within=10,
        )
        # Hints reach B again: a submit on A is run by B's executor, a cancel on A stops it.
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer")))
        assignment = await fake.recv("assignment")
        assert assignment.job_id == job.id
        await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id))
        stop = await fake.recv("cancel")
        assert stop.lease_id == assignment.lease_id


async def doomed_and_survivor(
    tmp_path: Path, dsn: str, schema: str, lease_ttl_s: float
) -> tuple[int, Proc, BrokerSettings]:
    """A replica as a process (to kill -9) on a port, and settings for an in-process one."""
    env = {
        "QRELAY_DATABASE_URL": dsn,
        "QRELAY_DATABASE_SCHEMA": schema,
        "QRELAY_LEASE_TTL_S": str(lease_ttl_s),
        "QRELAY_HEARTBEAT_INTERVAL_S": "0.25",
        "QRELAY_REPLICA_SYNC_INTERVAL_S": "0.3",
    }
    port = free_port()
    doomed = await asyncio.to_thread(start_broker, port, tmp_path / "unused.db", tmp_path, env)
    settings = BrokerSettings(
        listen="127.0.0.1:0",
        db_path=tmp_path / "unused-a.db",
        database_url=dsn,
        database_schema=schema,
        lease_ttl_s=lease_ttl_s,
        heartbeat_interval_s=0.25,
        replica_sync_interval_s=0.3,
        shutdown_grace_s=1.0,
    )
    return port, doomed, settings


@pytest.mark.slow
async def test_kill9_of_a_replica_hands_its_running_job_to_an_executor_of_another(
    tmp_path: Path,
) -> None:
    async with postgres_schema() as (dsn, schema):
        port, doomed, settings = await doomed_and_survivor(tmp_path, dsn, schema, 2.0)
        try:
            async with (
                running_broker(settings) as survivor,
                grpc.aio.insecure_channel(survivor.address) as channel,
            ):
                on_doomed = FakeExecutor(f"127.0.0.1:{port}", executor_id="e-doomed")
                await on_doomed.__aenter__()
                try:
                    await wait_online(survivor.address, "aer", 1)
                    jobs = jobs_pb2_grpc.JobServiceStub(channel)
                    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer")))
                    first = await on_doomed.recv("assignment")
                    assert first.job_id == job.id
                    await asyncio.to_thread(doomed.kill9)
                finally:
                    await on_doomed.close()

                async with FakeExecutor(survivor.address, executor_id="e-survivor") as fake:
                    # Lease expiry (2 s) on the surviving replica requeues the job here.
                    second = await fake.recv("assignment", within=15)
                    assert (second.job_id, second.attempt) == (job.id, 2)
                    fake.finish(second)
                    events = await watch_all(jobs, job.id)
                    # The dead replica's presence ages out: only e-survivor counts.
                    await wait_online(survivor.address, "aer", 1)
                running = [
                    e.state.executor_id
                    for e in events
                    if e.state.state == types_pb2.JOB_STATE_RUNNING
                ]
                assert running == ["e-doomed", "e-survivor"]
                assert events[-1].state.state == types_pb2.JOB_STATE_DONE
                assert [e.WhichOneof("payload") for e in events].count("result") == 1
        finally:
            doomed.stop()


@pytest.mark.slow
async def test_an_executor_fails_over_to_another_replica_and_reports_its_result_there(
    tmp_path: Path,
) -> None:
    """kill -9 of the executor's replica mid-job: the result goes out through the other one.

    The lease outlives the failover, so the job is not re-run: one attempt,
    one result, and the executor's next stream is to the survivor.
    """
    async with postgres_schema() as (dsn, schema):
        port, doomed, settings = await doomed_and_survivor(tmp_path, dsn, schema, 30.0)
        try:
            async with running_broker(settings) as survivor:
                executor_settings = ExecutorSettings(
                    broker=f"127.0.0.1:{port},{survivor.address}",
                    backends=["aer"],
                    slots=1,
                    programs=False,
                    reconnect_initial_s=0.05,
                    reconnect_max_s=0.5,
                )
                async with (
                    running_executor(executor_settings) as executor,
                    grpc.aio.insecure_channel(survivor.address) as channel,
                ):
                    assert executor.broker == f"127.0.0.1:{port}"
                    # The survivor learns of the executor through the shared presence table.
                    await wait_online(survivor.address, "aer", 1)
                    jobs = jobs_pb2_grpc.JobServiceStub(channel)
                    spec = sampler_spec("aer")
                    spec.sampler.pubs[0].circuit.qasm3 = heavy_qasm3(num_qubits=18, layers=40)
                    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=spec))
                    await wait_state(jobs, job.id, types_pb2.JOB_STATE_RUNNING, within=30)
                    await asyncio.to_thread(doomed.kill9)
                    events = await watch_all(jobs, job.id)
                    done = await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id))
                    assert executor.broker == survivor.address
                final = [e for e in events if e.WhichOneof("payload") == "state"][-1]
                assert final.state.state == types_pb2.JOB_STATE_DONE
                assert [e.WhichOneof("payload") for e in events].count("result") == 1
                assert done.attempts == 1, "finished once, reported through the survivor"
        finally:
            doomed.stop()
