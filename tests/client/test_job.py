"""Job handles on the async core: event streams, resume, cancel, failures, listing."""

from __future__ import annotations

import anyio
import pytest
from qiskit import QuantumCircuit
from qiskit.primitives import PrimitiveResult
from qiskit.providers import JobStatus

from qrelay._proto.v1 import types_pb2
from qrelay.client import AsyncQRelayService, AsyncRuntimeJob, JobEvent
from qrelay.client.modes import SubmitTarget
from qrelay.client.primitives import sampler_spec
from qrelay.codec import encode_sampler_task
from qrelay.errors import Cancelled, DeadlineExceeded, InvalidArgument, NotFound
from qrelay.testing import LocalStack
from tests.client.conftest import TcpProxy, bell, one_qubit


def _spec(
    backend: str, circuit: QuantumCircuit | None = None, shots: int = 20
) -> types_pb2.JobSpec:
    task = encode_sampler_task([circuit or bell()], shots)
    return types_pb2.JobSpec(backend=backend, sampler=task)


async def _collect(job: AsyncRuntimeJob, after_seq: int = 0) -> list[JobEvent]:
    return [ev async for ev in job.stream(after_seq)]


async def test_stream_yields_ordered_events_ending_with_result_then_done(
    aservice: AsyncQRelayService,
) -> None:
    job = await aservice.submit(_spec("aer"))
    events = await _collect(job)

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].kind == "state"
    assert events[0].data is JobStatus.QUEUED
    assert events[-1].kind == "state"
    assert events[-1].data is JobStatus.DONE
    assert events[-2].kind == "result"
    assert isinstance(events[-2].data, PrimitiveResult)
    assert set(events[-2].data[0].data.meas.get_counts()) <= {"00", "11"}
    assert JobStatus.RUNNING in [e.data for e in events if e.kind == "state"]
    # A late subscriber resumes exactly after the seq it names.
    assert [e.seq for e in await _collect(job, after_seq=2)] == [e.seq for e in events[2:]]


async def test_result_waits_for_the_job_and_is_cached(aservice: AsyncQRelayService) -> None:
    job = await aservice.submit(_spec("aer", one_qubit(), shots=7))
    result = await job.result(timeout=60)
    assert result[0].data.meas.get_counts() == {"1": 7}
    assert await job.result() is result
    assert await job.status() is JobStatus.DONE
    assert await job.done()
    assert await job.in_final_state()
    assert not await job.running()
    assert await job.logs() == []
    metrics = await job.metrics()
    assert metrics["attempts"] == 1
    assert metrics["num_pubs"] == 1
    assert metrics["usage"]["wall_seconds"] >= 0


async def test_dropped_stream_resumes_without_gaps_or_duplicates(
    stack: LocalStack, proxy: TcpProxy, offline_backend: str, aservice: AsyncQRelayService
) -> None:
    async with AsyncQRelayService(proxy.address, timeout=20.0) as via_proxy:
        job = await via_proxy.submit(_spec(offline_backend))
        seen: list[JobEvent] = []
        async for ev in job.stream():
            seen.append(ev)
            if len(seen) == 1:
                # The job is QUEUED for a backend nobody serves: the stream is idle
                # and open. Cut the connection under it, then make the job move.
                assert ev.data is JobStatus.QUEUED
                assert proxy.drop() >= 2
                await (await aservice.job(job.job_id())).cancel("test")
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].kind == "state"
    assert seen[-1].data is JobStatus.CANCELLED
    assert proxy.accepted >= 2, "the SDK must have reconnected"


async def test_cancel_queued_job_makes_it_cancelled(
    aservice: AsyncQRelayService, offline_backend: str
) -> None:
    job = await aservice.submit(_spec(offline_backend))
    assert await job.status() is JobStatus.QUEUED
    with pytest.raises(DeadlineExceeded, match=r"did not finish within 0\.2 s"):
        await job.result(timeout=0.2)
    await job.cancel()
    assert await job.status() is JobStatus.CANCELLED
    assert await job.cancelled()
    assert await job.in_final_state()
    assert not await job.done()
    with pytest.raises(Cancelled, match=job.job_id()):
        await job.result()
    await job.cancel()  # cancelling a finished job changes nothing
    assert await job.status() is JobStatus.CANCELLED


async def test_failed_job_streams_error_event_and_raises_its_class(
    aservice: AsyncQRelayService,
) -> None:
    too_wide = QuantumCircuit(6)
    too_wide.measure_all()
    job = await aservice.submit(_spec("fake_manila", too_wide))
    with pytest.raises(InvalidArgument):
        await job.result(timeout=60)
    events = await _collect(job)
    errors = [e for e in events if e.kind == "error"]
    assert len(errors) == 1
    assert isinstance(errors[0].data, InvalidArgument)
    assert events[-1].data is JobStatus.ERROR


async def test_jobs_lists_newest_first_with_filters(
    aservice: AsyncQRelayService, offline_backend: str
) -> None:
    done = await aservice.submit(_spec("aer"))
    await done.result(timeout=60)
    waiting = await aservice.submit(_spec(offline_backend))
    on_manila = await aservice.submit(_spec("fake_manila"))
    await on_manila.result(timeout=60)

    everything = [j.job_id() for j in await aservice.jobs(limit=10)]
    assert everything == [on_manila.job_id(), waiting.job_id(), done.job_id()]
    assert [j.job_id() for j in await aservice.jobs(limit=2)] == everything[:2]
    queued = await aservice.jobs(state="queued")
    assert [j.job_id() for j in queued] == [waiting.job_id()]
    finished = await aservice.jobs(state=[JobStatus.DONE, JobStatus.ERROR])
    assert {j.job_id() for j in finished} == {done.job_id(), on_manila.job_id()}
    assert [j.job_id() for j in await aservice.jobs(backend="aer")] == [done.job_id()]
    with pytest.raises(InvalidArgument, match="unknown job state 'finished'"):
        await aservice.jobs(state="finished")
    await waiting.cancel()


async def test_unknown_job_and_backend_are_not_found(aservice: AsyncQRelayService) -> None:
    with pytest.raises(NotFound):
        await aservice.job("j-does-not-exist")
    with pytest.raises(NotFound, match="no_such_device"):
        await aservice.backend("no_such_device")


async def test_submit_with_the_same_idempotency_key_returns_the_same_job(
    aservice: AsyncQRelayService,
) -> None:
    first = await aservice.submit(_spec("aer"), idempotency_key="k-1")
    again = await aservice.submit(_spec("aer"), idempotency_key="k-1")
    assert again.job_id() == first.job_id()
    assert len(await aservice.jobs()) == 1


async def test_submit_whose_response_was_lost_is_retried_without_a_duplicate(
    proxy: TcpProxy, aservice: AsyncQRelayService
) -> None:
    async with AsyncQRelayService(proxy.address, timeout=20.0) as via_proxy:
        await via_proxy.backends()  # connection and HTTP/2 handshake established
        proxy.swallow_responses = True
        async with anyio.create_task_group() as tg:
            submitted: list[AsyncRuntimeJob] = []

            async def submit() -> None:
                submitted.append(await via_proxy.submit(_spec("aer")))

            tg.start_soon(submit)
            # Wait until the broker has stored the job whose answer is being lost.
            with anyio.fail_after(10):
                while not await aservice.jobs():  # noqa: ASYNC110 - broker state
                    await anyio.sleep(0.02)
            proxy.swallow_responses = False
            proxy.drop()  # the client sees UNAVAILABLE and retries with the same key
    listed = await aservice.jobs(limit=10)
    assert [j.job_id() for j in listed] == [submitted[0].job_id()]


async def test_spec_builder_refuses_bad_pubs_without_a_connection() -> None:
    target = SubmitTarget(service=None, backend=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="pub 0: "):
        sampler_spec(target, [(bell(), [1.0])], None, None)  # type: ignore[arg-type]


async def test_submit_and_follow_costs_one_rpc_where_submit_then_result_costs_two(
    proxy: TcpProxy,
) -> None:
    async with AsyncQRelayService(proxy.address, timeout=20.0) as via_proxy:
        before = proxy.rpcs_started
        job = await via_proxy.submit(_spec("aer", one_qubit(), shots=5))
        await job.result()
        two_calls = proxy.rpcs_started - before  # Submit, then Watch
        before = proxy.rpcs_started
        job = await via_proxy.submit_and_follow(_spec("aer", one_qubit(), shots=5))
        assert job.job_id().startswith("j-")  # known before waiting for the result
        assert job.backend_name == "aer"
        result = await job.result()
        one_call = proxy.rpcs_started - before  # the RunStream, opened now
        before = proxy.rpcs_started
        for shots in (6, 7):
            again = await via_proxy.submit_and_follow(_spec("aer", one_qubit(), shots=shots))
            assert (await again.result())[0].data.meas.get_counts() == {"1": shots}
        no_call = proxy.rpcs_started - before  # both on the open RunStream
    assert (two_calls, one_call, no_call) == (2, 1, 0)
    assert result[0].data.meas.get_counts() == {"1": 5}


async def test_submit_and_follow_streams_every_event_and_repeats_idempotently(
    aservice: AsyncQRelayService,
) -> None:
    job = await aservice.submit_and_follow(_spec("aer", one_qubit(), shots=3), idempotency_key="k1")
    events = await _collect(job)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].data is JobStatus.QUEUED
    assert events[-1].data is JobStatus.DONE
    again = await aservice.submit_and_follow(
        _spec("aer", one_qubit(), shots=3), idempotency_key="k1"
    )
    assert again.job_id() == job.job_id()
    assert [e.seq for e in await _collect(again)] == [e.seq for e in events]
    # A second reader of the same job (the Run stream is taken) follows with Watch.
    assert (await job.result())[0].data.meas.get_counts() == {"1": 3}


async def test_submit_and_follow_refuses_bad_input_with_the_submit_status(
    aservice: AsyncQRelayService,
) -> None:
    with pytest.raises(NotFound, match="unknown backend 'nope'; known: aer"):
        await aservice.submit_and_follow(_spec("nope"))
    bad = _spec("aer")
    bad.sampler.shots = -1
    with pytest.raises(InvalidArgument, match="shots"):
        await aservice.submit_and_follow(bad)


async def test_submit_and_follow_falls_back_to_submit_past_the_open_stream_limit(
    proxy: TcpProxy, offline_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qrelay.client.service as service_module

    monkeypatch.setattr(service_module, "MAX_OPEN_RUNS", 1)
    async with AsyncQRelayService(proxy.address, timeout=20.0) as via_proxy:
        before = proxy.rpcs_started
        # Followed on the RunStream this opens, and waiting there.
        waiting = await via_proxy.submit_and_follow(_spec(offline_backend))
        assert proxy.rpcs_started - before == 1
        second = await via_proxy.submit_and_follow(_spec("aer", one_qubit(), shots=4))
        assert proxy.rpcs_started - before == 2  # a Submit: one job is already followed
        assert (await second.result())[0].data.meas.get_counts() == {"1": 4}
        assert proxy.rpcs_started - before == 3  # its Watch
        await waiting.cancel("test")
        with pytest.raises(Cancelled):
            await waiting.result()  # read from the RunStream opened first
        assert proxy.rpcs_started - before == 4  # the Cancel; no Watch for `waiting`
