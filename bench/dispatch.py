"""Submit-to-result latency of a tiny job (1 qubit, 1 shot) beside a raw gRPC echo.

A broker and one Aer executor run as separate processes on loopback (as
deployed; `--in-process` puts them in this process, sharing its GIL); one
SDK client runs a job (submit_and_follow, on the SDK's RunStream, as the
primitives do), waits for its result, and repeats. The raw grpc.aio echo
round trip is measured in the same run, interleaved in blocks with the jobs
so both see the same machine noise; the ratios of percentiles are the
figures that matter. With `--rtt-ms` both go through the WAN proxy.

The floor printed beside them is what any broker with a separate executor
must pay: two echo round trips (client<->broker, broker<->executor) plus
the executor's own work on the job (the primitive pipeline, timed in this
process).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio

from bench._procs import processes
from bench._report import Report, arg_parser, median, ratio, summarize
from bench.echo import measure_rtt, running_echo_server
from bench.wanproxy import WanProxy

#: Blocks the measurement is split into (echo block, job block, echo block, ...).
BLOCKS = 10


def tiny_spec() -> Any:
    """A 1-qubit, 1-shot Sampler job for the "aer" backend."""
    from qiskit import QuantumCircuit

    from qrelay import codec
    from qrelay._proto.v1 import types_pb2

    qc = QuantumCircuit(1)
    qc.x(0)
    qc.measure_all()
    return types_pb2.JobSpec(backend="aer", sampler=codec.encode_sampler_task([qc], 1))


async def measure_jobs(service: Any, spec: Any, n: int) -> tuple[list[float], list[Any]]:
    """`n` sequential run -> result round trips; returns (seconds each, jobs)."""
    times: list[float] = []
    jobs: list[Any] = []
    for _ in range(n):
        start = time.perf_counter()
        job = await service.submit_and_follow(spec)
        result = await job.result(timeout=60)
        times.append(time.perf_counter() - start)
        if result[0].data.meas.num_shots != 1:
            raise RuntimeError("tiny job returned the wrong number of shots")
        jobs.append(job)
    return times, jobs


async def broker_side(jobs: Sequence[Any]) -> dict[str, float]:
    """Medians of the broker's own timestamps: queued->running and running->finished (ms)."""
    waits, runs = [], []
    for job in jobs:
        ts = (await job.metrics())["timestamps"]
        if ts["created"] and ts["running"] and ts["finished"]:
            waits.append((ts["running"] - ts["created"]).total_seconds())
            runs.append((ts["finished"] - ts["running"]).total_seconds())
    return {
        "broker_queued_to_running_p50_ms": median(waits) * 1e3,
        "broker_running_to_finished_p50_ms": median(runs) * 1e3,
    }


def pipeline_seconds(spec: Any, n: int) -> list[float]:
    """The executor's own work on the job: its primitive pipeline, in this process."""
    from qrelay.executor.backends import load_backend
    from qrelay.executor.pipeline import PrimitivePipeline
    from qrelay.executor.transpile import TranspileCache

    pipeline = PrimitivePipeline(load_backend("aer"), TranspileCache(8))
    pipeline.run(spec)  # transpile once, as the executor's cache does
    out = []
    for _ in range(n):
        start = time.perf_counter()
        pipeline.run(spec)
        out.append(time.perf_counter() - start)
    return out


@asynccontextmanager
async def broker_and_executor(in_process: bool) -> AsyncIterator[str]:
    """A broker with one Aer executor; yields the broker's address."""
    if in_process:
        from qrelay.testing import local_stack

        async with local_stack(backends=("aer",), executors=1) as env:
            yield env.address
        return
    from qrelay.client import AsyncQRelayService

    async with processes() as procs:
        address = await procs.start_broker(max_queued=100_000)
        async with AsyncQRelayService(address) as control:
            await procs.add_executor(control, "aer", slots=1, expect_online=1)
        yield address


async def measure_at(
    report: Report, rtt_ms: float, jobs: int, warmup: int, in_process: bool
) -> None:
    from qrelay.client import AsyncQRelayService

    spec = tiny_spec()
    per_block = max(1, jobs // BLOCKS)
    pipe = summarize(pipeline_seconds(spec, max(50, jobs // 4)), 1e3)
    async with broker_and_executor(in_process) as address, running_echo_server() as echo:
        host, port = address.rsplit(":", 1)
        ehost, eport = echo.rsplit(":", 1)
        delay = rtt_ms / 2e3
        async with (
            WanProxy((host, int(port)), one_way_delay_s=delay) as broker_proxy,
            WanProxy((ehost, int(eport)), one_way_delay_s=delay) as echo_proxy,
        ):
            broker_addr = broker_proxy.address if rtt_ms > 0 else address
            echo_addr = echo_proxy.address if rtt_ms > 0 else echo
            async with AsyncQRelayService(broker_addr) as service:
                await measure_jobs(service, spec, warmup)
                echo_times: list[float] = []
                job_times: list[float] = []
                sample_jobs: list[Any] = []
                for _ in range(BLOCKS):
                    echo_times += await measure_rtt(echo_addr, per_block, warmup=2)
                    t, js = await measure_jobs(service, spec, per_block)
                    job_times += t
                    sample_jobs += js[-10:]
                side = await broker_side(sample_jobs)
    e = summarize(echo_times, 1e3)
    d = summarize(job_times, 1e3)
    floor = 2 * e["p50"] + pipe["p50"]
    report.add_row(rtt_ms=rtt_ms, what="grpc echo", **e)
    report.add_row(rtt_ms=rtt_ms, what="executor pipeline alone", **pipe)
    report.add_row(rtt_ms=rtt_ms, what="floor: 2 echo + pipeline (p50)", p50=floor)
    report.add_row(rtt_ms=rtt_ms, what="tiny job run->result", **d, **side)
    suffix = "" if rtt_ms == 0 else f"@{rtt_ms:g}ms"
    report.figures[f"floor_p50_over_echo_p50{suffix}"] = ratio(floor, e["p50"])
    report.figures[f"dispatch_p50_over_floor{suffix}"] = ratio(d["p50"], floor)
    report.figures[f"dispatch_p50_over_echo_p50{suffix}"] = ratio(d["p50"], e["p50"])
    report.figures[f"dispatch_p99_over_echo_p50{suffix}"] = ratio(d["p99"], e["p50"])
    report.figures[f"dispatch_p99_over_echo_p99{suffix}"] = ratio(d["p99"], e["p99"])


async def run(jobs: int, rtts_ms: Sequence[float], warmup: int, in_process: bool) -> Report:
    report = Report(
        "dispatch",
        title=f"Tiny job submit->result vs raw gRPC echo, {jobs} jobs (ms)",
        parameters={
            "jobs": jobs,
            "rtts_ms": list(rtts_ms),
            "warmup_jobs": warmup,
            "blocks": BLOCKS,
            "job": "Sampler, 1 qubit (x, measure), 1 shot, backend aer",
            "placement": (
                "broker, executor and client in one process on loopback"
                if in_process
                else "broker and executor as processes on loopback, SDK client in this one"
            ),
            "client_rpc": "SDK submit_and_follow (JobService.RunStream)",
            "targets": {"p50_over_echo": 3.0, "p99_over_echo": 10.0},
        },
    )
    for rtt in rtts_ms:
        await measure_at(report, rtt, jobs, warmup, in_process)
    p50 = report.figures.get("dispatch_p50_over_echo_p50")
    p99 = report.figures.get("dispatch_p99_over_echo_p50")
    if p50 is not None and p99 is not None:
        report.figures["target_p50_le_3x_echo_met"] = bool(p50 <= 3.0)
        report.figures["target_p99_le_10x_echo_met"] = bool(p99 <= 10.0)
    return report


def _plot(report: Report) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        labels = [f"{r['what']}\n{r['rtt_ms']:g} ms RTT" for r in report.rows]
        for key, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
            ys = [r.get(key, math.nan) for r in report.rows]
            ax.scatter(labels, ys, marker=marker, label=key)
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.legend()

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("dispatch", __doc__)
    parser.add_argument("--jobs", type=int, default=1000, help="timed jobs (and echo calls)")
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run broker and executor in this process instead of as separate processes",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.jobs, args.warmup = 20, 2
    report = anyio.run(run, args.jobs, args.rtt_ms, args.warmup, args.in_process)
    report.out_dir = args.results_dir
    report.finish(
        _plot(report),
        columns=[
            "rtt_ms",
            "what",
            "n",
            "p50",
            "p95",
            "p99",
            "max",
            "broker_queued_to_running_p50_ms",
            "broker_running_to_finished_p50_ms",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
