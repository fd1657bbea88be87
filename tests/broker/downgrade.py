"""Turn a current store back into an older schema version, jobs kept, to test upgrades.

Each step undoes one migration of `qrelay.broker.store.schema`; a new
migration adds its undo here, and every upgrade test keeps working.
"""

from __future__ import annotations

import sqlite3

import asyncpg

from qrelay.broker.store.schema import QUEUED

#: Undo of versions 8, 7, 6 and 5, newest first (SQL common to both stores).
_UNDO: dict[int, list[str]] = {
    8: [
        "DROP INDEX {s}api_tokens_user",
        "ALTER TABLE {s}api_tokens DROP COLUMN user_name",
        "DROP TABLE {s}users",
    ],
    7: ["DROP TABLE {s}job_tags", "DROP TABLE {s}deleted_jobs"],
    6: [
        "DROP INDEX {s}jobs_tenant_order",
        f"CREATE INDEX jobs_tenant_queued ON {{s}}jobs (tenant) WHERE state = {QUEUED}",
        "DROP INDEX {s}sessions_tenant",
        "ALTER TABLE {s}jobs DROP COLUMN priority",
        "ALTER TABLE {s}jobs DROP COLUMN usage_s",
        "ALTER TABLE {s}fair_share DROP COLUMN weight",
        "DROP TABLE {s}tenant_usage",
        "DELETE FROM {s}queued_counts WHERE scope = 'tb'",
    ],
    5: ["DROP TABLE {s}tenants", "DROP TABLE {s}api_tokens", "DROP TABLE {s}backend_access"],
}


def _statements(down_to: int, prefix: str) -> list[str]:
    out: list[str] = []
    for version in sorted(_UNDO, reverse=True):
        if version > down_to:
            out += [sql.replace("{s}", prefix) for sql in _UNDO[version]]
    return out


def sqlite_to(conn: sqlite3.Connection, version: int) -> None:
    """Undo the migrations above `version` (at least 4) in an open SQLite database."""
    assert version >= 4, "older undos are the upgrade tests' own"
    for sql in _statements(version, ""):
        conn.execute(sql)
    conn.execute(f"PRAGMA user_version = {version}")


async def postgres_to(conn: asyncpg.Connection, schema: str, version: int) -> None:
    """Undo the migrations above `version` (at least 4) in a PostgreSQL schema."""
    assert version >= 4, "older undos are the upgrade tests' own"
    for sql in _statements(version, f'"{schema}".'):
        await conn.execute(sql)
    await conn.execute(f'DELETE FROM "{schema}".schema_version WHERE version > $1', version)
