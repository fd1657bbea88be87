"""qiskit-ibm-runtime's job and service surface on qrelay's SDK.

job.backend(), error_message(), wait_for_final_state(), inputs;
service.least_busy(); saved accounts and QRELAY_BROKER / QRELAY_TOKEN as
defaults; a backend name resolved with the service of an enclosing
`with QRelayService(...)` block.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.primitives.containers.sampler_pub import SamplerPub
from qiskit.providers import JobStatus

from qrelay import codec
from qrelay._proto.v1 import types_pb2
from qrelay.client import AsyncQRelayService, Estimator, QRelayService, Sampler, Session
from qrelay.client.accounts import resolve_account
from qrelay.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from qrelay.testing import LocalStack
from tests.client.conftest import bell, one_qubit


def _exact_on_manila(service: QRelayService) -> Estimator:
    """An Estimator whose jobs the executor refuses (exact values need the ideal simulator)."""
    return Estimator(mode=service.backend("fake_manila"), options={"default_precision": 0})


def _h() -> QuantumCircuit:
    qc = QuantumCircuit(1)
    qc.h(0)
    return qc


def test_job_backend_is_the_backend_it_ran_on_and_usable_as_a_mode(
    service: QRelayService,
) -> None:
    job = Sampler(mode=service.backend("aer")).run([one_qubit()], shots=3)
    backend = job.backend()
    assert backend.name == "aer"
    assert backend.service is service
    again = Sampler(mode=backend).run([one_qubit()], shots=3).result()
    assert again[0].data.meas.get_counts() == {"1": 3}
    assert service.job(job.job_id()).backend().name == "aer"


def test_error_message_says_why_a_job_failed_and_is_none_otherwise(
    service: QRelayService,
) -> None:
    ok = Sampler(mode=service.backend("aer")).run([one_qubit()], shots=3)
    ok.wait_for_final_state(timeout=60)
    assert ok.status() is JobStatus.DONE
    assert ok.error_message() is None

    failed = _exact_on_manila(service).run([(_h(), "X")])
    failed.wait_for_final_state(timeout=60)  # a final state, no exception
    assert failed.status() is JobStatus.ERROR
    message = failed.error_message()
    assert message is not None
    assert "precision 0 asks for exact expectation values" in message
    with pytest.raises(InvalidArgument):  # result() still raises the error
        failed.result()


async def test_wait_for_final_state_times_out_on_a_job_that_cannot_start(
    aservice: AsyncQRelayService, offline_backend: str
) -> None:
    spec = types_pb2.JobSpec(
        backend=offline_backend, sampler=codec.encode_sampler_task([bell()], 10)
    )
    job = await aservice.submit(spec, idempotency_key=uuid.uuid4().hex)
    with pytest.raises(DeadlineExceeded, match=r"did not reach a final state within 0\.3 s"):
        await job.wait_for_final_state(timeout=0.3)
    assert await job.status() is JobStatus.QUEUED
    await job.cancel()
    await job.wait_for_final_state(timeout=30)
    assert await job.status() is JobStatus.CANCELLED


def test_job_inputs_are_what_was_submitted(service: QRelayService) -> None:
    sampler = Sampler(mode=service.backend("aer"), options={"default_shots": 7})
    job = sampler.run([bell(), (one_qubit(), None, 5)], shots=11)
    inputs = job.inputs
    assert inputs["shots"] == 11
    assert inputs["options"] == {"default_shots": 7}
    pubs = inputs["pubs"]
    assert all(isinstance(p, SamplerPub) for p in pubs)
    assert [p.circuit for p in pubs] == [bell(), one_qubit()]
    assert [p.shots for p in pubs] == [11, 5]  # run-level shots fill pubs without their own

    qc = _h()
    est_job = Estimator(mode=service.backend("aer")).run([(qc, ["X", "Z"])], precision=0.1)
    est = est_job.inputs
    assert est["precision"] == 0.1
    assert est["pubs"][0].circuit == qc
    assert est["pubs"][0].observables.shape == (2,)
    np.testing.assert_allclose(est_job.result()[0].data.stds, 0.1)

    with pytest.raises(FailedPrecondition, match="does not return a job's inputs"):
        _ = service.job(job.job_id()).inputs


def test_runtime_job_tags_option_tags_the_job(service: QRelayService) -> None:
    sampler = Sampler(mode=service.backend("aer"))
    sampler.options.environment.job_tags = ["vqe", "run-7"]
    job = sampler.run([one_qubit()], shots=2)
    assert job.tags == {"vqe": "", "run-7": ""}
    job.result()
    assert service.job(job.job_id()).tags == {"vqe": "", "run-7": ""}
    assert [j.job_id() for j in service.jobs(limit=5)] == [job.job_id()]


def test_least_busy_picks_an_online_backend_with_enough_qubits(service: QRelayService) -> None:
    aer = service.backend("aer")
    # Both idle (queue 0): the smaller that fits wins the tie.
    assert service.least_busy().name == "fake_manila"
    assert service.least_busy(min_num_qubits=5).name == "fake_manila"
    assert service.least_busy(min_num_qubits=6).name == "aer"
    assert service.least_busy(min_num_qubits=6).service is service
    with pytest.raises(NotFound, match=f"no online backend with at least {aer.num_qubits + 1}"):
        service.least_busy(min_num_qubits=aer.num_qubits + 1)


async def test_least_busy_async(aservice: AsyncQRelayService) -> None:
    assert (await aservice.least_busy(min_num_qubits=6)).name == "aer"


# ----------------------------------------------------------------- accounts and defaults


def test_saved_accounts_round_trip_and_are_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "acc" / "accounts.json"
    monkeypatch.setenv("QRELAY_ACCOUNTS_FILE", str(path))
    QRelayService.save_account(broker="a.example:1", token="t-a")
    QRelayService.save_account(broker="b.example:2", name="b")
    with pytest.raises(AlreadyExists, match="overwrite=True"):
        QRelayService.save_account(broker="c.example:3", name="b")
    QRelayService.save_account(broker="c.example:3", name="b", overwrite=True, set_as_default=True)
    assert QRelayService.saved_accounts() == {
        "default": {"broker": "a.example:1", "token": "t-a", "is_default": False},
        "b": {"broker": "c.example:3", "token": None, "is_default": True},
    }
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds tokens
    assert QRelayService.delete_account("b")
    assert not QRelayService.delete_account("b")
    assert QRelayService.saved_accounts()["default"]["is_default"]


def test_defaults_are_name_then_environment_then_saved_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QRELAY_ACCOUNTS_FILE", str(tmp_path / "accounts.json"))
    monkeypatch.delenv("QRELAY_BROKER", raising=False)
    monkeypatch.delenv("QRELAY_TOKEN", raising=False)
    with pytest.raises(InvalidArgument, match="save an account"):
        resolve_account()
    QRelayService.save_account(broker="saved.example:1", token="saved-token")
    QRelayService.save_account(broker="other.example:2", token="other-token", name="other")
    assert resolve_account() == ("saved.example:1", "saved-token")
    assert resolve_account(name="other") == ("other.example:2", "other-token")
    assert resolve_account(token="mine") == ("saved.example:1", "mine")
    with pytest.raises(NotFound, match="no saved account named 'nope'"):
        resolve_account(name="nope")
    monkeypatch.setenv("QRELAY_BROKER", "env.example:3")
    monkeypatch.setenv("QRELAY_TOKEN", "env-token")
    assert resolve_account() == ("env.example:3", "env-token")
    assert resolve_account("given.example:4") == ("given.example:4", "env-token")
    assert resolve_account("given.example:4", "given") == ("given.example:4", "given")


def test_a_service_from_the_saved_default_account_reaches_the_broker(
    sync_stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QRELAY_ACCOUNTS_FILE", str(tmp_path / "accounts.json"))
    monkeypatch.delenv("QRELAY_BROKER", raising=False)
    QRelayService.save_account(broker=sync_stack.address)
    with QRelayService() as service:
        assert service.address == sync_stack.address
        assert service.backend("aer").online


def test_names_resolve_with_the_enclosing_service_block(
    sync_stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QRELAY_ACCOUNTS_FILE", str(tmp_path / "accounts.json"))
    monkeypatch.delenv("QRELAY_BROKER", raising=False)
    with QRelayService(sync_stack.address) as outer:
        sampler = Sampler(mode="fake_manila")
        assert sampler.service is outer
        counts = sampler.run([one_qubit()], shots=20).result()[0].data.meas.get_counts()
        assert sum(counts.values()) == 20
        with QRelayService(sync_stack.address) as inner:
            assert Estimator(mode="aer").service is inner
            with Session(backend="aer") as session:
                assert session.service is inner
                assert Sampler(mode=session).run([one_qubit()], shots=2).result()
        assert Sampler(mode="aer").service is outer
    with pytest.raises(InvalidArgument, match="with QRelayService"):
        Sampler(mode="aer")
