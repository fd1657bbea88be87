"""A v4 store (before identity) migrates in place to the current schema, on both stores.

The identity part of the store contract is in test_store_contract.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg

from qrelay.broker.store import JobKind, JobStore, NewJob
from qrelay.broker.store.base import Role, TenantRecord, TokenRecord
from qrelay.broker.store.postgres import PostgresJobStore
from qrelay.broker.store.schema import SCHEMA_VERSION
from qrelay.broker.store.sqlite import SQLiteJobStore
from tests.broker import downgrade
from tests.broker.conftest import postgres_schema


def job(tenant: str) -> NewJob:
    return NewJob(tenant=tenant, backend="aer", kind=JobKind.SAMPLER, spec=b"s", num_pubs=1)


def token(n: int) -> TokenRecord:
    return TokenRecord(
        id=f"tok-{n}",
        prefix=f"qrl_pref{n:04d}",
        role=Role.USER,
        tenant="alice",
        executor_tenants=None,
        label="",
        created_at=1000.0 + n,
        expires_at=None,
        revoked_at=None,
        digest=bytes([n]) * 32,
    )


async def _v4_sqlite(path: Path) -> None:
    store = SQLiteJobStore(path)
    await store.open()
    await store.submit(job("alice"), max_queued_per_tenant=10)
    await store.close()
    with sqlite3.connect(path) as conn:  # back to version 4 with that job
        downgrade.sqlite_to(conn, 4)


async def test_sqlite_v4_store_migrates_to_v5_in_place(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    await _v4_sqlite(path)
    upgraded = SQLiteJobStore(path)
    await upgraded.open()
    try:
        await _check_upgraded(upgraded)
    finally:
        await upgraded.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_postgres_v4_store_migrates_to_v5_in_place() -> None:
    async with postgres_schema() as (dsn, schema):
        store = PostgresJobStore(dsn, schema=schema)
        await store.open()
        await store.submit(job("alice"), max_queued_per_tenant=10)
        await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            await downgrade.postgres_to(conn, schema, 4)
        finally:
            await conn.close()
        upgraded = PostgresJobStore(dsn, schema=schema)
        await upgraded.open()
        try:
            await _check_upgraded(upgraded)
        finally:
            await upgraded.close()


async def _check_upgraded(store: JobStore) -> None:
    page = await store.list_jobs("alice")
    assert len(page.jobs) == 1, "the job from before the migration is still there"
    await store.create_tenant(TenantRecord("alice", "", 1.0))
    await store.create_token(token(1))
    assert (await store.find_token("qrl_pref0001")) is not None
