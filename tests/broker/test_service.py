"""Servicer edge: status codes and messages, tenancy, limits, backends, health, reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qrelay._proto.v1 import (
    backends_pb2,
    backends_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    types_pb2,
)
from qrelay.broker.server import Broker, running_broker
from qrelay.broker.settings import MIB
from qrelay.errors import FailedPrecondition
from tests.broker.conftest import (
    FakeExecutor,
    announce,
    auth,
    broker_settings,
    sampler_spec,
    until,
    wait_state,
)

Code = grpc.StatusCode


async def rpc_error(awaitable: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await awaitable  # type: ignore[misc]
    return err.value


@pytest.fixture
async def tenant_broker(tmp_path: Path) -> AsyncIterator[Broker]:
    settings = broker_settings(
        tmp_path, tokens={"tok-a": "alice", "tok-b": "bob"}, max_queued_per_tenant=2
    )
    async with running_broker(settings) as broker:
        await announce(broker.address)
        yield broker


async def test_tenants_see_only_their_own_jobs(tenant_broker: Broker) -> None:
    async with grpc.aio.insecure_channel(tenant_broker.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth("tok-a"))
        mine = await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=auth("tok-a"))
        assert mine.id == job.id
        for call in (
            jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=auth("tok-b")),
            jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id), metadata=auth("tok-b")),
            jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id), metadata=auth("tok-b")),
        ):
            err = await rpc_error(call)
            assert err.code() == Code.NOT_FOUND
            assert err.details() == f"job {job.id!r} not found"
        watch = jobs.Watch(jobs_pb2.WatchRequest(job_id=job.id), metadata=auth("tok-b"))
        err = await rpc_error(watch.read())
        assert err.code() == Code.NOT_FOUND
        theirs = await jobs.List(jobs_pb2.ListJobsRequest(), metadata=auth("tok-b"))
        assert list(theirs.jobs) == []
        still = await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=auth("tok-a"))
        assert still.state == types_pb2.JOB_STATE_QUEUED


async def test_missing_or_unknown_token_is_unauthenticated(tenant_broker: Broker) -> None:
    async with grpc.aio.insecure_channel(tenant_broker.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        err = await rpc_error(jobs.List(jobs_pb2.ListJobsRequest()))
        assert err.code() == Code.UNAUTHENTICATED
        assert "requires a bearer token" in (err.details() or "")
        err = await rpc_error(jobs.List(jobs_pb2.ListJobsRequest(), metadata=auth("tok-zzz")))
        assert (err.code(), err.details()) == (Code.UNAUTHENTICATED, "unknown bearer token")
        backends = backends_pb2_grpc.BackendServiceStub(ch)
        err = await rpc_error(backends.List(backends_pb2.ListBackendsRequest()))
        assert err.code() == Code.UNAUTHENTICATED


async def test_queue_limit_per_tenant_is_resource_exhausted(tenant_broker: Broker) -> None:
    async with grpc.aio.insecure_channel(tenant_broker.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        for _ in range(2):
            await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth("tok-a"))
        err = await rpc_error(
            jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth("tok-a"))
        )
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert "at most 2 per tenant (QRELAY_MAX_QUEUED_PER_TENANT)" in (err.details() or "")
        # Everyone else keeps being served.
        await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth("tok-b"))


async def test_oversized_job_gets_our_message_not_grpcs(tmp_path: Path) -> None:
    async with running_broker(broker_settings(tmp_path, max_job_bytes=1 * MIB)) as broker:
        await announce(broker.address)
        async with grpc.aio.insecure_channel(
            broker.address, options=[("grpc.max_send_message_length", 64 * MIB)]
        ) as ch:
            jobs = jobs_pb2_grpc.JobServiceStub(ch)
            spec = sampler_spec()
            spec.sampler.pubs[0].circuit.qpy = b"\0" * int(1.5 * MIB)
            err = await rpc_error(jobs.Submit(jobs_pb2.SubmitRequest(spec=spec)))
            assert err.code() == Code.RESOURCE_EXHAUSTED
            assert err.details() == (
                "job is 1.5 MiB; this broker accepts at most 1.0 MiB per job (QRELAY_MAX_JOB_BYTES)"
            )


async def test_bad_requests_answer_invalid_argument_with_field(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    spec = sampler_spec()
    spec.sampler.pubs.add(circuit=types_pb2.Circuit(qasm3="x"), shots=0)
    err = await rpc_error(jobs.Submit(jobs_pb2.SubmitRequest(spec=spec)))
    assert (err.code(), err.details()) == (Code.INVALID_ARGUMENT, "pub 1: shots must be > 0, got 0")
    err = await rpc_error(
        jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="k" * 200))
    )
    assert err.code() == Code.INVALID_ARGUMENT
    assert "at most 128" in (err.details() or "")
    err = await rpc_error(jobs.Watch(jobs_pb2.WatchRequest(job_id="j-x", after_seq=-1)).read())
    assert err.code() == Code.INVALID_ARGUMENT
    err = await rpc_error(jobs.Get(jobs_pb2.GetJobRequest()))
    assert (err.code(), err.details()) == (Code.INVALID_ARGUMENT, "job_id is required")
    err = await rpc_error(jobs.List(jobs_pb2.ListJobsRequest(page_token="zz")))
    assert err.code() == Code.INVALID_ARGUMENT


async def test_unknown_backend_and_job_are_not_found(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    err = await rpc_error(jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("ibm_nowhere"))))
    assert err.code() == Code.NOT_FOUND
    assert err.details() == "unknown backend 'ibm_nowhere'; known: aer, fake_manila"
    for call in (
        jobs.Get(jobs_pb2.GetJobRequest(job_id="j-missing")),
        jobs.Cancel(jobs_pb2.CancelJobRequest(job_id="j-missing")),
        jobs.GetResult(jobs_pb2.GetResultRequest(job_id="j-missing")),
        jobs.Watch(jobs_pb2.WatchRequest(job_id="j-missing")).read(),
    ):
        err = await rpc_error(call)
        assert (err.code(), err.details()) == (Code.NOT_FOUND, "job 'j-missing' not found")


async def test_unfinished_job_result_is_failed_precondition(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
    err = await rpc_error(jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id)))
    assert err.code() == Code.FAILED_PRECONDITION
    assert "is QUEUED; its result is not ready" in (err.details() or "")


async def test_offline_backend_queues_and_backend_service_reports_it(
    broker: Broker, channel: grpc.aio.Channel, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    backends = backends_pb2_grpc.BackendServiceStub(channel)
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("fake_manila")))
    assert job.queue_position == 1
    manila = await backends.Get(backends_pb2.GetBackendRequest(name="fake_manila"))
    assert (manila.online, manila.online_executors, manila.queue_length) == (False, 0, 1)
    assert manila.info.num_qubits == 5
    assert manila.last_seen.seconds > 0
    async with FakeExecutor(broker.address, backends=["fake_manila"]) as executor:
        listed = {
            b.info.name: b
            for b in (await backends.List(backends_pb2.ListBackendsRequest())).backends
        }
        assert set(listed) == {"aer", "fake_manila"}
        assert listed["fake_manila"].online
        assert listed["fake_manila"].online_executors == 1
        assert not listed["aer"].online
        assert (await executor.recv("assignment")).job_id == job.id
    err = await rpc_error(backends.Get(backends_pb2.GetBackendRequest(name="nope")))
    assert err.code() == Code.NOT_FOUND
    assert "unknown backend 'nope'" in (err.details() or "")


async def test_list_pages_newest_first(broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub) -> None:
    ids = [(await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))).id for _ in range(3)]
    first = await jobs.List(jobs_pb2.ListJobsRequest(page_size=2))
    second = await jobs.List(
        jobs_pb2.ListJobsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [j.id for j in first.jobs] + [j.id for j in second.jobs] == ids[::-1]
    assert second.next_page_token == ""
    assert [j.queue_position for j in first.jobs] == [3, 2]


async def test_health_and_reflection_respond(broker: Broker, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "qrelay.v1.JobService", "qrelay.v1.ExecutorService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    response = await call.read()
    names = {s.name for s in response.list_services_response.service}
    assert {"qrelay.v1.JobService", "qrelay.v1.BackendService", "grpc.health.v1.Health"} <= names
    call.cancel()


async def test_client_disconnect_mid_watch_leaves_nothing_behind(
    broker: Broker, channel: grpc.aio.Channel, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
    before = len(asyncio.all_tasks())
    async with grpc.aio.insecure_channel(broker.address) as other:
        call = jobs_pb2_grpc.JobServiceStub(other).Watch(jobs_pb2.WatchRequest(job_id=job.id))
        assert (await call.read()).seq == 1
        assert broker.hub.subscriber_count == 1
    await until(lambda: broker.hub.subscriber_count == 0 and len(asyncio.all_tasks()) <= before)


async def test_executor_token_is_required_when_configured(tmp_path: Path) -> None:
    async with running_broker(broker_settings(tmp_path, executor_token="sekrit")) as broker:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with FakeExecutor(broker.address):
                pass
        assert err.value.code() == Code.UNAUTHENTICATED
        async with FakeExecutor(broker.address, metadata=auth("sekrit")) as executor:
            assert executor.welcome is not None
            assert executor.welcome.lease_ttl_ms == 1000


async def test_executor_must_start_with_hello(broker: Broker, channel: grpc.aio.Channel) -> None:
    stub = executor_pb2_grpc.ExecutorServiceStub(channel)
    call = stub.Connect(iter([executor_pb2.ExecutorMessage(heartbeat=executor_pb2.Heartbeat())]))
    err = await rpc_error(call.read())
    assert err.code() == Code.INVALID_ARGUMENT
    assert "must start with Hello, got heartbeat" in (err.details() or "")
    call = stub.Connect(
        iter([executor_pb2.ExecutorMessage(hello=executor_pb2.Hello(executor_id="e"))])
    )
    err = await rpc_error(call.read())
    assert (err.code(), err.details()) == (Code.INVALID_ARGUMENT, "Hello.slots must be > 0, got 0")


async def test_reconnecting_executor_replaces_its_old_stream(
    broker: Broker, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    async with (
        FakeExecutor(broker.address, executor_id="e-dup") as old,
        FakeExecutor(broker.address, executor_id="e-dup") as new,
    ):
        await old.ended()
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        assert (await new.recv("assignment")).job_id == job.id
        await wait_state(jobs, job.id, types_pb2.JOB_STATE_RUNNING)


async def test_run_answers_bad_input_with_submits_status_before_any_event(
    tenant_broker: Broker,
) -> None:
    async with grpc.aio.insecure_channel(tenant_broker.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        spec = sampler_spec()
        spec.sampler.pubs.add(circuit=types_pb2.Circuit(qasm3="x"), shots=0)
        err = await rpc_error(
            jobs.Run(jobs_pb2.SubmitRequest(spec=spec), metadata=auth("tok-a")).read()
        )
        assert (err.code(), err.details()) == (
            Code.INVALID_ARGUMENT,
            "pub 1: shots must be > 0, got 0",
        )
        err = await rpc_error(
            jobs.Run(
                jobs_pb2.SubmitRequest(spec=sampler_spec("ibm_nowhere")), metadata=auth("tok-a")
            ).read()
        )
        assert (err.code(), err.details()) == (
            Code.NOT_FOUND,
            "unknown backend 'ibm_nowhere'; known: aer, fake_manila",
        )
        for _ in range(2):
            await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth("tok-a"))
        err = await rpc_error(
            jobs.Run(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth("tok-a")).read()
        )
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert "at most 2 per tenant (QRELAY_MAX_QUEUED_PER_TENANT)" in (err.details() or "")


async def test_run_stores_the_job_before_its_first_event_and_follows_it(
    tenant_broker: Broker,
) -> None:
    async with grpc.aio.insecure_channel(tenant_broker.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        call = jobs.Run(
            jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="r1"),
            metadata=auth("tok-a"),
        )
        first = await call.read()
        assert (first.seq, first.state.state) == (1, types_pb2.JOB_STATE_QUEUED)
        stored = await jobs.Get(jobs_pb2.GetJobRequest(job_id=first.job_id), metadata=auth("tok-a"))
        assert (stored.state, stored.queue_position) == (types_pb2.JOB_STATE_QUEUED, 1)
        # Another tenant cannot see it; a repeat under the key follows the same job.
        err = await rpc_error(
            jobs.Get(jobs_pb2.GetJobRequest(job_id=first.job_id), metadata=auth("tok-b"))
        )
        assert err.code() == Code.NOT_FOUND
        again = jobs.Run(
            jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="r1"),
            metadata=auth("tok-a"),
        )
        assert (await again.read()).job_id == first.job_id
        await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=first.job_id), metadata=auth("tok-a"))
        for stream in (call, again):
            events = [first] if stream is call else []
            while (ev := await stream.read()) is not grpc.aio.EOF:
                events.append(ev)
            assert events[-1].state.state == types_pb2.JOB_STATE_CANCELLED


async def test_a_second_broker_on_a_busy_port_fails_saying_address_in_use(
    tmp_path: Path,
) -> None:
    async with running_broker(broker_settings(tmp_path)) as first:
        port = first.address.rsplit(":", 1)[1]
        second = broker_settings(tmp_path / "b", listen=f"127.0.0.1:{port}")
        (tmp_path / "b").mkdir()
        with pytest.raises(
            FailedPrecondition, match=f"cannot listen on 127.0.0.1:{port}: address in use"
        ):
            async with running_broker(second):
                pass
