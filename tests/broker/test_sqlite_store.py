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
