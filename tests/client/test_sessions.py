"""Sessions and batches through the SDK, against a broker with two executors.

Two executors serve `aer`, so pinning is observable: every job of a session
must report the same executor, the one the session names.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from qiskit import QuantumCircuit
from qiskit.quantum_info import SparsePauliOp

from qrelay.client import (
    AsyncQRelayService,
    AsyncSession,
    Batch,
    Estimator,
    QRelayService,
    Sampler,
    Session,
)
from qrelay.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from qrelay.testing import LocalStack, local_stack_in_thread
from tests.conftest import FAST_BROKER

SLOW = """
import time

def main(ctx):
    ctx.publish("started")
    while True:
        time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def two_executor_stack() -> Iterator[LocalStack]:
    with local_stack_in_thread(backends=("aer",), executors=2, slots=2, broker=FAST_BROKER) as (
        env,
        _portal,
    ):
        yield env


@pytest.fixture
def svc(two_executor_stack: LocalStack) -> Iterator[QRelayService]:
    with QRelayService(two_executor_stack.address, timeout=20.0) as service:
        yield service


def ry_pub(theta: float) -> tuple[QuantumCircuit, SparsePauliOp, list[float]]:
    from qiskit.circuit import Parameter

    p = Parameter("t")
    qc = QuantumCircuit(1)
    qc.ry(p, 0)
    return qc, SparsePauliOp("Z"), [theta]


def test_estimator_jobs_in_a_session_all_run_on_one_executor(svc: QRelayService) -> None:
    with Session(svc.backend("aer"), max_time=300) as session:
        estimator = Estimator(mode=session, options={"seed_simulator": 3})
        jobs = [estimator.run([ry_pub(0.3 * i)]) for i in range(6)]  # all queued at once
        for job in jobs:
            job.result(timeout=60)
        details = session.details()
    executors = {job.metrics()["executor_id"] for job in jobs}
    assert len(executors) == 1
    assert executors == {details["executor_id"]}
    assert {job.session_id for job in jobs} == {session.session_id}
    assert details["state"] == "active"
    assert details["jobs"]["done"] == 6
    assert details["jobs"]["total"] == 6


def test_session_used_after_close_is_failed_precondition(svc: QRelayService) -> None:
    session = Session("aer", service=svc)
    sampler = Sampler(mode=session)
    qc = QuantumCircuit(1)
    qc.measure_all()
    first = sampler.run([qc], shots=10)
    session.close()
    assert first.result(timeout=60)[0].data.meas.num_shots == 10  # submitted jobs finish
    with pytest.raises(FailedPrecondition, match=f"session {session.session_id} is closed"):
        sampler.run([qc], shots=10)
    assert session.status() == "closed"
    assert session.details()["accepting_jobs"] is False


def test_details_report_state_times_and_counts(svc: QRelayService) -> None:
    with Session(svc.backend("aer"), max_time="10m", max_idle=120) as session:
        opened = session.details()
        assert opened["state"] == "open"
        assert opened["accepting_jobs"] is True
        assert opened["max_time"] == 600
        assert opened["interactive_timeout"] == 120
        assert opened["created_at"] is not None
        assert opened["activated_at"] is None
        estimator = Estimator(mode=session)
        for i in range(3):
            estimator.run([ry_pub(0.1 * i)]).result(timeout=60)
        active = session.details()
    closed = session.details()
    assert active["state"] == "active"
    assert active["activated_at"] is not None
    assert active["last_job_at"] is not None
    assert active["jobs"] == {
        "total": 3,
        "queued": 0,
        "running": 0,
        "done": 3,
        "failed": 0,
        "cancelled": 0,
    }
    assert closed["state"] == "closed"
    assert closed["closed_at"] is not None
    assert closed["mode"] == "dedicated"


def test_cancel_cancels_every_unfinished_job(svc: QRelayService, tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text(textwrap.dedent(SLOW))
    program = svc.upload_program(tmp_path, name="slow-session")
    session = Session("aer", service=svc)
    jobs = [svc.run(program, mode=session) for _ in range(3)]
    assert next(iter(jobs[0].interim_results())) == "started"
    session.cancel()
    for job in jobs:
        with pytest.raises(Cancelled):
            job.result(timeout=30)
    details = session.details()
    assert details["state"] == "cancelled"
    assert details["jobs"]["cancelled"] == 3
    with pytest.raises(FailedPrecondition, match="session"):
        svc.run(program, mode=session)


def test_batch_groups_jobs_without_pinning(svc: QRelayService) -> None:
    with Batch("aer", service=svc) as batch:
        estimator = Estimator(mode=batch)
        jobs = [estimator.run([ry_pub(0.2 * i)]) for i in range(4)]
        for job in jobs:
            job.result(timeout=60)
        details = batch.details()
    assert details["mode"] == "batch"
    assert details["jobs"]["done"] == 4
    assert {j.session_id for j in svc.jobs(10, session_id=batch.session_id)} == {batch.session_id}
    assert isinstance(Session.from_id(batch.session_id, svc), Batch)


def test_program_runs_in_a_session_and_backend_must_match(
    svc: QRelayService, tmp_path: Path
) -> None:
    (tmp_path / "main.py").write_text("def main(ctx, x=1):\n    return x * 2\n")
    program = svc.upload_program(tmp_path, name="double")
    with Session("aer", service=svc) as session:
        job = svc.run(program, {"x": 21}, mode=session)
        assert job.session_id == session.session_id
        assert job.result(timeout=60) == 42
        with pytest.raises(InvalidArgument, match="differs from the backend 'aer'"):
            svc.run(program, backend="fake_manila", mode=session)
        again = Session.from_id(session.session_id, svc)
        assert type(again) is Session
        assert again.backend() == "aer"
        assert again.details()["jobs"]["done"] == 1


def test_bad_session_arguments_are_clear(svc: QRelayService) -> None:
    with pytest.raises(InvalidArgument, match="max_time must be seconds or a string like"):
        Session("aer", max_time="soon", service=svc)
    with pytest.raises(InvalidArgument, match="max_time must be > 0 seconds"):
        Session("aer", max_time=0, service=svc)
    with pytest.raises(InvalidArgument, match="backend must be a backend name"):
        Session("", service=svc)
    with pytest.raises(NotFound, match="no_such_backend"):
        Session("no_such_backend", service=svc)
    with pytest.raises(NotFound):
        Session.from_id("s-does-not-exist", svc)
    with pytest.raises(InvalidArgument, match="mode must be a Session or Batch"):
        svc.run("anything", mode="aer")  # type: ignore[arg-type]


async def test_async_session_runs_programs(two_executor_stack: LocalStack, tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("def main(ctx):\n    return ctx.backend.name\n")
    async with AsyncQRelayService(two_executor_stack.address, timeout=20.0) as service:
        program = await service.upload_program(tmp_path, name="which-backend")
        async with AsyncSession(service, "aer", max_time=60) as session:
            job = await service.run(program, mode=session)
            assert await job.result(timeout=60) == "aer"
            assert (await session.details())["jobs"]["done"] == 1
        assert await session.status() == "closed"
        handle = await service.session(session.session_id)
        assert handle.session_id == session.session_id
