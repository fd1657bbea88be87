"""Sustained jobs/s with 1 and 2 executors, latency under load, and a deep queue.

The broker and executors run as separate processes (as deployed) on
loopback; this process is the client. (1) Closed loop: C concurrent clients
each submit a tiny job and wait for its result, for a fixed time, at
several C; the best rate is the maximum. (2) Open loop at 25/50/75 % of the
maximum rate (Poisson arrivals, seeded): latency percentiles. (3) A broker
with no executor for the backend: its RSS and the submit latency with 1k,
10k and 100k jobs queued.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import numpy as np

from bench._procs import JOB_TIMEOUT_S, CpuMeter, RawClient, processes, rss_bytes
from bench._report import Report, arg_parser, ratio, summarize
from bench.dispatch import tiny_spec

#: Seed of the open-loop arrival process.
SEED = 11
#: Deadline for one job in the load phases.
_JOB_TIMEOUT_S = JOB_TIMEOUT_S


#: How a client job is sent: "run" (JobService.Run: one call, what the SDK's
#: primitives use) or "submit" (Submit then Watch: two calls).
CLIENT_RPC = "run"
#: The load generator: "stream" (generated stubs, every job on one
#: JobService.RunStream), "run" (generated stubs, one JobService.Run call per
#: job) -- both read events but never decode results, so the client takes as
#: little as it can of the two cores it shares with qrelay -- or "sdk"
#: (AsyncQRelayService, decoding every result as a user's program would).
CLIENT = "stream"


async def one_job(service: Any, spec: Any) -> float:
    start = time.perf_counter()
    if isinstance(service, RawClient):
        await service.run(spec)
    else:
        if CLIENT_RPC == "run":
            job = await service.submit_and_follow(spec)
        else:
            job = await service.submit(spec)
        await job.result(timeout=_JOB_TIMEOUT_S)
    return time.perf_counter() - start


async def closed_loop(
    service: Any, spec: Any, concurrency: int, duration_s: float
) -> tuple[float, list[float]]:
    """C workers each looping submit->result until the deadline; (jobs/s, latencies)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            latencies.append(await one_job(service, spec))

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return len(latencies) / (time.perf_counter() - start), latencies


async def open_loop(
    service: Any, spec: Any, rate: float, duration_s: float, seed: int
) -> tuple[float, list[float]]:
    """Poisson arrivals at `rate` jobs/s for `duration_s`; (achieved completions/s, latencies)."""
    rng = np.random.default_rng(seed)
    latencies: list[float] = []

    async def job() -> None:
        latencies.append(await one_job(service, spec))

    start = time.perf_counter()
    t0 = anyio.current_time()
    due = t0
    async with anyio.create_task_group() as tg:
        while due < t0 + duration_s:
            await anyio.sleep_until(due)
            tg.start_soon(job)
            due += float(rng.exponential(1.0 / rate))
    return len(latencies) / (time.perf_counter() - start), latencies


async def load_phases(
    report: Report, concurrencies: Sequence[int], duration_s: float, slots: int
) -> None:
    from qrelay.client import AsyncQRelayService

    spec = tiny_spec()
    async with processes() as procs:
        address = await procs.start_broker(max_queued=1_000_000)
        meter = CpuMeter(procs)
        async with (
            AsyncQRelayService(address) as service,
            RawClient(address, rpc="run" if CLIENT == "run" else "stream") as raw,
        ):
            load: Any = service if CLIENT == "sdk" else raw
            best: dict[int, float] = {}
            for executors in (1, 2):
                await procs.add_executor(service, "aer", slots, expect_online=executors)
                await closed_loop(load, spec, max(concurrencies), min(2.0, duration_s))
                for c in concurrencies:
                    progress(f"closed loop, {executors} executor(s), {c} clients")
                    before = meter.sample()
                    rate, lat = await closed_loop(load, spec, c, duration_s)
                    cpu = CpuMeter.cores(before, meter.sample())
                    stats = summarize(lat, 1e3)
                    report.add_row(
                        phase="closed loop",
                        executors=executors,
                        concurrency=c,
                        offered="",
                        jobs_per_s=rate,
                        broker_cpu_ms_per_job=1e3 * cpu["cpu_broker"] / rate if rate else None,
                        executor_cpu_ms_per_job=(
                            1e3 * cpu["cpu_executors"] / rate if rate else None
                        ),
                        n=stats["n"],
                        p50=stats["p50"],
                        p95=stats["p95"],
                        p99=stats["p99"],
                        **cpu,
                    )
                    best[executors] = max(best.get(executors, 0.0), rate)
                report.figures[f"max_jobs_per_s_{executors}_executor"] = best[executors]
            report.figures["scaling_2_over_1_executor"] = ratio(best[2], best[1])
            if CLIENT != "sdk":
                best_c = max(
                    (r for r in report.rows if r["phase"] == "closed loop" and r["executors"] == 2),
                    key=lambda r: r["jobs_per_s"],
                )["concurrency"]
                await compare_rpcs(report, address, raw, spec, best_c, duration_s, meter)
            top = best[2]
            for frac in (0.25, 0.5, 0.75):
                progress(f"open loop at {frac:.0%} of {top:.0f} jobs/s")
                before = meter.sample()
                rate, lat = await open_loop(load, spec, frac * top, duration_s, SEED)
                cpu = CpuMeter.cores(before, meter.sample())
                stats = summarize(lat, 1e3)
                report.add_row(
                    phase="open loop",
                    executors=2,
                    concurrency=None,
                    offered=f"{frac:.0%} of max",
                    jobs_per_s=rate,
                    broker_cpu_ms_per_job=1e3 * cpu["cpu_broker"] / rate if rate else None,
                    executor_cpu_ms_per_job=1e3 * cpu["cpu_executors"] / rate if rate else None,
                    n=stats["n"],
                    p50=stats["p50"],
                    p95=stats["p95"],
                    p99=stats["p99"],
                    **cpu,
                )
                if frac == 0.5:
                    report.figures["p99_ms_at_half_max_rate"] = stats["p99"]


async def compare_rpcs(
    report: Report,
    address: str,
    stream: RawClient,
    spec: Any,
    concurrency: int,
    duration_s: float,
    meter: CpuMeter,
    rounds: int = 3,
) -> None:
    """The same closed loop with one RunStream vs one Run call per job, in alternating
    rounds (so both see the same machine noise); medians of the rounds."""
    rates: dict[str, list[float]] = {"run_stream": [], "run": []}
    broker_ms: dict[str, list[float]] = {"run_stream": [], "run": []}
    async with RawClient(address, rpc="run") as per_call:
        for i in range(rounds):
            for name, client in (("run_stream", stream), ("run", per_call)):
                progress(f"RunStream vs Run, round {i + 1}/{rounds}: {name}")
                before = meter.sample()
                rate, _ = await closed_loop(client, spec, concurrency, duration_s)
                cpu = CpuMeter.cores(before, meter.sample())
                rates[name].append(rate)
                broker_ms[name].append(1e3 * cpu["cpu_broker"] / rate if rate else float("nan"))
    for name in rates:
        report.add_row(
            phase=f"closed loop, {name}",
            executors=2,
            concurrency=concurrency,
            offered=f"median of {rounds}",
            jobs_per_s=float(np.median(rates[name])),
            broker_cpu_ms_per_job=float(np.median(broker_ms[name])),
        )
    report.figures["run_stream_over_run_jobs_per_s"] = ratio(
        float(np.median(rates["run_stream"])), float(np.median(rates["run"]))
    )


def progress(text: str) -> None:
    """One line on stderr so a long phase shows it is alive."""
    print(f"  [throughput] {text}", file=sys.stderr, flush=True)


async def fill(service: Any, spec: Any, count: int, deadline: float, concurrency: int = 32) -> int:
    """Submit up to `count` jobs with parallel submitters until `deadline`; how many went in."""
    left = count
    done = 0
    last_report = time.perf_counter()

    async def worker() -> None:
        nonlocal left, done, last_report
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            await service.submit(spec)
            done += 1
            if time.perf_counter() - last_report > 10:
                last_report = time.perf_counter()
                progress(f"queued {done}/{count} more")

    async with anyio.create_task_group() as tg:
        for _ in range(min(concurrency, count)):
            tg.start_soon(worker)
    return done


async def queue_phase(report: Report, levels: Sequence[int], probes: int, budget_s: float) -> None:
    """Queue jobs for a backend whose executor has left; RSS and submit latency per level.

    Filling stops at `budget_s` seconds in all: the last row then says which
    depth was reached instead of the level asked for.
    """
    from qrelay.client import AsyncQRelayService

    backend = "fake_athens"
    spec = tiny_spec()
    spec.backend = backend
    async with processes() as procs:
        address = await procs.start_broker(max_queued=max(levels) + probes * len(levels) + 10)
        assert procs.broker is not None
        pid = procs.broker.pid
        async with AsyncQRelayService(address) as service:
            executor = await procs.add_executor(service, backend, 1, expect_online=1)
            await procs.stop(executor)  # the backend stays known; nothing takes its jobs
            await procs.wait_online(service, backend, 0)
            report.figures["broker_rss_mb_idle"] = rss_bytes(pid) / 2**20
            deadline = time.perf_counter() + budget_s
            queued = 0
            p50s: dict[int, float] = {}
            for level in levels:
                progress(f"filling the queue to {level}")
                start = time.perf_counter()
                added = await fill(service, spec, level - queued, deadline)
                fill_rate = added / (time.perf_counter() - start)
                queued += added
                lat = []
                for _ in range(probes):
                    t = time.perf_counter()
                    await service.submit(spec)
                    lat.append(time.perf_counter() - t)
                stats = summarize(lat, 1e3)
                rss = rss_bytes(pid) / 2**20
                reached = queued >= level
                report.add_row(
                    phase="queue depth",
                    target_queued=level,
                    queued=queued,
                    status="ok" if reached else f"fill budget {budget_s:g} s ran out",
                    broker_rss_mb=rss,
                    fill_submits_per_s=fill_rate,
                    n=stats["n"],
                    p50=stats["p50"],
                    p95=stats["p95"],
                    p99=stats["p99"],
                )
                queued += probes
                p50s[queued - probes] = stats["p50"]
                report.figures[f"broker_rss_mb_at_{queued - probes}"] = rss
                if not reached:
                    report.note(
                        f"queue depth {level} not reached: {queued - probes} jobs queued within "
                        f"the {budget_s:g} s fill budget ({fill_rate:.0f} submits/s at the end)"
                    )
                    break
            lo, hi = min(p50s), max(p50s)
            report.figures[f"submit_p50_{hi}_over_{lo}"] = ratio(p50s[hi], p50s[lo])


async def run(
    concurrencies: Sequence[int],
    duration_s: float,
    slots: int,
    levels: Sequence[int],
    probes: int,
    budget_s: float,
    queue_only: bool = False,
    load_only: bool = False,
) -> Report:
    report = Report(
        "throughput",
        title="Sustained throughput, latency under load and a deep queue (latencies in ms)",
        parameters={
            "concurrencies": list(concurrencies),
            "duration_s": duration_s,
            "executor_slots": slots,
            "queue_levels": list(levels),
            "submit_probes_per_level": probes,
            "queue_fill_budget_s": budget_s,
            "job": "Sampler, 1 qubit, 1 shot, backend aer",
            "placement": "broker and executors as processes on loopback, one client process",
            "store": "SQLite (WAL)",
            "client": CLIENT,
            "client_rpc": {"sdk": CLIENT_RPC, "run": "run", "stream": "run_stream"}[CLIENT],
            "seed": SEED,
            "targets": {
                "jobs_per_s": 500,
                "p99_ms_at_half_rate": 100,
                "rss_mb_at_100k": 250,
                "submit_ratio_100k_over_1k": 1.5,
            },
        },
    )
    if not queue_only:
        await load_phases(report, concurrencies, duration_s, slots)
    if not load_only:
        await queue_phase(report, levels, probes, budget_s)
    return report


def _plot(report: Report) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for ex in (1, 2):
            rows = [r for r in report.rows if r["phase"] == "closed loop" and r["executors"] == ex]
            ax1.plot(
                [r["concurrency"] for r in rows],
                [r["jobs_per_s"] for r in rows],
                "o-",
                label=f"{ex} executor(s)",
            )
        ax1.set_xscale("log", base=2)
        ax1.set_xlabel("concurrent clients")
        ax1.set_ylabel("jobs/s")
        ax1.legend()
        rows = [r for r in report.rows if r["phase"] == "queue depth"]
        ax2.plot(
            [r["queued"] for r in rows], [r["broker_rss_mb"] for r in rows], "o-", label="RSS MB"
        )
        ax2.plot([r["queued"] for r in rows], [r["p50"] for r in rows], "s-", label="submit p50 ms")
        ax2.set_xscale("log")
        ax2.set_xlabel("jobs queued")
        ax2.legend()

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("throughput", __doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration-s", type=float, default=3.0, help="per load point")
    parser.add_argument("--slots", type=int, default=4, help="slots per executor")
    parser.add_argument("--queue-levels", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--probes", type=int, default=200, help="timed submits per queue level")
    parser.add_argument(
        "--fill-budget-s", type=float, default=600.0, help="time allowed for filling the queue"
    )
    parser.add_argument(
        "--queue-only", action="store_true", help="skip the load phases (deep-queue phase only)"
    )
    parser.add_argument(
        "--load-only", action="store_true", help="skip the deep-queue phase (load phases only)"
    )
    parser.add_argument(
        "--rpc",
        choices=["run", "submit"],
        default="run",
        help="SDK client path per job: Run (one call, as the primitives) or Submit + Watch",
    )
    parser.add_argument(
        "--client",
        choices=["stream", "run", "sdk"],
        default="stream",
        help=(
            "load generator: raw stubs on one RunStream (the default) or one Run per job, "
            "or the SDK (decodes each result)"
        ),
    )
    args = parser.parse_args(argv)
    global CLIENT_RPC, CLIENT
    CLIENT_RPC, CLIENT = args.rpc, args.client
    if args.tiny:
        args.concurrency, args.duration_s = [1, 4], 0.5
        args.queue_levels, args.probes = [20, 60], 5
    report = anyio.run(
        run,
        args.concurrency,
        args.duration_s,
        args.slots,
        args.queue_levels,
        args.probes,
        args.fill_budget_s,
        args.queue_only,
        args.load_only,
    )
    report.out_dir = args.results_dir
    report.finish(
        _plot(report),
        columns=[
            "phase",
            "executors",
            "concurrency",
            "offered",
            "target_queued",
            "queued",
            "status",
            "jobs_per_s",
            "broker_cpu_ms_per_job",
            "executor_cpu_ms_per_job",
            "fill_submits_per_s",
            "broker_rss_mb",
            "n",
            "p50",
            "p95",
            "p99",
            "cpu_broker",
            "cpu_executors",
            "cpu_client",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
