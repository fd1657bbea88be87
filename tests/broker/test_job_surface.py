"""JobService.Delete, UpdateTags and ListJobs by tags, through real brokers on both stores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.broker.server import Broker, running_broker
from tests.broker.conftest import (
    FakeExecutor,
    announce,
    auth,
    broker_settings,
    postgres_schema,
    sampler_spec,
    wait_state,
)

Code = grpc.StatusCode
A, B = auth("tok-a"), auth("tok-b")


@pytest.fixture(params=["sqlite", "postgres"])
async def two_tenants(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Broker]:
    """A broker with tenants alice (tok-a) and bob (tok-b), on each store."""
    async with contextlib.AsyncExitStack() as stack:
        overrides: dict[str, Any] = {}
        if request.param == "postgres":
            dsn, schema = await stack.enter_async_context(postgres_schema())
            overrides = {"database_url": dsn, "database_schema": schema}
        settings = broker_settings(tmp_path, tokens={"tok-a": "alice", "tok-b": "bob"}, **overrides)
        broker = await stack.enter_async_context(running_broker(settings))
        await announce(broker.address)
        yield broker


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def _wait_done(jobs: jobs_pb2_grpc.JobServiceStub, job_id: str) -> None:
    for _ in range(500):
        job = await jobs.Get(jobs_pb2.GetJobRequest(job_id=job_id), metadata=A)
        if job.state == types_pb2.JOB_STATE_DONE:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


async def test_delete_removes_a_finished_job_for_its_tenant_only(two_tenants: Broker) -> None:
    async with grpc.aio.insecure_channel(two_tenants.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job = await jobs.Submit(
            jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="key-1"), metadata=A
        )
        # Queued: refused, naming the state.
        err = await _error(jobs.Delete(jobs_pb2.DeleteJobRequest(job_id=job.id), metadata=A))
        assert err.code() == Code.FAILED_PRECONDITION
        assert f"job {job.id} is QUEUED; only a finished" in (err.details() or "")
        async with FakeExecutor(two_tenants.address) as executor:
            assignment = await executor.recv("assignment")
            await _wait_running(jobs, job.id)
            err = await _error(jobs.Delete(jobs_pb2.DeleteJobRequest(job_id=job.id), metadata=A))
            assert err.code() == Code.FAILED_PRECONDITION
            assert "is RUNNING" in (err.details() or "")
            executor.finish(assignment)
            await _wait_done(jobs, job.id)
        # Another tenant: exactly what a missing job answers, and nothing is deleted.
        theirs = await _error(jobs.Delete(jobs_pb2.DeleteJobRequest(job_id=job.id), metadata=B))
        missing = await _error(
            jobs.Delete(jobs_pb2.DeleteJobRequest(job_id="j-missing"), metadata=B)
        )
        assert theirs.code() == missing.code() == Code.NOT_FOUND
        assert theirs.details() == f"job {job.id!r} not found"
        assert missing.details() == "job 'j-missing' not found"
        reply = await jobs.Delete(jobs_pb2.DeleteJobRequest(job_id=job.id), metadata=A)
        assert reply.job.id == job.id
        assert reply.job.state == types_pb2.JOB_STATE_DONE
        for call in (
            jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=A),
            jobs.GetResult(jobs_pb2.GetResultRequest(job_id=job.id), metadata=A),
            jobs.Delete(jobs_pb2.DeleteJobRequest(job_id=job.id), metadata=A),
        ):
            assert (await _error(call)).code() == Code.NOT_FOUND
        watch = jobs.Watch(jobs_pb2.WatchRequest(job_id=job.id), metadata=A)
        assert (await _error(watch.read())).code() == Code.NOT_FOUND
        listed = await jobs.List(jobs_pb2.ListJobsRequest(), metadata=A)
        assert job.id not in [j.id for j in listed.jobs]
        # The key still names the deleted job: a late retry is refused, not run again.
        err = await _error(
            jobs.Submit(
                jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="key-1"), metadata=A
            )
        )
        assert err.code() == Code.FAILED_PRECONDITION
        assert f"belonged to job {job.id}, which was deleted" in (err.details() or "")
        err = await _error(jobs.Delete(jobs_pb2.DeleteJobRequest(), metadata=A))
        assert err.code() == Code.INVALID_ARGUMENT


async def _wait_running(jobs: jobs_pb2_grpc.JobServiceStub, job_id: str) -> None:
    for _ in range(500):
        job = await jobs.Get(jobs_pb2.GetJobRequest(job_id=job_id), metadata=A)
        if job.state == types_pb2.JOB_STATE_RUNNING:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not start")


async def test_update_tags_replaces_tags_and_list_filters_by_tag_keys(two_tenants: Broker) -> None:
    async with grpc.aio.insecure_channel(two_tenants.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        first = await jobs.Submit(
            jobs_pb2.SubmitRequest(spec=sampler_spec(tags={"exp": "vqe"})), metadata=A
        )
        second = await jobs.Submit(
            jobs_pb2.SubmitRequest(spec=sampler_spec(tags={"exp": "qaoa", "run": ""})),
            metadata=A,
        )
        await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec(tags={"exp": ""})), metadata=B)

        async def listed(*tags: str, meta: Any = A) -> list[str]:
            reply = await jobs.List(jobs_pb2.ListJobsRequest(tags=list(tags)), metadata=meta)
            return [j.id for j in reply.jobs]

        assert await listed("exp") == [second.id, first.id]
        assert await listed("exp", "run") == [second.id]
        assert await listed("nope") == []
        updated = await jobs.UpdateTags(
            jobs_pb2.UpdateTagsRequest(job_id=first.id, tags={"run": "", "best": "yes"}),
            metadata=A,
        )
        assert dict(updated.tags) == {"run": "", "best": "yes"}
        assert updated.id == first.id  # in whatever state it is now: tags change in any
        got = await jobs.Get(jobs_pb2.GetJobRequest(job_id=first.id), metadata=A)
        assert dict(got.tags) == {"run": "", "best": "yes"}
        assert await listed("exp") == [second.id]
        assert await listed("run") == [second.id, first.id]
        assert len(await listed("exp", meta=B)) == 1  # bob's own job only
        # Another tenant's job: NOT_FOUND, tags untouched.
        err = await _error(
            jobs.UpdateTags(jobs_pb2.UpdateTagsRequest(job_id=first.id, tags={}), metadata=B)
        )
        assert err.code() == Code.NOT_FOUND
        assert err.details() == f"job {first.id!r} not found"
        got = await jobs.Get(jobs_pb2.GetJobRequest(job_id=first.id), metadata=A)
        assert dict(got.tags) == {"run": "", "best": "yes"}
        err = await _error(jobs.UpdateTags(jobs_pb2.UpdateTagsRequest(tags={}), metadata=A))
        assert err.code() == Code.INVALID_ARGUMENT
        assert err.details() == "job_id is required"


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({f"t{i}": "" for i in range(33)}, "tags has 33 entries; at most 32 allowed"),
        ({"": "x"}, "tags has an empty key"),
        ({"k" * 129: ""}, "is 129 characters; at most 128 allowed"),
        ({"k": "v" * 257}, "is 257 characters; at most 256 allowed"),
        ({"line\nbreak": ""}, "contains the non-printable character '\\n'"),
        ({"k": "tab\there"}, "contains the non-printable character '\\t'"),
        ({"k": "nul\x00"}, "contains a NUL character"),
    ],
    ids=["too many", "empty key", "long key", "long value", "newline", "tab", "nul"],
)
async def test_bad_tags_are_invalid_argument_at_update_and_at_submit(
    two_tenants: Broker, tags: dict[str, str], message: str
) -> None:
    async with grpc.aio.insecure_channel(two_tenants.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=A)
        err = await _error(
            jobs.UpdateTags(jobs_pb2.UpdateTagsRequest(job_id=job.id, tags=tags), metadata=A)
        )
        assert err.code() == Code.INVALID_ARGUMENT
        assert message in (err.details() or "")
        err = await _error(
            jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec(tags=tags)), metadata=A)
        )
        assert err.code() == Code.INVALID_ARGUMENT
        assert message in (err.details() or "")


async def test_list_refuses_a_tag_filter_that_cannot_be_a_tag_key(two_tenants: Broker) -> None:
    async with grpc.aio.insecure_channel(two_tenants.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        for tags, message in (
            ([""], "'' is not a tag key"),
            (["k" * 129], "is not a tag key (1 to 128 characters)"),
            ([f"t{i}" for i in range(33)], "tags has 33 keys; at most 32 allowed"),
        ):
            err = await _error(jobs.List(jobs_pb2.ListJobsRequest(tags=tags), metadata=A))
            assert err.code() == Code.INVALID_ARGUMENT
            assert message in (err.details() or "")


async def test_a_finished_jobs_tags_can_still_be_updated(broker: Broker) -> None:
    async with grpc.aio.insecure_channel(broker.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
        await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id))
        await wait_state(jobs, job.id, types_pb2.JOB_STATE_CANCELLED)
        updated = await jobs.UpdateTags(
            jobs_pb2.UpdateTagsRequest(job_id=job.id, tags={"reviewed": ""})
        )
        assert dict(updated.tags) == {"reviewed": ""}
        assert updated.state == types_pb2.JOB_STATE_CANCELLED


async def test_another_tenants_delete_or_update_tags_is_audited_a_missing_job_is_not(
    two_tenants: Broker,
) -> None:
    async with grpc.aio.insecure_channel(two_tenants.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=A)
        with structlog.testing.capture_logs() as logs:
            await _error(jobs.Delete(jobs_pb2.DeleteJobRequest(job_id=job.id), metadata=B))
            await _error(
                jobs.UpdateTags(jobs_pb2.UpdateTagsRequest(job_id=job.id, tags={}), metadata=B)
            )
            await _error(jobs.Delete(jobs_pb2.DeleteJobRequest(job_id="j-missing"), metadata=B))
    audited = [entry for entry in logs if entry.get("audit")]
    assert [(e["event"], e["rpc"], e["tenant"], e["job_id"]) for e in audited] == [
        ("audit.cross_tenant_denied", "JobService.Delete", "bob", job.id),
        ("audit.cross_tenant_denied", "JobService.UpdateTags", "bob", job.id),
    ]
