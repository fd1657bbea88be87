"""The broker's List latency while two executors simulate 20+ qubit jobs, against idle.

Heartbeats prove an executor alive, not its job short: while Aer simulates
for many seconds the broker must keep answering everyone and every lease
must hold. Two placements are measured in one run:

- `deployed`: broker and two executors as processes on loopback;
- `dev`: broker and two executors in this process, as `qrelay dev` runs
  them (where the old executor, simulating on a thread, froze the broker).

For each, `List` is called back to back while idle, then while the jobs
simulate; the figure that matters is busy p99 over idle p99 (same run, same
machine noise). Every job must finish on its first attempt.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio

from bench._procs import processes
from bench._report import Report, arg_parser, ratio, summarize

#: List calls measured while the broker is idle.
IDLE_CALLS = 200


def long_spec(num_qubits: int, layers: int) -> Any:
    """A one-pub Sampler job of `num_qubits` dense qubits: one long Aer call."""
    from qiskit import QuantumCircuit

    from qrelay import codec
    from qrelay._proto.v1 import types_pb2

    qc = QuantumCircuit(num_qubits)
    for layer in range(layers):
        for q in range(num_qubits):
            qc.rx(0.1 * (layer + 1) + 0.01 * q, q)
        for q in range(layer % 2, num_qubits - 1, 2):
            qc.cx(q, q + 1)
    qc.measure_all()
    return types_pb2.JobSpec(backend="aer", sampler=codec.encode_sampler_task([qc], 100))


@asynccontextmanager
async def broker_and_executors(placement: str) -> AsyncIterator[str]:
    """A broker with two one-slot Aer executors; yields the broker's address."""
    if placement == "dev":
        from qrelay.testing import local_stack

        async with local_stack(backends=("aer",), executors=2, slots=1) as env:
            yield env.address
        return
    from qrelay.client import AsyncQRelayService

    async with processes() as procs:
        address = await procs.start_broker(max_queued=1000)
        async with AsyncQRelayService(address) as control:
            await procs.add_executor(control, "aer", slots=1, expect_online=1)
            await procs.add_executor(control, "aer", slots=1, expect_online=2)
        yield address


async def list_latencies(stub: Any, calls: int | None, until: Callable[[], bool]) -> list[float]:
    """Back-to-back List calls: `calls` of them, or until `until()` is true."""
    from qrelay._proto.v1 import jobs_pb2

    times: list[float] = []
    while (calls is None and not until()) or (calls is not None and len(times) < calls):
        start = time.perf_counter()
        await stub.List(jobs_pb2.ListJobsRequest(page_size=50), timeout=30)
        times.append(time.perf_counter() - start)
        await anyio.sleep(0.005)
    return times


async def measure(report: Report, placement: str, spec: Any, jobs: int) -> None:
    import grpc

    from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2

    async with (
        broker_and_executors(placement) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        await list_latencies(stub, 20, lambda: False)  # warm up
        idle = await list_latencies(stub, IDLE_CALLS, lambda: False)
        started = time.perf_counter()
        ids = [
            (await stub.Submit(jobs_pb2.SubmitRequest(spec=spec), timeout=30)).id
            for _ in range(jobs)
        ]
        finished: dict[str, Any] = {}

        async def follow() -> None:
            while len(finished) < len(ids):
                for job_id in ids:
                    if job_id in finished:
                        continue
                    job = await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), timeout=30)
                    if job.state >= types_pb2.JOB_STATE_DONE:
                        finished[job_id] = job
                await anyio.sleep(0.2)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            busy = await list_latencies(stub, None, lambda: len(finished) == len(ids))
        wall = time.perf_counter() - started
    i, b = summarize(idle, 1e3), summarize(busy, 1e3)
    attempts = max(j.attempts for j in finished.values())
    done = sum(j.state == types_pb2.JOB_STATE_DONE for j in finished.values())
    report.add_row(placement=placement, phase="idle", **i)
    report.add_row(
        placement=placement,
        phase=f"{jobs} jobs simulating",
        **b,
        jobs_done=done,
        max_attempts=attempts,
        wall_s=wall,
    )
    report.figures[f"{placement}_list_p99_busy_over_idle"] = ratio(b["p99"], i["p99"])
    report.figures[f"{placement}_list_p50_busy_over_idle"] = ratio(b["p50"], i["p50"])
    report.figures[f"{placement}_max_attempts"] = attempts
    report.figures[f"{placement}_jobs_done"] = done


async def run(num_qubits: int, layers: int, jobs: int, placements: Sequence[str]) -> Report:
    report = Report(
        "long_jobs",
        title=f"Broker List latency (ms), idle vs {jobs} x {num_qubits}-qubit jobs simulating",
        parameters={
            "num_qubits": num_qubits,
            "layers": layers,
            "jobs": jobs,
            "executors": 2,
            "slots_per_executor": 1,
            "idle_list_calls": IDLE_CALLS,
            "job": f"Sampler, {num_qubits} qubits x {layers} layers of rx + cx, 100 shots, aer",
            "placements": list(placements),
        },
    )
    spec = long_spec(num_qubits, layers)
    for placement in placements:
        await measure(report, placement, spec, jobs)
    return report


def _plot(report: Report) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        labels = [f"{r['placement']}\n{r['phase']}" for r in report.rows]
        for key, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
            ax.scatter(labels, [r[key] for r in report.rows], marker=marker, label=key)
        ax.set_ylabel("List latency (ms)")
        ax.set_yscale("log")
        ax.legend()

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("long_jobs", __doc__)
    parser.add_argument("--qubits", type=int, default=22)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2, help="jobs submitted (2 run at once)")
    parser.add_argument(
        "--placement", nargs="+", default=["deployed", "dev"], choices=["deployed", "dev"]
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.qubits, args.layers = 20, 4
    report = anyio.run(run, args.qubits, args.layers, args.jobs, args.placement)
    report.out_dir = args.results_dir
    report.finish(
        _plot(report),
        columns=[
            "placement",
            "phase",
            "n",
            "p50",
            "p95",
            "p99",
            "max",
            "jobs_done",
            "max_attempts",
            "wall_s",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
