"""The executor agent against a real in-process broker on loopback.

Nothing is mocked: a real grpc.aio broker with a SQLite file in tmp_path,
real Aer behind the executor, raw generated stubs as the client.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import grpc
import numpy as np
import pytest

from qrelay._proto.v1 import backends_pb2, backends_pb2_grpc, jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.broker.server import running_broker
from qrelay.broker.settings import BrokerSettings
from qrelay.errors import DeadlineExceeded
from qrelay.executor.agent import Executor, backoff_delay, running_executor
from qrelay.executor.settings import ExecutorSettings
from qrelay.testing import free_port
from tests.integration.rawstubs import (
    BELL_QASM3,
    heavy_qasm3,
    sampler_spec,
    unpack_bits,
    wait_terminal,
    watch_all,
)

# Short leases so lease-related behaviour shows within seconds. (The broker
# drops an executor silent for 3 heartbeat intervals, so the interval must
# leave room for a loaded CI machine.)
FAST = {"lease_ttl_s": 2.0, "heartbeat_interval_s": 0.25}
HEAVY = heavy_qasm3(num_qubits=12, layers=20)


def long_spec(pubs: int) -> types_pb2.JobSpec:
    """A sampler job of `pubs` PUBs (~50 ms of Aer each): long, yet cancellable between PUBs."""
    spec = sampler_spec("aer", HEAVY, shots=200)
    spec.sampler.pubs.extend([spec.sampler.pubs[0]] * (pubs - 1))
    return spec


def broker_settings(tmp_path: Path, port: int = 0, **overrides: Any) -> BrokerSettings:
    return BrokerSettings(
        **{"listen": f"127.0.0.1:{port}", "db_path": tmp_path / "broker.db", **FAST, **overrides}
    )


def executor_settings(address: str, **overrides: Any) -> ExecutorSettings:
    return ExecutorSettings(
        **{
            "broker": address,
            "backends": ["aer"],
            "slots": 2,
            "reconnect_initial_s": 0.05,
            "reconnect_max_s": 0.3,
            "connect_timeout_s": 5.0,
            # No warm program sandboxes: these tests run primitives only.
            "programs": False,
            **overrides,
        }
    )


async def submit(stub: jobs_pb2_grpc.JobServiceStub, spec: types_pb2.JobSpec) -> str:
    job = await stub.Submit(jobs_pb2.SubmitRequest(spec=spec), timeout=10)
    return str(job.id)


async def wait_state(
    stub: jobs_pb2_grpc.JobServiceStub, job_id: str, state: int, within: float = 30.0
) -> jobs_pb2.Job:
    with anyio.fail_after(within):
        while True:
            job = await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), timeout=5)
            if job.state == state:
                return job
            await anyio.sleep(0.02)


async def poll_until(condition: Callable[[], bool], within: float) -> None:
    """Wait for a condition on executor state (no event exists for it); fail after `within` s."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - executor state has no event to await
            await anyio.sleep(0.01)


def states(events: list[types_pb2.JobEvent]) -> list[int]:
    return [e.state.state for e in events if e.WhichOneof("payload") == "state"]


def payloads(events: list[types_pb2.JobEvent], kind: str) -> list[types_pb2.JobEvent]:
    return [e for e in events if e.WhichOneof("payload") == kind]


# -- unit ------------------------------------------------------------------------


def test_backoff_is_full_jitter_capped() -> None:
    random.seed(7)
    for attempt in range(12):
        ceiling = min(2.0, 0.1 * 2**attempt)
        samples = [backoff_delay(attempt, 0.1, 2.0) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter spreads over the whole range, not just near the ceiling.
        assert min(samples) < ceiling / 4
    assert backoff_delay(10_000, 0.1, 2.0) <= 2.0


def test_settings_accept_comma_separated_backends_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QRELAY_EXECUTOR_BACKENDS", "aer, fake_manila")
    monkeypatch.setenv("QRELAY_EXECUTOR_SLOTS", "3")
    settings = ExecutorSettings()
    assert settings.backends == ["aer", "fake_manila"]
    assert settings.slots == 3
    assert settings.executor_id.startswith("e-")


def test_settings_reject_duplicate_backends() -> None:
    with pytest.raises(ValueError, match="backend names must be unique"):
        ExecutorSettings(backends=["aer", "aer"])


# -- against a real broker -----------------------------------------------------------


async def test_executor_announces_backends_and_runs_a_sampler_job(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with running_broker(broker_settings(tmp_path)) as broker:
        settings = executor_settings(broker.address, backends=["aer", "fake_manila"])
        async with running_executor(settings) as executor:
            assert executor.connected
            assert executor.capabilities == []  # programs=False in these tests
            async with grpc.aio.insecure_channel(broker.address) as channel:
                listed = await backends_pb2_grpc.BackendServiceStub(channel).List(
                    backends_pb2.ListBackendsRequest(), timeout=5
                )
            by_name = {b.info.name: b for b in listed.backends}
            assert set(by_name) == {"aer", "fake_manila"}
            assert all(b.online and b.online_executors == 1 for b in by_name.values())
            assert by_name["fake_manila"].info.num_qubits == 5

            stub = jobs_stub(broker.address)
            job_id = await submit(stub, sampler_spec("aer", BELL_QASM3, shots=200))
            done = (await wait_terminal(stub, [job_id], deadline=60))[job_id]
            assert done.state == types_pb2.JOB_STATE_DONE, done.error
            assert done.executor_id == settings.executor_id
            result = await stub.GetResult(jobs_pb2.GetResultRequest(job_id=job_id), timeout=5)
            (pub,) = result.primitive.pub_results
            bits = unpack_bits(pub.data[0].bits)
            assert bits.shape == (200, 2)
            # An ideal Bell state: both bits always agree (exact, no tolerance needed).
            assert np.all(bits[:, 0] == bits[:, 1])


async def test_bad_circuit_fails_the_job_with_invalid_argument_and_executor_keeps_serving(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(executor_settings(broker.address)),
    ):
        stub = jobs_stub(broker.address)
        bad = await submit(stub, sampler_spec("aer", "OPENQASM 3.0;\nthis is not qasm;\n"))
        failed = (await wait_terminal(stub, [bad], deadline=60))[bad]
        assert failed.state == types_pb2.JOB_STATE_FAILED
        assert failed.error.code == 3  # INVALID_ARGUMENT
        assert failed.error.message
        assert "Traceback" not in failed.error.message
        good = await submit(stub, sampler_spec("aer", BELL_QASM3))
        assert (await wait_terminal(stub, [good], deadline=60))[good].state == (
            types_pb2.JOB_STATE_DONE
        )


async def test_slots_bound_concurrency(tmp_path: Path, jobs_stub: Any) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(executor_settings(broker.address, slots=2)) as executor,
    ):
        stub = jobs_stub(broker.address)
        ids = [await submit(stub, long_spec(10)) for _ in range(4)]
        seen_running: list[int] = []
        with anyio.fail_after(120):
            while True:
                listed = await stub.List(jobs_pb2.ListJobsRequest(page_size=10), timeout=5)
                by_state = [j.state for j in listed.jobs if j.id in ids]
                seen_running.append(by_state.count(types_pb2.JOB_STATE_RUNNING))
                seen_running.append(len(executor.running_jobs))
                if all(s == types_pb2.JOB_STATE_DONE for s in by_state):
                    break
                await anyio.sleep(0.02)
        assert max(seen_running) <= 2
        # Four jobs for two slots: two ran side by side, never more.
        assert executor.peak_running == 2


async def test_cancelled_running_job_is_released_and_frees_its_slot(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(executor_settings(broker.address, slots=1)) as executor,
    ):
        stub = jobs_stub(broker.address)
        doomed = await submit(stub, long_spec(400))
        await wait_state(stub, doomed, types_pb2.JOB_STATE_RUNNING)
        await poll_until(lambda: doomed in executor.running_jobs, 10)
        await stub.Cancel(jobs_pb2.CancelJobRequest(job_id=doomed, reason="test"), timeout=5)
        await poll_until(
            lambda: doomed not in executor.running_jobs and not executor.held_leases, 30
        )
        # The one slot is free again: the next job runs to the end on this executor.
        after = await submit(stub, sampler_spec("aer", BELL_QASM3))
        done = (await wait_terminal(stub, [after], deadline=90))[after]
        assert done.state == types_pb2.JOB_STATE_DONE
        events = await watch_all(stub, doomed)
        assert states(events)[-1] == types_pb2.JOB_STATE_CANCELLED
        assert payloads(events, "result") == []
        assert payloads(events, "error") == []


async def test_heartbeats_keep_a_long_jobs_lease_alive_past_the_ttl(
    tmp_path: Path, jobs_stub: Any
) -> None:
    settings = broker_settings(tmp_path, lease_ttl_s=0.6, heartbeat_interval_s=0.2)
    async with (
        running_broker(settings) as broker,
        running_executor(executor_settings(broker.address, slots=1)),
    ):
        stub = jobs_stub(broker.address)
        # ~13 ms (idle machine) to ~50 ms (loaded) per PUB: always well past 3 TTLs.
        job_id = await submit(stub, long_spec(400))
        done = (await wait_terminal(stub, [job_id], deadline=180))[job_id]
        ran_for = (done.finished_at.ToDatetime() - done.started_at.ToDatetime()).total_seconds()
        assert ran_for > 3 * settings.lease_ttl_s, "precondition: the job outlived its TTL"
        assert done.state == types_pb2.JOB_STATE_DONE
        assert done.attempts == 1
        history = states(await watch_all(stub, job_id))
        assert history.count(types_pb2.JOB_STATE_QUEUED) == 1, "never requeued"


async def test_executor_reconnects_after_broker_restart_and_its_job_continues(
    tmp_path: Path, jobs_stub: Any
) -> None:
    port = free_port()
    # A TTL long enough that the running job's lease survives the restart gap.
    settings = broker_settings(tmp_path, port, lease_ttl_s=10.0, heartbeat_interval_s=0.25)
    executor: Executor
    async with anyio.create_task_group() as tg:
        async with running_broker(settings) as broker:
            executor = Executor(executor_settings(broker.address, slots=1))
            tg.start_soon(executor.run)
            await executor.wait_connected(30)
            stub = jobs_stub(broker.address)
            job_id = await submit(stub, long_spec(200))
            await wait_state(stub, job_id, types_pb2.JOB_STATE_RUNNING)
        # Broker gone; the job keeps running on the executor meanwhile.
        await poll_until(lambda: not executor.connected, 10)
        assert job_id in executor.running_jobs
        async with running_broker(settings) as broker:
            await executor.wait_connected(30)
            assert executor.connections == 2
            done = (await wait_terminal(stub, [job_id], deadline=120))[job_id]
            assert done.state == types_pb2.JOB_STATE_DONE
            assert done.attempts == 1, "the held lease was kept, not re-run"
            events = await watch_all(stub, job_id)
            assert len(payloads(events, "result")) == 1
        tg.cancel_scope.cancel()


async def test_wrong_executor_token_never_connects(tmp_path: Path) -> None:
    settings = broker_settings(tmp_path, executor_token="right-token")
    async with running_broker(settings) as broker:
        bad = Executor(executor_settings(broker.address, token="wrong-token"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(bad.run)
            with pytest.raises(DeadlineExceeded, match="not connected"):
                await bad.wait_connected(1.5)
            assert not bad.connected
            tg.cancel_scope.cancel()
        async with running_executor(executor_settings(broker.address, token="right-token")) as ok:
            assert ok.connected


async def test_unknown_backend_stops_the_executor_with_a_helpful_error(tmp_path: Path) -> None:
    async with running_broker(broker_settings(tmp_path)) as broker:
        with pytest.raises(BaseException) as info:  # noqa: PT011 - unwrapped below
            async with running_executor(
                executor_settings(broker.address, backends=["no_such_device"])
            ):
                pass
        leaves = list(_leaves(info.value))
        assert any("no_such_device" in str(e) for e in leaves), leaves


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


async def test_a_job_running_on_a_stopped_executor_finishes_once_on_another(
    tmp_path: Path, jobs_stub: Any
) -> None:
    # Stopping hands held jobs back (Released: requeued at once). The broker may
    # race and lease the job to the stopping executor again, in which case the
    # lease lapses after the TTL instead; either way it must finish exactly once.
    async with running_broker(broker_settings(tmp_path)) as broker:
        stub = jobs_stub(broker.address)
        first_settings = executor_settings(broker.address, slots=1, executor_id="e-first")
        async with running_executor(first_settings) as first:
            job_id = await submit(stub, long_spec(40))
            await wait_state(stub, job_id, types_pb2.JOB_STATE_RUNNING)
            await poll_until(lambda: job_id in first.running_jobs, 10)
        second_settings = executor_settings(broker.address, slots=1, executor_id="e-second")
        async with running_executor(second_settings):
            done = (await wait_terminal(stub, [job_id], deadline=120))[job_id]
            assert done.state == types_pb2.JOB_STATE_DONE
            assert done.executor_id == "e-second"
            assert done.attempts <= 2
            assert len(payloads(await watch_all(stub, job_id), "result")) == 1


def wide_register_qasm3(num_bits: int) -> str:
    """Two qubits measured into `num_bits` clbits: big results from few shots."""
    lines = ["OPENQASM 3.0;", 'include "stdgates.inc";', f"bit[{num_bits}] c;", "qubit[2] q;"]
    lines += ["h q[0];", "cx q[0], q[1];"]
    lines += [f"c[{i}] = measure q[{i % 2}];" for i in range(num_bits)]
    return "\n".join(lines) + "\n"


async def test_result_over_the_brokers_update_limit_fails_the_job_resource_exhausted(
    tmp_path: Path, jobs_stub: Any
) -> None:
    # Small job/program limits make the broker's update limit (Welcome.max_update_bytes)
    # about 1 MiB; an 80-bit register takes 10 bytes a shot, so limit/10 + 10 000
    # shots is a result just over it. (A slow heartbeat: building a result this
    # big holds the GIL for a while.)
    settings = broker_settings(
        tmp_path,
        max_job_bytes=4096,
        max_program_bytes=4096,
        lease_ttl_s=10.0,
        heartbeat_interval_s=1.0,
    )
    async with (
        running_broker(settings) as broker,
        running_executor(executor_settings(broker.address)) as executor,
    ):
        limit = executor.max_update_bytes
        assert 0 < limit < 2 * 1024 * 1024, "precondition: a small limit"
        stub = jobs_stub(broker.address)
        spec = sampler_spec("aer", wide_register_qasm3(80), shots=limit // 10 + 10_000)
        big = await submit(stub, spec)
        failed = (await wait_terminal(stub, [big], deadline=120))[big]
        assert failed.state == types_pb2.JOB_STATE_FAILED
        assert failed.error.code == 8, failed.error  # RESOURCE_EXHAUSTED
        assert f"over the broker limit of {limit} bytes" in failed.error.message
        # The stream survived: the same connection runs the next job.
        assert executor.connections == 1
        small = await submit(stub, sampler_spec("aer", BELL_QASM3))
        assert (await wait_terminal(stub, [small], deadline=60))[small].state == (
            types_pb2.JOB_STATE_DONE
        )


async def test_metrics_port_serves_slot_and_connection_gauges(tmp_path: Path) -> None:
    import urllib.request

    port = free_port()
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(
            executor_settings(broker.address, slots=3, metrics_port=port, executor_id="e-metrics")
        ),
    ):

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return str(resp.read().decode())

        text = await anyio.to_thread.run_sync(scrape)
    assert 'qrelay_executor_slots{executor_id="e-metrics"} 3.0' in text
    assert 'qrelay_executor_connected{executor_id="e-metrics"} 1.0' in text
    assert 'qrelay_executor_busy_slots{executor_id="e-metrics"}' in text


async def test_a_result_finished_while_the_broker_is_down_is_delivered_after_reconnecting(
    tmp_path: Path, jobs_stub: Any
) -> None:
    port = free_port()
    settings = broker_settings(tmp_path, port, lease_ttl_s=30.0)
    async with anyio.create_task_group() as tg:
        async with running_broker(settings) as broker:
            executor = Executor(executor_settings(broker.address, slots=1))
            tg.start_soon(executor.run)
            await executor.wait_connected(30)
            stub = jobs_stub(broker.address)
            job_id = await submit(stub, long_spec(30))
            await wait_state(stub, job_id, types_pb2.JOB_STATE_RUNNING)
        # With the broker down the job finishes here; its result waits in the outbox.
        await poll_until(lambda: job_id not in executor.running_jobs, 60)
        assert [h.job_id for h in executor.held_leases] == [job_id]
        assert not executor.connected
        async with running_broker(settings):
            await executor.wait_connected(30)
            done = (await wait_terminal(stub, [job_id], deadline=60))[job_id]
            assert done.state == types_pb2.JOB_STATE_DONE
            assert done.attempts == 1
            assert len(payloads(await watch_all(stub, job_id), "result")) == 1
            await poll_until(lambda: not executor.held_leases, 10)
        tg.cancel_scope.cancel()
