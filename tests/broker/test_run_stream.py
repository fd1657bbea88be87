"""JobService.RunStream: many Runs on one stream, events batched, per-tag errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.broker.server import Broker, running_broker
from tests.broker.conftest import (
    FakeExecutor,
    announce,
    auth,
    broker_settings,
    result_for,
    sampler_spec,
    until,
    watch_all,
)

Code = grpc.StatusCode
TERMINAL = (types_pb2.JOB_STATE_DONE, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    settings = broker_settings(
        tmp_path, tokens={"tok-a": "alice", "tok-b": "bob"}, max_queued_per_tenant=50
    )
    async with running_broker(settings) as b:
        await announce(b.address)
        yield b


def request(tag: str, spec: types_pb2.JobSpec, key: str = "") -> jobs_pb2.RunStreamRequest:
    return jobs_pb2.RunStreamRequest(
        tag=tag, submit=jobs_pb2.SubmitRequest(spec=spec, idempotency_key=key)
    )


class Collected:
    """Everything a RunStream answered, by tag, plus how many replies carried it."""

    def __init__(self) -> None:
        self.by_tag: dict[str, list[jobs_pb2.RunStreamItem]] = defaultdict(list)
        self.replies = 0

    def add(self, reply: jobs_pb2.RunStreamReply) -> None:
        self.replies += 1
        for item in reply.items:
            self.by_tag[item.tag].append(item)

    def ended(self, tag: str) -> bool:
        items = self.by_tag.get(tag, [])
        if not items:
            return False
        last = items[-1]
        return last.HasField("error") or last.event.state.state in TERMINAL


async def drain(call: grpc.aio.StreamStreamCall, into: Collected) -> None:
    while (reply := await call.read()) is not grpc.aio.EOF:
        into.add(reply)


async def test_many_jobs_on_one_stream_each_followed_to_its_end_in_seq_order(
    broker: Broker,
) -> None:
    async with (
        grpc.aio.insecure_channel(broker.address) as ch,
        FakeExecutor(broker.address, slots=8) as ex,
    ):
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        call = jobs.RunStream(metadata=auth("tok-a"))
        got = Collected()
        reader = asyncio.create_task(drain(call, got))
        tags = [f"t{i}" for i in range(20)]
        for tag in tags:
            await call.write(request(tag, sampler_spec()))
        for _ in tags:
            ex.finish(await ex.recv("assignment"))
        await call.done_writing()
        await asyncio.wait_for(reader, 10)  # the stream ends by itself once every job did
        assert set(got.by_tag) == set(tags)
        job_ids = set()
        for tag in tags:
            events = [i.event for i in got.by_tag[tag]]
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert events[0].state.state == types_pb2.JOB_STATE_QUEUED
            assert any(e.HasField("result") for e in events)
            assert events[-1].state.state == types_pb2.JOB_STATE_DONE
            assert len({e.job_id for e in events}) == 1
            job_ids.add(events[0].job_id)
            # The same events any Watch sees, as Run would stream them.
            watched = await watch_all(jobs, events[0].job_id, metadata=auth("tok-a"))
            assert [w.SerializeToString() for w in watched] == [
                e.SerializeToString() for e in events
            ]
        assert len(job_ids) == len(tags)
        items = sum(len(v) for v in got.by_tag.values())
        # Counts, not times: events that were ready together share a reply.
        assert got.replies < items


async def test_a_refused_submission_answers_under_its_tag_and_the_stream_goes_on(
    broker: Broker,
) -> None:
    async with (
        grpc.aio.insecure_channel(broker.address) as ch,
        FakeExecutor(broker.address) as ex,
    ):
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        call = jobs.RunStream(metadata=auth("tok-a"))
        got = Collected()
        reader = asyncio.create_task(drain(call, got))
        bad = sampler_spec()
        bad.sampler.pubs.add(circuit=types_pb2.Circuit(qasm3="x"), shots=0)
        await call.write(request("bad-shots", bad))
        await call.write(request("nowhere", sampler_spec("ibm_nowhere")))
        await call.write(request("good", sampler_spec()))
        ex.finish(await ex.recv("assignment"))
        await call.done_writing()
        await asyncio.wait_for(reader, 10)

        def only_error(tag: str) -> tuple[int, str]:
            (item,) = got.by_tag[tag]  # the tag's one and last item
            return item.error.code, item.error.message

        assert only_error("bad-shots") == (
            Code.INVALID_ARGUMENT.value[0],
            "pub 1: shots must be > 0, got 0",
        )
        assert only_error("nowhere") == (
            Code.NOT_FOUND.value[0],
            "unknown backend 'ibm_nowhere'; known: aer, fake_manila",
        )
        good = [i.event for i in got.by_tag["good"]]
        assert good[-1].state.state == types_pb2.JOB_STATE_DONE
        # Nothing was stored for the refused ones: the tenant has exactly one job.
        listed = await jobs.List(jobs_pb2.ListJobsRequest(), metadata=auth("tok-a"))
        assert [j.id for j in listed.jobs] == [good[0].job_id]


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("", "RunStream request needs a tag to name its job in the replies"),
        ("x" * 129, "tag is 129 characters; at most 128 allowed"),
        ("first", "tag 'first' already names a job this stream is following"),
    ],
)
async def test_a_malformed_tag_ends_the_stream_and_its_jobs_go_on(
    broker: Broker, tag: str, message: str
) -> None:
    async with (
        grpc.aio.insecure_channel(broker.address) as ch,
        FakeExecutor(broker.address) as ex,
    ):
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        call = jobs.RunStream(metadata=auth("tok-a"))
        await call.write(request("first", sampler_spec()))
        first = (await call.read()).items[0].event
        await call.write(request(tag, sampler_spec()))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await drain(call, Collected())
        assert (err.value.code(), err.value.details()) == (Code.INVALID_ARGUMENT, message)
        # The job the stream carried goes on; Watch follows it to its end.
        ex.finish(await ex.recv("assignment"))
        events = await watch_all(jobs, first.job_id, metadata=auth("tok-a"))
        assert events[-1].state.state == types_pb2.JOB_STATE_DONE
        listed = await jobs.List(jobs_pb2.ListJobsRequest(), metadata=auth("tok-a"))
        assert [j.id for j in listed.jobs] == [first.job_id]


async def test_tenant_limits_and_idempotency_hold_per_submission(broker: Broker) -> None:
    async with grpc.aio.insecure_channel(broker.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        call = jobs.RunStream(metadata=auth("tok-b"))
        got = Collected()
        reader = asyncio.create_task(drain(call, got))
        await call.write(request("a", sampler_spec(), key="k1"))
        await call.write(request("b", sampler_spec(), key="k1"))  # same key: the same job
        await until(lambda: bool(got.by_tag.get("a")) and bool(got.by_tag.get("b")))
        first_a, first_b = got.by_tag["a"][0].event, got.by_tag["b"][0].event
        assert first_a.job_id == first_b.job_id
        # Another tenant does not see bob's job; bob cancels it and both tags end.
        others = await jobs.List(jobs_pb2.ListJobsRequest(), metadata=auth("tok-a"))
        assert list(others.jobs) == []
        await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=first_a.job_id), metadata=auth("tok-b"))
        await call.done_writing()
        await asyncio.wait_for(reader, 10)
        for tag in ("a", "b"):
            assert got.by_tag[tag][-1].event.state.state == types_pb2.JOB_STATE_CANCELLED


async def test_queue_limit_refuses_the_overflowing_submission_only(tmp_path: Path) -> None:
    settings = broker_settings(tmp_path, max_queued_per_tenant=2)
    async with running_broker(settings) as b, grpc.aio.insecure_channel(b.address) as ch:
        await announce(b.address)
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        call = jobs.RunStream()
        got = Collected()
        reader = asyncio.create_task(drain(call, got))
        tags = ("q1", "q2", "q3")
        for tag in tags:
            await call.write(request(tag, sampler_spec()))
        # Submissions on one stream run concurrently: whichever reaches the store
        # third is the one refused, and only that one.
        await until(lambda: any(got.ended(tag) for tag in tags))
        (refused,) = [tag for tag in tags if got.ended(tag)]
        item = got.by_tag[refused][-1]
        assert item.error.code == Code.RESOURCE_EXHAUSTED.value[0]
        assert "QRELAY_MAX_QUEUED_PER_TENANT" in item.error.message
        await asyncio.sleep(0.2)  # nothing else ends: the other two stay queued
        assert [tag for tag in tags if got.ended(tag)] == [refused]
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader


async def test_unknown_token_fails_the_whole_stream(broker: Broker) -> None:
    async with grpc.aio.insecure_channel(broker.address) as ch:
        call = jobs_pb2_grpc.JobServiceStub(ch).RunStream(metadata=auth("tok-zzz"))
        # The broker refuses from the metadata alone, so the stream may be over
        # before this first write is sent (the write then fails, INTERNAL).
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(request("t", sampler_spec()))
        assert await call.code() == Code.UNAUTHENTICATED


async def test_a_stream_follows_at_most_max_stream_jobs_and_reads_on_as_jobs_end(
    tmp_path: Path,
) -> None:
    settings = broker_settings(tmp_path, max_stream_jobs=2)
    async with (
        running_broker(settings) as b,
        grpc.aio.insecure_channel(b.address) as ch,
    ):
        await announce(b.address)
        async with FakeExecutor(b.address, slots=4) as ex:
            jobs = jobs_pb2_grpc.JobServiceStub(ch)
            call = jobs.RunStream()
            got = Collected()
            reader = asyncio.create_task(drain(call, got))
            for tag in ("m1", "m2", "m3"):
                await call.write(request(tag, sampler_spec()))
            await until(lambda: "m1" in got.by_tag and "m2" in got.by_tag)
            await asyncio.sleep(0.3)
            assert "m3" not in got.by_tag  # not read, so not submitted
            listed = await jobs.List(jobs_pb2.ListJobsRequest())
            assert len(listed.jobs) == 2
            first = await ex.recv("assignment")
            ex.finish(first)
            await until(lambda: "m3" in got.by_tag)  # a slot freed: the third is read
            ex.finish(await ex.recv("assignment"))
            ex.finish(await ex.recv("assignment"))
            await call.done_writing()
            await asyncio.wait_for(reader, 10)
            assert all(got.ended(t) for t in ("m1", "m2", "m3"))


async def test_client_going_away_leaves_its_jobs_running_and_watchable(broker: Broker) -> None:
    async with (
        grpc.aio.insecure_channel(broker.address) as ch,
        FakeExecutor(broker.address) as ex,
    ):
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        call = jobs.RunStream(metadata=auth("tok-a"))
        await call.write(request("gone", sampler_spec()))
        first = (await call.read()).items[0].event
        call.cancel()
        assignment = await ex.recv("assignment")
        ex.update(assignment.job_id, assignment.lease_id, result=result_for(assignment.job_id))
        events = await watch_all(jobs, first.job_id, metadata=auth("tok-a"))
        assert events[-1].state.state == types_pb2.JOB_STATE_DONE
