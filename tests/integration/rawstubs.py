"""Talking to a broker with nothing but the generated stubs and numpy.

This is what a user of another language does: OpenQASM 3 text for circuits,
little-endian bytes for arrays, and the JobService RPCs. No qrelay SDK, no
Qiskit objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2

TERMINAL = {
    types_pb2.JOB_STATE_DONE,
    types_pb2.JOB_STATE_FAILED,
    types_pb2.JOB_STATE_CANCELLED,
}

BELL_QASM3 = """OPENQASM 3.0;
include "stdgates.inc";
bit[2] c;
qubit[2] q;
h q[0];
cx q[0], q[1];
c = measure q;
"""


def heavy_qasm3(num_qubits: int = 14, layers: int = 30) -> str:
    """A circuit that keeps Aer busy for a noticeable time per shot batch."""
    lines = [
        "OPENQASM 3.0;",
        'include "stdgates.inc";',
        f"bit[{num_qubits}] c;",
        f"qubit[{num_qubits}] q;",
    ]
    for layer in range(layers):
        for q in range(num_qubits):
            lines.append(f"rx({0.1 * (layer + 1) + 0.01 * q}) q[{q}];")
        for q in range(layer % 2, num_qubits - 1, 2):
            lines.append(f"cx q[{q}], q[{q + 1}];")
    lines.append("c = measure q;")
    return "\n".join(lines) + "\n"


def sampler_spec(backend: str, qasm: str = BELL_QASM3, shots: int = 100) -> types_pb2.JobSpec:
    task = types_pb2.SamplerTask(pubs=[types_pb2.SamplerPub(circuit=types_pb2.Circuit(qasm3=qasm))])
    task.shots = shots
    return types_pb2.JobSpec(backend=backend, sampler=task)


def array(values: np.ndarray) -> types_pb2.NDArray:
    values = np.ascontiguousarray(values)
    return types_pb2.NDArray(
        shape=list(values.shape),
        dtype=values.dtype.newbyteorder("<").str,
        data=values.astype(values.dtype.newbyteorder("<")).tobytes(),
    )


def unpack_bits(bits: types_pb2.BitArray) -> np.ndarray:
    """Shots x bits matrix (column 0 = bit 0) from a packed wire BitArray."""
    nbytes = (bits.num_bits + 7) // 8
    packed = np.frombuffer(bits.data, dtype=np.uint8).reshape(-1, nbytes)
    unpacked = np.unpackbits(packed, axis=1)[:, ::-1]
    return unpacked[:, : bits.num_bits]


async def watch_all(
    stub: jobs_pb2_grpc.JobServiceStub, job_id: str, after_seq: int = 0, deadline: float = 60.0
) -> list[types_pb2.JobEvent]:
    """Every event of the job after `after_seq`, until the terminal state."""
    events = []
    call = stub.Watch(jobs_pb2.WatchRequest(job_id=job_id, after_seq=after_seq), timeout=deadline)
    async for event in call:
        events.append(event)
    return events


async def wait_terminal(
    stub: jobs_pb2_grpc.JobServiceStub, job_ids: Sequence[str], deadline: float = 60.0
) -> dict[str, jobs_pb2.Job]:
    """Follow each job (reconnecting across broker restarts) until it is terminal."""
    import anyio

    jobs: dict[str, jobs_pb2.Job] = {}
    with anyio.fail_after(deadline):
        for job_id in job_ids:
            while True:
                try:
                    job = await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), timeout=5)
                    if job.state in TERMINAL:
                        jobs[job_id] = job
                        break
                    await watch_all(stub, job_id, after_seq=job.last_seq, deadline=deadline)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        raise
                    await anyio.sleep(0.2)
    return jobs
