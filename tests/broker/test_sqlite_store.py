"""SQLite-specific guarantees: file layout, schema version, durability across kill -9."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio.to_thread
import pytest

from qrelay.broker.store import JobState
from qrelay.broker.store.sqlite import SCHEMA_VERSION, SQLiteJobStore


async def test_creates_file_with_parents_wal_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "broker.db"
    store = SQLiteJobStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = SQLiteJobStore(path)  # re-opening an existing store migrates nothing
    await again.open()
    await again.close()


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SQLiteJobStore(path)
    with pytest.raises(RuntimeError, match="upgrade qrelay"):
        await store.open()
    await store.close()


async def test_upgrade_to_v3_counts_the_jobs_already_queued(tmp_path: Path) -> None:
    from qrelay.broker.store import JobKind, NewJob

    path = tmp_path / "broker.db"
    store = SQLiteJobStore(path)
    await store.open()
    for tenant, backend in [("t", "aer"), ("t", "aer"), ("u", "fake")]:
        await store.submit(
            NewJob(tenant=tenant, backend=backend, kind=JobKind.SAMPLER, spec=b"s", num_pubs=1),
            max_queued_per_tenant=10,
        )
    await store.close()
    with sqlite3.connect(path) as conn:  # back to a version-2 database with those jobs
        conn.execute("DROP TABLE users")  # version 8: users (api_tokens goes below)
        conn.execute("DROP TABLE job_tags")  # version 7: tag index, deleted jobs
        conn.execute("DROP TABLE deleted_jobs")
        conn.execute("DROP INDEX jobs_tenant_order")  # version 6: quotas, usage, priorities
        conn.execute("CREATE INDEX jobs_tenant_queued ON jobs (tenant) WHERE state = 1")
        conn.execute("DROP INDEX sessions_tenant")
        conn.execute("ALTER TABLE jobs DROP COLUMN priority")
        conn.execute("ALTER TABLE jobs DROP COLUMN usage_s")
        conn.execute("DROP TABLE tenant_usage")
        for table in ("tenants", "api_tokens", "backend_access"):  # version 5: identity
            conn.execute(f"DROP TABLE {table}")
        conn.execute("DROP INDEX jobs_fair")  # version 4: fair share
        conn.execute("ALTER TABLE jobs DROP COLUMN vt")
        conn.execute("DROP TABLE fair_share")
        conn.execute("DROP TABLE fair_clock")
        for trigger in ("insert", "leave", "enter", "delete"):
            conn.execute(f"DROP TRIGGER jobs_queued_{trigger}")
        conn.execute("DROP TABLE queued_counts")
        conn.execute("PRAGMA user_version = 2")
    upgraded = SQLiteJobStore(path)
    await upgraded.open()
    try:
        assert await upgraded.queue_lengths() == {"aer": 2, "fake": 1}
        job, _ = await upgraded.submit(
            NewJob(tenant="t", backend="aer", kind=JobKind.SAMPLER, spec=b"s", num_pubs=1),
            max_queued_per_tenant=10,
        )
        assert job.queue_position == 3
    finally:
        await upgraded.close()


CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from qrelay.broker.store import JobKind, NewJob
    from qrelay.broker.store.sqlite import SQLiteJobStore

    async def main():
        store = SQLiteJobStore(Path(sys.argv[1]))
        await store.open()
        for i in range(20):
            job, _ = await store.submit(
                NewJob(tenant="t", backend="aer", kind=JobKind.SAMPLER, spec=b"s", num_pubs=1,
                       idempotency_key=f"k{i}"),
                max_queued_per_tenant=100,
            )
            print("ACK", job.id, flush=True)  # acknowledged only after the commit returned
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def run_child_until_acknowledged_then_kill9(path: Path, count: int) -> list[str]:
    """Start the child, collect `count` acknowledged ids, then SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < count:
            line = child.stdout.readline()
            assert line, "child exited early"
            if line.startswith("ACK "):
                acknowledged.append(line.split()[1])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    return acknowledged


async def test_acknowledged_submits_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    acknowledged = await anyio.to_thread.run_sync(run_child_until_acknowledged_then_kill9, path, 20)
    store = SQLiteJobStore(path)
    await store.open()
    try:
        for job_id in acknowledged:
            job = await store.get(job_id)
            assert job.state is JobState.QUEUED
            assert job.last_seq == 1
    finally:
        await store.close()


async def test_a_tenants_positions_and_estimates_never_scan_other_tenants_queues(
    tmp_path: Path,
) -> None:
    """Every statement behind B's submit, get, list and queue lengths (and a
    claim's running-quota and priority look-ups) searches an index: none scans
    the jobs table, so A's 2,000 queued jobs cost B nothing."""
    from qrelay.broker.store import JobKind, NewJob
    from qrelay.broker.store.base import RunningLimits

    store = SQLiteJobStore(tmp_path / "broker.db")
    await store.open()
    try:

        def job(tenant: str) -> NewJob:
            return NewJob(tenant=tenant, backend="aer", kind=JobKind.SAMPLER, spec=b"s", num_pubs=1)

        for _ in range(2000):
            await store.submit(job("a"), max_queued_per_tenant=10_000)
        statements: list[str] = []

        def trace(conn: sqlite3.Connection | None) -> None:
            assert conn is not None
            conn.set_trace_callback(statements.append)

        await store._writer.submit(trace, transactional=False)
        b_job, _ = await store.submit(job("b"), max_queued_per_tenant=10_000)
        await store.get(b_job.id, "b")
        await store.list_jobs("b")
        await store.queue_estimates("b")
        await store.claim(["aer"], "e-1", 30.0, 1, running=RunningLimits(default=5))
        await store.tenant_usage("b", "2000-01-01")

        def plans(conn: sqlite3.Connection | None) -> list[tuple[str, str]]:
            assert conn is not None
            conn.set_trace_callback(None)
            found = []
            for sql in statements:
                if sql.lstrip().upper().startswith("SELECT") and " jobs" in sql:
                    for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall():
                        found.append((sql, row[3]))
            return found

        found = await store._writer.submit(plans, transactional=False)
        assert found, "no statement was traced"
        # (Walking the partial index of RUNNING jobs is fine: as many as busy slots.)
        scans = [
            (sql, detail)
            for sql, detail in found
            if detail.split()[:2] in (["SCAN", "jobs"], ["SCAN", "j"], ["SCAN", "q"])
            and "jobs_lease_expiry" not in detail
        ]
        assert scans == []
        details = " ".join(detail for _, detail in found)
        assert "jobs_tenant_order" in details
    finally:
        await store.close()
