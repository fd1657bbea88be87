"""Runtime's delete_job, job.update_tags and jobs(tags=...) on qrelay's SDK, sync and async,
and a Watch past a job's last event that ends instead of reconnecting forever."""

from __future__ import annotations

import pytest
from qiskit.providers import JobStatus

from qrelay._proto.v1 import types_pb2
from qrelay.client import AsyncQRelayService, QRelayService, Sampler
from qrelay.codec import encode_sampler_task
from qrelay.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.client.conftest import bell, one_qubit


def _spec(backend: str) -> types_pb2.JobSpec:
    return types_pb2.JobSpec(backend=backend, sampler=encode_sampler_task([bell()], 20))


def test_delete_job_deletes_a_finished_job_as_runtime_does(service: QRelayService) -> None:
    job = Sampler(mode=service.backend("aer")).run([one_qubit()], shots=5)
    job.result()
    service.delete_job(job.job_id())
    with pytest.raises(NotFound, match=f"job '{job.job_id()}' not found"):
        service.job(job.job_id())
    with pytest.raises(NotFound):
        service.delete_job(job.job_id())
    assert job.job_id() not in [j.job_id() for j in service.jobs(limit=50)]
    with pytest.raises(InvalidArgument):
        service.delete_job("")


def test_update_tags_replaces_the_tags_and_jobs_filters_by_them(service: QRelayService) -> None:
    sampler = Sampler(mode=service.backend("aer"), options={"environment": {"job_tags": ["old"]}})
    job = sampler.run([one_qubit()], shots=5)
    other = Sampler(mode=service.backend("aer")).run([one_qubit()], shots=5)
    assert job.tags == {"old": ""}
    assert job.update_tags(["exp-1", "best"]) == {"exp-1": "", "best": ""}
    assert job.tags == {"exp-1": "", "best": ""}
    assert service.job(job.job_id()).tags == {"exp-1": "", "best": ""}
    assert job.update_tags({"exp": "vqe"}) == {"exp": "vqe"}
    assert [j.job_id() for j in service.jobs(tags=["exp"])] == [job.job_id()]
    assert [j.job_id() for j in service.jobs(job_tags=["exp"])] == [job.job_id()]
    assert service.jobs(tags=["old"]) == []
    assert service.jobs(tags=["exp", "missing"]) == []
    assert other.job_id() in [j.job_id() for j in service.jobs(limit=50)]
    # Checked before sending, with the broker's own rule (a ValueError, as in Qiskit).
    with pytest.raises(ValueError, match="at most 32 allowed"):
        job.update_tags([f"t{i}" for i in range(33)])
    with pytest.raises(InvalidArgument, match="non-printable character '\\\\n'"):
        job.update_tags(["two\nlines"])
    with pytest.raises(InvalidArgument, match="not both"):
        service.jobs(tags=["a"], job_tags=["a"])
    assert job.update_tags() == {}
    assert job.tags == {}
    job.result()
    other.result()


def test_a_stream_after_the_last_event_of_a_finished_job_is_empty(service: QRelayService) -> None:
    job = Sampler(mode=service.backend("aer")).run([one_qubit()], shots=5)
    job.result()
    assert list(job.stream(after_seq=10**12)) == []
    last = list(job.stream())[-1]
    assert list(job.stream(after_seq=last.seq - 1)) == [last]


async def test_async_delete_refuses_an_unfinished_job_then_deletes_it_cancelled(
    aservice: AsyncQRelayService, offline_backend: str
) -> None:
    job = await aservice.submit(_spec(offline_backend))
    assert await job.status() is JobStatus.QUEUED
    with pytest.raises(FailedPrecondition, match="is QUEUED; only a finished"):
        await aservice.delete_job(job.job_id())
    assert await job.status() is JobStatus.QUEUED
    await job.cancel()
    await aservice.delete_job(job.job_id())
    with pytest.raises(NotFound):
        await aservice.job(job.job_id())


async def test_async_update_tags_and_jobs_by_tags(
    aservice: AsyncQRelayService, offline_backend: str
) -> None:
    job = await aservice.submit(_spec(offline_backend))
    assert await job.update_tags(["queued-one"]) == {"queued-one": ""}
    assert job.tags == {"queued-one": ""}
    found = await aservice.jobs(tags=["queued-one"])
    assert [j.job_id() for j in found] == [job.job_id()]
    assert found[0].tags == {"queued-one": ""}
    await job.cancel()
