"""The blocking service: backends, jobs, tokens, and clean shutdown of its loop thread."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from qiskit.providers import JobStatus
from qiskit.transpiler import generate_preset_pass_manager

from qrelay.client import QRelayBackend, QRelayService, Sampler
from qrelay.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from qrelay.executor.agent import running_executor
from qrelay.executor.settings import ExecutorSettings
from qrelay.testing import LocalStack, local_stack_in_thread
from tests.client.conftest import OFFLINE_BACKEND, TcpProxy, bell, one_qubit


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("qrelay-client")]


def test_backends_describe_what_executors_announced(service: QRelayService) -> None:
    backends = {b.name: b for b in service.backends()}
    assert {"aer", "fake_manila"} <= set(backends)
    manila = backends["fake_manila"]
    assert isinstance(manila, QRelayBackend)
    assert manila.num_qubits == 5
    assert manila.online
    assert {"cx", "rz", "sx", "x"} <= set(manila.basis_gates)
    assert manila.coupling_map is not None
    assert [0, 1] in manila.coupling_map
    status = manila.status()
    assert status.operational
    assert status.online_executors == 1
    assert status.pending_jobs == 0
    assert service.backend("aer").coupling_map is None  # all-to-all


def test_backend_target_transpiles_for_the_device(service: QRelayService) -> None:
    manila = service.backend("fake_manila")
    isa = generate_preset_pass_manager(optimization_level=1, target=manila.target).run(bell())
    assert set(isa.count_ops()) <= set(manila.basis_gates) | {"measure", "barrier"}


def test_unknown_backend_is_not_found_with_its_name(service: QRelayService) -> None:
    with pytest.raises(NotFound, match="no_such_device"):
        service.backend("no_such_device")
    with pytest.raises(NotFound):
        service.job("j-unknown")


def test_job_handle_from_id_and_from_listing(service: QRelayService) -> None:
    job = Sampler(mode=service.backend("aer")).run([one_qubit()], shots=4)
    job.result()
    again = service.job(job.job_id())
    assert again.status() is JobStatus.DONE
    assert again.result()[0].data.meas.get_counts() == {"1": 4}
    usage = again.usage()
    assert usage is not None
    assert usage >= 0
    assert again.logs() == []
    listed = service.jobs(limit=5, backend="aer", state=JobStatus.DONE)
    assert [j.job_id() for j in listed] == [job.job_id()]
    events = list(again.stream())
    assert [e.kind for e in events][-2:] == ["result", "state"]


def test_usage_of_the_service_and_of_a_job_like_runtimes(service: QRelayService) -> None:
    before = service.usage()["usage_consumed_seconds"]
    job = Sampler(mode=service.backend("aer")).run([one_qubit()], shots=4)
    job.result()
    seconds = job.usage()
    assert seconds is not None
    assert seconds > 0
    assert job.metrics()["usage"]["seconds"] == seconds
    report = service.usage()
    # Other tests of this stack may finish jobs meanwhile: at least this one's.
    assert report["usage_consumed_seconds"] >= before + seconds - 1e-9
    assert report["usage_limit_seconds"] is None
    assert report["usage_limit_reached"] is False
    assert report["period"]["start"] < report["period"]["end"]
    assert set(report["quotas"]) == {
        "max_queued_jobs",
        "max_running_jobs",
        "max_sessions",
        "max_program_bytes",
        "max_executor_seconds",
    }


def test_stream_can_be_abandoned_midway(service: QRelayService) -> None:
    job = Sampler(mode=service.backend("aer")).run([one_qubit()], shots=4)
    for ev in job.stream():
        assert ev.seq == 1
        break
    assert job.result()[0].data.meas.num_shots == 4


@pytest.fixture
def token_stack() -> Iterator[LocalStack]:
    tokens = {"tok-a": "tenant-a", "tok-b": "tenant-b"}
    with local_stack_in_thread(backends=("aer",), broker={"tokens": tokens}) as (env, _portal):
        yield env


def test_token_travels_as_bearer_and_scopes_jobs_to_its_tenant(token_stack: LocalStack) -> None:
    with QRelayService(token_stack.address, token="tok-a") as alice:
        job = Sampler(mode=alice.backend("aer")).run([one_qubit()], shots=2)
        assert job.result()[0].data.meas.num_shots == 2
    with QRelayService(token_stack.address, token="tok-b") as bob:
        with pytest.raises(NotFound):
            bob.job(job.job_id())
        assert bob.jobs() == []
    with (
        QRelayService(token_stack.address, token="wrong") as mallory,
        pytest.raises(Unauthenticated),
    ):
        mallory.backends()


def test_unreachable_broker_is_unavailable_after_bounded_retries() -> None:
    with (
        QRelayService("127.0.0.1:1", timeout=1.0) as svc,
        pytest.raises(Unavailable, match=r"127\.0\.0\.1:1"),
    ):
        svc.backends()


def test_close_is_idempotent_and_leaves_no_thread() -> None:
    before = len(_client_threads())
    svc = QRelayService("127.0.0.1:1")
    assert len(_client_threads()) == before + 1
    svc.close()
    svc.close()
    assert svc.closed
    assert len(_client_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        svc.backends()

    forgotten = QRelayService("127.0.0.1:1")
    assert len(_client_threads()) == before + 1
    del forgotten
    gc.collect()
    assert len(_client_threads()) == before


def test_bad_arguments_raise_invalid_argument_before_any_call(service: QRelayService) -> None:
    with pytest.raises(InvalidArgument, match="address must be 'host:port', got 'localhost'"):
        QRelayService("localhost")
    with pytest.raises(InvalidArgument, match="timeout must be > 0 seconds, got 0"):
        QRelayService("127.0.0.1:1", timeout=0)
    with pytest.raises(InvalidArgument, match="backend name must not be empty"):
        service.backend("")
    with pytest.raises(InvalidArgument, match="job_id must not be empty"):
        service.job("")
    with pytest.raises(InvalidArgument, match="limit must be >= 0, got -1"):
        service.jobs(limit=-1)
    with pytest.raises(InvalidArgument, match=r"JobStatus\.VALIDATING is not a qrelay job state"):
        service.jobs(state=JobStatus.VALIDATING)
    with pytest.raises(InvalidArgument, match="mode must be a QRelayBackend or a backend name"):
        Sampler(mode=42)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="options must be a SamplerOptions or a dict"):
        Sampler(mode=service.backend("aer"), options=[1])  # type: ignore[arg-type]
    assert InvalidArgument.code == 3


def test_blocking_stream_resumes_after_the_connection_drops() -> None:
    with local_stack_in_thread(backends=("aer",)) as (env, portal):
        settings = ExecutorSettings(broker=env.address, backends=[OFFLINE_BACKEND], slots=1)
        with portal.wrap_async_context_manager(running_executor(settings)):
            pass  # announced once, now offline: its jobs stay QUEUED
        proxy = TcpProxy(env.address)
        portal.call(proxy.start)
        try:
            with (
                QRelayService(proxy.address) as via_proxy,
                QRelayService(env.address) as direct,
            ):
                job = Sampler(mode=via_proxy.backend(OFFLINE_BACKEND)).run([bell()])
                seen = []
                for ev in job.stream():
                    seen.append(ev)
                    if len(seen) == 1:
                        assert portal.call(proxy.drop) >= 2
                        direct.job(job.job_id()).cancel()
            assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
            assert seen[-1].data is JobStatus.CANCELLED
            assert proxy.accepted >= 2
        finally:
            portal.call(proxy.close)


def test_backend_name_mode_uses_qrelay_broker_from_the_environment(
    sync_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QRELAY_BROKER", raising=False)
    with pytest.raises(InvalidArgument, match="set QRELAY_BROKER"):
        Sampler(mode="aer")
    monkeypatch.setenv("QRELAY_BROKER", sync_stack.address)
    sampler = Sampler(mode="aer")
    try:
        assert sampler.run([one_qubit()], shots=2).result()[0].data.meas.num_shots == 2
    finally:
        sampler.service.close()


def test_a_primitives_priority_reaches_its_jobs_and_is_checked(service: QRelayService) -> None:
    sampler = Sampler(mode=service.backend("aer"))
    assert sampler.priority == 0
    sampler.priority = 7
    job = sampler.run([one_qubit()], shots=4)
    job.result()
    assert service.job(job.job_id()).metrics()["priority"] == 7
    with pytest.raises(InvalidArgument, match="between -10 and 10, got 11"):
        sampler.priority = 11
    with pytest.raises(TypeError, match="must be an int"):
        sampler.priority = 1.5  # type: ignore[assignment]
    assert sampler.priority == 7


def test_a_program_run_carries_its_priority() -> None:
    from qrelay.client.service import program_spec

    assert program_spec("vqe", {"n": 1}, "aer", "", None, priority=3).priority == 3
    assert program_spec("vqe", None, "aer", "", None).priority == 0


def test_services_closed_one_after_another_leave_no_event_loop_errors(
    sync_stack: LocalStack,
) -> None:
    """Each blocking service has its own loop; closing one lets gRPC finish with it first.

    Before, the demo's examples run back to back printed "Exception in callback
    PollerCompletionQueue._handle_events ... RuntimeError: Event loop is closed"
    (4-8 times in 3 rounds): completions of a closed service's calls reached its
    stopped loop.
    """
    script = textwrap.dedent(
        """
        import io, contextlib, sys
        from examples import estimator_sweep, sampler_ghz
        for _ in range(3):
            with contextlib.redirect_stdout(io.StringIO()):
                sampler_ghz.main(sys.argv[1])
                estimator_sweep.main(sys.argv[1])
        print("rounds done")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, sync_stack.address],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "QRELAY_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rounds done" in done.stdout
    assert "Event loop is closed" not in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
