"""Quotas, usage, queue positions and priorities end to end: a real broker on
a loopback port, real executors running real Aer, gRPC stubs and the SDK.

Counts and the order of recorded timestamps are asserted, never durations;
usage figures are compared with what a client can observe, with a wide margin.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
import structlog

from qrelay._proto.v1 import (
    backends_pb2,
    backends_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    programs_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    types_pb2,
)
from qrelay.broker.server import running_broker
from qrelay.broker.settings import BrokerSettings
from qrelay.client import AsyncQRelayService
from qrelay.errors import ResourceExhausted
from qrelay.executor.agent import running_executor
from tests.broker.conftest import (
    FakeExecutor,
    announce,
    auth,
    broker_settings,
    postgres_schema,
    until,
)
from tests.broker.test_fairness import all_done
from tests.broker.test_programs import tar_gz, upload_request
from tests.executor.test_agent import executor_settings
from tests.integration.rawstubs import BELL_QASM3, heavy_qasm3, sampler_spec

TOKENS = {"tok-a": "a", "tok-b": "b"}
A, B = auth("tok-a"), auth("tok-b")


def quota_settings(tmp_path: Path, quotas: dict[str, Any], **overrides: Any) -> BrokerSettings:
    return broker_settings(
        tmp_path, tokens=TOKENS, tenant_quotas=quotas, max_queued_per_tenant=1000, **overrides
    )


async def submit(stub: jobs_pb2_grpc.JobServiceStub, who: Any, spec: Any = None) -> jobs_pb2.Job:
    request = jobs_pb2.SubmitRequest(spec=spec or sampler_spec("aer", BELL_QASM3, shots=10))
    job: jobs_pb2.Job = await stub.Submit(request, metadata=who)
    return job


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def quota_refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line["event"] == "audit.quota_refused"]


async def test_a_flooding_tenant_meets_its_queued_quota_while_another_submits(
    tmp_path: Path,
) -> None:
    settings = quota_settings(tmp_path, {"default": {"max_queued_jobs": 20}})
    async with (
        running_broker(settings) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        await announce(broker.address, ["aer"])
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        with structlog.testing.capture_logs() as logs:
            for _ in range(20):
                await submit(jobs, A)
            errors = [await refused(submit(jobs, A)) for _ in range(5)]
            b_jobs = [await submit(jobs, B) for _ in range(20)]
            # A RunStream submission meets the same quota as an item, not a dead stream.
            stream = jobs.RunStream(metadata=A)
            request = jobs_pb2.SubmitRequest(spec=sampler_spec("aer", BELL_QASM3, shots=10))
            await stream.write(jobs_pb2.RunStreamRequest(tag="t1", submit=request))
            await stream.done_writing()
            replies = [reply async for reply in stream]
        assert len(b_jobs) == 20
        expected = (
            "tenant 'a' has 20 queued jobs, its quota of queued jobs (max_queued_jobs=20); "
            "wait for some to finish or cancel some"
        )
        assert {(e.code(), e.details()) for e in errors} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, expected)
        }
        (item,) = [i for reply in replies for i in reply.items]
        assert (item.tag, item.error.code, item.error.message) == (
            "t1",
            ResourceExhausted.code,
            expected,
        )
        audited = quota_refusals(logs)
        assert len(audited) == 6
        assert {(a["tenant"], a["quota"], a["limit"], a["used"], a["action"]) for a in audited} == {
            ("a", "max_queued_jobs", 20, 20, "submit")
        }


async def test_running_quota_holds_back_a_tenants_jobs_while_anothers_run(
    tmp_path: Path,
) -> None:
    settings = quota_settings(tmp_path, {"a": {"max_running_jobs": 1}})
    spec = sampler_spec("aer", heavy_qasm3(12, 20), shots=200)
    async with (
        running_broker(settings) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        await announce(broker.address, ["aer"])
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        for _ in range(4):
            await submit(jobs, A, spec)
            await submit(jobs, B, spec)
        async with running_executor(executor_settings(broker.address, slots=4)):
            a_jobs = await all_done(jobs, "tok-a")
            b_jobs = await all_done(jobs, "tok-b")
    assert len(a_jobs) == len(b_jobs) == 4

    def span(job: jobs_pb2.Job) -> tuple[float, float]:
        return job.started_at.ToNanoseconds(), job.finished_at.ToNanoseconds()

    a_spans = sorted(span(j) for j in a_jobs)
    # One of A's at a time: each of its runs starts after the previous one ended.
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(a_spans))
    # Meanwhile B's jobs took the other slots: several started during A's first run.
    first_a_end = a_spans[0][1]
    assert sum(span(j)[0] < first_a_end for j in b_jobs) >= 2


async def test_executor_seconds_budget_spent_refuses_submits_and_usage_matches_run_times(
    tmp_path: Path,
) -> None:
    settings = quota_settings(tmp_path, {"a": {"max_executor_seconds": 0.001}}, quota_period="day")
    async with (
        running_broker(settings) as broker,
        running_executor(executor_settings(broker.address, slots=2)),
        AsyncQRelayService(broker.address, token="tok-a") as service_a,
        AsyncQRelayService(broker.address, token="tok-b") as service_b,
    ):
        spec = sampler_spec("aer", heavy_qasm3(10, 10), shots=100)
        before = anyio.current_time()
        job = await service_a.submit(spec)
        await job.result(timeout=120)
        observed = anyio.current_time() - before
        usage = await job.usage()
        assert usage is not None
        # The charge is the run (lease to result): within what the client waited.
        assert 0 < usage <= observed + 0.5
        record = await job.refresh()
        run = (record.finished_at.ToNanoseconds() - record.started_at.ToNanoseconds()) / 1e9
        assert usage == pytest.approx(run, abs=0.01)
        metrics = await job.metrics()
        assert metrics["usage"]["seconds"] == usage
        # The budget is spent: A's next submit is refused naming it; B runs on.
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(ResourceExhausted, match=r"max_executor_seconds=0\.001\b"),
        ):
            await service_a.submit(spec)
        (audited,) = quota_refusals(logs)
        assert (audited["quota"], audited["limit"], audited["used"]) == (
            "max_executor_seconds",
            0.001,
            usage,
        )
        b_job = await service_b.submit(spec)
        await b_job.result(timeout=120)
        report = await service_a.usage()
        assert report["usage_consumed_seconds"] == pytest.approx(usage)
        assert report["usage_limit_seconds"] == 0.001
        assert report["usage_remaining_seconds"] == 0.0
        assert report["usage_limit_reached"] is True
        assert report["quotas"]["max_executor_seconds"] == 0.001
        assert report["quotas"]["max_queued_jobs"] is None
        start, end = report["period"]["start"], report["period"]["end"]
        assert (end - start).days == 1
        assert (report["queued_jobs"], report["running_jobs"]) == (0, 0)
        b_report = await service_b.usage()
        assert b_report["usage_consumed_seconds"] == pytest.approx(await b_job.usage())
        assert b_report["usage_limit_seconds"] is None
        assert b_report["usage_limit_reached"] is False


@pytest.fixture
async def quota_broker(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    quotas = {"default": {"max_sessions": 1, "max_program_bytes": 4000}, "b": {"max_sessions": 3}}
    async with (
        running_broker(quota_settings(tmp_path, quotas)) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        await announce(broker.address, ["aer"])
        yield channel


async def test_sessions_quota_refuses_naming_it(quota_broker: grpc.aio.Channel) -> None:
    sessions = sessions_pb2_grpc.SessionServiceStub(quota_broker)
    create = sessions_pb2.CreateSessionRequest(backend="aer")
    first = await sessions.Create(create, metadata=A)
    with structlog.testing.capture_logs() as logs:
        error = await refused(sessions.Create(create, metadata=A))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == (
        "tenant 'a' has 1 open sessions, its quota of open sessions (max_sessions=1); "
        "close a session first"
    )
    assert [(a["quota"], a["action"]) for a in quota_refusals(logs)] == [
        ("max_sessions", "create_session")
    ]
    for _ in range(3):  # B's own override
        await sessions.Create(create, metadata=B)
    await sessions.Close(sessions_pb2.CloseSessionRequest(session_id=first.id), metadata=A)
    await sessions.Create(create, metadata=A)


async def test_program_storage_quota_refuses_naming_it(quota_broker: grpc.aio.Channel) -> None:
    programs = programs_pb2_grpc.ProgramServiceStub(quota_broker)
    noise = random.Random(7).randbytes(1200)  # incompressible: each archive takes room
    stored = 0
    error: grpc.aio.AioRpcError | None = None
    for i in range(10):
        request = upload_request(
            name=f"p{i}", archive=tar_gz({"main.py": b"def main(ctx):\n    return 1\n", "n": noise})
        )
        try:
            program = await programs.Upload(request, metadata=A)
        except grpc.aio.AioRpcError as exc:
            error = exc
            break
        stored += program.size_bytes
    assert error is not None, "the program storage quota never refused an upload"
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"tenant 'a' has {stored} bytes of programs stored and this upload adds" in (
        error.details()
    )
    assert "(max_program_bytes=4000); delete programs it no longer needs" in error.details()
    assert 0 < stored <= 4000
    # Another tenant's storage is its own.
    await programs.Upload(upload_request(name="p0"), metadata=B)
    usage = await jobs_pb2_grpc.JobServiceStub(quota_broker).GetUsage(
        jobs_pb2.GetUsageRequest(), metadata=A
    )
    assert (usage.program_bytes, usage.quotas.max_program_bytes) == (stored, 4000)


async def test_queue_numbers_of_one_tenant_ignore_anothers_backlog(tmp_path: Path) -> None:
    async with (
        running_broker(quota_settings(tmp_path, {})) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        await announce(broker.address, ["aer"])
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        backends = backends_pb2_grpc.BackendServiceStub(channel)

        async def b_numbers() -> tuple[list[int], list[int], int]:
            listed = await jobs.List(jobs_pb2.ListJobsRequest(), metadata=B)
            got = [
                (await jobs.Get(jobs_pb2.GetJobRequest(job_id=j), metadata=B)).queue_position
                for j in b_ids
            ]
            aer = await backends.Get(backends_pb2.GetBackendRequest(name="aer"), metadata=B)
            return got, sorted(j.queue_position for j in listed.jobs), aer.queue_length

        for _ in range(5):
            await submit(jobs, A)
        b_ids = [(await submit(jobs, B)).id for _ in range(3)]
        before = await b_numbers()
        assert before == ([1, 3, 5], [1, 3, 5], 6)
        for _ in range(300):
            await submit(jobs, A)
        assert await b_numbers() == before
        fresh = await submit(jobs, B)
        assert fresh.queue_position == 7


async def test_priority_out_of_bounds_is_invalid_argument(tmp_path: Path) -> None:
    async with (
        running_broker(quota_settings(tmp_path, {})) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        await announce(broker.address, ["aer"])
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        spec = sampler_spec("aer", BELL_QASM3, shots=10)
        spec.priority = 11
        error = await refused(submit(jobs, A, spec))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "priority must be between -10 and 10" in error.details()
        spec.priority = 4
        job = await submit(jobs, A, spec)
        assert (job.priority, job.usage_seconds) == (4, 0.0)
        assert job.state == types_pb2.JOB_STATE_QUEUED


async def test_running_quota_holds_across_replicas_sharing_postgresql(tmp_path: Path) -> None:
    """Two replicas over one PostgreSQL schema, an executor with free slots on
    each: the tenant never runs more than its 2 jobs at once, and each run's
    end lets exactly one more start (through either replica)."""
    async with postgres_schema() as (dsn, schema), AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                running_broker(
                    broker_settings(
                        tmp_path / f"r{i}",
                        database_url=dsn,
                        database_schema=schema,
                        tenant_quotas={"default": {"max_running_jobs": 2}},
                        replica_sync_interval_s=0.3,
                        lease_ttl_s=10.0,
                    )
                )
            )
            for i in range(2)
        ]
        held: list[tuple[FakeExecutor, Any]] = []
        started = 0
        peak = 0

        async def serve(fake: FakeExecutor) -> None:
            nonlocal started, peak
            while True:
                assignment = await fake.recv("assignment", within=60)
                started += 1
                held.append((fake, assignment))
                peak = max(peak, len(held))

        async with (
            FakeExecutor(a.address, executor_id="e-a", slots=4) as on_a,
            FakeExecutor(b.address, executor_id="e-b", slots=4) as on_b,
            grpc.aio.insecure_channel(a.address) as chan_a,
            grpc.aio.insecure_channel(b.address) as chan_b,
            asyncio.TaskGroup() as tg,
        ):
            workers = [tg.create_task(serve(on_a)), tg.create_task(serve(on_b))]
            stubs = [jobs_pb2_grpc.JobServiceStub(chan_a), jobs_pb2_grpc.JobServiceStub(chan_b)]
            for i in range(8):
                await stubs[i % 2].Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer")))
            await until(lambda: started == 2, within=10)
            # Several sync ticks on both replicas: nothing more may start meanwhile.
            await asyncio.sleep(1.0)
            assert started == 2
            for expected in range(3, 9):
                fake, assignment = held.pop(0)  # its end is counted before it is sent
                fake.finish(assignment)
                await until(lambda n=expected: started == n, within=10)  # type: ignore[misc]
            await asyncio.sleep(0.5)
            for worker in workers:
                worker.cancel()
        assert (started, peak) == (8, 2)
