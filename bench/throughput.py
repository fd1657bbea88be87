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

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from bench._report import Report, arg_parser, ratio, summarize
from bench.dispatch import tiny_spec
from qrelay.testing import free_port

#: Seed of the open-loop arrival process.
SEED = 11
#: Deadline for a process to come up (health SERVING, executor online).
_START_TIMEOUT_S = 60.0
#: Deadline for one job in the load phases.
_JOB_TIMEOUT_S = 120.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by the broker, the executors and this client over one measurement, in cores."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs

    def sample(self) -> dict[str, float]:
        broker = self.procs.broker
        assert broker is not None
        executors = [p for p in self.procs.procs if p is not broker and p.poll() is None]
        return {
            "broker": cpu_seconds(broker.pid),
            "executors": sum(cpu_seconds(p.pid) for p in executors),
            "client": cpu_seconds(os.getpid()),
            "t": time.perf_counter(),
        }

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        dt = after["t"] - before["t"]
        return {f"cpu_{k}": (after[k] - before[k]) / dt for k in ("broker", "executors", "client")}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Processes:
    """A broker process and executor processes on loopback; all stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self.address = ""

    def _spawn(self, args: Sequence[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / log_name).open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "qrelay", "--log-level", "warning", "--log-json", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )
        log.close()
        self.procs.append(proc)
        return proc

    async def start_broker(self, max_queued: int) -> str:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.broker = self._spawn(
            [
                "broker",
                "serve",
                "--listen",
                self.address,
                "--db",
                str(self.workdir / "broker.db"),
                "--max-queued-per-tenant",
                str(max_queued),
            ],
            "broker.log",
        )
        await self._wait_serving()
        return self.address

    async def _wait_serving(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with anyio.fail_after(_START_TIMEOUT_S):
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    self._check_alive()
                    try:
                        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.RpcError:
                        pass
                    await anyio.sleep(0.1)

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                logs = "\n".join(p.read_text()[-2000:] for p in self.workdir.glob("*.log"))
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{logs}")

    async def add_executor(
        self, service: Any, backend: str, slots: int, expect_online: int
    ) -> subprocess.Popen[bytes]:
        proc = self._spawn(
            [
                "executor",
                "serve",
                "--broker",
                self.address,
                "--backend",
                backend,
                "--slots",
                str(slots),
            ],
            f"executor-{len(self.procs)}.log",
        )
        await self.wait_online(service, backend, expect_online)
        return proc

    async def wait_online(self, service: Any, backend: str, executors: int) -> None:
        from qrelay._proto.v1 import backends_pb2
        from qrelay.errors import NotFound

        conn = service.connection
        with anyio.fail_after(_START_TIMEOUT_S):
            while True:
                self._check_alive()
                try:
                    b = await conn.unary(
                        conn.backends.Get, backends_pb2.GetBackendRequest(name=backend)
                    )
                    if b.online_executors == executors:
                        return
                except NotFound:
                    pass
                await anyio.sleep(0.1)

    async def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                await anyio.to_thread.run_sync(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                await anyio.to_thread.run_sync(proc.wait, 10)
        if proc in self.procs:
            self.procs.remove(proc)

    async def stop_all(self) -> None:
        with anyio.CancelScope(shield=True):
            for proc in reversed(list(self.procs)):
                await self.stop(proc)


@asynccontextmanager
async def processes() -> AsyncIterator[Processes]:
    with tempfile.TemporaryDirectory(prefix="qrelay-bench-") as tmp:
        procs = Processes(Path(tmp))
        try:
            yield procs
        finally:
            await procs.stop_all()


#: How a client job is sent: "run" (JobService.Run: one call, what the SDK's
#: primitives use) or "submit" (Submit then Watch: two calls).
CLIENT_RPC = "run"


async def one_job(service: Any, spec: Any) -> float:
    start = time.perf_counter()
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
        async with AsyncQRelayService(address) as service:
            best: dict[int, float] = {}
            for executors in (1, 2):
                await procs.add_executor(service, "aer", slots, expect_online=executors)
                await closed_loop(service, spec, max(concurrencies), min(2.0, duration_s))
                for c in concurrencies:
                    progress(f"closed loop, {executors} executor(s), {c} clients")
                    before = meter.sample()
                    rate, lat = await closed_loop(service, spec, c, duration_s)
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
            top = best[2]
            for frac in (0.25, 0.5, 0.75):
                progress(f"open loop at {frac:.0%} of {top:.0f} jobs/s")
                before = meter.sample()
                rate, lat = await open_loop(service, spec, frac * top, duration_s, SEED)
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
            "client_rpc": CLIENT_RPC,
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
        help="client path per job: Run (one call, as the primitives) or Submit + Watch",
    )
    args = parser.parse_args(argv)
    global CLIENT_RPC
    CLIENT_RPC = args.rpc
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
