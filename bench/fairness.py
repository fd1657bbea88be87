"""Fair share: how many of tenant A's queued jobs run before tenant B's first one.

Tenant A queues a backlog (100 and 500 jobs by default); tenant B then
submits one job; then the executor (2 slots, real Aer) starts. A FIFO broker
would run A's whole backlog first; start-time fair queueing runs B's job
after at most one of A's per busy slot. Counts, not times: a job is "ahead"
when it started before B's did. Each store the run can reach is measured
(SQLite always; PostgreSQL with QRELAY_BENCH_POSTGRES_DSN or
QRELAY_TEST_POSTGRES_DSN).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import grpc

from bench._report import Report, arg_parser
from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.broker.server import running_broker
from qrelay.broker.settings import BrokerSettings
from qrelay.executor.agent import running_executor
from qrelay.executor.settings import ExecutorSettings

SLOTS = 2
BELL = (
    'OPENQASM 3.0;\ninclude "stdgates.inc";\n'
    "qubit[2] q;\nbit[2] c;\nh q[0];\ncx q[0], q[1];\nc = measure q;\n"
)
TOKENS = {"tok-a": "a", "tok-b": "b"}


def _auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _spec() -> types_pb2.JobSpec:
    spec = types_pb2.JobSpec(backend="aer")
    spec.sampler.shots = 10
    spec.sampler.pubs.add(circuit=types_pb2.Circuit(qasm3=BELL))
    return spec


def _executor(address: str) -> ExecutorSettings:
    return ExecutorSettings(broker=address, backends=["aer"], slots=SLOTS, programs=False)


async def _wait_done(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, token: str) -> jobs_pb2.Job:
    with anyio.fail_after(600):
        while True:
            job = await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), metadata=_auth(token))
            if job.state == types_pb2.JOB_STATE_DONE:
                return job
            await anyio.sleep(0.05)


async def _list_all(stub: jobs_pb2_grpc.JobServiceStub, token: str) -> list[jobs_pb2.Job]:
    found: list[jobs_pb2.Job] = []
    request = jobs_pb2.ListJobsRequest(page_size=1000)
    while True:
        page = await stub.List(request, metadata=_auth(token))
        found.extend(page.jobs)
        if not page.next_page_token:
            return found
        request.page_token = page.next_page_token


async def measure(store: str, settings: BrokerSettings, backlog: int) -> dict[str, Any]:
    """One run: A's backlog, B's one job, then the executor; counts A's jobs ahead of B's."""
    async with (
        running_broker(settings) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        async with running_executor(_executor(broker.address)):
            pass  # announce 'aer' once, then leave it offline while the queue fills
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        spec = _spec()
        for _ in range(backlog):
            await jobs.Submit(jobs_pb2.SubmitRequest(spec=spec), metadata=_auth("tok-a"))
        b_id = (await jobs.Submit(jobs_pb2.SubmitRequest(spec=spec), metadata=_auth("tok-b"))).id
        async with running_executor(_executor(broker.address)):
            b_job = await _wait_done(jobs, b_id, "tok-b")
        a_jobs = await _list_all(jobs, "tok-a")
    b_started = b_job.started_at.ToDatetime()
    started = [j for j in a_jobs if j.HasField("started_at") and j.started_at.seconds]
    ahead = sum(1 for j in started if j.started_at.ToDatetime() < b_started)
    return {
        "store": store,
        "a_backlog": backlog,
        "a_jobs_seen_by_a": len(a_jobs),
        "a_ahead_of_b": ahead,
        "fifo_would_be": backlog,
        "bound": SLOTS,
        "within_bound": ahead <= SLOTS,
    }


def _stores(tmp: Path) -> list[tuple[str, Callable[[], BrokerSettings]]]:
    common: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tokens": TOKENS,
        "max_queued_per_tenant": 10_000,
    }
    stores: list[tuple[str, Callable[[], BrokerSettings]]] = [
        (
            "sqlite",
            lambda: BrokerSettings(db_path=tmp / f"{uuid.uuid4().hex}.db", **common),
        )
    ]
    dsn = os.environ.get("QRELAY_BENCH_POSTGRES_DSN") or os.environ.get("QRELAY_TEST_POSTGRES_DSN")
    if dsn:
        # A fresh schema per run (dropped by `run`), so no other run's jobs share the queue.
        stores.append(
            (
                "postgres",
                lambda: BrokerSettings(
                    database_url=dsn, database_schema=f"bench_{uuid.uuid4().hex[:12]}", **common
                ),
            )
        )
    return stores


async def _drop_schema(settings: BrokerSettings) -> None:
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
    finally:
        await conn.close()


async def run(backlogs: Sequence[int]) -> Report:
    report = Report(
        "fairness",
        title="Tenant A's queued jobs that ran before tenant B's first job",
        parameters={
            "backlogs": list(backlogs),
            "slots": SLOTS,
            "job": "Sampler, Bell pair, 10 shots, aer",
            "weights": "1:1",
        },
    )
    with tempfile.TemporaryDirectory(prefix="qrelay-fair-") as tmp:
        for store, settings in _stores(Path(tmp)):
            for backlog in backlogs:
                made = settings()
                try:
                    report.add_row(**await measure(store, made, backlog))
                finally:
                    if made.database_url:
                        await _drop_schema(made)
    report.figures["worst_a_ahead_of_b"] = max(r["a_ahead_of_b"] for r in report.rows)
    report.figures["all_within_one_job_per_slot"] = all(r["within_bound"] for r in report.rows)
    return report


def _plot(report: Report) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        labels = [f"{r['store']}\n{r['a_backlog']} queued" for r in report.rows]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], [r["fifo_would_be"] for r in report.rows], 0.4, label="FIFO")
        ax.bar([i + 0.2 for i in x], [r["a_ahead_of_b"] for r in report.rows], 0.4, label="qrelay")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("A's jobs started before B's first")
        ax.set_yscale("symlog")
        ax.legend()

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("fairness", __doc__)
    parser.add_argument("--backlog", type=int, nargs="+", default=[100, 500])
    args = parser.parse_args(argv)
    if args.tiny:
        args.backlog = [20]
    report = anyio.run(run, args.backlog)
    report.out_dir = args.results_dir
    report.finish(
        _plot(report),
        columns=["store", "a_backlog", "a_ahead_of_b", "fifo_would_be", "bound", "within_bound"],
    )
    return 0 if report.figures["all_within_one_job_per_slot"] else 1
