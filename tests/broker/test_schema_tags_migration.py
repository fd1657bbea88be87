"""Schema 7 on a store that already holds jobs: their tags are indexed at open,
so ListJobs(tags=...) finds jobs submitted before the upgrade (both stores)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg

from qrelay.broker.store import JobKind, JobStore, NewJob
from qrelay.broker.store.postgres import PostgresJobStore
from qrelay.broker.store.sqlite import SQLiteJobStore
from tests.broker import downgrade
from tests.broker.conftest import postgres_schema


async def _tagged_jobs(store: JobStore) -> list[str]:
    ids = []
    for tags in ({"exp": "vqe", "run": "1"}, {"exp": "qaoa"}, {}):
        job, _ = await store.submit(
            NewJob(
                tenant="t", backend="aer", kind=JobKind.SAMPLER, spec=b"s", num_pubs=1, tags=tags
            ),
            max_queued_per_tenant=10,
        )
        ids.append(job.id)
    return ids


async def _assert_indexed(store: JobStore, ids: list[str]) -> None:
    assert [j.id for j in (await store.list_jobs("t", tags=["exp"])).jobs] == [ids[1], ids[0]]
    assert [j.id for j in (await store.list_jobs("t", tags=["run"])).jobs] == [ids[0]]
    assert (await store.list_jobs("other", tags=["exp"])).jobs == []


async def test_sqlite_upgrade_to_7_indexes_existing_tags(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    store = SQLiteJobStore(path)
    await store.open()
    ids = await _tagged_jobs(store)
    await store.close()
    with sqlite3.connect(path) as conn:  # back to version 6, jobs kept
        downgrade.sqlite_to(conn, 6)
    upgraded = SQLiteJobStore(path)
    await upgraded.open()
    try:
        await _assert_indexed(upgraded, ids)
    finally:
        await upgraded.close()


async def test_postgres_upgrade_to_7_indexes_existing_tags() -> None:
    async with postgres_schema() as (dsn, schema):
        store = PostgresJobStore(dsn, schema=schema)
        await store.open()
        ids = await _tagged_jobs(store)
        await store.close()
        conn = await asyncpg.connect(dsn)
        try:  # back to version 6, jobs kept
            await downgrade.postgres_to(conn, schema, 6)
        finally:
            await conn.close()
        upgraded = PostgresJobStore(dsn, schema=schema)
        await upgraded.open()
        try:
            await _assert_indexed(upgraded, ids)
        finally:
            await upgraded.close()
