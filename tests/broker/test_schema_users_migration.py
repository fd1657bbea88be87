"""Schema 8 (users) on a v7 store that already holds tokens, on both stores: the
tokens keep working with no user, and users and user tokens can be added."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import asyncpg

from qrelay.broker.store import JobStore
from qrelay.broker.store.base import Role, TenantRecord, TokenRecord, UserRecord
from qrelay.broker.store.postgres import PostgresJobStore
from qrelay.broker.store.schema import SCHEMA_VERSION
from qrelay.broker.store.sqlite import SQLiteJobStore
from tests.broker import downgrade
from tests.broker.conftest import postgres_schema


def token(n: int, role: Role = Role.USER, tenant: str = "lab") -> TokenRecord:
    return TokenRecord(
        id=f"tok-{n}",
        prefix=f"qrl_pref{n:04d}",
        role=role,
        tenant=tenant,
        executor_tenants=None,
        label=f"token {n}",
        created_at=1000.0 + n,
        expires_at=None,
        revoked_at=None,
        digest=bytes([n]) * 32,
    )


async def _fill(store: JobStore) -> None:
    await store.create_tenant(TenantRecord("lab", "", 1.0))
    await store.create_token(token(1))
    await store.create_token(token(2, Role.ADMIN, ""))


async def _check_upgraded(store: JobStore) -> None:
    for prefix, tenant in (("qrl_pref0001", "lab"), ("qrl_pref0002", "")):
        found = await store.find_token(prefix)
        assert found is not None, "a token from before the migration is still found"
        assert (found.tenant, found.user, found.user_disabled_at) == (tenant, None, None)
        assert found.digest == bytes([int(prefix[-1])]) * 32
    assert [t.user for t in await store.list_tokens()] == [None, None]
    assert await store.count_tokens(Role.ADMIN) == 1
    await store.create_user(UserRecord("lab", "alice@lab", Role.USER, 2.0))
    await store.create_token(replace(token(3), user="alice@lab"))
    found = await store.find_token("qrl_pref0003")
    assert found is not None
    assert found.user == "alice@lab"


async def test_sqlite_v7_store_migrates_to_users_keeping_its_tokens(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    store = SQLiteJobStore(path)
    await store.open()
    await _fill(store)
    await store.close()
    with sqlite3.connect(path) as conn:  # back to version 7 with those tokens
        downgrade.sqlite_to(conn, 7)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(api_tokens)")]
        assert "user_name" not in columns
    upgraded = SQLiteJobStore(path)
    await upgraded.open()
    try:
        await _check_upgraded(upgraded)
    finally:
        await upgraded.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_postgres_v7_store_migrates_to_users_keeping_its_tokens() -> None:
    async with postgres_schema() as (dsn, schema):
        store = PostgresJobStore(dsn, schema=schema)
        await store.open()
        await _fill(store)
        await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            await downgrade.postgres_to(conn, schema, 7)
            missing = await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".users')
            assert missing is None
        finally:
            await conn.close()
        upgraded = PostgresJobStore(dsn, schema=schema)
        await upgraded.open()
        try:
            await _check_upgraded(upgraded)
        finally:
            await upgraded.close()
