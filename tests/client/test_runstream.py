"""The SDK's jobs share one JobService.RunStream: counted calls, resume, old brokers."""

from __future__ import annotations

import anyio
import pytest
from qiskit.providers import JobStatus

from qrelay._proto.v1 import types_pb2
from qrelay.broker.service import JobServicer
from qrelay.client import AsyncQRelayService, JobEvent
from qrelay.codec import encode_sampler_task
from qrelay.errors import InvalidArgument
from qrelay.testing import local_stack
from tests.client.conftest import TcpProxy, one_qubit


def _spec(backend: str, shots: int) -> types_pb2.JobSpec:
    return types_pb2.JobSpec(backend=backend, sampler=encode_sampler_task([one_qubit()], shots))


async def test_concurrent_jobs_share_one_call_and_each_gets_its_own_result(
    proxy: TcpProxy,
) -> None:
    async with AsyncQRelayService(proxy.address, timeout=20.0) as via_proxy:
        await via_proxy.backends()  # connection up
        before = proxy.rpcs_started
        counts: dict[int, dict[str, int]] = {}

        async def one(shots: int) -> None:
            job = await via_proxy.submit_and_follow(_spec("aer", shots))
            counts[shots] = (await job.result())[0].data.meas.get_counts()

        async with anyio.create_task_group() as tg:
            for shots in range(1, 21):
                tg.start_soon(one, shots)
        assert proxy.rpcs_started - before == 1  # one RunStream for all twenty
    assert counts == {shots: {"1": shots} for shots in range(1, 21)}


async def test_a_refusal_on_the_stream_raises_its_class_and_the_stream_serves_on(
    aservice: AsyncQRelayService,
) -> None:
    bad = _spec("aer", 3)
    bad.sampler.shots = -1
    with pytest.raises(InvalidArgument, match="shots"):
        await aservice.submit_and_follow(bad)
    job = await aservice.submit_and_follow(_spec("aer", 3))
    assert (await job.result())[0].data.meas.get_counts() == {"1": 3}


async def test_jobs_on_a_dropped_stream_resume_by_watch_and_new_jobs_reopen_it(
    proxy: TcpProxy, offline_backend: str, aservice: AsyncQRelayService
) -> None:
    async with AsyncQRelayService(proxy.address, timeout=20.0) as via_proxy:
        waiting = [await via_proxy.submit_and_follow(_spec(offline_backend, 1)) for _ in range(3)]
        before = proxy.rpcs_started
        assert proxy.drop() >= 2  # the RunStream under all three is cut
        for job in waiting:
            await (await aservice.job(job.job_id())).cancel("test")
        for job in waiting:
            events: list[JobEvent] = [ev async for ev in job.stream()]
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert events[-1].data is JobStatus.CANCELLED
        watches = proxy.rpcs_started - before
        fresh = await via_proxy.submit_and_follow(_spec("aer", 2))
        assert (await fresh.result())[0].data.meas.get_counts() == {"1": 2}
    assert watches == 3  # each job resumed with its own Watch, without gaps or repeats
    assert proxy.rpcs_started - before == 4  # plus one new RunStream


async def test_a_broker_without_runstream_is_served_by_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # An older broker: the generated base class answers UNIMPLEMENTED.
    monkeypatch.delattr(JobServicer, "RunStream")
    async with (
        local_stack(backends=("aer",), executors=1) as env,
        AsyncQRelayService(env.address, timeout=20.0) as svc,
    ):
        jobs = [await svc.submit_and_follow(_spec("aer", shots)) for shots in (4, 5)]
        assert [(await j.result())[0].data.meas.get_counts() for j in jobs] == [
            {"1": 4},
            {"1": 5},
        ]
        assert not svc._runs.supported


async def test_a_refused_token_on_the_stream_is_unauthenticated_every_time() -> None:
    """The broker refuses a bad token before reading the stream, which can end it
    while the first write is still being sent; the SDK reports the stream's status
    (UNAUTHENTICATED), never the failed write's INTERNAL."""
    from qrelay.errors import Unauthenticated

    spec = types_pb2.JobSpec(backend="aer", sampler=encode_sampler_task([one_qubit()], 4))
    async with local_stack(backends=("aer",), broker={"tokens": {"tok-a": "a"}}) as stack:
        for _ in range(12):  # a fresh stream each time: the race has many chances
            async with AsyncQRelayService(stack.address, "wrong") as svc:
                with pytest.raises(Unauthenticated):
                    await _submit_and_wait(svc, spec)


async def _submit_and_wait(svc: AsyncQRelayService, spec: types_pb2.JobSpec) -> None:
    job = await svc.submit_and_follow(spec, idempotency_key="k")
    await job.result()
