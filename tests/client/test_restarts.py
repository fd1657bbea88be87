"""A job re-run after its executor vanished: the SDK keeps the attempt that produced the result.

A real broker (short leases) and protocol-level executors driven message by
message: attempt 1 publishes and then goes silent, the lease expires, attempt
2 publishes and finishes. The job's log keeps both attempts' events, each
under its attempt.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import grpc
import pytest
from qiskit.providers import JobStatus

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.broker.server import running_broker
from qrelay.client import AsyncQRelayService
from tests.broker.conftest import FakeExecutor, broker_settings, sampler_spec, wait_state


def interim(value: int) -> types_pb2.Interim:
    return types_pb2.Interim(value_json=json.dumps(value))


async def rerun_job(
    address: str,
    first_values: list[int],
    second_values: list[int],
    while_first_runs: Callable[[str], Awaitable[None]] | None = None,
) -> str:
    """A job whose attempt 1 publishes `first_values` and vanishes; attempt 2 finishes."""
    async with grpc.aio.insecure_channel(address) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        async with FakeExecutor(address, executor_id="e-lost") as lost:
            job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("aer")))
            first = await lost.recv("assignment")
            for value in first_values:
                lost.update(job.id, first.lease_id, interim=interim(value))
            await wait_state(jobs, job.id, types_pb2.JOB_STATE_RUNNING)
            if while_first_runs is not None:
                await while_first_runs(job.id)
            lost.stop_heartbeats()
            await wait_state(jobs, job.id, types_pb2.JOB_STATE_QUEUED, within=15)
        async with FakeExecutor(address, executor_id="e-second") as second:
            again = await second.recv("assignment", within=15)
            assert again.attempt == 2
            for value in second_values:
                second.update(job.id, again.lease_id, interim=interim(value))
            second.update(
                job.id, again.lease_id, result=types_pb2.JobResult(program_json=json.dumps("ok"))
            )
            await wait_state(jobs, job.id, types_pb2.JOB_STATE_DONE)
        return str(job.id)


async def test_interim_results_of_a_rerun_job_are_the_attempt_that_produced_the_result(
    tmp_path: Path,
) -> None:
    async with running_broker(broker_settings(tmp_path)) as broker:
        job_id = await rerun_job(broker.address, [1, 2, 3], [10, 11])
        async with AsyncQRelayService(broker.address) as service:
            job = await service.job(job_id)
            assert [value async for value in job.interim_results()] == [10, 11]
            # The log keeps both attempts, each event under its attempt.
            events = [event async for event in job.stream()]
            published = [(e.data, e.raw.attempt) for e in events if e.kind == "interim" and e.raw]
            assert published == [(1, 1), (2, 1), (3, 1), (10, 2), (11, 2)]
            result = [e for e in events if e.kind == "result"]
            assert [e.raw.attempt for e in result if e.raw] == [2]


async def test_a_live_subscriber_is_warned_when_an_attempt_starts_over(tmp_path: Path) -> None:
    seen: list[int] = []
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        AsyncQRelayService(broker.address) as service,
        anyio.create_task_group() as tg,
    ):

        async def subscribe(job_id: str) -> None:
            job = await service.job(job_id)
            assert await job.status() == JobStatus.RUNNING, "precondition: a live subscriber"
            started.set()
            async for value in job.interim_results():
                seen.append(value)

        async def follow_live(job_id: str) -> None:
            tg.start_soon(subscribe, job_id)
            await started.wait()

        started = anyio.Event()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await rerun_job(broker.address, [1, 2], [10], follow_live)
            with anyio.fail_after(10):
                while len(seen) < 3:  # noqa: ASYNC110 - the subscriber task fills it
                    await anyio.sleep(0.02)
    # Live, the abandoned attempt's values were already delivered; the warning says so.
    assert seen == [1, 2, 10]
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("runs again (attempt 2)" in text for text in said), said


pytestmark = pytest.mark.slow
