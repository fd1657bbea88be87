"""Quantum work runs in worker processes: long, heavy and hostile jobs leave the executor alive.

Real broker, real executor, real worker processes and real Aer. Assertions are
on states, attempts, codes, counts and memory, never on wall-clock times
(the preconditions that a job really outlived its lease are checked, not
assumed).
"""

from __future__ import annotations

import io
import os
import resource
import signal
import struct
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from qiskit import QuantumCircuit, qpy

from qrelay._proto.v1 import jobs_pb2, types_pb2
from qrelay.broker.server import running_broker
from qrelay.executor import guards
from qrelay.executor.agent import Executor, running_executor
from tests.executor.test_agent import (
    broker_settings,
    executor_settings,
    poll_until,
    states,
    submit,
    wait_state,
)
from tests.integration.procs import Proc
from tests.integration.rawstubs import (
    BELL_QASM3,
    heavy_qasm3,
    sampler_spec,
    wait_terminal,
    watch_all,
)

pytestmark = pytest.mark.slow

# 20 qubits, one pub: a single Aer call of several seconds that holds its
# process's interpreter lock throughout (the failure mode of the old executor).
# About 2 s on an idle machine: long enough to be caught running or past a 1 s limit.
LONG = heavy_qasm3(num_qubits=20, layers=48)
# About 4 s on an idle machine: two at once outlive five 0.5 s leases.
LONGER = heavy_qasm3(num_qubits=21, layers=30)
# A pub long enough to be caught running, short enough not to matter if it is not.
MEDIUM = heavy_qasm3(num_qubits=18, layers=40)


def qpy_bytes(circuit: QuantumCircuit) -> bytes:
    buffer = io.BytesIO()
    qpy.dump(circuit, buffer)
    return buffer.getvalue()


def qpy_bomb(num_qubits: int = 2**24) -> bytes:
    """A valid one-qubit QPY whose circuit header claims `num_qubits` qubits."""
    circuit = QuantumCircuit(1, 1)
    circuit.measure(0, 0)
    data = bytearray(qpy_bytes(circuit))
    (table_offset,) = struct.unpack_from("!Q", data, 20)  # QPY >= 16: circuit table
    # CIRCUIT_HEADER_V12 "!H1cHIIQIQI": num_qubits after name_size, phase type, phase size.
    struct.pack_into("!I", data, table_offset + 5, num_qubits)
    return bytes(data)


def children_of(pid: int) -> set[int]:
    """Every live descendant of `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- guards, without a broker ---------------------------------------------------------


def test_qpy_header_gives_the_size_without_decoding() -> None:
    circuit = QuantumCircuit(5, 3)
    circuit.h(0)
    size = guards.circuit_size(types_pb2.Circuit(qpy=qpy_bytes(circuit)))
    assert (size.num_qubits, size.num_clbits) == (5, 3)
    assert guards.circuit_size(types_pb2.Circuit(qpy=qpy_bomb())).num_qubits == 2**24


def test_qasm_declarations_give_the_size_without_parsing() -> None:
    def size(text: str) -> tuple[int, int]:
        s = guards.circuit_size(types_pb2.Circuit(qasm3=text))
        return s.num_qubits, s.num_clbits

    assert size("OPENQASM 3.0;\nqubit[4000000] q;\nbit[3] c;") == (4_000_000, 3)
    assert size('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[5];\ncreg c[2];\nh q[0];') == (5, 2)
    assert size("OPENQASM 3.0; qubit a; qubit b; bit c = measure a;") == (2, 1)
    assert size("OPENQASM 3.0; h $7;") == (8, 0)


@pytest.mark.parametrize(
    "circuit",
    [
        types_pb2.Circuit(qpy=qpy_bomb()),
        types_pb2.Circuit(qasm3="OPENQASM 3.0;\nqubit[4000000] q;\nh q[0];"),
    ],
    ids=["qpy-2^24-qubits", "qasm-4e6-qubits"],
)
def test_bombs_are_refused_from_the_header(circuit: types_pb2.Circuit) -> None:
    with pytest.raises(guards.InvalidArgument, match=r"declares \d+ qubits, but backend 'aer'"):
        guards.check_circuit(circuit, "aer", 30, simulator=True)


def test_a_device_refuses_circuits_wider_than_itself_a_simulator_up_to_its_cap() -> None:
    circuit = QuantumCircuit(6)
    wire = types_pb2.Circuit(qpy=qpy_bytes(circuit))
    with pytest.raises(guards.InvalidArgument, match="declares 6 qubits, but backend 'dev' has 5"):
        guards.check_circuit(wire, "dev", 5, simulator=False)
    assert guards.check_circuit(wire, "sim", 5, simulator=True).num_qubits == 6


def test_implausible_instruction_count_is_refused() -> None:
    data = bytearray(qpy_bytes(QuantumCircuit(1)))
    (offset,) = struct.unpack_from("!Q", data, 20)
    struct.pack_into("!Q", data, offset + 25, 2**40)  # num_instructions
    with pytest.raises(guards.InvalidArgument, match="claims 1099511627776 instructions"):
        guards.circuit_size(types_pb2.Circuit(qpy=bytes(data)))


def test_memory_estimate_counts_active_qubits_and_spares_clifford_circuits() -> None:
    wide = QuantumCircuit(127)
    wide.rx(0.1, 3)
    wide.cx(3, 100)
    assert guards.simulation_bytes(wide)[:2] == (2, 16 << 2)
    ghz = QuantumCircuit(60)
    ghz.h(0)
    for q in range(59):
        ghz.cx(q, q + 1)
    assert guards.simulation_bytes(ghz)[2] == "stabilizer"
    dense = QuantumCircuit(34)
    dense.rx(0.3, range(34))
    with pytest.raises(guards.ResourceExhausted, match=r"34 active qubits .* needs at least 256"):
        guards.check_simulation_memory(dense, 8 << 30, "pub 0: circuit")


# -- liveness vs duration ------------------------------------------------------------


async def test_jobs_longer_than_five_ttls_finish_on_attempt_one_while_list_answers(
    tmp_path: Path, jobs_stub: Any
) -> None:
    settings = broker_settings(tmp_path, lease_ttl_s=0.5, heartbeat_interval_s=0.125)
    async with (
        running_broker(settings) as broker,
        running_executor(executor_settings(broker.address, slots=2)),
    ):
        jobs = jobs_stub(broker.address)
        ids = [await submit(jobs, sampler_spec("aer", LONGER, shots=100)) for _ in range(2)]
        answered = 0
        # The broker and the executor share this process (as under `qrelay dev`):
        # List must keep answering, within a lease TTL, while both jobs simulate.
        while True:
            listed = await jobs.List(jobs_pb2.ListJobsRequest(page_size=50), timeout=1.0)
            answered += 1
            if all(j.state >= types_pb2.JOB_STATE_DONE for j in listed.jobs if j.id in ids):
                break
            await anyio.sleep(0.05)
        done = await wait_terminal(jobs, ids, deadline=60)
        for job_id in ids:
            job = done[job_id]
            ran = (job.finished_at.ToDatetime() - job.started_at.ToDatetime()).total_seconds()
            assert ran > 5 * settings.lease_ttl_s, "precondition: the job outlived 5 TTLs"
            assert job.state == types_pb2.JOB_STATE_DONE, job.error.message
            assert job.attempts == 1
            history = states(await watch_all(jobs, job_id))
            assert history.count(types_pb2.JOB_STATE_QUEUED) == 1, "never requeued"
        assert answered >= 10


async def test_a_job_past_its_backends_max_run_time_fails_naming_the_limit(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with running_broker(broker_settings(tmp_path)) as broker:
        settings = executor_settings(
            broker.address,
            backends=["aer", "fake_manila"],
            slots=1,
            max_run_time_by_backend={"aer": 1.0},
        )
        async with running_executor(settings) as executor:
            jobs = jobs_stub(broker.address)
            job_id = await submit(jobs, sampler_spec("aer", LONG, shots=100))
            job = (await wait_terminal(jobs, [job_id], deadline=60))[job_id]
            assert job.state == types_pb2.JOB_STATE_FAILED
            assert job.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert "maximum run time of 1 s for backend 'aer'" in job.error.message
            assert job.attempts == 1
            # The limit is per backend; the next job runs on a fresh worker.
            ok = await submit(jobs, sampler_spec("fake_manila", BELL_QASM3, shots=10))
            done = (await wait_terminal(jobs, [ok], deadline=60))[ok]
            assert done.state == types_pb2.JOB_STATE_DONE
            assert executor.connected


# -- cancel and crash ------------------------------------------------------------------


async def running_worker(executor: Executor, job_id: str) -> int:
    await poll_until(lambda: job_id in executor.job_worker_pids, 30)
    return executor.job_worker_pids[job_id]


async def test_cancel_kills_the_simulating_worker_and_the_next_job_runs(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(executor_settings(broker.address, slots=1)) as executor,
    ):
        jobs = jobs_stub(broker.address)
        job_id = await submit(jobs, sampler_spec("aer", LONG, shots=100))
        await wait_state(jobs, job_id, types_pb2.JOB_STATE_RUNNING)
        pid = await running_worker(executor, job_id)
        await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=5)
        await poll_until(lambda: not alive(pid), 10)
        job = (await wait_terminal(jobs, [job_id], deadline=30))[job_id]
        assert job.state == types_pb2.JOB_STATE_CANCELLED
        assert executor.busy_slots == 0
        ok = await submit(jobs, sampler_spec("aer", BELL_QASM3, shots=10))
        assert (await wait_terminal(jobs, [ok], deadline=60))[ok].state == types_pb2.JOB_STATE_DONE


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
async def test_a_worker_that_dies_fails_its_job_saying_how_and_is_replaced(
    tmp_path: Path, jobs_stub: Any, sig: signal.Signals
) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(executor_settings(broker.address, slots=2)) as executor,
    ):
        jobs = jobs_stub(broker.address)
        victim = await submit(jobs, sampler_spec("aer", LONG, shots=100))
        bystander = await submit(jobs, sampler_spec("aer", MEDIUM, shots=100))
        os.kill(await running_worker(executor, victim), sig)
        done = await wait_terminal(jobs, [victim, bystander], deadline=90)
        assert done[victim].state == types_pb2.JOB_STATE_FAILED
        assert done[victim].error.code == grpc.StatusCode.ABORTED.value[0]
        assert f"worker process running this job died (killed by {sig.name})" in (
            done[victim].error.message
        )
        assert done[bystander].state == types_pb2.JOB_STATE_DONE
        assert done[bystander].attempts == 1
        assert executor.connected
        after = await submit(jobs, sampler_spec("aer", BELL_QASM3, shots=10))
        result = (await wait_terminal(jobs, [after], deadline=60))[after]
        assert result.state == types_pb2.JOB_STATE_DONE


# -- guards before work ----------------------------------------------------------------


async def test_bombs_are_refused_before_decoding_and_a_job_beside_them_is_unharmed(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(executor_settings(broker.address, slots=2)) as executor,
    ):
        jobs = jobs_stub(broker.address)
        beside = await submit(jobs, sampler_spec("aer", MEDIUM, shots=100))
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        bombs = []
        for circuit in (
            types_pb2.Circuit(qpy=qpy_bomb()),
            types_pb2.Circuit(qasm3="OPENQASM 3.0;\nqubit[4000000] q;\nh q[0];"),
        ):
            task = types_pb2.SamplerTask(pubs=[types_pb2.SamplerPub(circuit=circuit)])
            bombs.append(await submit(jobs, types_pb2.JobSpec(backend="aer", sampler=task)))
        done = await wait_terminal(jobs, [*bombs, beside], deadline=90)
        for job_id in bombs:
            assert done[job_id].state == types_pb2.JOB_STATE_FAILED
            assert done[job_id].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "qubits, but backend 'aer' has" in done[job_id].error.message
        assert done[beside].state == types_pb2.JOB_STATE_DONE
        assert done[beside].attempts == 1
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
        assert grown_kib < 100 * 1024, f"executor peak RSS grew {grown_kib} KiB"
        # The workers never saw the bombs either: none died, none was replaced.
        pool = executor.worker_pool
        assert pool is not None
        assert pool.workers_lost == 0
        assert pool.workers_started == 2


async def test_a_simulation_over_the_memory_limit_is_refused_with_the_numbers(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(
            executor_settings(broker.address, slots=1, worker_memory_mb=4096)
        ) as executor,
    ):
        jobs = jobs_stub(broker.address)
        wide = 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[29] q;\nbit[29] c;\n'
        wide += "".join(f"rx(0.3) q[{i}];\n" for i in range(29)) + "c = measure q;\n"
        job_id = await submit(jobs, sampler_spec("aer", wide, shots=10))
        job = (await wait_terminal(jobs, [job_id], deadline=60))[job_id]
        assert job.state == types_pb2.JOB_STATE_FAILED
        assert job.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "simulating 29 active qubits (statevector) needs at least 8.0 GiB" in (
            job.error.message
        )
        assert "over this executor's limit of" in job.error.message
        pool = executor.worker_pool
        assert pool is not None
        assert pool.workers_lost == 0


async def test_twirling_that_would_exceed_the_shot_budget_is_refused(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(executor_settings(broker.address, slots=1)),
    ):
        jobs = jobs_stub(broker.address)
        spec = sampler_spec("aer", BELL_QASM3, shots=1)
        spec.options.update(
            {
                "twirling": {
                    "enable_measure": True,
                    "num_randomizations": 20_000,
                    "shots_per_randomization": 10_000,
                }
            }
        )
        job_id = await submit(jobs, spec)
        job = (await wait_terminal(jobs, [job_id], deadline=60))[job_id]
        assert job.state == types_pb2.JOB_STATE_FAILED
        assert job.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "20000 twirling randomizations x 10000 shots" in job.error.message


# -- a killed executor leaves nothing behind --------------------------------------------


async def test_a_killed_executor_takes_its_zygote_and_workers_with_it(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with running_broker(broker_settings(tmp_path)) as broker:
        jobs = jobs_stub(broker.address)
        executor = Proc(
            [
                *("executor", "serve", "--broker", broker.address, "--backend", "aer"),
                *("--slots", "2", "--no-programs"),
            ],
            tmp_path / "executor.log",
        )
        try:
            with anyio.fail_after(60):
                while True:  # until the executor process has connected
                    try:
                        job_id = await submit(jobs, sampler_spec("aer", LONG, shots=100))
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != grpc.StatusCode.NOT_FOUND:
                            raise
                        await anyio.sleep(0.2)
            await wait_state(jobs, job_id, types_pb2.JOB_STATE_RUNNING, within=60)
            descendants = children_of(executor.popen.pid)
            assert len(descendants) >= 3, "precondition: a zygote and two workers"
        finally:
            executor.kill9()
        await poll_until(lambda: not any(alive(pid) for pid in descendants), 10)


# -- backends from other providers -------------------------------------------------------


async def test_jobs_of_a_device_that_only_waits_share_one_worker_and_cancel_alone(
    tmp_path: Path, jobs_stub: Any
) -> None:
    """Six jobs of a remote device run at once in one worker process, not six."""
    async with running_broker(broker_settings(tmp_path)) as broker:
        settings = executor_settings(
            broker.address,
            backends=["remote_wait"],
            slots=6,
            backend_providers=["tests.executor.remote_provider:provider"],
        )
        async with running_executor(settings) as executor:
            jobs = jobs_stub(broker.address)
            ids = [
                await submit(jobs, sampler_spec("remote_wait", BELL_QASM3, shots=10))
                for _ in range(6)
            ]
            pids: set[int] = set()

            def all_running() -> bool:
                pids.update(executor.job_worker_pids.values())
                return len(executor.job_worker_pids) == 6

            await poll_until(all_running, 30)
            await jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=ids[0]), timeout=5)
            done = await wait_terminal(jobs, ids, deadline=60)
        assert len(pids) == 1, "one worker process holds every waiting job"
        assert done[ids[0]].state == types_pb2.JOB_STATE_CANCELLED
        assert [done[i].state for i in ids[1:]] == [types_pb2.JOB_STATE_DONE] * 5
        assert executor.peak_running == 6


async def test_a_killed_zygote_is_started_again_and_the_next_job_runs(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(executor_settings(broker.address, slots=1)) as executor,
    ):
        pool = executor.worker_pool
        assert pool is not None
        first = pool.zygote_pid
        os.kill(first, signal.SIGKILL)
        await poll_until(lambda: not alive(first), 10)
        jobs = jobs_stub(broker.address)
        job_id = await submit(jobs, sampler_spec("aer", BELL_QASM3, shots=10))
        job = (await wait_terminal(jobs, [job_id], deadline=120))[job_id]
        assert job.state == types_pb2.JOB_STATE_DONE, job.error.message
        assert pool.zygote_pid not in (0, first)
        assert executor.connected


# -- progress -----------------------------------------------------------------------------


async def test_a_long_job_reports_progress_and_a_tiny_one_does_not(
    tmp_path: Path, jobs_stub: Any
) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        running_executor(executor_settings(broker.address, slots=2)),
    ):
        jobs = jobs_stub(broker.address)
        spec = sampler_spec("aer", LONGER, shots=100)
        spec.sampler.pubs.extend([sampler_spec("aer", BELL_QASM3).sampler.pubs[0]] * 2)
        long_id = await submit(jobs, spec)
        tiny_id = await submit(jobs, sampler_spec("aer", BELL_QASM3, shots=10))
        done = await wait_terminal(jobs, [long_id, tiny_id], deadline=90)
        assert {j.state for j in done.values()} == {types_pb2.JOB_STATE_DONE}
        job = done[long_id]
        ran = (job.finished_at.ToDatetime() - job.started_at.ToDatetime()).total_seconds()
        assert ran > 2.0, "precondition: the job ran long enough to report"
        reports = [e for e in await watch_all(jobs, long_id) if e.HasField("progress")]
        assert reports, "a job of several seconds reports its progress"
        assert {(r.progress.stage, r.progress.total) for r in reports} <= {
            ("transpile", 3),
            ("run", 3),
        }
        assert all(r.progress.done <= r.progress.total for r in reports)
        assert {r.attempt for r in reports} == {1}
        tiny = await watch_all(jobs, tiny_id)
        tiny_job = done[tiny_id]
        tiny_ran = (
            tiny_job.finished_at.ToDatetime() - tiny_job.started_at.ToDatetime()
        ).total_seconds()
        if tiny_ran < 0.9:  # a loaded machine can stretch even 10 shots past the 1 s mark
            assert not [e for e in tiny if e.HasField("progress")]
